"""ImageNet VGG-16 weights (torchvision's or timm's layout) -> params of `models.VGG16`.

Where the weights come from (`resolve_vgg16_weights`, config `model.pretrained` and
`model.pretrained_path`):

- `model.pretrained = "imagenet"`: torchvision's ImageNet VGG-16 (`IMAGENET1K_V1`,
  vgg16-397923af.pth) as the safetensors copy timm publishes on the Hugging Face Hub,
  `IMAGENET_VGG16` (repository, pinned revision, pinned sha256). `huggingface_hub`
  downloads it once into its cache (`HF_HUB_CACHE`, default
  `~/.cache/huggingface/hub`); every load checks the sha256, then the keys and shapes.
  Without network access the error names the URL to fetch elsewhere and the two places
  the copy can go (the cache path, or `model.pretrained_path`).
- `model.pretrained_path`: a local file, which wins over `model.pretrained`.
- `model.pretrained = "none"`: a randomly initialised VGG-16, said explicitly.

A weight file holds torchvision's `vgg16` state dict:
`features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight` `(O, I, 3, 3)` and `.bias`
`(O,)` for the 13 convs, `classifier.0.weight` `(4096, 25088)` (fc6) and
`classifier.3.weight` `(4096, 4096)` (fc7) with their biases; or timm's `vgg16` state
dict, the same tensors with fc6 and fc7 stored as convolutions: `pre_logits.fc1.weight`
`(4096, 512, 7, 7)`, `pre_logits.fc2.weight` `(4096, 4096, 1, 1)` (timm's
`_filter_fn` reshapes torchvision's fc6 rows, which are in (C, H, W) order, into exactly
this). `classifier.6` / `head.fc` (the 1000-way ImageNet layer) and any other extra key
are ignored. Supported files: `.safetensors`, `.npz`, and `.pth` / `.pt` when torch is
installed.

To make a torchvision-layout file on a machine with torchvision:

    import torchvision, safetensors.torch
    model = torchvision.models.vgg16(weights="IMAGENET1K_V1")
    safetensors.torch.save_file(model.state_dict(), "vgg16.safetensors")

Conv weights are transposed to Flax's HWIO, dense weights to `(in, out)`; fc6's rows
keep torch's (C, H, W) order because `VGG16` flattens in that order.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
import safetensors.numpy

from psch_jax import io_utils
from psch_jax import models
from psch_jax.errors import UserError

_CONVERT_HINT = (
    "Export torchvision's VGG-16 (no BatchNorm) state dict, e.g. "
    "safetensors.torch.save_file(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vgg16.safetensors'), and pass that file.")
_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")


@dataclasses.dataclass(frozen=True)
class HubFile:
  """One file of a Hugging Face Hub repository, pinned by commit and content hash."""
  repo_id: str
  filename: str
  revision: str  # a 40-hex commit hash, so a moved branch cannot change the file
  sha256: str    # of the whole file, hex


# timm's copy of torchvision's vgg16-397923af.pth (the conv tensors are bitwise
# torchvision's; fc6/fc7 reshaped to convs, see the module docstring), 553 MB.
# The revision and sha256 are those recorded by two independent public projects
# that pin this file; they were not re-measured here (no network on this machine).
IMAGENET_VGG16 = HubFile(
    repo_id="timm/vgg16.tv_in1k",
    filename="model.safetensors",
    revision="b8d8aa2dd860af9233c8c67385a8097fd6c35d3f",
    sha256="57b026918159a6bf9faf8405c3a551903768e7138989d9c6224a14227203fad8")

# timm key prefix -> torchvision key prefix; features.* are the same in both.
_TIMM_TO_TORCHVISION = {"pre_logits.fc1.": "classifier.0.",
                        "pre_logits.fc2.": "classifier.3.",
                        "head.fc.": "classifier.6."}


def torchvision_key_map() -> dict[str, tuple[str, str]]:
  """Maps each needed torchvision key to `(our layer name, 'kernel' | 'bias')`.

  `features.{i}` for the conv layers in order (index i counts torchvision's
  Sequential, where every conv is followed by a ReLU and "M" is one max-pool),
  `classifier.0` -> `fc6`, `classifier.3` -> `fc7`.
  """
  key_map = {}
  conv_names = iter(models.vgg16_conv_names())
  index = 0
  for entry in models.VGG16_CONFIG_D:
    if entry == "M":
      index += 1
    else:
      name = next(conv_names)
      key_map[f"features.{index}.weight"] = (name, "kernel")
      key_map[f"features.{index}.bias"] = (name, "bias")
      index += 2
  for torch_index, name in ((0, "fc6"), (3, "fc7")):
    key_map[f"classifier.{torch_index}.weight"] = (name, "kernel")
    key_map[f"classifier.{torch_index}.bias"] = (name, "bias")
  return key_map


def torchvision_shapes() -> dict[str, tuple[int, ...]]:
  """Expected shape of each needed torchvision key, in torch layout (`(O, I, 3, 3)`)."""
  shapes = {}
  in_channels = 3
  key_map = torchvision_key_map()
  conv_keys = [k for k in key_map if k.startswith("features.")]
  out_channels = [int(e) for e in models.VGG16_CONFIG_D if e != "M"]
  for weight_key, bias_key, out in zip(conv_keys[::2], conv_keys[1::2],
                                       out_channels):
    shapes[weight_key] = (out, in_channels, 3, 3)
    shapes[bias_key] = (out,)
    in_channels = out
  fc6_in = in_channels * models.VGG16_POOLED_SIZE ** 2
  fc = models.VGG16_FC_DIM
  shapes["classifier.0.weight"] = (fc, fc6_in)
  shapes["classifier.0.bias"] = (fc,)
  shapes["classifier.3.weight"] = (fc, fc)
  shapes["classifier.3.bias"] = (fc,)
  return shapes


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads every array of a weight file as numpy, by file extension."""
  if not os.path.isfile(path):
    raise UserError(
        f"VGG-16 weight file {path!r} does not exist. {_CONVERT_HINT}")
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in _SUFFIXES:
    raise UserError(
        f"VGG-16 weight file {path!r} has unsupported extension {suffix!r}; use one "
        f"of {list(_SUFFIXES)}. {_CONVERT_HINT}")
  try:
    if suffix == ".safetensors":
      return dict(safetensors.numpy.load_file(path))
    if suffix == ".npz":
      with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
  except Exception as error:  # Parsers raise their own types for corrupt files.
    raise UserError(
        f"cannot read VGG-16 weight file {path!r} ({error}). {_CONVERT_HINT}"
    ) from error
  return _read_torch_state_dict(path)


