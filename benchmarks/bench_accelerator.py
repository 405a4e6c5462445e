"""Benchmark: FLOPs, step time, TFLOP/s, memory and MFU of the train step, per dtype.

On whatever backend JAX runs (CPU, GPU or TPU), for the small CNN at 28x28 and VGG-16
at 224x224, in float32 and bfloat16 (`model.compute_dtype`), it compiles the real train
step of psch_jax/train.py (`make_train_step`: preprocess, augment, network, attention,
Eq. 7 targets, loss, AdamW) and prints:

- XLA FLOPs: `jax.jit(...).lower(...).compile().cost_analysis()["flops"]` of one step,
  counted by XLA's cost model for the compiled program (multiply-add = 2 FLOPs);
- the median step time over --steps steps after a warm-up, and the achieved TFLOP/s
  (XLA FLOPs / median time);
- MFU: achieved FLOP/s over the device's peak dense FLOP/s of the step's dtype. For
  GPUs and TPUs the peak is the vendor's bfloat16 dense figure (`PEAK_BF16_DENSE`,
  sources in docs/benchmarks.md; float32 rows are also set against it, as what the
  chip could do in bfloat16); on a CPU it is the FLOP/s of a large jitted matmul in
  the same dtype, measured here (`measured_matmul_peak`);
- the peak device memory of the step (`compiled.memory_analysis()`: arguments +
  outputs + temporaries - donated aliases, or XLA's own peak where it reports one);
- database encoding images/s: the jitted encoder of psch_jax/train.py
  (`encoding.make_encoder`, what k-means features and retrieval codes are computed with).

Run from the repository root:
  python -m benchmarks.bench_accelerator              (CPU: batch 32 / 2; minutes)
  python -m benchmarks.bench_accelerator --batch-vgg 128 --batch-cnn 1024   (a GPU)
  python -m benchmarks.bench_accelerator --quick      (small CNN only, seconds: CI)
  python -m benchmarks.bench_accelerator --quick --networks=small_cnn,vgg16
                                                       (adds VGG-16 at 32x32)
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags

from benchmarks import describe_machine, print_table
from psch_jax import cli
from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax import encoding
from psch_jax import run_setup
from psch_jax import sharding
from psch_jax import targets as targets_lib
from psch_jax import train

FLAGS = flags.FLAGS

# Peak dense bfloat16 FLOP/s per chip (GPU or TPU chip as JAX sees one device), from
# the vendors' data sheets (docs/benchmarks.md cites each). Matched in order against
# `device.device_kind`, case-insensitively.
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    ("H200", 989e12),        # NVIDIA H200 SXM: 1,979 TFLOP/s with sparsity
    ("H100 PCIe", 756e12),   # NVIDIA H100 PCIe: 1,513 with sparsity
    ("H100", 989e12),        # NVIDIA H100 SXM: 1,979 with sparsity
    ("A100", 312e12),        # NVIDIA A100: 624 with sparsity
    ("TPU v6 lite", 918e12),  # TPU v6e (Trillium)
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),  # TPU v5e
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),      # v5p reports "TPU v5"
    ("TPU v4", 275e12),
)

NETWORKS = ("small_cnn", "vgg16")
DTYPES = ("float32", "bfloat16")


def table_peak(device_kind: str) -> float | None:
  """The `PEAK_BF16_DENSE` entry of a device kind, or None (CPU, unknown chips)."""
  kind = device_kind.lower()
  for name, peak in PEAK_BF16_DENSE:
    if name.lower() in kind:
      return peak
  return None


def _median_seconds(run: Callable[[], Any], repeats: int) -> float:
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measured_matmul_peak(dtype: str, size: int, repeats: int) -> float:
  """FLOP/s of a jitted (size, size) @ (size, size) matmul in `dtype` on device 0."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.dtype(dtype))
  matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  jax.block_until_ready(matmul(a, b))
  return 2.0 * size ** 3 / _median_seconds(lambda: matmul(a, b), repeats)


