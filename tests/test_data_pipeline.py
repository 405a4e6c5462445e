"""Tests for psch_jax/data/pipeline.py: epoch order, slices, resume, eval padding."""
import gc
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from psch_jax.data import pipeline
from psch_jax.data import sources
from psch_jax.data.sources import ArraySource
from psch_jax.errors import UserError


def _indexed_source(num_images: int, source_class=ArraySource) -> ArraySource:
  """A source whose image i holds i (little-endian uint32) in its 4 pixels."""
  images = np.arange(num_images, dtype="<u4")[:, None].view(np.uint8)
  labels = np.eye(3, dtype=np.uint8)[np.arange(num_images) % 3]
  return source_class(name="indexed", images=images.reshape(num_images, 2, 2, 1),
                      labels=labels, official_split=np.full(num_images, "train"))


def _decode_index(images: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(images.reshape(len(images), 4)).view("<u4")[:, 0]


def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
  indices = np.arange(100, 200)
  first = pipeline.epoch_order(indices, seed=3, epoch=5)
  assert np.array_equal(first, pipeline.epoch_order(indices, seed=3, epoch=5))
  assert np.array_equal(np.sort(first), indices)
  assert first.dtype == np.int64
  assert not np.array_equal(first, pipeline.epoch_order(indices, seed=3, epoch=6))
  assert not np.array_equal(first, pipeline.epoch_order(indices, seed=4, epoch=5))
  with pytest.raises(UserError):
    pipeline.epoch_order(indices, seed=-1, epoch=0)


def test_process_slices_partition_each_global_batch():
  source = _indexed_source(50)
  indices = np.arange(3, 50)  # 47 images: 5 full batches of 8, 7 dropped.
  per_process = [
      list(pipeline.train_batches(source, indices, seed=1, epoch=2,
                                  global_batch_size=8, process_index=p,
                                  process_count=4))
      for p in range(4)]
  order = pipeline.epoch_order(indices, seed=1, epoch=2)
  assert [len(b) for b in per_process] == [5] * 4
  for step in range(5):
    rows = [per_process[p][step] for p in range(4)]
    assert all(r["images"].shape == (2, 2, 2, 1) and r["images"].dtype == np.uint8
               for r in rows)
    global_index = np.concatenate([r["index"] for r in rows])
    assert np.array_equal(global_index, order[step * 8:(step + 1) * 8])
    for r in rows:
      assert np.array_equal(_decode_index(r["images"]), r["index"])


def test_resume_from_step_yields_the_uninterrupted_batches():
  source = _indexed_source(40)
  kwargs = dict(seed=7, epoch=1, global_batch_size=6, process_index=1,
                process_count=2)
  full = list(pipeline.train_batches(source, np.arange(40), **kwargs))
  resumed = list(pipeline.train_batches(source, np.arange(40), start_step=4,
                                        **kwargs))
  assert len(full) == 40 // 6 and len(resumed) == len(full) - 4
  for a, b in zip(full[4:], resumed):
    assert np.array_equal(a["index"], b["index"])
    assert np.array_equal(a["images"], b["images"])
  at_end = pipeline.train_batches(source, np.arange(40), start_step=len(full),
                                  **kwargs)
  assert list(at_end) == []


def test_prefetch_does_not_change_the_batches():
  source = _indexed_source(30)
  kwargs = dict(seed=0, epoch=0, global_batch_size=4, process_index=0,
                process_count=1)
  inline = list(pipeline.train_batches(source, np.arange(30), prefetch=0, **kwargs))
  threaded = list(pipeline.train_batches(source, np.arange(30), prefetch=3, **kwargs))
  assert ([b["index"].tolist() for b in inline]
          == [b["index"].tolist() for b in threaded])


def test_reader_error_reaches_the_consumer_and_early_close_stops_the_thread():

  class Failing(ArraySource):

    def _read(self, indices):
      if 7 in indices:
        raise RuntimeError("disk gone")
      return super()._read(indices)

  failing = _indexed_source(16, Failing)
  base = _indexed_source(16)
  order = pipeline.epoch_order(np.arange(16), seed=0, epoch=0)
  step_with_7 = int(np.flatnonzero(order == 7)[0]) // 2
  batches = pipeline.train_batches(failing, np.arange(16), seed=0, epoch=0,
                                   global_batch_size=2, process_index=0,
                                   process_count=1)
  with pytest.raises(RuntimeError, match="disk gone"):
    for _ in range(step_with_7 + 1):
      next(batches)

  threads_before = set(threading.enumerate())
  batches = pipeline.train_batches(base, np.arange(16), seed=0, epoch=0,
                                   global_batch_size=2, process_index=0,
                                   process_count=1, prefetch=1)
  next(batches)
  batches.close()
  assert set(threading.enumerate()) <= threads_before

  # An iterator dropped half-way (no close) stops its thread when collected.
  abandoned = pipeline.train_batches(base, np.arange(16), seed=0, epoch=0,
                                     global_batch_size=2, process_index=0,
                                     process_count=1, prefetch=1)
  next(abandoned)
  (reader,) = set(threading.enumerate()) - threads_before
  del abandoned
  gc.collect()
  reader.join(timeout=5)
  assert not reader.is_alive()


def test_train_batches_rejects_bad_arguments():
  source = _indexed_source(10)
  common = dict(seed=0, epoch=0, process_index=0)
  with pytest.raises(UserError, match="multiple of the process count"):
    pipeline.train_batches(source, np.arange(10), global_batch_size=6,
                           process_count=4, **common)
  with pytest.raises(UserError, match="do not fill one global batch"):
    pipeline.train_batches(source, np.arange(10), global_batch_size=16,
                           process_count=1, **common)
  with pytest.raises(UserError, match="start_step"):
    pipeline.train_batches(source, np.arange(10), global_batch_size=4,
                           process_count=1, start_step=3, **common)
  with pytest.raises(UserError, match="process_index"):
    pipeline.train_batches(source, np.arange(10), global_batch_size=4, seed=0,
                           epoch=0, process_index=2, process_count=2)


def test_eval_batches_pad_the_last_batch_with_a_mask():
  source = _indexed_source(20)
  indices = np.array([19, 2, 5, 11, 0, 7, 3, 14, 8, 1])
  per_process = [
      list(pipeline.eval_batches(source, indices, batch_size=4, process_index=p,
                                 process_count=2))
      for p in range(2)]
  assert pipeline.num_eval_steps(10, 4) == 3
  assert [len(b) for b in per_process] == [3, 3]
  seen = []
  for step in range(3):
    for p in range(2):
      batch = per_process[p][step]
      assert batch["images"].shape == (2, 2, 2, 1)
      assert batch["index"].shape == batch["mask"].shape == (2,)
      assert batch["mask"].dtype == bool
      real = batch["mask"]
      assert np.array_equal(_decode_index(batch["images"][real]), batch["index"][real])
      assert np.all(batch["index"][~real] == -1)
      assert not batch["images"][~real].any()
      seen.extend(batch["index"][real].tolist())
  assert seen == indices.tolist()
  # The last global batch holds rows 8, 9 then two padding rows (process 1).
  assert per_process[0][2]["mask"].tolist() == [True, True]
  assert per_process[1][2]["mask"].tolist() == [False, False]


def test_eval_batches_of_nothing_yield_nothing():
  source = _indexed_source(4)
  assert list(pipeline.eval_batches(source, np.zeros(0, np.int64), batch_size=2,
                                    process_index=0, process_count=1)) == []


class _Records:
  """A random-access sequence of {"image": JPEG bytes}, like tfds's data sources."""

  def __init__(self, encoded):
    self._encoded = encoded

  def __len__(self):
    return len(self._encoded)

  def __getitems__(self, rows):
    return [{"image": self._encoded[r]} for r in rows]


def _jpeg_source(num_images: int, size: int = 48) -> sources.EncodedSource:
  rng = np.random.default_rng(0)
  encoded = []
  for _ in range(num_images):
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=90)
    encoded.append(buffer.getvalue())
  labels = np.eye(3, dtype=np.uint8)[np.arange(num_images) % 3]
  return sources.EncodedSource(
      name="jpeg", split_records=[_Records(encoded[:20]), _Records(encoded[20:])],
      labels=labels, official_split=np.array(["train"] * 20 + ["test"] * (num_images - 20)),
      image_shape=(size, size, 3))


