r"""The results table: PSCH, its ablations and the classical baselines, over code
lengths and seeds (`experiments.run_experiments`; its module docstring has the
layout of the experiment directory).

  python -m psch_jax.commands.experiments --config=configs/fashion_mnist.py \
      --bits=16,32,64 --seeds=0,1,2 --workdir=experiments/fashion_mnist \
      [--methods=psch,no_lq,itq] [--epochs_ablation=10] [--ablation_bits=32] \
      [--config.train.num_epochs=20]
"""
import os
import sys
from collections.abc import Sequence

from absl import flags

from psch_jax import cli
from psch_jax import io_utils
from psch_jax import table_rows
from psch_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
COMMAND = "python -m psch_jax.commands.experiments"


def define_flags() -> None:
  cli.define_config_flag(
      "PSCH config file, e.g. configs/fashion_mnist.py (:tiny for the smoke variant); "
      "--config.<field>=<value> overrides apply to every PSCH run.")
  methods = list(table_rows.METHODS)
  flags.DEFINE_list("bits", ["16", "32", "64"], "Code lengths (table columns).")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (mean ± std over them).")
  flags.DEFINE_list("methods", methods, f"Table rows, from {methods}.")
  flags.DEFINE_string("workdir", None, "Experiment directory; default "
                      "experiments/<dataset>.")
  flags.DEFINE_integer("epochs_ablation", None, "train.num_epochs of the ablations "
                       "(default: the config's, as PSCH).")
  flags.DEFINE_list("ablation_bits", None, "Code lengths, among --bits, the ablations "
                    "run at (default: all of --bits); the table marks the others.")
  flags.DEFINE_string("compilation_cache_dir", None, "XLA's persistent compilation "
                      "cache (default <workdir>/jax_cache; '' turns it off). Experiments "
                      "may share one.")


def main(argv: Sequence[str]) -> None:
  del argv
  # First: XLA reads its flags when the backend starts.
  from psch_jax import xla_settings  # pylint: disable=g-import-not-at-top
  xla_settings.apply(FLAGS.config)
  import jax  # pylint: disable=g-import-not-at-top
  from psch_jax import experiments  # pylint: disable=g-import-not-at-top

  config = FLAGS.config
  workdir = FLAGS.workdir or os.path.join("experiments", config.data.name)
  cache_dir = (io_utils.join(workdir, "jax_cache") if FLAGS.compilation_cache_dir is None
               else FLAGS.compilation_cache_dir)
  if cache_dir:
    # Runs that differ only in their seed compile the same programs.
    # JAX's cache writes through etils.epath too: a gs:// directory works.
    jax.config.update("jax_compilation_cache_dir",
                      os.fspath(io_utils.workdir_path(cache_dir)))
  experiments.run_experiments(
      config, workdir=workdir, bits=FLAGS.bits, seeds=FLAGS.seeds, methods=FLAGS.methods,
      ablation_epochs=FLAGS.epochs_ablation, ablation_bits=FLAGS.ablation_bits,
      command=" ".join([COMMAND, *sys.argv[1:]]))
  print(f"wrote {io_utils.join(workdir, workdir_lib.RESULTS_REPORT)}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags, command=COMMAND)
