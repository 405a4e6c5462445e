"""The declared schema of every config field, and the one check of a whole config.

`config.base_config()` says what each field is for and its default; `FIELDS` here says
what values it may take: its type, its range, its enumerated choices, whether it may
be None. The checks come in two steps, both before anything is written:

- `check_config(config, num_devices=...)`: every field against its declaration, then
  the combinations knowable before any data is read (mean/std against the channels,
  the batch sizes against the device count, the split fields the preset allows, ...).
  Call it at the edge, right after the config is loaded and the overrides applied.
- `check_against_data(config, num_train=..., num_database=..., ...)`: the
  combinations that depend on the split sizes (the batch, the clusters, the spectral
  graph, the retrieval cut-offs). Call it once the splits are drawn, before training
  writes a checkpoint.

Every message names the field as the user sets it (`config.train.keep_checkpoints=0`),
says why the value cannot work and how to fix it. All problems of one step are
reported together, one per line, so a user fixes them in one go.

The schema is a small table of our own rather than a pydantic model: ml_collections
already types each field (an override of the wrong type fails at flag parsing), so
what is left is ranges, choices and cross-field rules, which a table states in one
line per field with the messages this project needs (docs/design.md, "Config checks").
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Optional

import ml_collections

from psch_jax import config as psch_config
from psch_jax.data import sources
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Field:
  """What values one config field may take.

  Attributes:
    kind: int, float, str, bool or tuple. A float field takes ints too; an int field
      never takes a bool.
    nullable: None is allowed (the field is a `config_dict.placeholder`).
    choices: the allowed values, for an enumerated field.
    low, high: the range bounds (None = unbounded); `low_open` / `high_open` exclude
      the bound itself.
    item: for a tuple field, the kind of each entry (int or float); entries are then
      checked against low/high.
    meaning: what the field is, said after the requirement ("the code length").
    example: a valid value, as typed on the command line (tuple fields).
  """
  kind: type
  nullable: bool = False
  choices: Optional[tuple] = None
  low: Optional[float] = None
  high: Optional[float] = None
  low_open: bool = False
  high_open: bool = False
  item: Optional[type] = None
  meaning: str = ""
  example: str = ""


def _int(low=None, high=None, *, nullable=False, meaning=""):
  return Field(int, nullable=nullable, low=low, high=high, meaning=meaning)


def _float(low=None, high=None, *, low_open=False, high_open=False, nullable=False,
           meaning=""):
  return Field(float, nullable=nullable, low=low, high=high, low_open=low_open,
               high_open=high_open, meaning=meaning)


def _choice(choices, meaning=""):
  return Field(str, choices=tuple(choices), meaning=meaning)


_PATH = Field(str, nullable=True, meaning="a directory or file path, or unset")
_BOOL = Field(bool)

# Every field of `config.base_config()`, by its dotted name. A test checks that the
# two name the same fields.
FIELDS: dict[str, Field] = {
    "seed": _int(0, 2**32 - 1, meaning="the seed every random draw derives from"),

    "method.name": _choice(psch_config.METHODS, meaning="the method trained"),
    "method.ssdh.features": _choice(psch_config.PEER_FEATURES),
    "method.ssdh.left_stds": _float(0.0, meaning=(
        "how many left standard deviations below the mode of the cosine distances a "
        "pair must be to count as similar")),
    "method.ssdh.right_stds": _float(0.0, meaning=(
        "how many right standard deviations above the mode a pair must be to count "
        "as dissimilar")),
    "method.ssdh.fit_rows": _int(2, meaning=(
        "the training images whose pairwise distances fit SSDH's thresholds")),
    "method.greedyhash.features": _choice(psch_config.PEER_FEATURES),
    "method.greedyhash.cubic_weight": _float(0.0, meaning=(
        "the weight of GreedyHash's | |h| - 1 |^3 penalty")),
    "method.bihalf.features": _choice(psch_config.PEER_FEATURES),
    "method.bihalf.gamma": _float(0.0, meaning=(
        "gamma of the bi-half layer's gradient (U - B) term")),
    "method.cibhash.temperature": _float(0.0, low_open=True, meaning=(
        "the NT-Xent temperature")),
    "method.cibhash.kl_weight": _float(0.0, meaning="the weight of the KL term"),
    "method.cibhash.stochastic": _BOOL,
    "method.cibhash.augment": _choice(psch_config.AUGMENTATIONS),
    "data.name": _choice(sources.DATASETS),
    "data.data_dir": _PATH,
    "data.manual_dir": _PATH,
    "data.preset": _choice(psch_config.PRESETS),
    "data.query_per_class": _int(1, nullable=True, meaning=(
        "the query images per class (unset: the preset's)")),
    "data.train_per_class": _int(1, nullable=True, meaning=(
        "the training images per class (unset: the preset's)")),
    "data.num_validation": _int(0, nullable=True, meaning=(
        "the validation images (0: no validation; unset: as many as the query)")),
    "data.num_database": _int(1, nullable=True, meaning=(
        "the size of a database subset for smoke runs (unset: the preset's)")),
    "data.allow_fewer": _BOOL,
    "data.augment": _choice(psch_config.AUGMENTATIONS),
    "data.mean": Field(tuple, item=float, example="(0.5,)", meaning=(
        "the per-channel mean in [0, 1] pixel units")),
    "data.std": Field(tuple, item=float, low=0.0, low_open=True, example="(0.5,)",
                      meaning=("the per-channel standard deviation in [0, 1] pixel "
                               "units, which the input is divided by")),

    "model.backbone": _choice(psch_config.BACKBONES),
    "model.num_bits": Field(int, low=1, meaning=(
        "a positive code length (the paper uses 16, 32, 64 or 128)")),
    "model.image_size": _int(1, meaning="the side of the network input in pixels"),
    "model.channels": Field(int, choices=(1, 3)),
    "model.pretrained": Field(str, nullable=True, choices=psch_config.PRETRAINED,
                              meaning="VGG-16's starting weights (unset for the small CNN)"),
    "model.pretrained_path": _PATH,
    "model.dropout_rate": _float(0.0, 1.0, high_open=True, meaning=(
        "the fraction of VGG-16 classifier units dropped (1 would drop all)")),
    "model.compute_dtype": _choice(psch_config.COMPUTE_DTYPES, meaning=(
        "what the backbone's and hash head's convolutions and matmuls compute in "
        "(params stay float32): bfloat16 on GPUs and TPUs, float32 on CPUs")),

    "pseudo_labels.num_clusters": _int(2, meaning="K_c, the number of pseudo classes"),
    "pseudo_labels.keep_quantile": _float(0.0, 1.0, low_open=True, meaning=(
        "the fraction of images kept per cluster (Eq. 2); 1.0 keeps every image "
        "(no threshold)")),
    "pseudo_labels.absolute_threshold": _float(0.0, nullable=True, meaning=(
        "a distance to the centroid, or unset")),
    "pseudo_labels.features": _choice(psch_config.FEATURE_SOURCES),
    "pseudo_labels.refresh_every_epochs": _int(0, meaning=(
        "the epochs between pseudo-label refreshes (0 = once, before training)")),
    "pseudo_labels.spectral_neighbors": _int(1, meaning=(
        "k of the pixels' k-NN graph (Eq. 1a)")),
    "pseudo_labels.spectral_components": _int(1, nullable=True, meaning=(
        "the spectral embedding size d of Eq. 1a (unset = num_clusters)")),
    "pseudo_labels.fine_clusters": _int(2, nullable=True, meaning=(
        "K_f of Eq. 2b, the finer clustering (unset = one level)")),
    "pseudo_labels.n_init": _int(1, meaning="the number of k-means restarts"),
    "pseudo_labels.max_iter": _int(0, meaning="the Lloyd iterations per restart"),
    "pseudo_labels.tol": _float(0.0, meaning="the k-means convergence tolerance"),

    "attention.num_parts": _int(1, meaning="P, the attention parts (1 = single part)"),
    "attention.temperature": _float(0.0, low_open=True, meaning="T of Eq. 3"),
    "attention.uniform": _BOOL,

    "similarity.source": _choice(psch_config.SIMILARITY_SOURCES),
    "similarity.hard": _BOOL,
    "similarity.same_class_floor": _float(0.0, 1.0, meaning="lambda of Eq. 7"),
    "similarity.unlabelled_weight": _float(0.0, meaning="mu of Eq. 7 (0 masks)"),
    "similarity.cross_cluster_ceiling": _float(-1.0, nullable=True, meaning=(
        "c of Eq. 7b (unset keeps the paper's -1)")),
    "similarity.sibling_target": _float(-1.0, 1.0, meaning=(
        "t of Eq. 7c, the target of one pseudo class's pairs in two fine clusters")),

    "loss.alpha": _float(0.0, meaning="the L_cls weight (0 = ablation)"),
    "loss.beta": _float(0.0, meaning="the L_q weight (0 = ablation)"),
    "loss.fine_alpha": _float(0.0, meaning=(
        "alpha_f of Eq. 11b, the weight of the fine clusters' L_cls^f")),

    "optim.name": _choice(psch_config.OPTIMIZERS),
    "optim.learning_rate": _float(0.0, low_open=True, meaning="the peak learning rate"),
    "optim.backbone_lr_multiplier": _float(0.0, meaning=(
        "the backbone's learning-rate factor (0.1 for a pretrained backbone, 0 "
        "freezes it)")),
    "optim.momentum": _float(0.0, 1.0, high_open=True, meaning="SGD's momentum"),
    "optim.weight_decay": _float(0.0, meaning="the decoupled weight decay (0 = none)"),
    "optim.warmup_epochs": _int(0, meaning="the epochs of linear warmup (0 = none)"),
    "optim.grad_clip_norm": _float(0.0, low_open=True, meaning=(
        "the global gradient norm clipped to")),

    "train.global_batch_size": _int(2, meaning=(
        "the images per step over all devices (the pairwise loss needs two)")),
    "train.num_epochs": _int(1, meaning="the epochs of training"),
    "train.checkpoint_every_steps": _int(1, meaning=(
        "the steps between checkpoints (every epoch end saves one too)")),
    "train.log_every_steps": _int(1, meaning=(
        "the steps between reads of the training metrics from the device (also at "
        "every epoch end and before every checkpoint)")),
    "train.keep_checkpoints": _int(1, meaning=(
        "the number of checkpoints kept: with none, a killed run cannot resume")),
    "train.tensorboard": _BOOL,
    "train.deterministic": Field(bool, meaning=(
        "on a GPU, XLA's deterministic ops: bitwise-equal reruns of one seed, slower "
        "scatter-adds and convolution gradients (docs/reliability.md)")),

    "eval.topk": Field(tuple, item=int, low=1, example="(1000,)",
                       meaning="the cut-offs K of mAP@K"),
    "eval.batch_size": _int(1, meaning="the images per encoding step over all devices"),
    "eval.validation_every_epochs": _int(0, meaning=(
        "the epochs between validations (0 = only after training)")),
}


# --------------------------------------------------------------------- messages

def _range_text(field: Field) -> str:
  parts = []
  if field.low is not None and field.high is not None:
    left = "(" if field.low_open else "["
    right = ")" if field.high_open else "]"
    return f"in {left}{_number(field.low)}, {_number(field.high)}{right}"
  if field.low is not None:
    parts.append(f"{'>' if field.low_open else '>='} {_number(field.low)}")
  if field.high is not None:
    parts.append(f"{'<' if field.high_open else '<='} {_number(field.high)}")
  return " and ".join(parts)


def _number(value: float) -> str:
  if float(value).is_integer() and abs(value) < 1e15:
    return str(int(value))
  return str(value)


def _kind_text(kind: type) -> str:
  return {int: "an integer", float: "a number", str: "a string", bool: "True or False",
          tuple: "a tuple"}[kind]


def _is_kind(value: Any, kind: type) -> bool:
  if kind is bool:
    return isinstance(value, bool)
  if kind is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if kind is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if kind is tuple:
    return isinstance(value, (tuple, list))
  return isinstance(value, kind)


def _in_range(value: float, field: Field) -> bool:
  if field.low is not None and (value < field.low or
                                (field.low_open and value == field.low)):
    return False
  if field.high is not None and (value > field.high or
                                 (field.high_open and value == field.high)):
    return False
  return True


def field_problem(name: str, value: Any) -> Optional[str]:
  """The message for `value` in field `name` against its declaration, or None.

  Args:
    name: a key of `FIELDS`, e.g. "train.keep_checkpoints".
    value: the field's value.
  """
  field = FIELDS[name]
  shown = f"config.{name}={value!r}"
  meaning = f"; it is {field.meaning}" if field.meaning else ""
  if value is None:
    if field.nullable:
      return None
    return f"{shown} must be set{meaning}. Set --config.{name} to a value."
  if field.choices is not None:
    if value in field.choices and _is_kind(value, field.kind):
      return None
    if field.kind is str:
      # The wording tests and docs quote.
      return (f"{shown} is not one of {list(field.choices)}; "
              f"set --config.{name} to one of them.")
    return (f"{shown} must be {' or '.join(map(str, field.choices))}; "
            f"set --config.{name} to one of them.")
  if not _is_kind(value, field.kind):
    kind = _kind_text(field.kind)
    return f"{shown} must be {kind}{meaning}. Set --config.{name} to {kind}."
  if field.kind is tuple:
    return _tuple_problem(name, value, field)
  if field.kind in (int, float):
    if not math.isfinite(value):
      return f"{shown} must be a finite number{meaning}. Set --config.{name} to one."
    if not _in_range(value, field):
      requirement = _range_text(field)
      if name == "model.num_bits":  # The wording tests and docs quote.
        return f"{shown} must be {field.meaning}."
      return (f"{shown} must be {requirement}{meaning}. "
              f"Set --config.{name} to a value {requirement}.")
  return None


def _tuple_problem(name: str, value, field: Field) -> Optional[str]:
  shown = f"config.{name}={tuple(value)!r}"
  meaning = f"; it is {field.meaning}" if field.meaning else ""
  fix = (f"Set --config.{name}='{field.example}' (a tuple: in quotes, entries "
         "separated by commas).")
  if not value:
    return f"{shown} is empty{meaning}. {fix}"
  for entry in value:
    if not _is_kind(entry, field.item):
      return (f"{shown} holds {entry!r}, which is not {_kind_text(field.item)}"
              f"{meaning}. {fix}")
    if not math.isfinite(entry):
      return f"{shown} holds {entry!r}, which is not finite{meaning}. {fix}"
    if not _in_range(entry, field):
      return (f"{shown} holds {entry!r}, but every entry must be "
              f"{_range_text(field)}{meaning}. {fix}")
  return None


def other_methods_fields(method: str) -> tuple[str, ...]:
  """The prefixes of the config fields a run of `method` never reads: the sections
  of the other deep peers (`method.<peer>.`). A run is compared with its saved config
  without them, so choosing another default for one peer leaves the runs of every
  other method valid."""
  return tuple(f"method.{name}." for name in psch_config.METHODS
               if name not in ("psch", method))


def flatten(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The config's fields by dotted name, e.g. {"train.num_epochs": 30, ...}.

  Takes a ConfigDict or the plain dict of `config.to_dict()` (a saved config.json).
  """
  flat = {}
  for key, value in config.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      for sub_key, sub_value in flatten(value).items():
        flat[f"{key}.{sub_key}"] = sub_value
    else:
      flat[key] = value
  return flat


