r"""The command-line layer every command shares: flags, --config, errors.

The commands themselves are thin modules of `psch_jax.commands` (main.py is
`commands.train`): each offers `define_flags()` and `main(argv)`, and its `__main__`
block calls `run(main, define_flags=..., command=...)`, the absl
`app.run(main, flags_parser=...)` pattern, with flags defined only for the command that
runs. Benchmarks use it the same way. No library module imports this one.

`--config` is an `ml_collections.config_flags` config file ("path.py" or
"path.py:variant", fields overridden as --config.<section>.<field>=<value>). Before
`main` runs, `parse_flags` refuses an argument that is not a flag (a work directory
given without --workdir=) and checks the whole --config
(`config_schema.check_config`), so a bad value stops the command before it reads or
writes anything.

`run` is the one error handler: a `UserError` (or a training run's
`FloatingPointError`, which says the fix) raised while parsing the flags or by the
command prints "error: <what is wrong and how to fix it>" to stderr and exits with
code 2, `errors.EXIT_BAD_INPUT`, never with a traceback. Whatever else `main` returns
is the exit code (`commands.reports` returns 1 when a metric disagrees).

SIGINT (Ctrl-C) and SIGTERM stop a command with one line, after its cleanup has run
(a checkpoint save in flight completes, `interrupts.deferred`; the lock is released):
what the work directory keeps and how to resume; the exit code is 128 + the signal's
number (130, 143). A full disk (ENOSPC, EDQUOT) is an "error:" line naming the path,
exit code 2: every file is written aside and renamed, so nothing is half-written.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from psch_jax import config as psch_config
from psch_jax import interrupts
from psch_jax.errors import EXIT_BAD_INPUT, UserError, flag_error_message

FLAGS = flags.FLAGS


# ------------------------------------------------------------------------ configs

def define_config_flag(help_string: str) -> None:
  """--config, a required config file whose fields --config.<field>=<value> override."""
  config_flags.DEFINE_config_file("config", None, help_string, lock_config=True)
  flags.mark_flags_as_required(["config"])


def _config_specs(argv: Sequence[str]) -> list[str]:
  """The values given to --config in `argv` (as --config=X or --config X)."""
  specs = []
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    match = re.fullmatch(r"--?config(?:=(.*))?", arg)
    if match and match.group(1) is not None:
      specs.append(match.group(1))
    elif match and i + 1 < len(argv):
      specs.append(argv[i + 1])
  return specs


# ------------------------------------------------------------------ flags, errors

def exit_bad_input(message: str) -> NoReturn:
  """Prints "error: `message`" to stderr and exits with code 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: Sequence[str], *, command: str) -> list[str]:
  """absl's flag parsing, every bad flag an "error: ..." and exit code 2.

  Args:
    argv: the command line, program name first.
    command: how the user starts the command (e.g. "python main.py"), for the hint.

  Returns:
    The arguments left after the flags, program name first (what `main` gets).
  """
  has_config = "config" in FLAGS
  try:
    # config_flags defers a missing file to the first use of the config and wraps
    # an unknown variant's error in a traceback's text; loading the file here first
    # reports both as the UserError that says the fix.
    for spec in _config_specs(argv) if has_config else ():
      psch_config.load_config(spec)
    remaining = FLAGS(argv)
    if has_config and not isinstance(FLAGS.config, ml_collections.ConfigDict):
      raise UserError("the file given to --config could not be loaded; pass a config "
                      "file, e.g. --config=configs/fashion_mnist.py.")
    check_no_positional_arguments(remaining)
    if has_config:
      # The one check of the whole config, before the command reads or writes
      # anything. The device count is not known yet (a multi-process run starts its
      # backend after the flags): run_setup.setup_run checks the batch sizes against it.
      from psch_jax import config_schema  # pylint: disable=g-import-not-at-top
      config_schema.check_config(FLAGS.config, num_devices=None)
  except UserError as e:
    exit_bad_input(str(e))
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError, OSError) as e:
    hint = f"Run `{command} --helpfull` for the flags"
    if has_config:
      hint += "; config fields are overridden as --config.<section>.<field>=<value>"
    exit_bad_input(f"{flag_error_message(e)}\n{hint}.")
  return remaining


