r"""How well the step-0 targets rank the training set, before any training.

  python -m psch_jax.commands.diagnostics --config=configs/fashion_mnist.py \
      --workdir=/tmp/diag [--query_stride=5]

Writes <workdir>/target_quality.json and prints the report
(`diagnostics.target_quality`).
"""
from collections.abc import Sequence

from absl import flags

from psch_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  cli.define_config_flag("PSCH config file, e.g. configs/fashion_mnist.py (:tiny for "
                         "the smoke variant).")
  flags.DEFINE_string("workdir", None, "Directory for the splits and "
                      "target_quality.json (a training run's directory reuses its "
                      "splits).")
  flags.DEFINE_integer("query_stride", 1, "Rank every query_stride-th training image "
                       "as a query (1 = all of them).")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> None:
  del argv
  # Imported here: --help and flag errors answer before JAX's imports.
  # pylint: disable=g-import-not-at-top
  from psch_jax import xla_settings
  xla_settings.apply(FLAGS.config)  # before the backend starts
  from psch_jax import diagnostics
  from psch_jax import io_utils
  # pylint: enable=g-import-not-at-top
  report = diagnostics.target_quality(FLAGS.config, FLAGS.workdir,
                                      query_stride=FLAGS.query_stride)
  path = io_utils.join(io_utils.workdir_path(FLAGS.workdir), diagnostics.REPORT_FILE)
  print(diagnostics.format_report(report))
  print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m psch_jax.commands.diagnostics")
