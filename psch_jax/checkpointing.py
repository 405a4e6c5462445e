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
- `record_checksums`, `verify_checksums`: the sha256 of every file of a committed
  checkpoint, recorded in <workdir>/checksums/<step>.json once the save is complete
  and verified before the checkpoint is used, so a damaged checkpoint is an error
  naming its step, never a quiet number (docs/reliability.md);
- `latest_step`: the newest committed step, read-only (no directory is created);
- `restore_params`: only the network params of a run's latest checkpoint, as numpy
  arrays (for tools that read a finished run, e.g. `psch_jax.search`).
"""
import errno
import os
import shutil
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from psch_jax import interrupts
from psch_jax import io_utils
from psch_jax import workdir as workdir_lib
from psch_jax.errors import UserError

# Config fields that decide the shapes and meaning of the saved arrays: a checkpoint
# written under other values cannot be resumed.
SHAPE_FIELDS = ("model.backbone", "model.num_bits", "model.image_size", "model.channels",
                "pseudo_labels.num_clusters", "attention.num_parts", "similarity.source",
                "data.name", "data.preset", "seed", "method.name")
# Checkpoints saved before a field joined SHAPE_FIELDS were saved with this value:
# every run was PSCH before the deep peers came.
_SIGNATURE_DEFAULTS = {"method.name": "psch"}


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


def manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
  """The manager of `<workdir>/checkpoints` (a local path or gs://), left-overs
  removed and the checksums of committed steps recorded (`record_checksums`).

  Args:
    create: make the directory (training); False for a reader (evaluation), which
      needs it to exist.
  """
  directory = _directory(workdir)
  if create or io_utils.isdir(directory):
    remove_unfinished(directory)
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
  mngr = ocp.CheckpointManager(directory, options=options,
                               item_names=("state", "targets", "meta"))
  record_checksums(mngr, workdir)
  return mngr


def latest_step(workdir: str) -> Optional[int]:
  """The newest committed step in workdir/checkpoints, or None; reads only."""
  directory = _directory(workdir)
  if not io_utils.isdir(directory):
    return None
  steps = ocp.path.step.checkpoint_steps(directory)
  return max(steps) if steps else None


# -------------------------------------------------------------------- checksums

def _checksum_path(workdir: str, step: int) -> str:
  return io_utils.join(workdir, workdir_lib.CHECKSUMS_DIR, f"{step}.json")


def _pending_path(workdir: str, step: int) -> str:
  return io_utils.join(workdir, workdir_lib.CHECKSUMS_DIR, f"{step}.pending")


def _steps_named(directory: str, suffix: str) -> set[int]:
  if not io_utils.isdir(directory):
    return set()
  return {int(name[:-len(suffix)]) for name in io_utils.listdir(directory)
          if name.endswith(suffix) and name[:-len(suffix)].isdigit()}


def record_checksums(mngr: ocp.CheckpointManager, workdir: str) -> None:
  """Records the digests of every committed step that `save` announced (a
  `<step>.pending` file) and that has none yet; drops the records of steps the manager
  deleted (`train.keep_checkpoints`) and the announcements of saves that never
  committed (a run killed while saving). Process 0; call when no save is in flight.

  A step committed by a run killed before it recorded the digests gets them at the
  next start (its announcement is there): between the commit and the record nothing
  but a kill happened. A committed step with neither record nor announcement is left
  unrecorded, so `verify_checksums` refuses it; only a work directory without a
  checksums/ directory at all (written before checksums existed) has its steps
  recorded as they are.
  """
  if jax.process_index() != 0:
    return
  steps = set(mngr.all_steps())
  record_dir = io_utils.join(workdir, workdir_lib.CHECKSUMS_DIR)
  older_layout = not io_utils.isdir(record_dir)
  recorded = _steps_named(record_dir, ".json")
  announced = _steps_named(record_dir, ".pending")
  for step in sorted(steps - recorded):
    if step in announced or older_layout:
      io_utils.write_json(_checksum_path(workdir, step), {
          "step": step, "sha256": io_utils.file_digests(mngr.directory / str(step))})
  for step in announced:
    io_utils.remove(_pending_path(workdir, step))
  for step in recorded - steps:
    if not io_utils.exists(mngr.directory / str(step)):
      io_utils.remove(_checksum_path(workdir, step))


def check_newest(workdir: str) -> Optional[int]:
  """Verifies the newest committed step before a command writes anything, where it
  can be: a step whose record is still to be made from its announcement, or a
  directory older than checksums, is left to `restore_latest`, after the record.
  Reads only.

  Returns:
    The step verified (pass it to `restore_latest` as `verified_step`, which then
    does not read the checkpoint twice), or None.

  Raises:
    UserError: from `verify_checksums`.
  """
  directory = _directory(workdir)
  if not io_utils.isdir(directory):
    return None
  steps = ocp.path.step.checkpoint_steps(directory)
  if not steps:
    return None
  step = max(steps)
  record_dir = io_utils.join(workdir, workdir_lib.CHECKSUMS_DIR)
  if (not io_utils.isdir(record_dir)
      or (not io_utils.exists(_checksum_path(workdir, step))
          and io_utils.exists(_pending_path(workdir, step)))):
    return None
  verify_checksums(workdir, step, steps=list(steps))
  return step


def verify_checksums(workdir: str, step: int, *, steps: list[int]) -> None:
  """Raises unless checkpoint `step`'s files are those recorded when it was saved.

  Args:
    steps: every committed step, to name the one to fall back to.

  Raises:
    UserError: a file differs, is missing or was added, or the record is missing or
      unreadable; names the step and the choices.
  """
  directory = _directory(workdir)
  earlier = [s for s in steps if s < step]
  choices = (f"Delete {directory}/{step} to resume from step {max(earlier)}, the "
             "newest earlier checkpoint (run it again to check that one too)"
             if earlier else f"Delete {directory}/{step} to train from the start")
  choices += ", or start a new --workdir."
  path = _checksum_path(workdir, step)
  record = io_utils.read_json(
      path, missing_fix=f"without it checkpoint {step} cannot be proven intact. "
      + choices, corrupt_fix=choices)
  expected = record.get("sha256") if isinstance(record, dict) else None
  if not isinstance(expected, dict):
    raise UserError(f"{path} holds no checksums of checkpoint {step}. {choices}")
  found = io_utils.file_digests(directory / str(step))
  differing = sorted(name for name in expected.keys() | found.keys()
                     if expected.get(name) != found.get(name))
  if differing:
    listing = ", ".join(differing[:3]) + (
        f" and {len(differing) - 3} more" if len(differing) > 3 else "")
    raise UserError(
        f"checkpoint {directory}/{step} is damaged: {listing} "
        f"{'differs' if len(differing) == 1 else 'differ'} from the checksums "
        f"recorded when it was saved ({path}). {choices}")


_DISK_FULL = ("No space left on device", "Disk quota exceeded")


def wait(mngr: ocp.CheckpointManager) -> None:
  """Waits for the save in flight. A save that failed for a full disk raises the
  OSError (ENOSPC) it is, naming the checkpoint directory, rather than the
  ValueError Orbax wraps TensorStore's error in."""
  try:
    with interrupts.deferred():
      mngr.wait_until_finished()
  except Exception as e:  # Orbax re-raises its background thread's error as is.
    if not any(text in str(e) for text in _DISK_FULL):
      raise
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                  str(mngr.directory)) from None


