r"""Recomputes every metric of a run's results.json from its saved codes with the
NumPy reference, and prints them side by side.

  python -m psch_jax.commands.reports --workdir=workdirs/fmnist

Exit code 0 when all agree, 1 (`reports.EXIT_MISMATCH`) when one differs, 2 on bad
input.
"""
from collections.abc import Sequence

from absl import flags

from psch_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run's work directory.")
  flags.mark_flags_as_required(["workdir"])


def main(argv: Sequence[str]) -> int:
  del argv
  # Imported here: --help and flag errors answer before JAX's imports.
  from psch_jax import reports  # pylint: disable=g-import-not-at-top
  return reports.print_comparison(FLAGS.workdir)


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags, command="python -m psch_jax.commands.reports")
