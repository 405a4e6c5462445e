"""The deep hashing methods the harness trains, behind one interface.

The training loop, the multi-device step, checkpoints and exact resume, evaluation,
reports and experiments are shared by every method (`psch_jax.train`); a method
contributes only what differs:

- `num_views`: how many augmented views of a batch its loss reads (1 or 2), and
  `view_augmentation(config)`, the `config.AUGMENTATIONS` kind of each view;
- `classifier_outputs(config)`: the outputs of the network's linear classifier on
  the relaxed codes (0: no classifier); the backbone and the hash head are shared;
- its per-epoch state, "targets" (a dict of arrays, one row per training image, held
  in the checkpoint so a resumed run never recomputes it differently):
  `epoch_targets(config, key, data, params, *, epoch, previous)` makes it,
  `refresh_due(config, epoch)` says when it is made again, and
  `abstract_targets(config, num_train, model, sharding, *, pixel_dim, attention)`
  gives its shapes to restore a checkpoint into;
- `loss(config, outputs, targets, position, *, key, attention)`: the scalar loss of
  a batch and its metrics, from the network outputs of each view;
- `describe(stats)`: the line printed when the targets are made, and `log_key`, the
  key their statistics are logged under in metrics.jsonl.

Every method's codes at evaluation are sign(h) of the hash head (`models.hash_codes`
of tanh(h)), so evaluation, search and reports need nothing per method.

`config.method.name` chooses the method (`for_config`); docs/method.md has each one's
equations, sources and where we differ from its authors' code.
"""
import ml_collections

from psch_jax.methods import bihalf, cibhash, greedyhash, psch, ssdh
from psch_jax.methods.interface import Method, TrainingData

_METHODS: dict[str, Method] = {
    m.METHOD.name: m.METHOD for m in (psch, ssdh, greedyhash, bihalf, cibhash)}

__all__ = ["Method", "TrainingData", "get", "for_config"]


def get(name: str) -> Method:
  """The method called `name` (one of `config.METHODS`)."""
  if name not in _METHODS:
    raise ValueError(f"unknown method {name!r}; expected one of {sorted(_METHODS)}")
  return _METHODS[name]


def for_config(config: ml_collections.ConfigDict) -> Method:
  """The method `config.method.name` names."""
  return get(config.method.name)
