r"""Trains and evaluates PSCH.

  python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python main.py --config=configs/cifar10.py --config.model.num_bits=64
  python main.py --config=configs/fashion_mnist.py --workdir=... --mode=eval

Bad input (config, data, checkpoint, work directory) prints what is wrong and how to
fix it, and exits with code 2.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from psch_jax.errors import EXIT_BAD_INPUT, flag_error_message

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/cifar10.py "
                                "(add :tiny for the smoke variant).", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, splits, metrics and results go here; "
                    "default workdirs/<dataset>_<bits>bits_seed<seed>.")
flags.DEFINE_enum("mode", "train", ["train", "eval"],
                  "train (resumes from the latest checkpoint) or eval (latest "
                  "checkpoint, no training).")
flags.DEFINE_string("coordinator_address", None, "Multi-process runs: host:port of "
                    "process 0 (omit on Cloud TPU, where it is detected).")
flags.DEFINE_integer("num_processes", None, "Multi-process runs: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process's index.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (Cloud TPU "
                  "pods and SLURM detect the rest).")
flags.mark_flags_as_required(["config"])



def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    print(f"error: {flag_error_message(e)}\nRun `python main.py --helpfull` for the flags; config fields "
          "are overridden as --config.<section>.<field>=<value>.", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv):
  del argv
  import jax  # after flag parsing, so --helpfull is fast
  from psch_jax.errors import UserError
  from psch_jax import train
  from psch_jax.evaluators import retrieval

  FLAGS = flags.FLAGS
  # Orbax and tfds log every save and read at INFO; the progress bar says enough.
  logging.set_verbosity(logging.WARNING)
  if FLAGS.coordinator_address or FLAGS.distributed:
    # Only the CPU backend reads this (it must be set before any backend starts);
    # GPUs and TPUs use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                               FLAGS.process_id)
  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join(
      "workdirs", f"{config.data.name}_{config.model.num_bits}bits_seed{config.seed}")
  try:
    if FLAGS.mode == "train":
      results = train.train_and_evaluate(config, workdir)
    else:
      results = train.evaluate_checkpoint(config, workdir)
  except (UserError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)
  if jax.process_count() > 1:
    print(f"[process {jax.process_index()}/{jax.process_count()}] "
          + retrieval.format_results(results), flush=True)
  else:
    print(retrieval.format_results(results))


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
