"""The device mesh of a run and how arrays are placed on it.

One 1-D mesh over every device of every host, its one axis named `AXIS`, made once per
run (`make_mesh`) and passed down. Batches are split over the axis
(`batch_sharding`), params, optimizer state and targets are replicated
(`replicated`); k-means, the ranking and the encoder shard their rows over the same
axis of the local devices (`local_mesh`). A jit over this mesh is the data-parallel
step of the paper ("pmapped" in its card): XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """A 1-D mesh named `AXIS` over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def local_mesh(mesh: Optional[Mesh] = None) -> Mesh:
  """This process's devices of `mesh` (default: every local device), for work on
  host arrays of this process (k-means, ranking)."""
  return make_mesh(jax.local_devices()) if mesh is None else mesh.local_mesh


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (params, optimizer state, targets)."""
  return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (the leading axis) split over `AXIS`."""
  return NamedSharding(mesh, PartitionSpec(AXIS))


def global_batch(local: dict, sharding: NamedSharding) -> dict:
  """One global array per field from this process's rows of each field.

  Args:
    local: name -> numpy array (b, ...), this process's consecutive rows of the
      global batch (`data.pipeline` gives process p the rows [p b, (p + 1) b)).
    sharding: the batch sharding of the run's mesh (`batch_sharding`).
  Returns:
    name -> jax.Array (process_count * b, ...) sharded over the mesh.
  """
  return {k: jax.make_array_from_process_local_data(sharding, v)
          for k, v in local.items()}
