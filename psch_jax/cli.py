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
"""
from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from psch_jax import config as psch_config
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
    try:
      return main(argv)
    except (UserError, FloatingPointError) as e:
      exit_bad_input(str(e))

  app.run(main_with_errors, flags_parser=functools.partial(parse_flags,
                                                           command=command))
