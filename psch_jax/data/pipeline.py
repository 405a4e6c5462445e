"""Host-side batching: per-epoch order, per-process slices, padded eval batches.

Every process computes the same global order (a pure function of seed and
epoch), cuts it into global batches and keeps its own `global_batch_size //
process_count` consecutive rows of each, so the processes' slices partition every
global batch and `jax.make_array_from_process_local_data` can assemble it. Resuming
at step k of an epoch yields exactly the batches the uninterrupted run yields
from k on. Images are read by background threads, `prefetch` batches ahead and
`num_workers` batches at a time, and yielded in step order (docs/benchmarks.md,
"Input pipeline", measures what this buys for JPEG-stored sets).
"""
from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from psch_jax.data.sources import ImageSource
from psch_jax.errors import UserError

# Batches read ahead, and read at the same time, by default (docs/benchmarks.md,
# "Input pipeline": 2 at a time keeps 2 cores decoding JPEG batches).
DEFAULT_PREFETCH = 4
DEFAULT_NUM_WORKERS = 2


def epoch_order(indices: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
  """Shuffles `indices` for one epoch.

  Args:
    indices: int (n,) global indices (e.g. the train split).
    seed: run seed, >= 0.
    epoch: epoch number, >= 0.

  Returns:
    int64 (n,): `indices` permuted by np.random.default_rng([seed, epoch]), the
    same on every process and every call.
  """
  if seed < 0 or epoch < 0:
    raise UserError(f"seed ({seed}) and epoch ({epoch}) must be >= 0.")
  indices = np.asarray(indices, np.int64)
  return indices[np.random.default_rng([seed, epoch]).permutation(indices.size)]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in an epoch (the remainder is dropped)."""
  return num_examples // global_batch_size


def num_eval_steps(num_examples: int, batch_size: int) -> int:
  """Global batches `eval_batches` yields (the last one padded)."""
  return -(-num_examples // batch_size)


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} must lie in "
                    f"[0, process_count={process_count}).")
  if batch_size < 1 or batch_size % process_count:
    raise UserError(f"batch size {batch_size} must be a positive multiple of the "
                    f"process count {process_count}.")
  return batch_size // process_count


class _OrderedReader:
  """Reads batches `read(step)` for `steps` on `num_workers` threads, yielding them in
  step order, at most `depth` batches ahead of the consumer.

  Each batch is a pure function of its step, so reading several at once changes
  only when they are read, never what is yielded or in which order. Several batches
  in flight keep the host cores busy through the serial parts of a read (record
  lookup, stacking) that a source's own decoding threads wait on. An exception in
  `read` is re-raised by `__next__` for that step. `close` (also called on
  exhaustion or error) and garbage collection cancel the batches not yet started.
  The worker threads reference `read`, never this reader, so an abandoned reader is
  collected and its `__del__` stops them.
  """

  def __init__(self, read: Callable[[int], Any], steps: Iterable[int], *,
               depth: int, num_workers: int):
    self._pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=max(1, min(num_workers, depth)),
        thread_name_prefix="psch_jax-batch-reader")
    self._read = read
    self._steps = iter(steps)
    self._pending: collections.deque = collections.deque()
    self._done = False
    for _ in range(depth):
      self._submit_next()

  def _submit_next(self) -> None:
    step = next(self._steps, None)
    if step is not None:
      self._pending.append(self._pool.submit(self._read, step))

  def __iter__(self) -> _OrderedReader:
    return self

  def __next__(self) -> Any:
    if self._done or not self._pending:
      self.close()
      raise StopIteration
    future = self._pending.popleft()
    self._submit_next()
    try:
      return future.result()
    except BaseException:
      self.close()
      raise

  def close(self) -> None:
    self._done = True
    for future in self._pending:
      future.cancel()
    self._pending.clear()
    self._pool.shutdown(wait=True, cancel_futures=True)

  def __del__(self) -> None:
    self._pool.shutdown(wait=False, cancel_futures=True)


def _read_in_order(read: Callable[[int], Any], steps: range, prefetch: int,
                   num_workers: int) -> Iterator[Any]:
  if prefetch <= 0:
    return (read(step) for step in steps)
  return _OrderedReader(read, steps, depth=prefetch, num_workers=num_workers)


def train_batches(source: ImageSource, indices: np.ndarray, *, seed: int, epoch: int,
                  global_batch_size: int, process_index: int, process_count: int,
                  start_step: int = 0, prefetch: int = DEFAULT_PREFETCH,
                  num_workers: int = DEFAULT_NUM_WORKERS
                  ) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's slice of each global training batch of one epoch.

  Args:
    source: the images.
    indices: int (n,) global indices to train on.
    seed, epoch: fix the order (`epoch_order`).
    global_batch_size: images per step over all processes; the last
      `n % global_batch_size` images of the epoch's order are dropped.
    process_index, process_count: this process and how many there are.
    start_step: first step to yield (resume), in [0, steps_per_epoch].
    prefetch: batches read ahead by background threads (0: read inline).
    num_workers: batches read at the same time (at most `prefetch`); the batches
      and their order do not depend on it.

  Yields:
    {"images": uint8 (b, H, W, C), "index": int64 (b,)} with
    b = global_batch_size // process_count: rows
    [process_index * b, (process_index + 1) * b) of the global batch.
  """
  local = _local_batch_size(global_batch_size, process_index, process_count)
  order = epoch_order(indices, seed=seed, epoch=epoch)
  num_steps = steps_per_epoch(order.size, global_batch_size)
  if num_steps == 0:
    raise UserError(f"{order.size} training images do not fill one global batch "
                    f"of {global_batch_size}; lower the batch size.")
  if not 0 <= start_step <= num_steps:
    raise UserError(f"start_step {start_step} must lie in [0, {num_steps}] "
                    f"(steps per epoch).")

  def read(step: int) -> dict[str, np.ndarray]:
    start = step * global_batch_size + process_index * local
    rows = order[start:start + local]
    return {"images": source.read(rows), "index": rows}

  return _read_in_order(read, range(start_step, num_steps), prefetch, num_workers)


def eval_batches(source: ImageSource, indices: np.ndarray, *, batch_size: int,
                 process_index: int, process_count: int,
                 prefetch: int = DEFAULT_PREFETCH,
                 num_workers: int = DEFAULT_NUM_WORKERS
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Yields fixed-size batches of `indices`, in order, the last one padded.

  Every process yields `num_eval_steps(len(indices), batch_size)` batches of the
  same shape, so a jit-compiled step sees one shape and no process waits for
  another at the end.

  Args:
    source: the images.
    indices: int (n,) global indices to encode, in the order to keep.
    batch_size: global batch size over all processes.
    process_index, process_count: this process and how many there are.
    prefetch: batches read ahead by background threads (0: read inline).
    num_workers: batches read at the same time (at most `prefetch`).

  Yields:
    {"images": uint8 (b, H, W, C), "index": int64 (b,), "mask": bool (b,)} with
    b = batch_size // process_count, this process's rows of the global batch;
    padding rows have mask False, index -1 and zero images.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  indices = np.asarray(indices, np.int64)
  num_steps = num_eval_steps(indices.size, batch_size)

  def read(step: int) -> dict[str, np.ndarray]:
    start = step * batch_size + process_index * local
    rows = indices[start:start + local]
    index = np.full(local, -1, np.int64)
    index[:rows.size] = rows
    mask = index >= 0
    images = np.zeros((local, *source.image_shape), np.uint8)
    images[:rows.size] = source.read(rows)
    return {"images": images, "index": index, "mask": mask}

  return _read_in_order(read, range(num_steps), prefetch, num_workers)
