"""Orbax checkpoints of a PSCH run: train state, pseudo-label targets and run metadata.

A checkpoint holds three items:
- `state`: params, optimizer state and step (a pytree of arrays);
- `targets`: the per-training-image pseudo labels and similarity part features the
  loss reads (so a resumed run never recomputes k-means differently);
- `meta`: JSON with the epoch, the seed and the fields that fix array shapes.

On a local disk Orbax writes each checkpoint into a temporary directory and renames
it when complete; on gs:// (no atomic rename) it writes the step directory in place
and marks it complete with a commit_success.txt written last. Either way a kill
during a save leaves the previous checkpoint as the latest one; the temporary
leftovers are removed at the next start (`manager`, before it returns).

- `manager`, `save`, `restore_latest`, `close`: the training run's checkpoints;
- `restore_params`: only the network params of a run's latest checkpoint, as numpy
  arrays (for tools that read a finished run, e.g. `psch_jax.search`).
"""
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from psch_jax import io_utils
from psch_jax import workdir as workdir_lib
from psch_jax.errors import UserError

# Config fields that decide the shapes and meaning of the saved arrays: a checkpoint
# written under other values cannot be resumed.
SHAPE_FIELDS = ("model.backbone", "model.num_bits", "model.image_size", "model.channels",
                "pseudo_labels.num_clusters", "attention.num_parts", "similarity.source",
                "data.name", "data.preset", "seed")


def _field(config: ml_collections.ConfigDict, dotted: str):
  value = config
  for part in dotted.split("."):
    value = value[part]
  return value


def shape_signature(config: ml_collections.ConfigDict) -> dict:
  return {name: _field(config, name) for name in SHAPE_FIELDS}


def _directory(workdir: str):
  return io_utils.workdir_path(workdir) / workdir_lib.CHECKPOINTS_DIR


def remove_unfinished(directory) -> None:
  """Deletes the temporary directories of saves that never completed (a run killed
  while saving), on process 0, before returning.

  Orbax's own `cleanup_tmp_directories=True` does this in a background thread that
  only `save` waits for (orbax-checkpoint 0.12 offers no public wait): a run that
  fails right after start-up would exit under it and print an Orbax traceback after
  our error. Done here, with Orbax's public listing of its temporary paths, it is
  over when the manager exists.
  """
  if jax.process_index() != 0:
    return
  for path in ocp.path.step.all_temporary_paths(directory):
    path.get().rmtree(missing_ok=True)


def manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """The manager of `<workdir>/checkpoints` (a local path or gs://; created),
  left-overs removed."""
  directory = _directory(workdir)
  remove_unfinished(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=("state", "targets", "meta"))


def close(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending saves, then closes."""
  mngr.close()


def save(mngr: ocp.CheckpointManager, step: int, *, state: Any, targets: Any,
         meta: dict) -> None:
  """Saves asynchronously; the rename that makes it visible happens when it is done."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      targets=ocp.args.StandardSave(targets),
      meta=ocp.args.JsonSave(meta)))


def restore_latest(mngr: ocp.CheckpointManager, *, abstract_state: Any,
                   abstract_targets: Any, config: ml_collections.ConfigDict
                   ) -> Optional[tuple[Any, Any, dict]]:
  """(state, targets, meta) of the latest checkpoint, or None when there is none.

  Raises:
    UserError: the checkpoint was written by a config with other shapes (another code
      length, backbone, ...), or it cannot be read.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  directory = mngr.directory
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise UserError(
        f"checkpoint {directory}/{step} cannot be read ({type(e).__name__}: {e}). "
        "Delete that step directory to resume from an earlier one, or use a new "
        "--workdir to start over.") from e
  expected = shape_signature(config)
  saved = meta.get("signature", {})
  differences = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
  if differences:
    listing = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}"
                        for k, (a, b) in differences.items())
    raise UserError(
        f"the checkpoint in {directory} was written by another config ({listing}). "
        "Use a new --workdir for this config, or pass the config it was trained with.")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        targets=ocp.args.StandardRestore(abstract_targets)))
  except Exception as e:
    raise UserError(
        f"checkpoint {directory}/{step} is incomplete or corrupt "
        f"({type(e).__name__}: {e}). Delete that step directory to resume from an "
        "earlier one, or use a new --workdir to start over.") from e
  return restored.state, restored.targets, meta


def saved_signature(workdir: str) -> Optional[dict]:
  """The `shape_signature` the latest checkpoint in workdir/checkpoints was saved
  with, or None without a checkpoint (or without a signature in it).

  Raises:
    UserError: the checkpoint's metadata cannot be read.
  """
  directory = _directory(workdir)
  if not io_utils.isdir(directory):
    return None
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False), item_names=("meta",))
  try:
    step = mngr.latest_step()
    if step is None:
      return None
    try:
      meta = mngr.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # Orbax raises many types for unreadable files.
      raise UserError(
          f"checkpoint {directory}/{step} cannot be read ({type(e).__name__}: {e}). "
          "Delete that step directory to use an earlier one, or train again.") from e
  finally:
    mngr.close()
  signature = meta.get("signature") if isinstance(meta, dict) else None
  return signature if isinstance(signature, dict) else None


def restore_params(workdir: str, abstract_params: Any) -> Any:
  """The params of the latest checkpoint in workdir/checkpoints, as numpy arrays.

  Only `state["params"]` is read (a partial restore): the optimizer state and the
  pseudo-label targets stay on disk, and nothing is placed on a device mesh.

  Args:
    abstract_params: a pytree of arrays or `jax.ShapeDtypeStruct`s shaped like the
      params (e.g. `jax.eval_shape` of the model's init).

  Raises:
    UserError: there is no checkpoint, or it cannot be read into these shapes.
  """
  directory = _directory(workdir)
  if not io_utils.isdir(directory):
    raise UserError(f"{directory} is missing (the trained checkpoints); pass the "
                    "--workdir of a run that main.py trained and evaluated, or finish "
                    "that run first.")
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      create=False), item_names=("state",))
  try:
    step = mngr.latest_step()
    if step is None:
      raise UserError(f"{directory} holds no checkpoint; train first with main.py "
                      f"--workdir={workdir}.")
    # ShapeDtypeStructs without sharding and numpy restore types: host arrays, no
    # device layout from the training mesh needed.
    item = {"params": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                   abstract_params)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                item)
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                       partial_restore=True)))
    except Exception as e:  # Orbax raises many types for unreadable or mismatched files.
      raise UserError(f"cannot restore the params of checkpoint {directory}/{step} "
                      f"({type(e).__name__}: {e}); it is damaged or config.json "
                      "belongs to another run. Delete that step directory to use an "
                      "earlier one, or train again.") from e
  finally:
    mngr.close()
  return restored.state["params"]
