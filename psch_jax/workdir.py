"""Work-directory integrity: its layout, the config it was started with, one run at once.

A run's work directory holds what makes it resumable (docs/reliability.md): the
splits, the checkpoints, config.json, metrics.jsonl, results.json. Three things can
make a rerun silently wrong or crash deep inside a library, and are checked here
before the run reads or writes any of it:

- `check_layout`: a file where a directory belongs (`checkpoints/`, `splits/`,
  `codes/`) or a directory where a file belongs (`config.json`, `metrics.jsonl`,
  `results.json`, ...).
- `check_config_unchanged`: a config that differs from the saved config.json in a
  field that changes the data, the splits, the schedule or the model
  (`RESUME_FIXED`); only the fields of `RESUME_SAFE` may change on a resume.
- `lock`: a second run on the same work directory. On a local (or NFS) file system
  an exclusive `fcntl.flock` on `.lock-<process>`, which the kernel releases when the
  holder dies, so a killed run never blocks the next one. On `gs://` no kernel lock
  exists: `Lease` is a `lock.json` with a heartbeat, refused while fresh.

Every work directory also records what made it (`KIND_FILE`: a run of main.py, an
experiments table, a diagnostics report, one baseline run of an experiments table), so
a command refuses a directory of another kind before it reads or writes any of it.

`check_unclaimed(workdir, config, kinds=...)` does the read-only checks; `claim`
repeats them under the lock and returns the lock. A command runs every check it has
before `claim`, and writes only after it: a refused start leaves the directory as it
was (docs/reliability.md, "Check everything, then write").
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional

import ml_collections

from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax import io_utils
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError

# ----------------------------------------------------------------------- layout

DIRECTORY, FILE = "directory", "file"

# The names of a run's entries; every module that reads or writes one uses these.
CHECKPOINTS_DIR = "checkpoints"
SPLITS_DIR = "splits"
CODES_DIR = "codes"
TENSORBOARD_DIR = "tensorboard"
GENERATIONS_DIR = "generations"
CHECKSUMS_DIR = "checksums"
KIND_FILE = "kind.json"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
RESULTS_REPORT = "results.md"
PR_PLOT = "pr_curve.png"
TOPN_PLOT = "precision_at_topn.png"
GRID_PLOT = "retrieval_grid.png"
TABLE_PLOT = "results.png"  # an experiments table's
CODE_SETS = ("query", "database")

# Every entry a run creates in its work directory: (kind, what it holds).
LAYOUT: dict[str, tuple[str, str]] = {
    CHECKPOINTS_DIR: (DIRECTORY, "checkpoints"),
    SPLITS_DIR: (DIRECTORY, "split index files"),
    CODES_DIR: (DIRECTORY, "hash codes"),
    TENSORBOARD_DIR: (DIRECTORY, "TensorBoard summaries"),
    GENERATIONS_DIR: (DIRECTORY, "generations of results"),
    CHECKSUMS_DIR: (DIRECTORY, "checkpoint checksums"),
    KIND_FILE: (FILE, "kind of work directory"),
    CONFIG_FILE: (FILE, "config"),
    METRICS_FILE: (FILE, "training metrics"),
    RESULTS_FILE: (FILE, "results"),
    RESULTS_REPORT: (FILE, "results report"),
    PR_PLOT: (FILE, "precision-recall plot"),
    TOPN_PLOT: (FILE, "precision@N plot"),
    GRID_PLOT: (FILE, "retrieval grid"),
    TABLE_PLOT: (FILE, "results plot"),
    **{f"{SPLITS_DIR}/{name}.npy": (FILE, f"{name} split")
       for name in splits_lib.SPLIT_NAMES},
    **{f"{CODES_DIR}/{name}.npy": (FILE, f"{name} codes") for name in CODE_SETS},
}

_FIX = "Move or delete it, or pass another --workdir."


def check_layout(workdir: str) -> None:
  """Raises UserError when an entry of `workdir` is not of the kind a run expects.

  A missing entry is fine (a run creates it); `workdir` itself may be missing.

  Args:
    workdir: a local work directory.

  Raises:
    UserError: naming the path, what is wrong and the fix.
  """
  if os.path.lexists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"work directory {workdir} is not writable: it is a file, not a "
                    "directory; pass a --workdir that is a directory or does not "
                    "exist yet.")
  for name, (kind, what) in LAYOUT.items():
    path = os.path.join(workdir, name)
    if not os.path.lexists(path):
      continue
    if not os.path.exists(path):
      raise UserError(f"{path} is a broken symbolic link (to {os.readlink(path)}), "
                      f"where the run keeps its {what}. {_FIX}")
    if kind == DIRECTORY and not os.path.isdir(path):
      raise UserError(f"{path} is a file, but the run keeps its {what} in a directory "
                      f"of that name. {_FIX}")
    if kind == FILE and not os.path.isfile(path):
      found = "directory" if os.path.isdir(path) else "special file"
      raise UserError(f"{path} is a {found}, but the run writes its {what} to a file "
                      f"of that name. {_FIX}")


# ------------------------------------------------------------------------- kind

RUN = "run"  # main.py (train or eval); diagnostics may read and add to it
EXPERIMENTS = "experiments"  # the table of python -m psch_jax.commands.experiments
DIAGNOSTICS = "diagnostics"  # a work directory made by the diagnostics command
BASELINE = "baseline"  # one baseline run inside an experiments table

_KIND_NAMES = {RUN: "a training run of main.py", EXPERIMENTS: "an experiments table",
               DIAGNOSTICS: "a diagnostics report",
               BASELINE: "a baseline run of an experiments table"}


def saved_kind(workdir: str) -> Optional[str]:
  """The kind `workdir` records in KIND_FILE; for a directory written before the file
  existed, the kind its entries show; None for a missing or empty directory.

  Raises:
    UserError: KIND_FILE cannot be read or names no known kind.
  """
  path = io_utils.join(workdir, KIND_FILE)
  if io_utils.exists(path):
    value = io_utils.read_json(
        path, missing_fix="", corrupt_fix="restore it, or pass another --workdir.")
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind not in _KIND_NAMES:
      raise UserError(f"{path} names no kind of work directory ({value!r}); restore "
                      f"it (one of {sorted(_KIND_NAMES)}), or pass another --workdir.")
    return kind
  if not io_utils.isdir(workdir):
    return None
  names = set(io_utils.listdir(workdir))
  if "runs" in names:
    return EXPERIMENTS
  if CHECKPOINTS_DIR in names or SPLITS_DIR in names:
    return RUN
  if CONFIG_FILE in names and RESULTS_FILE in names:
    return BASELINE
  return None


def check_kind(workdir: str, accepted: tuple[str, ...], *, command: str,
               reads: bool = False) -> None:
  """Refuses a work directory of another kind than `accepted` (a main.py run given to
  experiments, an experiments table given to main.py or to reports, ...), naming
  what it is.

  Args:
    reads: the command only reads the directory (reports, search).

  Raises:
    UserError: naming the directory, its kind, and the fix.
  """
  kind = saved_kind(workdir)
  if kind is None or kind in accepted:
    return
  wanted = " or ".join(_KIND_NAMES[k] for k in accepted)
  if reads:
    raise UserError(f"work directory {workdir} holds {_KIND_NAMES[kind]}, and {command} "
                    f"reads {wanted}. Pass the --workdir of one"
                    + (" (an experiments table keeps its runs under runs/<method>/)."
                       if kind == EXPERIMENTS else "."))
  raise UserError(
      f"work directory {workdir} holds {_KIND_NAMES[kind]}, and {command} writes "
      f"{wanted}: it would overwrite that directory's results. Pass another "
      "--workdir.")


def write_kind(workdir: str, kind: str) -> None:
  """Records `kind` in `workdir`/KIND_FILE (once: an existing record is kept)."""
  path = io_utils.join(workdir, KIND_FILE)
  if not io_utils.exists(path):
    io_utils.write_json(path, {"kind": kind})


# ------------------------------------------------------------ config on resume

# The fields that may differ between the saved config.json and a resumed run, and
# why: none changes the data, the splits, the optimisation schedule or the model.
RESUME_SAFE: dict[str, str] = {
    "data.data_dir": "where the dataset is read from, not what it holds (the splits "
                     "are checked against the dataset's size)",
    "data.manual_dir": "the same",
    "train.checkpoint_every_steps": "when checkpoints are saved, not what they hold",
    "train.keep_checkpoints": "how many old checkpoints are kept",
    "train.log_every_steps": "when the metrics are read from the device, not their values",
    "train.tensorboard": "an extra copy of the logged metrics",
    "train.deterministic": "how XLA picks GPU kernels: the same computation, up to "
                           "the order of float additions",
    "eval.batch_size": "how many images are encoded at once (the codes are the same "
                       "function of the parameters, up to float rounding)",
    "eval.topk": "which cut-offs are reported",
    "eval.validation_every_epochs": "how often validation mAP is logged",
}

# Every other field: a change is refused on resume (docs/reliability.md lists them).
RESUME_FIXED: tuple[str, ...] = tuple(
    name for name in config_schema.FIELDS if name not in RESUME_SAFE)

_MISSING = object()

# Fields added after work directories were first written: a saved config.json
# without them was written by PSCH before the deep peers existed, and so with their
# defaults.
_ADDED_LATER = ("method.",)


def _comparable(value: Any) -> Any:
  """The value as config.json holds it (tuples are lists)."""
  return json.loads(json.dumps(value))


def _shown(value: Any) -> str:
  if value is _MISSING:
    return "absent"
  return repr(tuple(value)) if isinstance(value, list) else repr(value)


def config_changes(saved: dict, config: ml_collections.ConfigDict
                   ) -> list[tuple[str, Any, Any]]:
  """The `RESUME_FIXED` fields whose value differs.

  Args:
    saved: the config a run was started with, as in its config.json.
    config: the config of this run.

  Returns:
    [(dotted name, saved value, this value)], sorted by name; a field absent on one
    side has the value `_MISSING` there.
  """
  old = config_schema.flatten(saved)
  new = {k: _comparable(v) for k, v in config_schema.flatten(config).items()}
  defaults = {k: _comparable(v) for k, v in
              config_schema.flatten(psch_config.base_config()).items()
              if k.startswith(_ADDED_LATER)}
  if not any(name.startswith(_ADDED_LATER) for name in old):
    old.update(defaults)
  unread = config_schema.other_methods_fields(new.get("method.name", "psch"))
  changes = []
  for name in sorted(set(old) | set(new)):
    if name in RESUME_SAFE or name.startswith(unread):
      continue
    before, after = old.get(name, _MISSING), new.get(name, _MISSING)
    if before != after:
      changes.append((name, before, after))
  return changes


def check_config_unchanged(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Refuses a config that differs from `workdir`'s config.json in a fixed field.

  Nothing to compare when there is no config.json (a new work directory).

  Raises:
    UserError: config.json cannot be read, or names each changed field with its
      old and new value, and the fix.
  """
  path = io_utils.join(workdir, CONFIG_FILE)
  if not io_utils.exists(path):
    if io_utils.isdir(io_utils.join(workdir, CHECKPOINTS_DIR)) and io_utils.listdir(
        io_utils.join(workdir, CHECKPOINTS_DIR)):
      raise UserError(
          f"work directory {workdir} holds checkpoints but no {CONFIG_FILE} (the "
          "config they were trained with): restore it from a backup, or start a new "
          "--workdir. Without it nothing proves this config fits those checkpoints.")
    return
  saved = io_utils.read_json(
      path, missing_fix="pass the --workdir of the run.",
      corrupt_fix=("it is the config the run in that work directory was started with: "
                   "restore it, or start a new --workdir."))
  if not isinstance(saved, dict):
    raise UserError(f"{path} holds a {type(saved).__name__}, not a config; restore it "
                    "(it is the config the run was started with), or start a new "
                    "--workdir.")
  changes = config_changes(saved, config)
  if not changes:
    return
  lines = [f"config.{name}: {_shown(before)} in {path}, {_shown(after)} now"
           for name, before, after in changes]
  restore = "; ".join(_restore_hint(name, before) for name, before, _ in changes
                      if before is not _MISSING)
  raise UserError(
      f"work directory {workdir} holds a run started with another config:\n  "
      + "\n  ".join(lines)
      + "\nThese fields change the data, the splits, the schedule or the model, so "
      "the run cannot resume with them. Start a new --workdir for this config, or "
      f"restore the old value{'s' if len(changes) > 1 else ''}"
      + (f" ({restore})." if restore else "."))