def check_no_positional_arguments(remaining: Sequence[str]) -> None:
  """Refuses arguments that are not flags: every command takes only flags, and a
  bare path (`python main.py --config=... /tmp/run`) would otherwise be ignored and
  the run go to the default work directory.

  Args:
    remaining: what absl's parsing left, program name first.

  Raises:
    UserError: naming the first such argument and the flag it was probably meant for.
  """
  extra = list(remaining[1:])
  if not extra:
    return
  listed = " ".join(repr(a) for a in extra)
  raise UserError(
      f"unexpected argument{'s' if len(extra) > 1 else ''} {listed}: the command takes "
      f"only flags. For a work directory pass --workdir={extra[0]}; config fields are "
      "set as --config.<section>.<field>=<value>.")


def _exit_now(code: int) -> NoReturn:
  """Exits without the interpreter's shutdown, once the command's cleanup has run:
  Orbax's and TensorStore's background work of a failed or interrupted save would
  print tracebacks while the interpreter tears down under it."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _quiet_closed_event_loop(hook):
  """`sys.excepthook` that drops TensorStore's "Event loop is closed" reports (its
  callbacks of a failed save, arriving after Orbax closed the loop; the failure
  itself reaches the command as an exception) and passes on everything else."""
  def excepthook(kind, value, traceback):
    if kind is RuntimeError and str(value) == "Event loop is closed":
      return
    hook(kind, value, traceback)
  return excepthook


def _object_store_errors() -> tuple[type[BaseException], ...]:
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  return (errors.OpError,) if errors is not None else ()


def _kept() -> str:
  """What the work directory of the stopped command keeps, in one sentence."""
  workdir = FLAGS["workdir"].value if "workdir" in FLAGS else None
  if not workdir:
    return "nothing was half-written. Rerun the same command."
  from psch_jax import checkpointing  # pylint: disable=g-import-not-at-top
  try:
    step = checkpointing.latest_step(workdir)
  except Exception:  # pylint: disable=broad-except  (a message, never a new error)
    step = None
  kept = (f"{workdir} keeps its checkpoint of step {step}" if step is not None else
          f"{workdir} keeps what was committed before")
  return (f"{kept}, and nothing half-written. Rerun the same command to resume.")


def run(main: Callable[[list[str]], int | None], *,
        define_flags: Callable[[], None], command: str) -> NoReturn:
  """Defines the command's flags, parses them and runs `main(argv)`; exits with
  `main`'s return value (None: 0), or 2 on bad input (see the module docstring)."""
  defined_before = set(FLAGS)
  define_flags()
  # `--help` lists the key flags of the module named by sys.argv[0] (main.py, or the
  # file of `python -m`): the command's flags are defined in its commands/ module.
  for name in set(FLAGS) - defined_before:
    FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])

  def main_with_errors(argv: list[str]) -> int | None:
    # tfds and Orbax log every read and save at INFO (the level app.run sets);
    # each command prints what it did.
    logging.set_verbosity(logging.WARNING)
    interrupts.install()
    sys.excepthook = _quiet_closed_event_loop(sys.excepthook)
    try:
      return main(argv)
    except (UserError, FloatingPointError) as e:
      exit_bad_input(str(e))
    except KeyboardInterrupt as e:
      signum = getattr(e, "signum", signal.SIGINT)
      print(f"stopped by {signal.Signals(signum).name}: {_kept()}", file=sys.stderr)
      _exit_now(128 + signum)
    except _object_store_errors() as e:
      # tf.io.gfile's errors on gs:// (a bucket that does not exist, no network,
      # no credentials): the message names the object.
      exit_bad_input(f"cannot reach the object store: {getattr(e, 'message', e)}. "
                     "Check that the bucket exists and that this machine can reach it "
                     "(network, credentials), or pass a local --workdir.")
    except OSError as e:
      if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        raise
      print(f"error: no space left on the device of "
            f"{e.filename or 'the work directory'} ({e.strerror}). Every file is "
            "written aside and renamed, so nothing is half-written: free space and "
            "rerun the same command; it resumes from the newest complete checkpoint.",
            file=sys.stderr)
      _exit_now(EXIT_BAD_INPUT)

  app.run(main_with_errors, flags_parser=functools.partial(parse_flags,
                                                           command=command))
