"""Benchmark: images/s the host input pipeline delivers into the train step, per core.

Two sources, read through `psch_jax.data.pipeline.train_batches` and turned into a
device array as the train loop does (`jax.device_put`), one epoch at a time:

- CIFAR-10-like: an in-memory uint8 (N, 32, 32, 3) `ArraySource` (what
  `sources.load_source("cifar10")` returns); the resize to 224 happens on device.
- NUS-WIDE / MIRFlickr-25K: generated raw files in the DPSH layout (README
  "Datasets", tests/test_data_builders.py), prepared by our tfds builder into its
  stored form (256x256 RGB JPEG, quality 90, in array_record files) and read back by
  `sources.load_source`, which decodes each JPEG with PIL on read. The generated
  images are smooth colour fields with texture noise, so their stored JPEGs have the
  size of photographs' (printed), not of incompressible noise.

Figures: wall images/s, and images per CPU-second of this process (all its threads),
which is the rate per host core fully used: `cores needed = demand / per-core rate`.
For each pipeline setting (`prefetch`, `num_workers`: 0 / 1 is the old single-thread
reader) the batches are checked bitwise equal to the inline read.

Demand: what a bfloat16 VGG-16 224x224 train step consumes at 40 % MFU on an H100
(989 TFLOP/s bf16 dense) and a TPU v4 chip (275 TFLOP/s), from the step's FLOPs per
image as XLA counts them (`jax.jit(step).lower(...).cost_analysis()`, the program
before optimisation, which does not need a VGG-16 compile; bench_accelerator prints
the compiled figure).

Run from the repository root:
  python -m benchmarks.bench_input            (8k in-memory images, 512 JPEGs)
  python -m benchmarks.bench_input --quick    (tiny sizes, seconds: CI)
"""
from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from PIL import Image

from benchmarks import describe_machine, print_table
from benchmarks.bench_accelerator import network_config, table_peak
from psch_jax import cli
from psch_jax import run_setup
from psch_jax import sharding
from psch_jax import targets as targets_lib
from psch_jax import train
from psch_jax.data import manual_files
from psch_jax.data import pipeline
from psch_jax.data import sources

FLAGS = flags.FLAGS
TARGET_MFU = 0.4
# (pipeline name, prefetch, num_workers): the old reader, then the new default.
SETTINGS = (("single thread (before)", 2, 1),
            ("parallel (default)", pipeline.DEFAULT_PREFETCH,
             pipeline.DEFAULT_NUM_WORKERS))


def cifar_like_source(num_images: int) -> sources.ArraySource:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
  labels = np.eye(10, dtype=np.uint8)[rng.integers(0, 10, num_images)]
  return sources.ArraySource(name="cifar10", images=images, labels=labels,
                             official_split=np.full(num_images, "train"))


def _photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """A smooth random colour field plus mild texture, uint8 (height, width, 3)."""
  coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
  field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                     np.float32)
  texture = rng.normal(0.0, 6.0, (height, width, 1))
  return np.clip(field + texture, 0, 255).astype(np.uint8)