def _read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as error:
    raise UserError(
        f"reading {path!r} needs torch, which is not installed; install torch or "
        "convert the file to .safetensors (safetensors.torch.save_file) or .npz."
    ) from error
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as error:  # torch raises many types for bad or unsafe files.
    raise UserError(
        f"cannot read {path!r} with torch.load(weights_only=True) ({error}). "
        f"{_CONVERT_HINT}") from error
  if isinstance(state, Mapping) and "state_dict" in state:
    state = state["state_dict"]
  if not isinstance(state, Mapping):
    raise UserError(
        f"{path!r} holds a {type(state).__name__}, not a state dict. {_CONVERT_HINT}")
  return {key: value.detach().to(torch.float32).numpy()
          for key, value in state.items() if isinstance(value, torch.Tensor)}


def _strip_data_parallel_prefix(
    state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # torch.nn.DataParallel checkpoints prefix every key with "module.".
  if state and all(key.startswith("module.") for key in state):
    return {key[len("module."):]: value for key, value in state.items()}
  return state


def timm_to_torchvision(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Renames timm's VGG-16 keys to torchvision's, fc6 / fc7 reshaped to dense.

  `pre_logits.fc1.weight` `(4096, 512, 7, 7)` -> `classifier.0.weight` `(4096,
  25088)` (a reshape: torchvision flattens the pooled map in (C, H, W) order, which is
  the conv kernel's (I, kh, kw) order), `pre_logits.fc2.weight` `(4096, 4096, 1, 1)` ->
  `classifier.3.weight` `(4096, 4096)`, biases renamed, `head.fc` -> `classifier.6`.
  Other keys (`features.*`) pass unchanged; a state without timm keys is returned as
  is. A weight that is not 4-D is left for the shape check to report.
  """
  converted = {}
  for key, value in state.items():
    for timm_prefix, torchvision_prefix in _TIMM_TO_TORCHVISION.items():
      if key.startswith(timm_prefix):
        key = torchvision_prefix + key[len(timm_prefix):]
        if key.endswith(".weight") and value.ndim == 4 and timm_prefix != "head.fc.":
          value = value.reshape(value.shape[0], -1)
        break
    converted[key] = value
  return converted


def load_vgg16_torchvision(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Loads torchvision- or timm-layout VGG-16 weights as params of `models.VGG16`.

  Args:
    path: a `.safetensors`, `.npz`, `.pth` or `.pt` file (the last two need torch)
      with torchvision's or timm's `vgg16` state dict keys (module docstring); extra
      keys are ignored.

  Returns:
    `{'conv1_1': {'kernel': float32 (3, 3, 3, 64), 'bias': (64,)}, ..., 'conv5_3':
    ..., 'fc6': {'kernel': (25088, 4096), 'bias': (4096,)}, 'fc7': {'kernel': (4096,
    4096), 'bias': (4096,)}}` as numpy arrays: the `'params'` collection of
    `models.VGG16`, or `params['backbone']` of a vgg16 `PSCHNet` (see
    `replace_backbone_params`).

  Raises:
    UserError: missing file, unsupported extension, unreadable file, missing keys
      or wrong shapes; the message lists each offending key with its expected shape.
  """
  path = os.fspath(path)
  file_state = _strip_data_parallel_prefix(_read_state_dict(path))
  state = timm_to_torchvision(file_state)
  expected = torchvision_shapes()
  missing = [key for key in expected if key not in state]
  mismatched = [key for key in expected
                if key in state and tuple(state[key].shape) != expected[key]]
  if missing or mismatched:
    lines = [f"VGG-16 weight file {path!r} does not match torchvision's vgg16 layout:"]
    lines += [f"  missing {key}: expected shape {expected[key]}" for key in missing]
    lines += [f"  wrong shape {key}: got {tuple(state[key].shape)}, expected "
              f"{expected[key]}" for key in mismatched]
    if any("running_mean" in key for key in state):
      lines.append("  (the file looks like vgg16_bn; only plain vgg16 is supported)")
    if any(key.startswith("pre_logits.") for key in file_state):
      lines.append("  (the file has timm's layout, read as torchvision's: classifier.0 "
                   "and classifier.3 are its pre_logits.fc1 and pre_logits.fc2)")
    lines.append(_CONVERT_HINT)
    raise UserError("\n".join(lines))
  params: dict[str, dict[str, np.ndarray]] = {}
  for key, (name, kind) in torchvision_key_map().items():
    value = np.asarray(state[key], np.float32)
    if kind == "kernel":
      # torch conv (O, I, kh, kw) -> Flax HWIO; torch Linear (out, in) -> (in, out).
      # Views, not copies: device_put makes the contiguous copy anyway.
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    params.setdefault(name, {})[kind] = value
  return params


def hub_cache_path(hub_file: HubFile, cache_dir: Optional[str] = None) -> str:
  """Where `huggingface_hub` keeps `hub_file` once downloaded, and where a copy made by
  hand is found without network access: `<cache>/models--<owner>--<name>/snapshots/
  <revision>/<filename>`, `<cache>` being `cache_dir` or `HF_HUB_CACHE`."""
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  cache_dir = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
  return os.path.join(cache_dir, "models--" + hub_file.repo_id.replace("/", "--"),
                      "snapshots", hub_file.revision, *hub_file.filename.split("/"))


def hub_url(hub_file: HubFile, endpoint: Optional[str] = None) -> str:
  """The download URL of `hub_file` (`endpoint` or `HF_ENDPOINT`, default the Hub)."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  return huggingface_hub.hf_hub_url(hub_file.repo_id, hub_file.filename,
                                    revision=hub_file.revision, endpoint=endpoint)


def fetch_hub_file(hub_file: HubFile, *, cache_dir: Optional[str] = None,
                   endpoint: Optional[str] = None) -> str:
  """Downloads `hub_file` into the Hugging Face cache once; returns its checked path.

  A file already in the cache at `hub_cache_path` is used without any network access
  (the revision is a commit hash, so `huggingface_hub` looks no further). Every call
  checks the sha256 of the cached bytes against `hub_file.sha256`.

  Args:
    hub_file: repository, file, commit and sha256 (e.g. `IMAGENET_VGG16`).
    cache_dir: the cache folder; None takes `HF_HUB_CACHE` (`~/.cache/huggingface/hub`).
    endpoint: the Hub's URL; None takes `HF_ENDPOINT` (default huggingface.co).

  Returns:
    The local path of the verified file.

  Raises:
    UserError: no network (or the Hub unreachable, or `HF_HUB_OFFLINE=1`) and no
      cached copy: the message names the URL, the cache path to copy it to and
      `model.pretrained_path`; the Hub refusing the file; an unwritable cache; a
      sha256 that differs from the pinned one.
  """
  import huggingface_hub  # pylint: disable=g-import-not-at-top  (only when needed)
  from huggingface_hub import errors as hub_errors  # pylint: disable=g-import-not-at-top
  url = hub_url(hub_file, endpoint)
  cache_path = hub_cache_path(hub_file, cache_dir)
  how_to_copy = (
      f"On a machine with network access download {url} (sha256 {hub_file.sha256}) "
      f"and either copy it to {cache_path} (the cache this run reads; the folder "
      "comes from HF_HUB_CACHE) or pass --config.model.pretrained_path=/path/to/"
      f"{os.path.basename(hub_file.filename)}. To train a randomly initialised VGG-16 "
      "instead, set --config.model.pretrained=none.")
  try:
    path = huggingface_hub.hf_hub_download(
        hub_file.repo_id, hub_file.filename, revision=hub_file.revision,
        cache_dir=cache_dir, endpoint=endpoint)
  except hub_errors.LocalEntryNotFoundError as error:
    # Raised for no network, HF_HUB_OFFLINE=1, a Hub that is down or a response
    # without the Hub's headers, once no cached copy was found.
    raise UserError(
        f"cannot download the ImageNet VGG-16 weights ({hub_file.repo_id}/"
        f"{hub_file.filename}): no network access to the Hub and no cached copy "
        f"({_error_chain(error)}).\n{how_to_copy}") from error
  except hub_errors.HfHubHTTPError as error:
    raise UserError(
        f"the Hub refused {url} ({_error_chain(error)}).\n{how_to_copy}") from error
  except OSError as error:  # e.g. a read-only or full cache folder.
    raise UserError(
        f"cannot write the downloaded VGG-16 weights into the Hugging Face cache "
        f"({error}); point HF_HUB_CACHE at a writable folder.\n{how_to_copy}"
    ) from error
  actual = io_utils.file_digest(path)
  if actual != hub_file.sha256:
    raise UserError(
        f"the VGG-16 weight file {path} has sha256 {actual}, not the pinned "
        f"{hub_file.sha256} of {url}: the copy is damaged or not that file. Delete it "
        f"and the bytes it links to ({os.path.realpath(path)}) and run again to "
        f"download it anew.\n{how_to_copy}")
  return path


def _error_chain(error: BaseException) -> str:
  """`error`'s message and its causes', innermost last (the library's top message
  alone often hides that the connection was refused)."""
  parts = []
  while error is not None and len(parts) < 4:
    parts.append(f"{type(error).__name__}: {error}".strip())
    error = error.__cause__ or error.__context__
  return "; caused by ".join(parts)


def resolve_vgg16_weights(pretrained: Optional[str], pretrained_path: Optional[str],
                          *, cache_dir: Optional[str] = None,
                          endpoint: Optional[str] = None,
                          hub_file: HubFile = IMAGENET_VGG16
                          ) -> Optional[dict[str, Any]]:
  """The VGG-16 backbone params a run starts from, or None for a random VGG-16.

  Called before the work directory is touched, so a download that cannot happen stops
  the run before anything is written.

  Args:
    pretrained: config `model.pretrained`: "imagenet" (download `hub_file` once,
      verify, load) or "none" (random initialisation, said explicitly).
    pretrained_path: config `model.pretrained_path`; when set, that local file is
      loaded (torchvision or timm layout) and `pretrained` is not used.
    cache_dir, endpoint: see `fetch_hub_file`.
    hub_file: the weights "imagenet" stands for; tests point it at a generated file.

  Returns:
    The params of `load_vgg16_torchvision`, or None for "none".

  Raises:
    UserError: `pretrained` is neither choice, or any error of `fetch_hub_file` and
      `load_vgg16_torchvision`.
  """
  if pretrained_path:
    return load_vgg16_torchvision(pretrained_path)
  if pretrained == "imagenet":
    return load_vgg16_torchvision(
        fetch_hub_file(hub_file, cache_dir=cache_dir, endpoint=endpoint))
  if pretrained == "none":
    logging.info("VGG-16 starts from random weights (model.pretrained='none').")
    return None
  raise UserError(
      f"config.model.pretrained={pretrained!r}: VGG-16 needs "
      f"--config.model.pretrained set to 'imagenet' (torchvision's ImageNet weights, "
      "downloaded once) or 'none' (random initialisation), or "
      "--config.model.pretrained_path set to a weight file.")


def replace_backbone_params(params: Mapping[str, Any],
                            backbone_params: Mapping[str, Any]) -> dict[str, Any]:
  """Returns `params` with `params['backbone']` replaced, after checking every shape.

  Args:
    params: `PSCHNet` params `{'backbone': ..., 'hash_head': ..., 'classifier':
      ...}` (or a `{'params': ...}` variables dict, returned in the same form).
    backbone_params: the new backbone params, e.g. from `load_vgg16_torchvision`;
      must have exactly the paths and shapes of `params['backbone']`.

  Returns:
    A new dict; the other entries are shared with `params`, the new backbone leaves
    are cast to the dtype of the leaves they replace.

  Raises:
    UserError: `params` has no backbone, or paths / shapes differ (each listed).
  """
  if "params" in params and "backbone" not in params:
    return {**params,
            "params": replace_backbone_params(params["params"], backbone_params)}
  if "backbone" not in params:
    raise UserError(
        f"params have no 'backbone' entry (top-level keys {sorted(params)}); pass "
        "the params of a PSCHNet.")
  old = {jax.tree_util.keystr(path): leaf for path, leaf in
         jax.tree_util.tree_leaves_with_path(params["backbone"])}
  new = {jax.tree_util.keystr(path): leaf for path, leaf in
         jax.tree_util.tree_leaves_with_path(backbone_params)}
  problems = [f"  missing {key}: expected shape {tuple(np.shape(old[key]))}"
              for key in old if key not in new]
  problems += [f"  unexpected {key} (shape {tuple(np.shape(new[key]))})"
               for key in new if key not in old]
  problems += [f"  wrong shape {key}: got {tuple(np.shape(new[key]))}, expected "
               f"{tuple(np.shape(old[key]))}"
               for key in old if key in new
               and tuple(np.shape(new[key])) != tuple(np.shape(old[key]))]
  if problems:
    raise UserError(
        "backbone params do not fit the model's backbone:\n" + "\n".join(problems)
        + "\nBuild the model with the backbone the weights belong to (VGG-16 "
        "weights need backbone 'vgg16' and 3-channel images).")
  # Rebuilt from the model's own tree, so dict vs FrozenDict containers never clash.
  leaves = [_as_dtype(new[key], old[key].dtype) for key in old]
  backbone = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(params["backbone"]), leaves)
  return {**params, "backbone": backbone}


def _as_dtype(value: Any, dtype: Any) -> Any:
  if isinstance(value, np.ndarray) or np.isscalar(value):
    return np.asarray(value, dtype)
  return value.astype(dtype)
