"""The command lines: each module is one command's flags and `main`, and nothing else.

  python main.py --config=configs/fashion_mnist.py          (commands/train.py)
  python -m psch_jax.commands.experiments --config=...       the results table
  python -m psch_jax.commands.diagnostics --config=... --workdir=...
  python -m psch_jax.commands.search --workdir=... --images=a.png,b.jpg
  python -m psch_jax.commands.reports --workdir=...

Each calls `psch_jax.cli.run` (flags, --config, the one error handler) and the
library function that does the work. No library module imports this package.
"""
