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
leftovers are removed at the next start.
"""
from typing import Any, Optional

import ml_collections
import orbax.checkpoint as ocp

from psch_jax import io_utils
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


def manager(workdir: str, *, keep: int) -> ocp.CheckpointManager:
  """The manager of `<workdir>/checkpoints` (a local path or gs://)."""
  directory = io_utils.workdir_path(workdir) / "checkpoints"
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  return ocp.CheckpointManager(directory, options=options,
                               item_names=("state", "targets", "meta"))


def close(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending saves and for the start-up clean-up of temporary directories,
  then closes. close() alone does not wait for the clean-up: a run that fails right
  after start-up would exit under it and print an Orbax traceback after our error
  (orbax-checkpoint 0.12 has no public way to wait for it)."""
  getattr(mngr, "_maybe_await_cleanup_tmp_directory", lambda: None)()
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
