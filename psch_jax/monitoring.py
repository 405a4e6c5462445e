"""What the training loop shows and guards: metrics.jsonl (and TensorBoard), the
progress display, and the one device-to-host read of the metrics with its
non-finite check.

The loop (`train.run_epoch`) keeps each step's metrics on the device and calls
`read_metrics` only at log points, before saves and at epoch ends: that is where a
non-finite loss term or gradient norm stops the run, naming its steps, and where a
non-finite state is caught before it is saved.
"""
import os
import sys
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from psch_jax import io_utils
from psch_jax import workdir as workdir_lib


class MetricsLog:
  """metrics.jsonl in the work directory (process 0), plus TensorBoard on request.

  Read it back with `io_utils.read_jsonl`, which skips a last line torn by a kill; a
  resumed run replays the steps after its checkpoint, so keep the last record of a
  step.
  """

  def __init__(self, workdir: str, tensorboard: bool):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, workdir_lib.METRICS_FILE)
    self._writer = None
    if self._active and tensorboard:
      import tensorflow as tf  # seconds to import: only on request
      self._tf = tf
      self._writer = tf.summary.create_file_writer(
          os.path.join(workdir, workdir_lib.TENSORBOARD_DIR))

  def write(self, step: int, record: dict) -> None:
    """Appends {"step": step, **record} as one JSON line; scalars to TensorBoard."""
    if not self._active:
      return
    # One write of the whole line, after cutting off a line torn by a kill: a torn
    # record is never read (io_utils.read_jsonl) nor runs into the next one.
    io_utils.append_jsonl(self._path, {"step": step, **record})
    if self._writer is not None:
      with self._writer.as_default(step=step):
        for k, v in record.items():
          if isinstance(v, (int, float)):
            self._tf.summary.scalar(k, v)
      self._writer.flush()


# PSCH's loss terms in the progress line: (shown name, decimals).
_SHOWN_TERMS = {"sim": ("sim", 4), "cls": ("cls", 3), "quant": ("q", 3)}


class Progress:
  """The progress of one epoch, drawn to suit where stderr goes (process 0 only).

  On a terminal: a live tqdm bar with the loss terms and images/s. Into a file or a
  pipe (a log): no redraws, one line when the epoch ends and one at most every
  `line_every_s` seconds before, so a log grows by a few lines per epoch.
  """

  def __init__(self, *, total: int, initial: int, epoch: int, num_epochs: int,
               stream=None, line_every_s: float = 60.0):
    self._stream = sys.stderr if stream is None else stream
    self._active = jax.process_index() == 0
    self._live = self._active and self._stream.isatty()
    self._total, self._done = total, initial
    self._desc = f"epoch {epoch + 1}/{num_epochs}"
    self._line_every_s = line_every_s
    self._last_line = time.perf_counter()
    self._postfix = ""
    self._bar = None
    if self._live:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=self._desc, unit="step",
                       dynamic_ncols=True, leave=True, file=self._stream)

  def update(self, metrics: dict, images_per_s: float, steps: int = 1) -> None:
    """`steps` more steps done (those since the last log point); `metrics` are the
    host floats of the newest."""
    if not self._active:
      return
    self._done += steps
    fields = {"loss": f"{metrics['loss']:.4f}"}
    for key, value in metrics.items():
      # Each term of the method's loss ("loss_<term>"), PSCH's under short names.
      if key.startswith("loss_") and key != "loss_cls_fine":
        term = key[len("loss_"):]
        name, digits = _SHOWN_TERMS.get(term, (term, 4))
        fields[name] = f"{value:.{digits}f}"
    fields["img_s"] = f"{images_per_s:.0f}"
    if self._bar is not None:
      self._bar.set_postfix(refresh=False, **fields)
      self._bar.update(steps)
      return
    self._postfix = ", ".join(f"{k}={v}" for k, v in fields.items())
    now = time.perf_counter()
    if self._done < self._total and now - self._last_line >= self._line_every_s:
      self._line()
      self._last_line = now

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    elif self._active and self._postfix:
      self._line()

  def _line(self) -> None:
    print(f"{self._desc}: step {self._done}/{self._total}, {self._postfix}",
          file=self._stream, flush=True)


NON_FINITE_FIX = (
    "training stopped. Lower optim.learning_rate or check the input normalisation "
    "(data.mean / data.std), and start in a new --workdir.")

def check_finite(window: list[dict], first_step: int) -> None:
  """Raises FloatingPointError naming the window's steps, the first step with a
  non-finite loss term or gradient norm, and those terms.

  Args:
    window: host metrics (name -> float) of steps first_step, first_step + 1, ...
      (a step's number is the state's step count after it).
  """
  # grad_norm too: a non-finite gradient turns the params into NaN through the update,
  # and that state must never reach a checkpoint.
  for offset, metrics in enumerate(window):
    bad = [k for k, v in metrics.items()
           if (k.startswith("loss") or k == "grad_norm") and not np.isfinite(v)]
    if bad:
      last = first_step + len(window) - 1
      raise FloatingPointError(
          f"non-finite {', '.join(sorted(bad))} within steps [{first_step}, {last}], "
          f"first at step {first_step + offset}: {NON_FINITE_FIX}")


@jax.jit
def is_finite(tree) -> jax.Array:
  """bool (): every floating-point leaf of `tree` is finite (on the device)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def read_metrics(pending: list[dict], first_step: int,
                  state: Optional[dict] = None) -> list[dict]:
  """The training loop's one device-to-host transfer: the metrics of the steps since
  the last read, checked for non-finite values; with `state` (before a save) also
  whether every value of the state is finite, so a diverged state is never saved.

  Args:
    pending: device metrics (name -> f32 scalar) of steps first_step, first_step + 1,
      ..., oldest first.
  Returns:
    Their host floats, one dict per step. Raises FloatingPointError on a non-finite one.
  """
  finite = None if state is None else is_finite(state)
  # Allowed here even under a guard that disallows transfers around the loop (as the
  # test of the loop runs it): this is the read the loop means to do.
  with jax.transfer_guard_device_to_host("allow"):
    host, finite = jax.device_get((pending, finite))
  window = [{k: float(v) for k, v in metrics.items()} for metrics in host]
  check_finite(window, first_step)
  if finite is not None and not finite:
    raise FloatingPointError(
        f"non-finite parameters or optimizer state after step "
        f"{first_step + len(window) - 1} (the metrics of steps [{first_step}, "
        f"{first_step + len(window) - 1}] are finite); it was not saved: "
        f"{NON_FINITE_FIX}")
  return window