def _restore_hint(name: str, value: Any) -> str:
  if value is None:
    return f"leave config.{name} unset"
  if isinstance(value, list):
    return f"--config.{name}='{tuple(value)!r}'"
  return f"--config.{name}={value}"


# -------------------------------------------------------------------------- lock

LOCAL_LOCK_PREFIX = ".lock-"
LEASE_NAME = "lock.json"


def is_remote(path: str) -> bool:
  """Whether `path` is on an object store (gs://, s3://, ...), not a file system."""
  return "://" in str(path)


def _holder(token: str = "") -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"),
          "command": " ".join(sys.argv), **({"token": token} if token else {})}


def _holder_died_here(holder: dict) -> bool:
  """Whether `holder` ran on this host and its process is gone: a run killed here
  (SIGKILL, a crash) leaves its lease behind, and its rerun on the same machine must
  not wait for the lease to expire."""
  pid = holder.get("pid")
  if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # alive, another user's
    return False
  return False


def _describe(holder: Optional[dict]) -> str:
  if not holder:
    return "a run that is just starting (it has not written its pid yet)"
  return (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
          f"{holder.get('started')} ({holder.get('command')})")


class LocalLock:
  """An exclusive `fcntl.flock` on a file of the work directory, held until `release`.

  The kernel releases it when the holding process exits, however it dies, so a
  killed run never blocks the next one. On NFS, Linux maps flock to a POSIX lock of
  the server (NFSv4), so runs on two hosts exclude each other too. A child made
  with os.fork inherits the lock while it lives; subprocesses do not (the
  descriptor is not inheritable).
  """

  def __init__(self, path: str):
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
    self.path = path
    try:
      self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot open the lock file {path} ({e.strerror}); it must be a "
                      f"file the run can write. {_FIX}") from e
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = self._read_holder()
      os.close(self._fd)
      raise UserError(  # pylint: disable=raise-missing-from
          f"work directory {os.path.dirname(path)} is in use by another run: "
          f"{_describe(holder)}. Wait for it to finish or stop it, or pass another "
          "--workdir. (A run that was killed holds no lock; this one is alive.)")
    self.holder = _holder()
    os.ftruncate(self._fd, 0)
    os.pwrite(self._fd, (json.dumps(self.holder) + "\n").encode(), 0)

  def _read_holder(self) -> Optional[dict]:
    try:
      return json.loads(os.pread(self._fd, 65536, 0).decode() or "null")
    except ValueError:
      return None

  def release(self) -> None:
    """Empties the lock file (no holder), then releases the lock.

    The file stays: deleting it would race with a new run that has opened it. Empty,
    it is the same file before and after a run that was refused, so a refused run
    leaves the work directory byte-identical.
    """
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # still held: no other run reads it half-written
      os.close(self._fd)  # closing the last descriptor drops the flock
      self._fd = None

  def check(self) -> None:
    """Nothing to check: a kernel lock cannot be lost while the process lives."""

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


