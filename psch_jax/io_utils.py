"""Work-directory files on a local disk or an object store (gs://), through one path type.

Every path a run reads or writes goes through `workdir_path`, an `etils.epath.Path`:
local paths are made absolute, `gs://bucket/dir` stays a Cloud Storage path (epath
reaches it through tf.io.gfile, the file system Orbax and tfds use too).

Small files (JSON, text, .npy, figures) are written so that a reader, or a rerun
after a kill, sees the old file or the new one, never half of one
(docs/reliability.md, "Writes per file system"):
- local disk: a temporary sibling is filled, flushed to disk (fsync) and renamed
  over the target (`os.replace`, atomic within one file system);
- object store: the whole content is uploaded as one object in one write; an
  object becomes visible only when its upload completes (a single GCS object
  write is atomic), so no temporary object or rename is needed (a "rename" on
  GCS is a copy plus a delete, not atomic).

metrics.jsonl (`append_jsonl`, `read_jsonl`) is a log of one JSON record per line:
locally each record is one O_APPEND write; on an object store, which cannot append,
each record rewrites the whole object (one atomic upload). `read_jsonl` drops a last
line without its newline (a record torn by a kill), and the next append cuts it off.
"""
import contextlib
import io
import json
import os
import posixpath
import sys
import tempfile
from typing import Any, Iterator, IO, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike]

# URI schemes that name an object store rather than a local path (epath's set).
_OBJECT_STORE_SCHEMES = ("gs://", "s3://", "az://")


def is_object_store(path: PathLike) -> bool:
  """True for gs:// (and s3://, az://) paths, where objects replace files."""
  return os.fspath(path).startswith(_OBJECT_STORE_SCHEMES)


def workdir_path(path: PathLike) -> epath.Path:
  """The `epath.Path` of a work directory (or a file in one): local paths made
  absolute (so a later chdir cannot move them), gs:// paths kept as they are."""
  text = os.fspath(path)
  return epath.Path(text if is_object_store(text) else os.path.abspath(text))


def join(directory: PathLike, *names: str) -> str:
  """`directory/name/...` as a string, for a local directory or a gs:// one alike
  (object-store keys use "/" as local POSIX paths do). A relative local directory
  stays relative: messages show the path the user gave."""
  return posixpath.join(os.fspath(directory), *names)


def io_errors() -> tuple[type[BaseException], ...]:
  """The exception types a failed read or write raises: OSError locally; on gs://
  tf.io.gfile raises tf.errors.OpError subclasses that epath does not translate."""
  errors: tuple[type[BaseException], ...] = (OSError,)
  tf = sys.modules.get("tensorflow")
  if tf is not None and hasattr(tf, "errors"):
    errors += (tf.errors.OpError,)
  return errors


# ------------------------------------------------------------------ directories

def exists(path: PathLike) -> bool:
  return workdir_path(path).exists()


def isdir(path: PathLike) -> bool:
  return workdir_path(path).is_dir()


def isfile(path: PathLike) -> bool:
  return workdir_path(path).is_file()