def _check_free_space(directory, items: Any) -> None:
  """Raises OSError(ENOSPC) before a save that cannot fit the local disk: a save that
  fills it fails inside Orbax's background threads, whose TensorStore callbacks
  print tracebacks the command cannot catch. The arrays' bytes plus 1 MiB of
  metadata; an object store has no free space to ask."""
  if io_utils.is_object_store(directory) or jax.process_index() != 0:
    return
  needed = sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(items)) + 2**20
  free = shutil.disk_usage(os.fspath(directory)).free
  if needed > free:
    raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: a checkpoint needs "
                  f"{needed / 2**20:.1f} MiB and {free / 2**20:.1f} MiB are free",
                  os.fspath(directory))


def close(mngr: ocp.CheckpointManager) -> None:
  """Waits for pending saves, records their checksums, then closes."""
  with interrupts.deferred():
    try:
      wait(mngr)
      record_checksums(mngr, workdir_of(mngr))
    finally:
      mngr.close()


# What stands for the targets of a method that keeps none (CIBHash): Orbax refuses
# to save an empty tree.
_NO_TARGETS_KEY = "no_targets"


def _savable_targets(targets: Any) -> Any:
  if isinstance(targets, dict) and not targets:
    return {_NO_TARGETS_KEY: np.zeros((), np.int8)}
  return targets


