"""Stopping signals: raised as `Stopped` where the main thread is, held back inside
`deferred()` (a checkpoint being written) and raised once it ends."""
import os
import signal

import pytest

from psch_jax import interrupts


@pytest.fixture
def installed():
  previous = {s: signal.getsignal(s) for s in interrupts.STOPPING_SIGNALS}
  interrupts.install()
  yield
  for signum, handler in previous.items():
    signal.signal(signum, handler)


@pytest.mark.parametrize("signum", interrupts.STOPPING_SIGNALS)
def test_a_signal_outside_a_deferred_block_raises_at_once(installed, signum):
  with pytest.raises(interrupts.Stopped) as stopped:
    os.kill(os.getpid(), signum)
  assert stopped.value.signum == signum
  assert isinstance(stopped.value, KeyboardInterrupt)  # cleanup runs as for Ctrl-C


@pytest.mark.parametrize("signum", interrupts.STOPPING_SIGNALS)
def test_a_signal_inside_a_deferred_block_is_raised_when_it_ends(installed, signum):
  finished = []
  with pytest.raises(interrupts.Stopped) as stopped:
    with interrupts.deferred():
      with interrupts.deferred():  # nested: held until the outermost block ends
        os.kill(os.getpid(), signum)
        finished.append("inner")
      finished.append("outer")
  assert finished == ["inner", "outer"]
  assert stopped.value.signum == signum
  with interrupts.deferred():  # the held signal was raised once, not kept
    pass


def test_a_second_signal_inside_a_deferred_block_raises_at_once(installed):
  with pytest.raises(interrupts.Stopped) as stopped:
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGTERM)
      os.kill(os.getpid(), signal.SIGINT)
      pytest.fail("the second signal did not raise")
  assert stopped.value.signum == signal.SIGINT


def test_an_error_inside_a_deferred_block_propagates_instead_of_the_signal(installed):
  with pytest.raises(OSError, match="disk"):
    with interrupts.deferred():
      os.kill(os.getpid(), signal.SIGINT)
      raise OSError("disk full")
  with interrupts.deferred():  # and the dropped signal does not come back later
    pass
