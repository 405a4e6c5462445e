"""ImageNet VGG-16 weights in torchvision's layout -> params of `models.VGG16`.

Pretrained weights cannot be downloaded on the machines this project runs on, so they
come from a local file holding torchvision's `vgg16` state dict:
`features.{0,2,5,7,10,12,14,17,19,21,24,26,28}.weight` `(O, I, 3, 3)` and `.bias`
`(O,)` for the 13 convs, `classifier.0.weight` `(4096, 25088)` (fc6) and
`classifier.3.weight` `(4096, 4096)` (fc7) with their biases. `classifier.6` (the
1000-way ImageNet layer) and any other extra key are ignored. Supported files:
`.safetensors`, `.npz`, and `.pth` / `.pt` when torch is installed.

To make such a file on a machine with torchvision:

    import torchvision, safetensors.torch
    model = torchvision.models.vgg16(weights="IMAGENET1K_V1")
    safetensors.torch.save_file(model.state_dict(), "vgg16.safetensors")

Conv weights are transposed to Flax's HWIO, dense weights to `(in, out)`; fc6's rows
keep torch's (C, H, W) order because `VGG16` flattens in that order.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import safetensors.numpy

from psch_jax import models
from psch_jax.errors import UserError

_CONVERT_HINT = (
    "Export torchvision's VGG-16 (no BatchNorm) state dict, e.g. "
    "safetensors.torch.save_file(torchvision.models.vgg16(weights='IMAGENET1K_V1')"
    ".state_dict(), 'vgg16.safetensors'), and pass that file.")
_SUFFIXES = (".safetensors", ".npz", ".pth", ".pt")


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


def load_vgg16_torchvision(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Loads torchvision-layout VGG-16 weights as params of `models.VGG16`.

  Args:
    path: a `.safetensors`, `.npz`, `.pth` or `.pt` file (the last two need torch)
      with torchvision's `vgg16` state dict keys; extra keys are ignored.

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
  state = _strip_data_parallel_prefix(_read_state_dict(path))
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


def save_vgg16_torchvision(params: Mapping[str, Any],
                           path: str | os.PathLike[str]) -> None:
  """Writes `models.VGG16` params as a torchvision-layout `.safetensors` or `.npz`.

  The inverse of `load_vgg16_torchvision` (no `classifier.6`, which `VGG16` lacks).

  Args:
    params: the VGG16 `'params'` collection (`{'conv1_1': ..., 'fc7': ...}`); a
      `{'params': ...}` variables dict is accepted too.
    path: output file ending in `.safetensors` or `.npz`.

  Raises:
    UserError: unsupported extension or params that are not VGG16's.
  """
  path = os.fspath(path)
  if "params" in params and "conv1_1" not in params:
    params = params["params"]
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in (".safetensors", ".npz"):
    raise UserError(
        f"cannot save VGG-16 weights to {path!r}: use a .safetensors or .npz path.")
  state = {}
  for key, (name, kind) in torchvision_key_map().items():
    if name not in params or kind not in params[name]:
      raise UserError(
          f"params have no {name}/{kind}; pass the params of models.VGG16 "
          "(or params['backbone'] of a vgg16 PSCHNet).")
    value = np.asarray(params[name][kind], np.float32)
    if kind == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[key] = np.ascontiguousarray(value)
  if suffix == ".safetensors":
    safetensors.numpy.save_file(state, path)
  else:
    np.savez(path, **state)


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