def _raise(problems: list[str]) -> None:
  if len(problems) == 1:
    raise UserError(problems[0])
  if problems:
    raise UserError(f"the config has {len(problems)} problems:\n  "
                    + "\n  ".join(problems))


# ---------------------------------------------------------------- entry points

def check_config(config: ml_collections.ConfigDict, *,
                 num_devices: Optional[int]) -> None:
  """Checks everything about `config` that is knowable before any data is read.

  Every field against `FIELDS`; no field outside it; then the combinations: the
  normalisation statistics against the channels, the batch sizes against the device
  count, the split fields against the preset, the similarity ceiling against the
  floor, the warmup against the schedule, pretrained weights against the backbone.

  Args:
    config: the full config (`config.base_config()` with a dataset's changes and
      the command line's overrides).
    num_devices: the devices of this run (all hosts); the global batches are split
      evenly over them. None skips that one rule: the command lines check the config
      before the devices exist (a multi-process run starts its backend after the
      flags), and `run_setup.setup_run` checks again with the mesh.

  Raises:
    UserError: naming each field in error, why, and the fix (all problems at once).
  """
  flat = flatten(config)
  problems = []
  for name in flat:
    if name not in FIELDS:
      close = difflib.get_close_matches(name, FIELDS, n=1)
      hint = f" Did you mean config.{close[0]}?" if close else ""
      problems.append(f"config.{name} is not a field of the config.{hint} The fields "
                      "are those of psch_jax/config.py's base_config; remove or rename "
                      "it in the config file.")
  for name in FIELDS:
    if name not in flat:
      problems.append(f"config.{name} is missing: a config file must start from "
                      "psch_jax.config.base_config() and change fields, not remove "
                      "them.")
      continue
    problem = field_problem(name, flat[name])
    if problem:
      problems.append(problem)
  _raise(problems)
  _raise(_combination_problems(config, num_devices=num_devices))


