r"""Trains and evaluates PSCH (`python main.py`).

  python main.py --config=configs/fashion_mnist.py --workdir=workdirs/fmnist
  python main.py --config=configs/cifar10.py --config.model.num_bits=64
  python main.py --config=configs/fashion_mnist.py --workdir=... --mode=eval

Bad input (config, data, checkpoint, work directory) prints what is wrong and how to
fix it, and exits with code 2.
"""
import os
from collections.abc import Sequence

from absl import flags

from psch_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The flags of main.py."""
  cli.define_config_flag("Config file, e.g. configs/cifar10.py (add :tiny for the "
                         "smoke variant).")
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


def main(argv: Sequence[str]) -> None:
  """Trains (--mode=train) or evaluates (--mode=eval) FLAGS.config in FLAGS.workdir
  and prints the results."""
  del argv
  # First: XLA reads its flags when the backend starts.
  from psch_jax import xla_settings  # pylint: disable=g-import-not-at-top
  xla_settings.apply(FLAGS.config)
  # After the flags: --help answers without loading JAX.
  import jax  # pylint: disable=g-import-not-at-top
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


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags, command="python -m psch_jax.commands.train")