class _Jittery(ArraySource):
  """Reads take a random few milliseconds, so parallel reads finish out of order."""

  def _read(self, indices):
    time.sleep(np.random.default_rng(int(indices[0])).uniform(0.0, 0.01))
    return super()._read(indices)


@pytest.mark.parametrize("prefetch,num_workers", [(1, 1), (2, 2), (4, 2), (6, 4)])
def test_parallel_reads_deliver_bitwise_the_inline_batches(prefetch, num_workers):
  """JPEG decoding and out-of-order reads: same images, same order, as inline."""
  for source in (_jpeg_source(36), _indexed_source(36, _Jittery)):
    kwargs = dict(seed=3, epoch=1, global_batch_size=4, process_index=0,
                  process_count=1)
    inline = list(pipeline.train_batches(source, np.arange(36), prefetch=0, **kwargs))
    parallel = list(pipeline.train_batches(source, np.arange(36), prefetch=prefetch,
                                           num_workers=num_workers, **kwargs))
    assert len(parallel) == len(inline) == 9
    for a, b in zip(inline, parallel):
      np.testing.assert_array_equal(a["index"], b["index"])
      np.testing.assert_array_equal(a["images"], b["images"])
    resumed = list(pipeline.train_batches(source, np.arange(36), prefetch=prefetch,
                                          num_workers=num_workers, start_step=5,
                                          **kwargs))
    for a, b in zip(inline[5:], resumed, strict=True):
      np.testing.assert_array_equal(a["images"], b["images"])
    evals = [list(pipeline.eval_batches(source, np.arange(35), batch_size=8,
                                        process_index=0, process_count=1,
                                        prefetch=p, num_workers=w))
             for p, w in ((0, 1), (prefetch, num_workers))]
    for a, b in zip(*evals, strict=True):
      for key in ("images", "index", "mask"):
        np.testing.assert_array_equal(a[key], b[key])
