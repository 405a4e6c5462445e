"""Host-side batching: per-epoch order, per-process slices, padded eval batches.

Every process computes the same global order (a pure function of seed and
epoch), cuts it into global batches and keeps its own `global_batch_size //
process_count` consecutive rows of each, so the processes' slices partition every
global batch and `jax.make_array_from_process_local_data` can assemble it. Resuming
at step k of an epoch yields exactly the batches the uninterrupted run yields
from k on. Images are read by a background thread, `prefetch` batches ahead.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from psch_jax.data.sources import ImageSource
from psch_jax.errors import UserError


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


def _produce(items: Iterator[Any], out: queue.Queue, stop: threading.Event) -> None:
  """Thread body: puts ("item", x) per item, then ("end", None) or ("error", e).

  It references neither the consumer nor its `_Prefetcher`, so an abandoned
  prefetcher is garbage-collected and its `__del__` stops this thread.
  """

  def put(entry: tuple[str, Any]) -> bool:
    while not stop.is_set():
      try:
        out.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  try:
    for item in items:
      if not put(("item", item)):
        return
  except BaseException as e:  # pylint: disable=broad-except
    put(("error", e))
    return
  put(("end", None))


class _Prefetcher:
  """Runs an iterator in a daemon thread, `depth` items ahead of the consumer.

  An exception in the thread is re-raised by `__next__`. `close` (also called on
  exhaustion) and garbage collection stop the thread after its current item.
  """

  def __init__(self, items: Iterator[Any], depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._done = False
    self._thread = threading.Thread(target=_produce,
                                    args=(items, self._queue, self._stop),
                                    daemon=True)
    self._thread.start()

  def __iter__(self) -> _Prefetcher:
    return self

  def __next__(self) -> Any:
    if self._done:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == "item":
      return value
    self.close()
    if kind == "error":
      raise value
    raise StopIteration

  def close(self) -> None:
    self._done = True
    self._stop.set()
    self._thread.join()

  def __del__(self) -> None:
    self._stop.set()


def _maybe_prefetch(items: Iterator[Any], prefetch: int) -> Iterator[Any]:
  return _Prefetcher(items, prefetch) if prefetch > 0 else items


def train_batches(source: ImageSource, indices: np.ndarray, *, seed: int, epoch: int,
                  global_batch_size: int, process_index: int, process_count: int,
                  start_step: int = 0, prefetch: int = 2
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
    prefetch: batches read ahead by a background thread (0: read inline).

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

  def batches() -> Iterator[dict[str, np.ndarray]]:
    for step in range(start_step, num_steps):
      start = step * global_batch_size + process_index * local
      rows = order[start:start + local]
      yield {"images": source.read(rows), "index": rows}

  return _maybe_prefetch(batches(), prefetch)


def eval_batches(source: ImageSource, indices: np.ndarray, *, batch_size: int,
                 process_index: int, process_count: int, prefetch: int = 2
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
    prefetch: batches read ahead by a background thread (0: read inline).

  Yields:
    {"images": uint8 (b, H, W, C), "index": int64 (b,), "mask": bool (b,)} with
    b = batch_size // process_count, this process's rows of the global batch;
    padding rows have mask False, index -1 and zero images.
  """
  local = _local_batch_size(batch_size, process_index, process_count)
  indices = np.asarray(indices, np.int64)
  num_steps = num_eval_steps(indices.size, batch_size)

  def batches() -> Iterator[dict[str, np.ndarray]]:
    for step in range(num_steps):
      start = step * batch_size + process_index * local
      rows = indices[start:start + local]
      index = np.full(local, -1, np.int64)
      index[:rows.size] = rows
      mask = index >= 0
      images = np.zeros((local, *source.image_shape), np.uint8)
      images[:rows.size] = source.read(rows)
      yield {"images": images, "index": index, "mask": mask}

  return _maybe_prefetch(batches(), prefetch)