def save(mngr: ocp.CheckpointManager, step: int, *, state: Any, targets: Any,
         meta: dict) -> None:
  """Saves asynchronously; the rename that makes it visible happens when it is done.

  Waits for the previous save first (Orbax would), to record its checksums. A
  stopping signal is held until the save is under way (`interrupts.deferred`).
  """
  targets = _savable_targets(targets)
  with interrupts.deferred():
    wait(mngr)
    workdir = workdir_of(mngr)
    record_checksums(mngr, workdir)
    _check_free_space(mngr.directory, (state, targets))
    if jax.process_index() == 0:
      io_utils.write_bytes(_pending_path(workdir, step), b"")  # announces the save
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        targets=ocp.args.StandardSave(targets),
        meta=ocp.args.JsonSave(meta)))


def restore_latest(mngr: ocp.CheckpointManager, *, abstract_state: Any,
                   abstract_targets: Any, config: ml_collections.ConfigDict,
                   verified_step: Optional[int] = None
                   ) -> Optional[tuple[Any, Any, dict]]:
  """(state, targets, meta) of the latest checkpoint, or None when there is none.

  Its files are verified against their checksums first, unless it is
  `verified_step` (what `check_newest` returned for this work directory, in this
  process, before the run locked it: no other writer since).

  Raises:
    UserError: the checkpoint was written by a config with other shapes (another code
      length, backbone, ...), or it cannot be read.
  """
  step = mngr.latest_step()
  if step is None:
    return None
  directory = mngr.directory
  if step != verified_step:
    verify_checksums(workdir_of(mngr), step, steps=list(mngr.all_steps()))
  try:
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  except Exception as e:  # Orbax raises many types for unreadable files.
    raise UserError(
        f"checkpoint {directory}/{step} cannot be read ({type(e).__name__}: {e}). "
        "Delete that step directory to resume from an earlier one, or use a new "
        "--workdir to start over.") from e
  expected = shape_signature(config)
  saved = {**_SIGNATURE_DEFAULTS, **meta.get("signature", {})}
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
        targets=ocp.args.StandardRestore(_savable_targets(abstract_targets))))
  except Exception as e:
    raise UserError(
        f"checkpoint {directory}/{step} is incomplete or corrupt "
        f"({type(e).__name__}: {e}). Delete that step directory to resume from an "
        "earlier one, or use a new --workdir to start over.") from e
  if not _all_finite(restored.state):
    raise UserError(
        f"checkpoint {directory}/{step} holds non-finite values, which training "
        "never saves: the checkpoint is damaged. Delete that step directory to resume "
        "from an earlier one, or use a new --workdir to start over.")
  targets = restored.targets
  if isinstance(abstract_targets, dict) and not abstract_targets:
    targets = {}
  return restored.state, targets, meta


def workdir_of(mngr: ocp.CheckpointManager) -> str:
  """The work directory of a manager made by `manager`."""
  return str(mngr.directory.parent)


def _all_finite(tree: Any) -> bool:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return all(bool(jnp.isfinite(x).all()) for x in leaves)


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
  return {**_SIGNATURE_DEFAULTS, **signature} if isinstance(signature, dict) else None


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
    verify_checksums(str(io_utils.workdir_path(workdir)), step,
                     steps=list(mngr.all_steps()))
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
