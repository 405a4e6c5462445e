"""XLA settings a run needs before JAX starts its backend: deterministic GPU kernels.

On a GPU, XLA may pick kernels whose result depends on the order in which threads
finish (atomic scatter-adds, some convolution gradients, autotuned algorithms), so
two runs of one seed can differ in the last bits and, through training, in their
codes. `--xla_gpu_deterministic_ops=true` makes XLA use deterministic kernels only
(it implies `--xla_gpu_exclude_nondeterministic_ops`, autotuning included). XLA
reads XLA_FLAGS once, when JAX starts its first backend, so `apply` must run before
the first JAX computation: every command calls it first thing in its `main`. CPUs
and TPUs give bitwise-equal reruns without it; there the flag changes nothing.
docs/reliability.md has the platform table.
"""
import os

import jax
import ml_collections

from psch_jax.errors import UserError

DETERMINISTIC_GPU_FLAGS = ("--xla_gpu_deterministic_ops=true",)


def _missing_flags() -> list[str]:
  present = os.environ.get("XLA_FLAGS", "").split()
  return [flag for flag in DETERMINISTIC_GPU_FLAGS if flag not in present]


def apply(config: ml_collections.ConfigDict) -> None:
  """Adds to XLA_FLAGS the flags `config.train.deterministic` asks for (nothing when
  it is off: flags the user set stay). Call before JAX starts its backend."""
  missing = _missing_flags() if config.train.deterministic else []
  if missing:
    os.environ["XLA_FLAGS"] = " ".join(
        os.environ.get("XLA_FLAGS", "").split() + missing)


def check_in_effect(config: ml_collections.ConfigDict) -> None:
  """Refuses a deterministic run on a GPU whose backend started without the flags
  (a library caller that did not call `apply` first): its codes would not be
  reproducible, which the config promises.

  Raises:
    UserError: naming the field and both fixes.
  """
  if not config.train.deterministic or jax.default_backend() != "gpu":
    return
  missing = _missing_flags()
  if missing:
    raise UserError(
        "config.train.deterministic is on, but the GPU backend started without "
        f"{' '.join(missing)} in XLA_FLAGS, so this run's codes would not be "
        "reproducible. Call psch_jax.xla_settings.apply(config) before the first JAX "
        "computation (the command lines do), set XLA_FLAGS yourself, or pass "
        "--config.train.deterministic=False.")
