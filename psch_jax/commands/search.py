r"""Ranks a trained run's database for new images.

  python -m psch_jax.commands.search --workdir=workdirs/fmnist --images=a.png,b.jpg \
      [--topk=10]

Prints, per image, the `topk` nearest database images by Hamming distance (ties by
database index) with their labels.
"""
from collections.abc import Sequence

from absl import flags

from psch_jax import cli

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The run's work directory (trained and "
                      "evaluated by main.py).")
  flags.DEFINE_string("images", None, "Comma-separated image files, e.g. a.png,b.jpg.")
  flags.DEFINE_integer("topk", 10, "Results per image.")
  flags.mark_flags_as_required(["workdir", "images"])


def main(argv: Sequence[str]) -> None:
  del argv
  # Imported here: --help and flag errors answer before JAX's imports.
  from psch_jax import search  # pylint: disable=g-import-not-at-top
  paths = [p for p in FLAGS.images.split(",") if p]
  results = search.search(FLAGS.workdir, paths, topk=FLAGS.topk)
  print("\n\n".join(search.format_matches(p, m) for p, m in zip(paths, results)))


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags, command="python -m psch_jax.commands.search")
