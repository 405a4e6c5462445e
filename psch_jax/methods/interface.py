"""The one interface every method implements (`psch_jax.methods` says what each
member is for)."""
from typing import Any, Callable, NamedTuple

import ml_collections
import numpy as np
from jax.sharding import Mesh


class TrainingData(NamedTuple):
  """What a method may read to make its targets.

  Attributes:
    encode: `encoding.make_encoder`'s function (params, batch) -> outputs.
    source: the image source (`psch_jax.data.sources`).
    train_indices: sorted int64 global indices of the training set; row i of the
      targets belongs to image train_indices[i].
    mesh: the run's device mesh.
  """
  encode: Any
  source: Any
  train_indices: np.ndarray
  mesh: Mesh


class Method(NamedTuple):
  """One method; see the module docstring for what each member does."""
  name: str
  num_views: int
  view_augmentation: Callable[[ml_collections.ConfigDict], str]
  classifier_outputs: Callable[[ml_collections.ConfigDict], int]
  epoch_targets: Callable[..., tuple[dict, dict]]
  refresh_due: Callable[[ml_collections.ConfigDict, int], bool]
  abstract_targets: Callable[..., Any]
  loss: Callable[..., tuple[Any, dict]]
  describe: Callable[[dict], str]
  log_key: str = "targets"
