"""One generation of results: what one evaluation wrote, stamped, made visible at once.

An evaluation writes several files: results.json, results.md, codes/{query,database}.npy
and the plots. A reader must see all of one evaluation or all of another, never the
results.json of one beside the codes of another (a run killed while writing, or a
later evaluation of another checkpoint). So an evaluation writes a new generation
aside, in `<workdir>/generations/<id>/`, and then switches to it (`commit`):

- local disk: `<workdir>/current` is a symbolic link to the generation, replaced
  atomically by a rename; `results.json`, `results.md`, `codes` and the plots at the
  top of the work directory are fixed links into `current/`, so they all switch at
  the one rename;
- object store (gs://, no links and no atomic rename): `results.json` at the top is a
  copy of the generation's, written last as one object; it names the generation,
  whose other files are read from `generations/<id>/`.

Either way a reader goes through `results.json`, and its stamp says what the
generation belongs to (`STAMP`): the checkpoint step, the sha256 of the config that
made it, of each split file it was scored on and of each of its own files.
`verify` checks them all, so a result that does not belong to the checkpoint, the
config or the splits beside it is an error, never a quiet number.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from typing import Callable, Optional

from psch_jax import checkpointing
from psch_jax import io_utils
from psch_jax import workdir as workdir_lib
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError

STAMP = "generation"
CURRENT_LINK = "current"
# The entries at the top of a local work directory that link into `current/`.
LINKED = (workdir_lib.RESULTS_FILE, workdir_lib.RESULTS_REPORT, workdir_lib.CODES_DIR,
          workdir_lib.PR_PLOT, workdir_lib.TOPN_PLOT, workdir_lib.GRID_PLOT,
          workdir_lib.TABLE_PLOT)


def config_digest(config: dict) -> str:
  """sha256 of a config as config.json holds it (canonical JSON)."""
  text = json.dumps(json.loads(json.dumps(config)), sort_keys=True,
                    separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()


def split_digests(workdir: str) -> dict[str, str]:
  """{split name: sha256 of workdir/splits/<name>.npy} of the splits present."""
  directory = io_utils.join(workdir, workdir_lib.SPLITS_DIR)
  return {name: io_utils.file_digest(io_utils.join(directory, f"{name}.npy"))
          for name in splits_lib.SPLIT_NAMES
          if io_utils.exists(io_utils.join(directory, f"{name}.npy"))}


def commit(workdir: str, results: dict, *, config: dict, step: Optional[int],
           write_files: Callable[[str], None], splits: bool = True) -> dict:
  """Writes a new generation and switches the work directory to it.

  Args:
    workdir: the work directory (local or gs://), claimed by this process.
    results: the scalar results; the stamp is added under `STAMP`.
    config: the config that made them (as config.json holds it).
    step: the checkpoint step evaluated (None for a closed-form method).
    write_files: writes the generation's other files into the directory it is given
      (codes/, results.md, plots).
    splits: stamp the digests of workdir/splits (False where there are none).

  Returns:
    `results` with its stamp, as results.json holds it.
  """
  name = f"step{step if step is not None else 'none'}-{uuid.uuid4().hex[:12]}"
  directory = io_utils.join(workdir, workdir_lib.GENERATIONS_DIR, name)
  io_utils.makedirs(directory)
  write_files(directory)
  stamp = {"id": name, "step": step, "config_sha256": config_digest(config),
           "files": io_utils.file_digests(directory)}
  if splits:
    stamp["splits_sha256"] = split_digests(workdir)
  stamped = {**results, STAMP: stamp}
  io_utils.write_json(io_utils.join(directory, workdir_lib.RESULTS_FILE), stamped)
  if io_utils.is_object_store(workdir):
    io_utils.write_json(io_utils.join(workdir, workdir_lib.RESULTS_FILE), stamped)
  else:
    _switch_links(os.fspath(io_utils.workdir_path(workdir)), name)
  _remove_other_generations(workdir, keep=name)
  return stamped


def _switch_links(workdir: str, name: str) -> None:
  """Points `current` at generations/<name> (the commit: one rename), then makes sure
  each `LINKED` entry is a link into `current/` (an entry of an older layout, a
  regular file or directory, is replaced; it held an older generation)."""
  tmp = os.path.join(workdir, f".{CURRENT_LINK}-{uuid.uuid4().hex[:8]}")
  os.symlink(os.path.join(workdir_lib.GENERATIONS_DIR, name), tmp)
  current = os.path.join(workdir, CURRENT_LINK)
  if os.path.isdir(current) and not os.path.islink(current):
    shutil.rmtree(current)  # a copy that followed the link: an old generation's files
  os.replace(tmp, current)
  generation = os.path.join(workdir, workdir_lib.GENERATIONS_DIR, name)
  for entry in LINKED:
    path = os.path.join(workdir, entry)
    target = os.path.join(CURRENT_LINK, entry)
    if os.path.islink(path) and os.readlink(path) == target:
      continue
    if not os.path.lexists(os.path.join(generation, entry)):
      if os.path.lexists(path) and not os.path.islink(path):
        _remove(path)  # an older layout's file this generation has no new copy of
      continue
    link = os.path.join(workdir, f".{entry}-{uuid.uuid4().hex[:8]}")
    os.symlink(target, link)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    os.replace(link, path)


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


def _remove_other_generations(workdir: str, *, keep: str) -> None:
  """Deletes the generations but `keep`: superseded ones, and those of evaluations
  killed before their commit."""
  directory = io_utils.join(workdir, workdir_lib.GENERATIONS_DIR)
  for name in io_utils.listdir(directory):
    if name != keep:
      io_utils.workdir_path(io_utils.join(directory, name)).rmtree(missing_ok=True)


# ------------------------------------------------------------------------ reading

def read(workdir: str, *, fix: Optional[str] = None) -> dict:
  """The stamped results.json of `workdir`.

  Args:
    fix: what to do about a bad file (default: evaluate the run again).

  Raises:
    UserError: it is missing, unreadable, not an object or has no stamp.
  """
  path = io_utils.join(workdir, workdir_lib.RESULTS_FILE)
  fix = fix or f"evaluate again: main.py --mode=eval --workdir={workdir}."
  results = io_utils.read_json(
      path, missing_fix=f"finish that run (main.py --workdir={workdir}) or point "
      "--workdir at a finished one.", corrupt_fix=fix)
  if not isinstance(results, dict):
    raise UserError(f"{path} holds a {type(results).__name__}, not the results of a "
                    f"run; {fix}")
  if not isinstance(results.get(STAMP), dict) or "id" not in results[STAMP]:
    raise UserError(f"{path} has no generation stamp (written by an older psch-jax, "
                    "or edited), so nothing proves which checkpoint and config it "
                    f"belongs to; {fix}")
  return results


def path(workdir: str, results: dict, name: str) -> str:
  """The path of the generation's file `name` (e.g. "codes/query.npy")."""
  return io_utils.join(workdir, workdir_lib.GENERATIONS_DIR, results[STAMP]["id"], name)


def verify(workdir: str, results: dict, *, config: Optional[dict],
           checkpoint_step: Optional[int], names: Optional[tuple[str, ...]] = None,
           fix: str) -> None:
  """Raises unless the generation of `results` belongs to what is beside it.

  Args:
    config: the config.json beside it (None: not compared).
    checkpoint_step: the newest checkpoint's step (compared when the stamp has one).
    names: the generation's files to check (None: all it lists).
    fix: what the user should do, ending the message.

  Raises:
    UserError: naming each disagreement.
  """
  stamp = results[STAMP]
  problems = []
  if config is not None and stamp.get("config_sha256") != config_digest(config):
    problems.append(f"{workdir_lib.CONFIG_FILE} is not the config these results were "
                    "made with (it was edited, or a later run changed it)")
  if stamp.get("step") is not None and checkpoint_step is None:
    problems.append(f"{workdir}/{workdir_lib.CHECKPOINTS_DIR} is missing or empty, "
                    f"and they were made from checkpoint {stamp['step']}")
  elif stamp.get("step") is not None and checkpoint_step != stamp["step"]:
    problems.append(f"they were made from checkpoint {stamp['step']}, and the newest "
                    f"checkpoint is {checkpoint_step}")
  for name, digest in sorted(stamp.get("splits_sha256", {}).items()):
    split = io_utils.join(workdir, workdir_lib.SPLITS_DIR, f"{name}.npy")
    if not io_utils.exists(split) or io_utils.file_digest(split) != digest:
      problems.append(f"{workdir_lib.SPLITS_DIR}/{name}.npy is not the split they "
                      "were scored on")
  files = stamp.get("files", {})
  for name in (names if names is not None else tuple(files)):
    file = path(workdir, results, name)
    if (name not in files or not io_utils.exists(file)
        or io_utils.file_digest(file) != files[name]):
      problems.append(f"{file} is missing or not the file the evaluation wrote")
  if problems:
    raise UserError(f"the results in {workdir} do not belong to what is beside them: "
                    + "; ".join(problems) + f". {fix}")


def read_verified(workdir: str, *, names: Optional[tuple[str, ...]] = None,
                  fix: Optional[str] = None) -> dict:
  """`read`, then `verify` against the config.json, the splits and the newest
  checkpoint beside it; the results of a run whose generation belongs to them.

  Raises:
    UserError: from `read` or `verify`, or config.json cannot be read.
  """
  results = read(workdir, fix=fix)
  fix = fix or (f"Evaluate again (main.py --mode=eval --workdir={workdir}) to make "
                "results of what is there now, or restore what was changed.")
  config_path = io_utils.join(workdir, workdir_lib.CONFIG_FILE)
  config = io_utils.read_json(config_path, missing_fix=fix, corrupt_fix=fix)
  step = (checkpointing.latest_step(workdir)
          if results[STAMP].get("step") is not None else None)
  verify(workdir, results, config=config if isinstance(config, dict) else {},
         checkpoint_step=step, names=names, fix=fix)
  return results
