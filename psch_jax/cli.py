r"""The command line of every psch_jax command: flags, config files, errors.

  python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python -m psch_jax.experiments --config=configs/fashion_mnist.py --bits=16,32
  python -m psch_jax.diagnostics --config=configs/fashion_mnist.py --workdir=/tmp/diag
  python -m psch_jax.search --workdir=workdirs/fmnist --images=a.png,b.jpg
  python -m psch_jax.reports --workdir=workdirs/fmnist

Every command is absl flags; `--config` is an `ml_collections.config_flags` config file
("path.py" or "path.py:variant", fields overridden as
--config.<section>.<field>=<value>). A command module offers `define_flags()` and
`main(argv)`, and its `__main__` block calls `run(main, define_flags=..., command=...)`:
the absl `app.run(main, flags_parser=...)` pattern, with flags defined only for the
command that runs, so the modules import side by side (several define --workdir).

Before `main` runs, `parse_flags` refuses an argument that is not a flag (a work
directory given without --workdir=) and checks the whole --config
(`config_schema.check_config`), so a bad value stops the command before it reads or
writes anything.

`run` is the one error handler: a `UserError` (or a training run's
`FloatingPointError`, which says the fix) raised while parsing the flags or by the
command prints "error: <what is wrong and how to fix it>" to stderr and exits with
code 2, `errors.EXIT_BAD_INPUT`, never with a traceback. Whatever else `main` returns
is the exit code (`reports` returns 1 when a metric disagrees).

`load_config` reads a config file as --config does, for tests, benchmarks and
notebooks.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from psch_jax.errors import EXIT_BAD_INPUT, UserError, flag_error_message

FLAGS = flags.FLAGS


# ------------------------------------------------------------------------ configs

def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of "path/to/config.py" or "path/to/config.py:variant".

  What --config=`spec` gives before any --config.* override, unlocked: the file's
  `get_config(variant)` (`get_config()` without a variant).

  Raises:
    UserError: the file does not exist, or (from the config file) the variant is
      unknown.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    problem = "is not a file" if os.path.exists(path) else "does not exist"
    raise UserError(f"config file {path!r} {problem}; pass e.g. "
                    "--config=configs/fashion_mnist.py (a path from the current "
                    "directory, :tiny for the smoke variant).")
  module_spec = importlib.util.spec_from_file_location("psch_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


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
      load_config(spec)
    remaining = FLAGS(argv)
    if has_config and not isinstance(FLAGS.config, ml_collections.ConfigDict):
      raise UserError("the file given to --config could not be loaded; pass a config "
                      "file, e.g. --config=configs/fashion_mnist.py.")
    check_no_positional_arguments(remaining)
    if has_config:
      # The one check of the whole config, before the command reads or writes
      # anything. The device count is not known yet (a multi-process run starts its
      # backend after the flags): train.setup_run checks the batch sizes against it.
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
  define_flags()

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


# ----------------------------------------------------- main.py: train and evaluate

def define_train_flags() -> None:
  """The flags of main.py."""
  define_config_flag("Config file, e.g. configs/cifar10.py (add :tiny for the smoke "
                     "variant).")
  flags.DEFINE_string("workdir", None, "Checkpoints, splits, metrics and results go "
                      "here; default workdirs/<dataset>_<bits>bits_seed<seed>.")
  flags.DEFINE_enum("mode", "train", ["train", "eval"],
                    "train (resumes from the latest checkpoint) or eval (latest "
                    "checkpoint, no training).")
  flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of "
                      "process 0 (omit on Cloud TPU, where it is detected).")
  flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of "
                       "processes.")
  flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (Cloud "
                    "TPU pods and SLURM detect the rest).")


def train_main(argv: Sequence[str]) -> None:
  """main.py: trains (--mode=train) or evaluates (--mode=eval) FLAGS.config in
  FLAGS.workdir and prints the results."""
  del argv
  import jax  # pylint: disable=g-import-not-at-top  # after the flags: fast --helpfull
  from psch_jax import train  # pylint: disable=g-import-not-at-top
  from psch_jax.evaluators import retrieval  # pylint: disable=g-import-not-at-top

  if FLAGS.coordinator_address or FLAGS.distributed:
    # Only the CPU backend reads this (it must be set before any backend starts);
    # GPUs and TPUs use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      "workdirs", f"{config.data.name}_{config.model.num_bits}bits_seed{config.seed}")
  if FLAGS.mode == "train":
    results = train.train_and_evaluate(config, workdir)
  else:
    results = train.evaluate_checkpoint(config, workdir)
  if jax.process_count() > 1:
    print(f"[process {jax.process_index()}/{jax.process_count()}] "
          + retrieval.format_results(results), flush=True)
  else:
    print(retrieval.format_results(results))