def network_config(network: str, dtype: str, *, image_size: int,
                   batch_size: int) -> ml_collections.ConfigDict:
  """The config of a benchmark row: Fashion-MNIST's small CNN or CIFAR-10's VGG-16."""
  config = psch_config.base_config()
  if network == "vgg16":
    config.data.name = "cifar10"
    config.data.augment = "crop_flip"
    config.data.mean = (0.485, 0.456, 0.406)
    config.data.std = (0.229, 0.224, 0.225)
    config.model.backbone = "vgg16"
    config.model.channels = 3
    config.model.dropout_rate = 0.5
    config.model.pretrained = "none"  # timed, never trained: no download
  config.model.image_size = image_size
  config.model.compute_dtype = dtype
  config.train.global_batch_size = batch_size
  config.eval.batch_size = batch_size
  config_schema.check_config(config, num_devices=1)
  return config


def _targets(config: ml_collections.ConfigDict, model, num_train: int) -> dict:
  """Random targets shaped as `targets.compute_targets` returns them."""
  rng = np.random.default_rng(0)
  k = config.pseudo_labels.num_clusters
  shapes = targets_lib.abstract_targets(config, num_train, model, None)
  descriptors = rng.standard_normal(shapes["part_descriptors"].shape)
  descriptors /= np.linalg.norm(descriptors, axis=-1, keepdims=True)
  weights = rng.random(shapes["part_weights"].shape)
  return {"pseudo_labels": rng.integers(-1, k, num_train).astype(np.int32),
          "cluster_affinity": np.eye(k, dtype=np.float32),
          "part_descriptors": descriptors.astype(np.float32),
          "part_weights": (weights / weights.sum(-1, keepdims=True)).astype(np.float32)}