def makedirs(path: PathLike) -> None:
  """Creates `path` and its parents (no error if they exist). On an object store
  this writes directory marker objects, as tf.io.gfile and Orbax do."""
  workdir_path(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
  """The sorted names (not paths) of the entries of directory `path`."""
  return sorted(p.name for p in workdir_path(path).iterdir())


# Each file read is one or more round trips on an object store, so the files of a
# checkpoint are hashed concurrently (hashlib releases the GIL); each thread holds one
# chunk at a time.
_DIGEST_THREADS = 8
_DIGEST_CHUNK_BYTES = 1 << 24


def file_digest(path: PathLike) -> str:
  """sha256 hex of one file, local or on an object store, read in 16 MiB chunks (a
  checkpoint's files can be GiBs)."""
  import hashlib  # pylint: disable=g-import-not-at-top
  digest = hashlib.sha256()
  with workdir_path(path).open("rb") as f:
    while chunk := f.read(_DIGEST_CHUNK_BYTES):
      digest.update(chunk)
  return digest.hexdigest()


def file_digests(directory: PathLike) -> dict[str, str]:
  """{path relative to `directory` ("/"-separated): sha256 hex} of every file under
  it, local or on an object store (listed one level at a time: epath refuses a
  recursive glob on gs://), the files hashed by `file_digest` in parallel."""
  from concurrent import futures  # pylint: disable=g-import-not-at-top
  root = workdir_path(directory)
  files, pending = [], [root]
  while pending:
    for path in pending.pop().iterdir():
      (pending if path.is_dir() else files).append(path)
  with futures.ThreadPoolExecutor(max_workers=_DIGEST_THREADS) as pool:
    hexdigests = list(pool.map(file_digest, files))
  prefix = len(os.fspath(root))
  return dict(sorted((os.fspath(path)[prefix:].lstrip("/"), hexdigest)
                     for path, hexdigest in zip(files, hexdigests)))


def remove(path: PathLike, *, missing_ok: bool = True) -> None:
  """Deletes one file (object)."""
  workdir_path(path).unlink(missing_ok=missing_ok)


def check_writable(directory: PathLike, *, probe_name: str = ".write-test") -> None:
  """Creates `directory` and writes and deletes a probe file in it.

  Raises:
    UserError: the directory cannot be created or written (names it).
  """
  from psch_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  path = workdir_path(directory)
  try:
    makedirs(path)
    probe = path / probe_name
    write_bytes(probe, b"")
    remove(probe)
  except io_errors() as e:
    reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
    raise UserError(f"work directory {path} is not writable ({reason}); "
                    "pass a --workdir you can write to.") from e


# ---------------------------------------------------------------- atomic writes

def _local_atomic_write(path: str, data: bytes) -> None:
  """Temporary sibling + fsync + os.replace: the rename is the commit."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_bytes(path: PathLike, data: bytes) -> None:
  """Writes `data` to `path` atomically (see the module docstring)."""
  target = workdir_path(path)
  if is_object_store(target):
    # One open-write-close of the whole content: tf.io.gfile uploads it at close
    # as one object; nothing is visible before, and a failed upload leaves the
    # previous object. (An intermediate flush() would upload a partial object.)
    with target.open("wb") as f:
      f.write(data)
  else:
    _local_atomic_write(os.fspath(target), data)


@contextlib.contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[IO]:
  """A file object whose content replaces `path` atomically when the block ends
  without an exception (nothing is written otherwise). For writers that want a
  file object: `np.save`, matplotlib's `savefig(f, format=...)`.

  Args:
    path: the target, local or gs://.
    mode: "w" (text, UTF-8) or "wb".
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
  buffer = io.BytesIO()
  if mode == "w":
    text = io.TextIOWrapper(buffer, encoding="utf-8", newline="")
    yield text
    text.flush()
    data = buffer.getvalue()
    text.detach()
  else:
    yield buffer
    data = buffer.getvalue()
  write_bytes(path, data)


def write_text(path: PathLike, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, value: Any) -> None:
  write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")


def save_npy(path: PathLike, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  write_bytes(path, buffer.getvalue())


def save_figure(path: PathLike, figure, **savefig_kwargs) -> None:
  """Renders a matplotlib `figure` in memory (format from the suffix of `path`)
  and writes it atomically."""
  buffer = io.BytesIO()
  fmt = savefig_kwargs.pop("format", None) or os.fspath(path).rsplit(".", 1)[-1]
  figure.savefig(buffer, format=fmt, **savefig_kwargs)
  write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------ reads

def read_bytes(path: PathLike) -> bytes:
  return workdir_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return read_bytes(path).decode("utf-8")


def load_npy(path: PathLike) -> np.ndarray:
  """The array in a .npy file (no pickles)."""
  return np.load(io.BytesIO(read_bytes(path)), allow_pickle=False)


def read_json(path: PathLike, *, missing_fix: str, corrupt_fix: str) -> Any:
  """The JSON value in `path`.

  Raises:
    UserError: the file is missing (the message ends with `missing_fix`) or cannot be
      read or parsed (`corrupt_fix`).
  """
  from psch_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not isfile(path):
    raise UserError(f"{path} is missing; {missing_fix}")
  try:
    return json.loads(read_text(path))
  except (ValueError,) + io_errors() as e:
    raise UserError(f"cannot read {path} ({e}); {corrupt_fix}") from e


# ------------------------------------------------------------------ JSON lines

def _complete_lines(data: bytes) -> bytes:
  """`data` up to and including its last newline: drops a torn last record."""
  return data[:data.rfind(b"\n") + 1]


def append_jsonl(path: PathLike, record: dict) -> None:
  """Appends `record` as one line of JSON to `path` (one writer process at a time).

  Local disk: one write(2) of the whole line to a descriptor opened with O_APPEND,
  after cutting off a torn last line left by a kill (so it cannot run into this
  record). Object store: the object is read, its complete lines kept, the record
  added, and the whole content uploaded as one object (an object cannot be appended
  to; each append costs one read and one upload of the log so far).
  """
  line = (json.dumps(record, sort_keys=True) + "\n").encode("utf-8")
  target = workdir_path(path)
  if is_object_store(target):
    previous = read_bytes(target) if target.exists() else b""
    write_bytes(target, _complete_lines(previous) + line)
    return
  os.makedirs(os.path.dirname(os.fspath(target)), exist_ok=True)
  fd = os.open(os.fspath(target), os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
  try:
    size = os.fstat(fd).st_size
    if size and os.pread(fd, 1, size - 1) != b"\n":
      with open(os.fspath(target), "rb") as f:
        os.ftruncate(fd, len(_complete_lines(f.read())))
    os.write(fd, line)
  finally:
    os.close(fd)


def read_jsonl(path: PathLike) -> list[dict]:
  """The records of a JSON-lines file, ignoring a torn last line (one without its
  newline); [] when the file does not exist.

  Raises:
    UserError: a complete line is not JSON (the file is corrupt, not torn).
  """
  from psch_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not exists(path):
    return []
  lines = _complete_lines(read_bytes(path)).decode("utf-8").splitlines()
  records = []
  for number, text in enumerate(lines, 1):
    try:
      records.append(json.loads(text))
    except ValueError as e:
      raise UserError(f"{path} line {number} is not JSON ({e}); delete the file "
                      "or that line.") from e
  return records