def _combination_problems(c: ml_collections.ConfigDict, *,
                          num_devices: Optional[int]) -> list[str]:
  problems = []
  if (len(c.data.mean) != len(c.data.std)
      or len(c.data.mean) not in (1, c.model.channels)):
    # The first sentence is the one tests quote.
    problems.append(
        "config.data.mean and config.data.std must have 1 or "
        f"model.channels={c.model.channels} entries each; they have "
        f"{len(c.data.mean)} and {len(c.data.std)}. Set e.g. "
        f"--config.data.mean='{(0.5,) * c.model.channels}'.")
  batch = c.train.global_batch_size
  if num_devices and batch % num_devices:
    problems.append(
        f"config.train.global_batch_size={batch} must be >= 2 and divisible by the "
        f"{num_devices} devices of this run; use a multiple of {num_devices}.")
  if num_devices and c.eval.batch_size % num_devices:
    problems.append(
        f"config.eval.batch_size={c.eval.batch_size} must be divisible by the "
        f"{num_devices} devices of this run; use a multiple of {num_devices}.")
  if c.method.name in ("greedyhash", "bihalf") and batch % 2:
    problems.append(
        f"config.train.global_batch_size={batch} must be even for "
        f"method.name={c.method.name!r}: its loss pairs the first half of a batch with "
        "the second; use an even batch size.")
  ceiling, floor = c.similarity.cross_cluster_ceiling, c.similarity.same_class_floor
  if ceiling is not None and not ceiling < floor:
    problems.append(
        f"config.similarity.cross_cluster_ceiling={ceiling} must lie in [-1, "
        f"same_class_floor={floor}) so same-class pairs stay above cross-cluster "
        "pairs; unset it to keep the paper's -1.")
  fine, sibling = c.pseudo_labels.fine_clusters, c.similarity.sibling_target
  if fine is not None:
    if not fine > c.pseudo_labels.num_clusters:
      problems.append(
          f"config.pseudo_labels.fine_clusters={fine} must be more than "
          f"pseudo_labels.num_clusters={c.pseudo_labels.num_clusters} (it splits the "
          "pseudo classes finer); raise it or unset it.")
    low = -1.0 if ceiling is None else ceiling
    if not low < sibling < floor:
      problems.append(
          f"config.similarity.sibling_target={sibling} must lie between the "
          f"cross-cluster targets (at most {low}) and same_class_floor={floor}, so "
          "pairs of one fine cluster stay above pairs of one pseudo class, and those "
          "above pairs of two; set it in between.")
  if c.optim.warmup_epochs > c.train.num_epochs:
    problems.append(
        f"config.optim.warmup_epochs={c.optim.warmup_epochs} is longer than "
        f"train.num_epochs={c.train.num_epochs}: the learning rate would never reach "
        f"its peak; set --config.optim.warmup_epochs to at most {c.train.num_epochs}.")
  for name in ("pseudo_labels.refresh_every_epochs", "eval.validation_every_epochs"):
    section, field = name.split(".")
    every = c[section][field]
    if every > c.train.num_epochs:
      problems.append(
          f"config.{name}={every} is more than train.num_epochs={c.train.num_epochs}, "
          f"so it would never happen; set --config.{name}=0 (never during training) "
          f"or at most {c.train.num_epochs}.")
  if c.model.pretrained_path and c.model.backbone != "vgg16":
    # The wording of run_setup.check_model, which tests quote.
    problems.append(
        f"config.model.pretrained_path is set but the backbone is "
        f"{c.model.backbone!r}; pretrained weights exist for 'vgg16' only. "
        "Set --config.model.backbone=vgg16 or drop the path.")
  if c.model.pretrained == "imagenet" and c.model.backbone != "vgg16":
    # The wording tests quote.
    problems.append(
        f"config.model.pretrained='imagenet' but the backbone is {c.model.backbone!r}; "
        "ImageNet weights exist for 'vgg16' only. Set --config.model.backbone=vgg16 "
        "or --config.model.pretrained=none.")
  if (c.model.backbone == "vgg16" and c.model.pretrained is None
      and not c.model.pretrained_path):
    problems.append(
        "config.model.backbone='vgg16' needs its starting weights said: "
        "--config.model.pretrained=imagenet (torchvision's ImageNet VGG-16, "
        "downloaded once), --config.model.pretrained=none (random initialisation) "
        "or --config.model.pretrained_path=/path/to/weights.safetensors.")
  components, features = c.pseudo_labels.spectral_components, c.pseudo_labels.features
  if components is not None and features != "spectral":
    problems.append(
        f"config.pseudo_labels.spectral_components={components} is set but "
        f"pseudo_labels.features={features!r} does not use a spectral embedding; "
        "unset it or set --config.pseudo_labels.features=spectral.")
  protocol = splits_lib.PROTOCOLS.get((c.data.name, c.data.preset))
  if protocol is not None:
    fixed = {"official_test": "query", "database": "train"}
    for scheme, what in ((protocol.query, "query"), (protocol.train, "train")):
      name = f"data.{what}_per_class"
      if fixed.get(scheme) == what and c.data[f"{what}_per_class"] is not None:
        problems.append(
            f"config.{name}={c.data[f'{what}_per_class']} cannot be used with "
            f"data.preset={c.data.preset!r}: that preset fixes the {what} set of "
            f"{c.data.name} ({scheme!r}). Unset it, or use --config.data.preset=ssdh.")
  return problems


