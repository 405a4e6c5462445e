"""SIGINT and SIGTERM as one exception, held back while a checkpoint is written.

A command (`cli.run`) calls `install()`: both signals then raise `Stopped` in the main
thread, so the command's cleanup runs as for Ctrl-C and it exits with one line. A
signal that lands inside Orbax (waiting for a save to finalize) would be raised there,
and Orbax logs the exception with a traceback before re-raising it. So the
checkpointing functions run their Orbax calls inside `deferred()`: a signal received
there is remembered and raised when the block ends, after the save in flight has
completed. A second signal inside the block raises at once (a user who insists is not
kept waiting on a hung save).

Without `install()` (a library user, a test in-process), `deferred()` changes nothing:
Python's own handler raises KeyboardInterrupt wherever the main thread is.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Optional

STOPPING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
  """SIGINT or SIGTERM, raised where the main thread is; `signum` says which."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


_depth = 0                      # how many deferred() blocks the main thread is in
_pending: Optional[int] = None  # the signal received inside them, not yet raised


def _handle(signum, frame) -> None:
  del frame
  global _pending
  if _depth and _pending is None:
    _pending = signum
    return
  raise Stopped(signum)


def install() -> None:
  """Makes SIGINT and SIGTERM raise `Stopped` (deferred inside `deferred()`).
  Call from the main thread, as `signal.signal` requires."""
  for signum in STOPPING_SIGNALS:
    signal.signal(signum, _handle)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds back a stopping signal until the block ends, then raises `Stopped`.

  If the block raises, its exception propagates and the held signal is dropped: the
  command ends on that error either way.
  """
  global _depth, _pending
  _depth += 1
  completed = False
  try:
    yield
    completed = True
  finally:
    _depth -= 1
    if not _depth:
      signum, _pending = _pending, None
      if completed and signum is not None:
        raise Stopped(signum)