class Lease:
  """A best-effort lock for object stores (gs://), which have no kernel lock.

  `lock.json` in the work directory names the holder and a heartbeat time, which a
  background thread renews every `heartbeat_s`. A new run refuses a lease whose
  heartbeat is younger than `stale_after_s` and whose holder is not a dead process
  of this host (a run killed elsewhere without releasing it blocks the next one for
  at most that long; one killed on this host does not block its rerun here); otherwise it writes its own, waits
  `settle_s` and reads it back, and refuses if another run's lease replaced it.

  Limits: without a write precondition (GCS `if_generation_match=0`, which
  etils.epath does not expose) two runs starting within `settle_s` of each other
  can in rare interleavings both believe they hold the lease; `check()` (call it
  before each checkpoint) raises in the one whose lease was overwritten. The
  heartbeat is compared with this host's clock, so clocks must agree to well
  within `stale_after_s`.
  """

  def __init__(self, workdir: str, *, stale_after_s: float = 300.0,
               heartbeat_s: Optional[float] = None, settle_s: float = 2.0):
    from etils import epath  # pylint: disable=g-import-not-at-top
    self.path = epath.Path(workdir) / LEASE_NAME
    self.stale_after_s = stale_after_s
    self._heartbeat_s = heartbeat_s or stale_after_s / 5
    self._thread: Optional[threading.Thread] = None
    self._token = uuid.uuid4().hex
    self.holder = _holder(self._token)
    self._lost: Optional[dict] = None
    current = self._read()
    if current is not None and self._fresh(current):
      raise UserError(self._in_use_message(current))
    self._write()
    time.sleep(settle_s)
    current = self._read()
    if current is None or current.get("token") != self._token:
      raise UserError(self._in_use_message(current))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._renew, daemon=True,
                                    name="psch-workdir-lease")
    self._thread.start()

  def _read(self) -> Optional[dict]:
    try:
      value = json.loads(self.path.read_text())
    except (FileNotFoundError, ValueError):
      return None
    return value if isinstance(value, dict) else None

  def _write(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self.path.write_text(json.dumps({**self.holder, "heartbeat": time.time()}))

  def _fresh(self, lease: dict) -> bool:
    heartbeat = lease.get("heartbeat")
    return (isinstance(heartbeat, (int, float))
            and time.time() - heartbeat < self.stale_after_s
            and not _holder_died_here(lease))

  def _in_use_message(self, lease: Optional[dict]) -> str:
    return (f"work directory {self.path.parent} is in use by another run: "
            f"{_describe(lease)}, per its lease {self.path}. Wait for it to finish or "
            "stop it, or pass another --workdir. A lease whose holder died expires "
            f"{self.stale_after_s:.0f} s after its last heartbeat; delete {self.path} "
            "only if you are sure no run uses the directory.")

  def _renew(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      current = self._read()
      if current is None or current.get("token") != self._token:
        self._lost = current
        return
      self._write()

  def check(self) -> None:
    """Raises UserError if another run took the lease over."""
    if self._lost is not None:
      raise UserError(self._in_use_message(self._lost) + " (It took over this run's "
                      "lease: stop one of the two runs.)")

  def release(self) -> None:
    """Stops the heartbeat and deletes the lease if it is still this run's."""
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    current = self._read()
    if current is not None and current.get("token") == self._token:
      self.path.unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()


def lock(workdir: str, *, process_index: int = 0):
  """Takes the work directory for this run, or raises UserError naming the holder.

  Args:
    workdir: the work directory (created if missing).
    process_index: this process of a multi-process run; each process takes its own
      lock (`.lock-<process_index>`), so the processes of one run do not exclude each
      other while every process of a second run is refused. On an object store
      only process 0 takes the lease; the others get a no-op lock.

  Returns:
    A `LocalLock` or `Lease` with `release()` and `check()`, usable in `with`.
  """
  if is_remote(workdir):
    if process_index != 0:
      return _NoLock()
    return Lease(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    # The wording of io_utils.check_writable, which tests quote.
    raise UserError(f"work directory {workdir} is not writable ({e.strerror}); pass a "
                    "--workdir you can write to.") from e
  return LocalLock(os.path.join(workdir, f"{LOCAL_LOCK_PREFIX}{process_index}"))


class _NoLock:
  def release(self) -> None:
    pass

  def check(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    pass


def check_bucket(workdir: str) -> None:
  """Refuses a gs:// work directory whose bucket does not exist or cannot be reached:
  writing into it would retry for many minutes inside tf.io.gfile.

  Raises:
    UserError: naming the bucket and the fix.
  """
  scheme, _, rest = workdir.partition("://")
  bucket = f"{scheme}://{rest.split('/', 1)[0]}"
  try:
    reachable = io_utils.isdir(bucket)
  except io_utils.io_errors() as e:
    raise UserError(f"cannot reach the bucket {bucket} of work directory {workdir} "
                    f"({getattr(e, 'message', e)}); check the network and the "
                    "credentials, or pass a local --workdir.") from e
  if not reachable:
    raise UserError(f"the bucket {bucket} of work directory {workdir} does not exist "
                    "or this machine cannot see it (credentials); create it "
                    f"(gcloud storage buckets create {bucket}) or pass another "
                    "--workdir.")


def check_unclaimed(workdir: str, config: Optional[ml_collections.ConfigDict], *,
                    kinds: tuple[str, ...], command: str) -> None:
  """The read-only checks of a work directory before a command writes to it: its
  layout (local), its kind (`check_kind`), and the config against its config.json
  (`check_config_unchanged`; skipped when `config` is None). Writes nothing, creates
  nothing.

  Raises:
    UserError: from those checks.
  """
  if not is_remote(workdir):
    check_layout(workdir)
  else:
    check_bucket(workdir)
  if io_utils.exists(workdir) and not io_utils.isdir(workdir):
    raise UserError(f"work directory {workdir} is a file, not a directory; pass a "
                    "--workdir that is a directory or does not exist yet.")
  check_kind(workdir, kinds, command=command)
  if config is not None:
    check_config_unchanged(config, workdir)


def claim(workdir: str, config: Optional[ml_collections.ConfigDict], *,
          kinds: tuple[str, ...] = (RUN,), command: str = "main.py",
          process_index: int = 0):
  """Locks the work directory, then repeats `check_unclaimed` under the lock (another
  run may have written it since the caller checked).

  Call `check_unclaimed` (and every other check the command has) first: taking the
  lock creates the directory and its lock file. Hold the returned lock until the
  command ends (`with claim(...):`).

  Returns:
    The lock (see `lock`).

  Raises:
    UserError: from `lock` or `check_unclaimed`.
  """
  check_unclaimed(workdir, config, kinds=kinds, command=command)
  held = lock(workdir, process_index=process_index)
  try:
    check_unclaimed(workdir, config, kinds=kinds, command=command)
  except BaseException:
    held.release()
    raise
  return held