def write_nus_wide_layout(root: str, num_images: int) -> None:
  """Raw NUS-WIDE files in the DPSH layout: images/, *_img.txt, *_label_onehot.txt."""
  rng = np.random.default_rng(0)
  paths = [f"images/{i:05d}_{1000 + i}.jpg" for i in range(num_images)]
  os.makedirs(os.path.join(root, "images"))
  for path in paths:
    Image.fromarray(_photo_like(rng, 240, 320)).save(os.path.join(root, path),
                                                     quality=90)
  labels = (rng.random((num_images, 21)) < 0.2).astype(np.uint8)
  labels[np.arange(num_images), np.arange(num_images) % 21] = 1
  num_test = max(num_images // 8, 1)
  for name, rows in (("database", slice(num_test, None)), ("test", slice(0, num_test))):
    with open(os.path.join(root, f"{name}_img.txt"), "w") as f:
      f.write("\n".join(paths[rows]) + "\n")
    np.savetxt(os.path.join(root, f"{name}_label_onehot.txt"), labels[rows], fmt="%d")


def _epoch_batches(source, indices, batch_size, prefetch, num_workers, epoch=0):
  return pipeline.train_batches(source, indices, seed=0, epoch=epoch,
                                global_batch_size=batch_size, process_index=0,
                                process_count=1, prefetch=prefetch,
                                num_workers=num_workers)


def delivered_rate(source, indices, batch_size, prefetch, num_workers, repeats
                   ) -> tuple[float, float]:
  """Best (wall images/s, images per CPU-second) of `repeats` epochs into devices."""
  best_wall, best_cpu = 0.0, 0.0
  for epoch in range(repeats):
    count = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in _epoch_batches(source, indices, batch_size, prefetch, num_workers,
                                epoch):
      jax.block_until_ready(jax.device_put(batch["images"]))
      count += batch["images"].shape[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    best_wall, best_cpu = max(best_wall, count / wall), max(best_cpu, count / cpu)
  return best_wall, best_cpu


def check_same_batches(source, indices, batch_size, prefetch, num_workers) -> None:
  inline = _epoch_batches(source, indices, batch_size, 0, 1)
  for a, b in zip(inline, _epoch_batches(source, indices, batch_size, prefetch,
                                         num_workers), strict=True):
    if not (np.array_equal(a["index"], b["index"])
            and np.array_equal(a["images"], b["images"])):
      raise AssertionError(f"prefetch={prefetch} num_workers={num_workers} changed "
                           "the batches")


def vgg16_flops_per_image(image_size: int, batch_size: int) -> float:
  """XLA FLOPs of one bfloat16 VGG-16 train step per image (uncompiled HLO)."""
  config = network_config("vgg16", "bfloat16", image_size=image_size,
                          batch_size=batch_size)
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = run_setup.build_model(config)
  tx = run_setup.build_optimizer(config, steps_per_epoch=1000)
  params = jax.eval_shape(lambda: run_setup.init_params(config, model))
  state = {"params": params, "opt_state": jax.eval_shape(tx.init, params),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  targets = targets_lib.abstract_targets(config, batch_size, model, None)
  batch = {"images": jax.ShapeDtypeStruct((batch_size, 32, 32, 3), jnp.uint8),
           "position": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
  step = train.make_train_step(config, model, tx, mesh)
  cost = step.lower(state, batch, targets).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost["flops"]) / batch_size


def define_flags() -> None:
  """The benchmark's flags (the module docstring has the commands)."""
  flags.DEFINE_bool("quick", False, "tiny sizes: a check")
  flags.DEFINE_integer("batch", 64, "global batch size")


def main(argv: Sequence[str]) -> None:
  del argv
  num_memory, num_jpeg, repeats = (512, 64, 1) if FLAGS.quick else (8192, 512, 3)
  batch = 16 if FLAGS.quick else FLAGS.batch
  print(describe_machine(("jax", "numpy", "pillow", "tensorflow-datasets")))
  cores = len(os.sched_getaffinity(0))

  image_size = 64 if FLAGS.quick else 224
  flops = vgg16_flops_per_image(image_size, batch)
  demand = {}
  for chip in ("H100", "TPU v4"):
    peak = table_peak(chip)
    demand[chip] = TARGET_MFU * peak / flops
  print(f"\nbfloat16 VGG-16 {image_size}x{image_size} train step: {flops / 1e9:.1f} "
        "GFLOP per image (XLA); at 40 % MFU it consumes " + ", ".join(
            f"{name} {rate:,.0f} images/s" for name, rate in demand.items()))

  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    memory_source = cifar_like_source(num_memory)
    raw, data_dir = os.path.join(tmp, "raw"), os.path.join(tmp, "tfds")
    write_nus_wide_layout(raw, num_jpeg)
    jpeg_source = sources.load_source("nus_wide", data_dir=data_dir, manual_dir=raw)
    # The stored form, as the builder encodes it (manual_files.encode_stored_image).
    stored = [len(manual_files.encode_stored_image(
        os.path.join(raw, "images", name), list_file="bench"))
              for name in sorted(os.listdir(os.path.join(raw, "images")))[:32]]
    for name, source in (("CIFAR-10 in memory 32x32", memory_source),
                         ("NUS-WIDE / MIRFlickr JPEG 256x256", jpeg_source)):
      indices = np.arange(len(source))
      for setting, prefetch, workers in SETTINGS:
        check_same_batches(source, indices, batch, prefetch, workers)
        wall, per_core = delivered_rate(source, indices, batch, prefetch, workers,
                                        repeats)
        rows.append([name, setting, prefetch, workers, wall, per_core,
                     demand["H100"] / per_core, demand["TPU v4"] / per_core])
  print(f"stored JPEGs: mean {np.mean(stored) / 1024:.1f} KiB")
  print(f"\n{cores} host cores usable; batches checked bitwise equal to the inline "
        "read.\n")
  print_table(["source", "pipeline", "prefetch", "workers", "images/s (wall)",
               "images/s per core", "cores for H100 @40%", "cores for TPU v4 @40%"],
              rows)


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_input")