def _peak_memory_bytes(compiled) -> float:
  stats = compiled.memory_analysis()
  if stats is None:
    return float("nan")
  peak = getattr(stats, "peak_memory_in_bytes", 0) or 0
  if peak:
    return float(peak)
  return float(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def benchmark_row(network: str, dtype: str, *, image_size: int, batch_size: int,
                  steps: int) -> dict[str, float]:
  """Compiles and times one (network, dtype): the figures of the module docstring."""
  config = network_config(network, dtype, image_size=image_size, batch_size=batch_size)
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = run_setup.build_model(config)
  tx = run_setup.build_optimizer(config, steps_per_epoch=1000)
  state = run_setup.fresh_state(config, model, tx)
  num_train = 2 * batch_size
  targets = jax.device_put(_targets(config, model, num_train))
  rng = np.random.default_rng(1)
  size, channels = image_size, config.model.channels
  # Stored-resolution uint8 input, as the pipeline ships it: 28x28 Fashion-MNIST,
  # CIFAR-10's 32x32 resized on device to 224 (at --quick sizes: the network's own).
  stored = 32 if network == "vgg16" and image_size >= 32 else size
  images = rng.integers(0, 256, (batch_size, stored, stored, channels), dtype=np.uint8)
  batch = {"images": jnp.asarray(images),
           "position": jnp.arange(batch_size, dtype=jnp.int32)}

  step_fn = train.make_train_step(config, model, tx, mesh)
  compiled = step_fn.lower(state, batch, targets).compile()
  flops = _flops(compiled)
  memory = _peak_memory_bytes(compiled)
  for _ in range(2):  # warm-up: first-touch allocation, autotuning
    state, metrics = compiled(state, batch, targets)
  jax.block_until_ready(metrics)
  holder = {"state": state}

  def one_step():
    holder["state"], m = compiled(holder["state"], batch, targets)
    return m

  step_seconds = _median_seconds(one_step, steps)
  if not np.isfinite(float(jax.device_get(one_step()["loss"]))):
    raise FloatingPointError(f"{network} {dtype}: non-finite loss")

  encode = encoding.make_encoder(config, model, mesh)
  eval_batch = {"images": batch["images"],
                "index": np.arange(batch_size), "mask": np.ones(batch_size, bool)}
  params = holder["state"]["params"]
  jax.block_until_ready(encode(params, eval_batch))
  encode_seconds = _median_seconds(lambda: encode(params, eval_batch), steps)
  return {"flops": flops, "step_s": step_seconds, "memory": memory,
          "encode_images_per_s": batch_size / encode_seconds}


def define_flags() -> None:
  """The benchmark's flags (the module docstring has the commands)."""
  flags.DEFINE_bool("quick", False, "seconds (CI): the small CNN only, batch 8, small "
                    "matmul peak; VGG-16's 138M params take a minute per step row on "
                    "a loaded 2-core CPU even at 32x32")
  flags.DEFINE_integer("batch-cnn", None, "small-CNN batch (default 32; --quick 8)")
  flags.DEFINE_integer("batch-vgg", None, "VGG-16 batch (default 2, a CPU size; "
                       "--quick 2)")
  flags.DEFINE_integer("steps", None, "timed steps per row (median; default 5, "
                       "--quick 2)")
  flags.DEFINE_string("networks", None, f"comma-separated, of {NETWORKS} (default "
                      "all; --quick small_cnn)")
  flags.DEFINE_string("dtypes", ",".join(DTYPES), "comma-separated compute dtypes")


def main(argv: Sequence[str]) -> None:
  del argv
  quick, dtypes = FLAGS.quick, FLAGS.dtypes
  batch_cnn, batch_vgg = FLAGS["batch-cnn"].value, FLAGS["batch-vgg"].value
  steps = FLAGS.steps or (2 if quick else 5)
  networks = FLAGS.networks or ("small_cnn" if quick else ",".join(NETWORKS))
  sizes = {"small_cnn": (28, batch_cnn or (8 if quick else 32)),
           "vgg16": (32 if quick else 224, batch_vgg or 2)}
  device = jax.devices()[0]
  print(describe_machine())
  print(f"backend {jax.default_backend()}, device 0: {device.device_kind} "
        f"({jax.device_count()} devices; the rows use one)")

  peaks = {}
  peak_source = ""
  if device.platform == "cpu":
    size, repeats = (512, 3) if quick else (2048, 5)
    for dtype in dtypes.split(","):
      peaks[dtype] = measured_matmul_peak(dtype, size, repeats)
    peak_source = (f"measured: jitted {size}x{size} matmul, " + ", ".join(
        f"{d} {p / 1e12:.3f} TFLOP/s" for d, p in peaks.items()))
  else:
    peak = table_peak(device.device_kind)
    peaks = {dtype: peak for dtype in dtypes.split(",")}
    peak_source = (f"{device.device_kind}: {peak / 1e12:.0f} TFLOP/s bf16 dense "
                   "(vendor)" if peak else f"{device.device_kind}: not in the table")
  print(f"peak: {peak_source}\n")

  header = ["network", "input", "batch", "dtype", "XLA GFLOP/step", "step ms",
            "TFLOP/s", "MFU %", "peak mem MiB", "encode img/s", "GFLOP/image"]
  rows = []
  for network in networks.split(","):
    image_size, batch_size = sizes[network]
    for dtype in dtypes.split(","):
      r = benchmark_row(network, dtype, image_size=image_size, batch_size=batch_size,
                        steps=steps)
      achieved = r["flops"] / r["step_s"]
      peak = peaks.get(dtype)
      rows.append([network, f"{image_size}x{image_size}", batch_size, dtype,
                   r["flops"] / 1e9, r["step_s"] * 1e3, achieved / 1e12,
                   100.0 * achieved / peak if peak else float("nan"),
                   r["memory"] / 2 ** 20, r["encode_images_per_s"],
                   r["flops"] / batch_size / 1e9])
  print_table(header, rows)
  print("\nXLA GFLOP/step: compiled cost analysis of the whole train step; MFU: "
        "achieved over the peak above; peak mem: compiled memory analysis.")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_accelerator")
