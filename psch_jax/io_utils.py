"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new
one, never half of one. And `read_json`, the reader of a work directory's JSON files.

Each writer fills a temporary file in the destination directory (so the final rename
stays on one file system), flushes it to disk, then `os.replace`s it over the target.
"""
import contextlib
import json
import os
import tempfile
from typing import Any, Iterator, IO

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary sibling of `path`; renames it onto `path` only on success."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=directory)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_json(path: str, value: Any) -> None:
  with atomic_open(path) as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")


def write_text(path: str, text: str) -> None:
  with atomic_open(path) as f:
    f.write(text)


def save_npy(path: str, array: np.ndarray) -> None:
  with atomic_open(path, "wb") as f:
    np.save(f, array)


def read_json(path: str, *, missing_fix: str, corrupt_fix: str) -> Any:
  """The JSON value in `path`.

  Raises:
    UserError: the file is missing (the message ends with `missing_fix`) or cannot be
      read or parsed (`corrupt_fix`).
  """
  from psch_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise UserError(f"{path} is missing; {missing_fix}")
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, OSError) as e:
    raise UserError(f"cannot read {path} ({e}); {corrupt_fix}") from e