def spectral_components(config: ml_collections.ConfigDict) -> int:
  """d of Eq. 1a: `pseudo_labels.spectral_components`, by default K_c."""
  p = config.pseudo_labels
  return p.spectral_components or p.num_clusters


def check_against_data(config: ml_collections.ConfigDict, *, num_train: int,
                       num_database: int, num_query: Optional[int] = None,
                       num_validation: Optional[int] = None,
                       image_channels: Optional[int] = None) -> None:
  """Checks the combinations of `config` with the sizes of the drawn splits.

  Call after `check_config`, once the splits are known and before training writes a
  checkpoint.

  Args:
    config: a config that passed `check_config`.
    num_train: images of the training split.
    num_database: images of the retrieval database.
    num_query: images of the query split (None: not checked).
    num_validation: images of the validation split (None: not checked); validation
      ranks them against the rest of the database.
    image_channels: channels of the dataset's images (None: not checked).

  Raises:
    UserError: naming the field the user set, why, and the fix (all at once).
  """
  c = config
  problems = []
  batch = c.train.global_batch_size
  if num_train < batch:
    problems.append(
        f"config.train.global_batch_size={batch} is larger than the "
        f"{num_train} training images; lower it.")
  num_clusters = c.pseudo_labels.num_clusters
  if num_clusters > num_train:
    problems.append(
        f"config.pseudo_labels.num_clusters={num_clusters} is more than the "
        f"{num_train} training images k-means clusters; lower it (the dataset has "
        "fewer classes than that in any case), or train on more images "
        "(data.train_per_class).")
  elif c.pseudo_labels.features == "spectral":
    problems += _spectral_problems(c, num_train)
  fine = c.pseudo_labels.fine_clusters
  if fine is not None and num_clusters <= num_train:
    if fine > num_train:
      problems.append(
          f"config.pseudo_labels.fine_clusters={fine} is more than the {num_train} "
          "training images; lower it.")
    elif c.pseudo_labels.features == "spectral" and 5 * fine >= num_train:
      problems.append(
          f"config.pseudo_labels.fine_clusters={fine} also sets the size of the fine "
          f"clustering's spectral embedding, and 5 x it must be below the {num_train} "
          f"training images; use at most {max((num_train - 1) // 5, 0)}.")
  if num_query is not None and num_query < 1:
    problems.append(
        f"the query split is empty (data.query_per_class={c.data.query_per_class}, "
        f"data.allow_fewer={c.data.allow_fewer}): nothing would be evaluated; "
        "raise --config.data.query_per_class or unset it for the preset's.")
  if c.data.num_database is not None and num_database > c.data.num_database:
    problems.append(
        f"config.data.num_database={c.data.num_database} is below the "
        f"{num_database} training and validation images the database must hold; "
        f"raise it to at least {num_database} or lower data.train_per_class / "
        "data.num_validation.")
  for k in c.eval.topk:
    if k > num_database:
      problems.append(
          f"config.eval.topk holds {k}, more than the {num_database} database "
          f"images: mAP@{k} would be mAP@all under another name; use cut-offs of at "
          f"most {num_database}.")
    elif num_validation and k > num_database - num_validation:
      # Validation ranks its queries against the database minus them
      # (psch_jax/data/splits.py, validation_database).
      rest = num_database - num_validation
      problems.append(
          f"config.eval.topk holds {k}, more than the {rest} database images "
          f"validation ranks against (the {num_database} less the {num_validation} "
          f"validation queries): validation/map@{k} would be map@all under another "
          f"name; use cut-offs of at most {rest} or lower data.num_validation.")
  if image_channels is not None and image_channels not in (1, c.model.channels):
    # The wording of run_setup.setup_run.
    problems.append(
        f"{c.data.name} images have {image_channels} channels "
        f"but config.model.channels={c.model.channels}.")
  _raise(problems)


