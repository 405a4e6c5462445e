"""Benchmark: time and peak memory of each phase as the training set grows.

Runs configs/fashion_mnist.py for one epoch with 500 .. 6,000 training images per
class (5,000 .. 60,000 images; `--config.data.train_per_class`), the query and the
database of the "ssdh" protocol fixed (1,000 and 69,000 images). Each size runs in
its own subprocess, so its VmHWM (peak resident memory, /proc/self/status) is its
own; the phases are timed as in `benchmarks.bench_train --phases-only`.

Run from the repository root:
  python -m benchmarks.bench_scaling                  (5 sizes, about 15 min on 2
                                                       cores)
  python -m benchmarks.bench_scaling --quick          (tiny sizes, a check that it
                                                       runs)
  python -m benchmarks.bench_scaling --per-class=500,2000 --override eval.batch_size=256
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmarks import describe_machine, print_table
from benchmarks.bench_train import data_wait_seconds

QUICK_OVERRIDES = ["data.num_database=2000", "data.num_validation=100",
                   "pseudo_labels.n_init=1"]


def child(per_class: int, overrides: list[str], output: str) -> None:
  """One size: runs the phases and writes their report as JSON to `output`."""
  from benchmarks import bench_train  # pylint: disable=import-outside-toplevel,reimported
  from psch_jax import io_utils  # pylint: disable=import-outside-toplevel
  config = bench_train.apply_overrides(
      bench_train.load_config("fashion_mnist"),
      [f"data.train_per_class={per_class}", "train.num_epochs=1"] + overrides)
  with tempfile.TemporaryDirectory(prefix="bench_scaling_") as workdir:
    report = bench_train.run_phases(config, workdir)
  io_utils.write_json(output, report)


def run_size(per_class: int, overrides: list[str], log_dir: str) -> dict:
  """Runs `child` in a fresh interpreter; returns its report."""
  output = os.path.join(log_dir, f"{per_class}.json")
  log = os.path.join(log_dir, f"{per_class}.log")
  command = [sys.executable, "-m", "benchmarks.bench_scaling", "--child",
             f"--per-class={per_class}", f"--output={output}"]
  command += [f"--override={o}" for o in overrides]
  with open(log, "w") as f:
    done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(
                              __file__))))
  if done.returncode != 0:
    with open(log) as f:
      tail = f.read()[-3000:]
    raise RuntimeError(f"size {per_class}/class failed (exit {done.returncode}):\n"
                       f"{tail}")
  with open(output) as f:
    return json.load(f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--per-class", default="500,1000,2000,4000,6000",
                      help="comma-separated training images per class")
  parser.add_argument("--override", action="append", default=[],
                      help="extra config override KEY=VALUE for every size")
  parser.add_argument("--quick", action="store_true",
                      help=f"50 and 100 per class with {' '.join(QUICK_OVERRIDES)}")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(int(args.per_class), args.override, args.output)
    return
  if args.quick:
    args.per_class = "50,100"
    args.override = QUICK_OVERRIDES + args.override

  print(describe_machine(("jax", "jaxlib", "flax", "numpy")))
  print(f"\nconfigs/fashion_mnist.py, 1 epoch, overrides: "
        f"{' '.join(args.override) or 'none'}; one subprocess per size\n", flush=True)
  rows, memory_rows = [], []
  with tempfile.TemporaryDirectory(prefix="bench_scaling_logs_") as log_dir:
    for per_class in (int(n) for n in args.per_class.split(",")):
      report = run_size(per_class, args.override, log_dir)
      phases, peaks = report["phases"], report["peak_mib"]
      epoch = report["epochs"][0]
      num_train = report["num_train"]
      rows.append((
          f"{num_train:,}", phases["setup (data, splits, model, optimizer)"],
          phases["init params and optimizer"], phases["pseudo labels"],
          phases.get("pseudo labels/k-means and thresholds (Eqs. 1-2)", 0.0),
          phases["train epochs"], sum(data_wait_seconds(report)),
          epoch["images_per_s"], phases["evaluation (query + database)"],
          phases["validation"], report["total_s"],
          1e3 * report["total_s"] / num_train))
      memory_rows.append((
          f"{num_train:,}", peaks["setup (data, splits, model, optimizer)"],
          peaks["pseudo labels"], peaks["train epochs"],
          peaks["evaluation (query + database)"], peaks["total"]))
      print(f"done: {num_train:,} training images in {report['total_s']:.0f} s",
            flush=True)
  print(f"\n### Time (seconds) per phase, database {report['num_database']:,} "
        "images\n")
  print_table(("train images", "setup", "init params", "pseudo labels",
               "of which k-means",
               "train epoch", "of which data wait", "img/s (incl. compile)",
               "evaluation", "validation", "total", "total ms / train image"), rows)
  print("\n### Peak resident memory (VmHWM, MiB) at the end of each phase\n")
  print_table(("train images", "after setup", "after pseudo labels",
               "after train epoch", "after evaluation", "at end"), memory_rows)
  load = os.getloadavg()
  print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
  main()
