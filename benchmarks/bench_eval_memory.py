r"""Benchmark: peak memory of retrieval evaluation stays flat as the database grows.

1,000 queries against 50,000, 200,000 and 1,000,000 random 64-bit codes with random
multi-hot labels (24 labels, each set with probability 0.1). Each size runs
`psch_jax.ranking.retrieval_metrics` (mAP@1000, mAP@all, tie-aware mAP,
precision@radius2, curves) once in a fresh subprocess, the database opened with
`np.load(path, mmap_mode="r")`, so it is read from disk segment by segment
(`db_segment`, default 65,536 items) and never held whole. Reported per size:
- VmHWM: the kernel's peak resident set size of the subprocess. It counts the pages
  of the memory-mapped files the process has touched, which are clean page cache the
  kernel drops under memory pressure, so it grows by up to the file sizes;
- peak anonymous: the largest RssAnon (heap, JAX buffers) seen by a thread sampling
  /proc/self/status every millisecond: memory the process cannot give back, the
  number that must not grow with the database;
- file-backed: the RssFile at the end (mapped database pages and shared libraries).
`--in-memory` loads the files into RAM instead (np.load without mmap_mode): then RSS
grows by the arrays the caller holds, and the evaluation adds a constant on top.

Run from the repository root:  python -m benchmarks.bench_eval_memory
      (--sizes 50000,200000 / --num-queries / --format packed / --in-memory).
Unless XLA_FLAGS already sets it, the subprocess gives XLA one CPU device per core.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np
from absl import flags

from psch_jax import cli

NUM_BITS = 64
NUM_LABELS = 24
WRITE_ROWS = 100_000  # rows generated and written at a time
FLAGS = flags.FLAGS


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


class _PeakSampler(threading.Thread):
  """Largest RssAnon seen, sampled every `interval` seconds until `stop()`."""

  def __init__(self, interval: float = 0.001):
    super().__init__(daemon=True)
    self._interval = interval
    self._done = threading.Event()
    self.peak_kib = 0

  def run(self) -> None:
    while not self._done.is_set():
      self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
      time.sleep(self._interval)

  def stop(self) -> int:
    self._done.set()
    self.join()
    self.peak_kib = max(self.peak_kib, _status_kib("RssAnon"))
    return self.peak_kib


def write_data(directory: str, num_queries: int, num_database: int, packed: bool,
               seed: int = 0) -> None:
  """Random +-1 (or packed) codes and multi-hot labels as .npy files, in slices."""
  from psch_jax import ranking  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)

  def draw_codes(n):
    return rng.choice(np.array([-1, 1], np.int8), (n, NUM_BITS))

  def draw_labels(n):
    return (rng.random((n, NUM_LABELS)) < 0.1).astype(np.uint8)

  np.save(os.path.join(directory, "query_codes.npy"), draw_codes(num_queries))
  np.save(os.path.join(directory, "query_labels.npy"), draw_labels(num_queries))
  code_shape = (num_database, NUM_BITS // 32) if packed else (num_database, NUM_BITS)
  codes = np.lib.format.open_memmap(os.path.join(directory, "db_codes.npy"), "w+",
                                    np.uint32 if packed else np.int8, code_shape)
  labels = np.lib.format.open_memmap(os.path.join(directory, "db_labels.npy"), "w+",
                                     np.uint8, (num_database, NUM_LABELS))
  for start in range(0, num_database, WRITE_ROWS):
    rows = min(WRITE_ROWS, num_database - start)
    block = draw_codes(rows)
    codes[start:start + rows] = ranking.pack_codes(block) if packed else block
    labels[start:start + rows] = draw_labels(rows)
  codes.flush()
  labels.flush()
  del codes, labels


def measure(directory: str, in_memory: bool) -> dict:
  """In this (fresh) process: evaluates the files once; memory and time."""
  import jax  # pylint: disable=import-outside-toplevel
  from psch_jax import ranking  # pylint: disable=import-outside-toplevel
  jax.devices()  # start the backend before the baseline
  mmap_mode = None if in_memory else "r"
  load = lambda name, mode=None: np.load(os.path.join(directory, name + ".npy"),
                                         mmap_mode=mode)
  query_codes, query_labels = load("query_codes"), load("query_labels")
  db_codes, db_labels = load("db_codes", mmap_mode), load("db_labels", mmap_mode)
  baseline_kib = _status_kib("VmRSS")
  sampler = _PeakSampler()
  sampler.start()
  start = time.perf_counter()
  metrics = ranking.retrieval_metrics(query_codes, query_labels, db_codes, db_labels,
                                      topk=(1000, None), code_length=NUM_BITS)
  seconds = time.perf_counter() - start
  return {"num_database": int(db_codes.shape[0]), "seconds": seconds,
          "baseline_mib": baseline_kib / 1024, "vmhwm_mib": _status_kib("VmHWM") / 1024,
          "peak_anon_mib": sampler.stop() / 1024,
          "file_backed_mib": _status_kib("RssFile") / 1024,
          "map@1000": metrics["map@1000"], "num_devices": len(jax.local_devices())}


def define_flags() -> None:
  """The benchmark's flags (the module docstring says what it measures)."""
  flags.DEFINE_string("sizes", "50000,200000,1000000",
                      "database sizes, comma-separated")
  flags.DEFINE_integer("num-queries", 1000, "queries per database")
  flags.DEFINE_enum("format", "pm1", ["pm1", "packed"],
                    "database file: int8 +-1 codes or uint32 packed words")
  flags.DEFINE_bool("in-memory", False,
                    "load the database into RAM instead of memory-mapping it")
  flags.DEFINE_bool("quick", False, "seconds (CI): databases of 5,000 and 20,000 "
                    "items, 100 queries")
  flags.DEFINE_string("child", None, "internal: measure the data directory given, in "
                      "this process, and print one JSON line")


def main(argv: Sequence[str]) -> None:
  del argv
  in_memory, data_format = FLAGS["in-memory"].value, FLAGS.format
  if FLAGS.child:
    print(json.dumps(measure(FLAGS.child, in_memory)))
    return
  num_queries = 100 if FLAGS.quick else FLAGS["num-queries"].value
  sizes = [int(s) for s in ("5000,20000" if FLAGS.quick else FLAGS.sizes).split(",")]

  env = dict(os.environ)
  if "xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_"
                        f"device_count={os.cpu_count()}")
  mode = "in memory" if in_memory else "memory-mapped"
  print(f"{num_queries} queries, {NUM_BITS}-bit {data_format} database {mode}, "
        f"{NUM_LABELS} labels; one fresh process per size")
  print(f"{'database':>10s} {'time s':>8s} {'before MiB':>11s} {'VmHWM MiB':>10s} "
        f"{'peak anon MiB':>14s} {'file-backed MiB':>16s} {'mAP@1000':>9s}")
  for size in sizes:
    with tempfile.TemporaryDirectory() as directory:
      write_data(directory, num_queries, size, packed=data_format == "packed")
      command = [sys.executable, "-m", "benchmarks.bench_eval_memory", "--child",
                 directory] + (["--in-memory"] if in_memory else [])
      out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
      row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{row['num_database']:>10,d} {row['seconds']:>8.1f} "
          f"{row['baseline_mib']:>11.0f} {row['vmhwm_mib']:>10.0f} "
          f"{row['peak_anon_mib']:>14.0f} {row['file_backed_mib']:>16.0f} "
          f"{row['map@1000']:>9.4f}", flush=True)
  print(f"({row['num_devices']} XLA CPU devices; db_segment 65,536 items)")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_eval_memory")