def _spectral_problems(c: ml_collections.ConfigDict, num_train: int) -> list[str]:
  """The sizes the k-NN graph and the spectral embedding of Eq. 1a need (the one
  place of these rules), blamed on the field the user set."""
  p = c.pseudo_labels
  problems = []
  if not p.spectral_neighbors < num_train:
    problems.append(
        f"config.pseudo_labels.spectral_neighbors={p.spectral_neighbors} must lie in "
        f"[1, {num_train - 1}] for {num_train} training images; 10 is typical.")
  components = spectral_components(c)
  if 5 * components >= num_train:
    limit = max((num_train - 1) // 5, 0)
    if p.spectral_components is None:
      problems.append(
          f"config.pseudo_labels.num_clusters={p.num_clusters} also sets the spectral "
          f"embedding size (pseudo_labels.spectral_components is unset), and 5 x it "
          f"must be below the {num_train} training images; lower num_clusters to at "
          f"most {limit}, or set --config.pseudo_labels.spectral_components to at most "
          f"{limit}, or use another pseudo_labels.features.")
    else:
      problems.append(
          f"config.pseudo_labels.spectral_components={components} must be >= 1 and "
          f"5 x components below the {num_train} training images; use at most "
          f"{limit} (about the number of clusters).")
  return problems
