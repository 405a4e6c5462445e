"""Benchmark: time, peak memory and pseudo-label quality as the training set grows.

Full mode: runs configs/fashion_mnist.py for one epoch with 500 .. 6,000 training
images per class (5,000 .. 60,000 images; `--config.data.train_per_class`), the query
and the database of the "ssdh" protocol fixed (1,000 and 69,000 images). Each size
runs in its own subprocess, so its VmHWM (peak resident memory, /proc/self/status) is
its own; the phases are timed as in `benchmarks.bench_train --phases-only`. Beside
time and memory it prints the quality of each size's pseudo labels, read from the
run's metrics.jsonl and results.json: purity of the kept labels (diagnostic, true
labels), the k-means inertia ratio against Gaussian noise's (the label-free check of
psch_jax/pseudo_labels.py), the largest eigenpair residual of the spectral embedding
(Eq. 1a) and the validation mAP after the epoch. A collapse of the embedding, like
issue 13's purity 0.18 at 60,000 images, shows in these columns.

`--labels-only`: only the pseudo-label stage of the default config (k-NN graph,
spectral embedding, k-means, thresholds) on class-balanced subsets of the
Fashion-MNIST train split (the IDX files), each size in its own subprocess; minutes
instead of a quarter of an hour.

Run from the repository root:
  python -m benchmarks.bench_scaling                  (5 sizes, about 15 min on 2
                                                       quiet cores)
  python -m benchmarks.bench_scaling --labels-only    (5 sizes, the pseudo-label
                                                       stage only)
  python -m benchmarks.bench_scaling --quick          (the pseudo-label stage at 500
                                                       and 1,000 images: ~10 s
                                                       each on quiet cores)
  python -m benchmarks.bench_scaling --per-class=50,100 --override=data.num_database=2000 \
      --override=data.num_validation=100 --override=pseudo_labels.n_init=1 \
      --override=pseudo_labels.fine_clusters=20
                                                      (the full path at tiny sizes,
                                                       about a minute)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from absl import flags

from benchmarks import describe_machine, peak_rss_mib, print_table
from benchmarks.bench_train import data_wait_seconds
from psch_jax import cli

FLAGS = flags.FLAGS


def _quality(pseudo_label_stats: dict) -> dict:
  """The quality columns from a "pseudo_labels" record of metrics.jsonl."""
  spectral = pseudo_label_stats.get("spectral", {})
  return {"purity": pseudo_label_stats["purity"],
          "kept_fraction": pseudo_label_stats["kept_fraction"],
          "inertia_ratio": pseudo_label_stats["inertia_ratio"],
          "noise_inertia_ratio": pseudo_label_stats["noise_inertia_ratio"],
          "largest_cluster_fraction": pseudo_label_stats["largest_cluster_fraction"],
          "max_eigen_residual": spectral.get("max_eigen_residual", float("nan")),
          "fine_purity": pseudo_label_stats.get("fine", {}).get("purity", float("nan"))}


def child(per_class: int, overrides: list[str], output: str) -> None:
  """One size: runs the phases and writes their report as JSON to `output`."""
  from benchmarks import bench_train  # pylint: disable=import-outside-toplevel,reimported
  from psch_jax import io_utils  # pylint: disable=import-outside-toplevel
  config = bench_train.apply_overrides(
      bench_train.repo_config("fashion_mnist"),
      [f"data.train_per_class={per_class}", "train.num_epochs=1"] + overrides)
  with tempfile.TemporaryDirectory(prefix="bench_scaling_") as workdir:
    report = bench_train.run_phases(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      stats = next(json.loads(line)["pseudo_labels"] for line in f
                   if "pseudo_labels" in json.loads(line))
    with open(os.path.join(workdir, "results.json")) as f:
      results = json.load(f)
  report["quality"] = _quality(stats)
  report["quality"]["validation_map_all"] = results.get("validation/map@all",
                                                        float("nan"))
  io_utils.write_json(output, report)


def child_labels_only(per_class: int, output: str) -> None:
  """One size, the pseudo-label stage only, as compute_targets runs it for the
  default config (features "spectral", K_c = 10, k = 10, d = K_c; then the fine
  clusters, K_f = d = 100, where 5 K_f is below the images)."""
  # pylint: disable=import-outside-toplevel
  import jax
  import jax.numpy as jnp
  import numpy as np

  from benchmarks import bench_train
  from psch_jax import config_schema, io_utils, spectral
  from psch_jax import pseudo_labels as pseudo_labels_lib
  from psch_jax.data import idx_files, sources
  config = bench_train.repo_config("fashion_mnist")
  p = config.pseudo_labels
  timings, peaks = {}, {}

  def done(name, start):
    timings[name] = time.perf_counter() - start
    peaks[name] = peak_rss_mib()

  start = time.perf_counter()
  images, labels = idx_files.read_fashion_mnist(
      sources.DEFAULT_FASHION_MNIST_DIR, fix="apt-get install dataset-fashion-mnist"
  )["train"]
  rng = np.random.default_rng(config.seed)
  chosen = np.sort(np.concatenate([
      rng.choice(np.flatnonzero(labels == c), min(per_class, np.sum(labels == c)),
                 replace=False) for c in range(10)]))
  pixels = images[chosen].reshape(len(chosen), -1).astype(np.float32) / 255.0
  done("read pixels", start)
  start = time.perf_counter()
  neighbors = np.asarray(spectral.knn_graph(jnp.asarray(pixels),
                                            num_neighbors=p.spectral_neighbors))
  done("k-NN graph", start)
  start = time.perf_counter()
  key = jax.random.key(config.seed)
  embedding = spectral.graph_embedding(
      key, neighbors, num_components=config_schema.spectral_components(config))
  done("eigenvectors (ARPACK)", start)
  start = time.perf_counter()
  pseudo, stats = pseudo_labels_lib.pseudo_labels(
      key, jnp.asarray(embedding.embedding), num_clusters=p.num_clusters,
      keep_quantile=p.keep_quantile, n_init=p.n_init, max_iter=p.max_iter, tol=p.tol)
  done("k-means, thresholds and checks", start)
  true_labels = np.eye(10)[labels[chosen]]
  fine = {}
  if p.fine_clusters is not None and 5 * p.fine_clusters < len(chosen):
    start = time.perf_counter()
    fine_key = jax.random.fold_in(key, 1)
    fine_embedding = spectral.graph_embedding(
        jax.random.split(fine_key)[0], neighbors, num_components=p.fine_clusters)
    fine_labels, _ = pseudo_labels_lib.pseudo_labels(
        jax.random.split(fine_key)[1], jnp.asarray(fine_embedding.embedding),
        num_clusters=p.fine_clusters, keep_quantile=p.keep_quantile, n_init=p.n_init,
        max_iter=p.max_iter, tol=p.tol)
    fine = {"purity": float(pseudo_labels_lib.purity(fine_labels, true_labels))}
    done("fine clusters (Eq. 2b)", start)
  quality = _quality({
      "purity": float(pseudo_labels_lib.purity(pseudo, true_labels)),
      "kept_fraction": float(stats.kept_fraction), **stats.sanity(),
      "spectral": embedding.stats(), "fine": fine})
  io_utils.write_json(output, {"num_train": len(chosen), "phases": timings,
                               "peak_mib": peaks, "quality": quality})


def run_size(per_class: int, overrides: list[str], log_dir: str,
             labels_only: bool) -> dict:
  """Runs `child` (or `child_labels_only`) in a fresh interpreter; its report."""
  output = os.path.join(log_dir, f"{per_class}.json")
  log = os.path.join(log_dir, f"{per_class}.log")
  command = [sys.executable, "-m", "benchmarks.bench_scaling", "--child",
             f"--per-class={per_class}", f"--output={output}"]
  command += [f"--override={o}" for o in overrides]
  command += ["--labels-only"] if labels_only else []
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


QUALITY_HEADER = ("train images", "purity of kept labels", "kept",
                  "inertia ratio", "noise's ratio", "largest cluster",
                  "max eigen residual", "purity of fine labels")


def _quality_row(report: dict) -> tuple:
  q = report["quality"]
  return (f"{report['num_train']:,}", q["purity"], q["kept_fraction"],
          q["inertia_ratio"], q["noise_inertia_ratio"], q["largest_cluster_fraction"],
          f"{q['max_eigen_residual']:.1e}", q.get("fine_purity", float("nan")))


def main_labels_only(sizes: list[int]) -> None:
  print("configs/fashion_mnist.py pseudo-label stage (features spectral, K_c 10, then "
        "its fine clusters) on class-balanced subsets of the train split; one "
        "subprocess per size\n", flush=True)
  reports = []
  with tempfile.TemporaryDirectory(prefix="bench_scaling_logs_") as log_dir:
    for per_class in sizes:
      reports.append(run_size(per_class, [], log_dir, labels_only=True))
      print(f"done: {reports[-1]['num_train']:,} images", flush=True)
  phases = ["read pixels", "k-NN graph", "eigenvectors (ARPACK)",
            "k-means, thresholds and checks", "fine clusters (Eq. 2b)"]
  print("\n### Time (seconds) per phase, and peak resident memory at the end\n")
  print_table(("train images",) + tuple(phases) + ("total", "VmHWM (MiB)"), [
      (f"{r['num_train']:,}",) + tuple(r["phases"].get(p, float("nan"))
                                       for p in phases)
      + (sum(r["phases"].values()), max(r["peak_mib"].values())) for r in reports])
  print("\n### Quality of the pseudo labels\n")
  print_table(QUALITY_HEADER, [_quality_row(r) for r in reports])


def define_flags() -> None:
  """The benchmark's flags (the module docstring has the commands)."""
  flags.DEFINE_string("per-class", "500,1000,2000,4000,6000",
                      "comma-separated training images per class")
  flags.DEFINE_multi_string("override", [], "extra config override KEY=VALUE for "
                            "every size (repeat the flag for several)")
  flags.DEFINE_bool("quick", False, "--labels-only at 50 and 100 per class: seconds")
  flags.DEFINE_bool("labels-only", False,
                    "time only the pseudo-label stage, on the train split")
  flags.DEFINE_bool("child", False, "internal: run one size (--per-class) in this "
                    "process and write its report to --output")
  flags.DEFINE_string("output", None, "internal: the JSON report of --child")


# The phase `benchmarks.bench_train.run_phases` times the test and validation in.
_EVALUATION = "evaluation and validation (encode, rank, score)"


def main(argv: Sequence[str]) -> None:
  del argv
  per_class, labels_only = FLAGS["per-class"].value, FLAGS["labels-only"].value
  overrides = FLAGS.override
  if FLAGS.child:
    if labels_only:
      child_labels_only(int(per_class), FLAGS.output)
    else:
      child(int(per_class), overrides, FLAGS.output)
    return
  if FLAGS.quick:
    per_class, labels_only = "50,100", True

  print(describe_machine(("jax", "jaxlib", "flax", "numpy", "scipy")))
  sizes = [int(n) for n in per_class.split(",")]
  if labels_only:
    main_labels_only(sizes)
    load = os.getloadavg()
    print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    return
  print(f"\nconfigs/fashion_mnist.py, 1 epoch, overrides: "
        f"{' '.join(overrides) or 'none'}; one subprocess per size\n", flush=True)
  rows, memory_rows, quality_rows = [], [], []
  with tempfile.TemporaryDirectory(prefix="bench_scaling_logs_") as log_dir:
    for per_class in sizes:
      report = run_size(per_class, overrides, log_dir, labels_only=False)
      phases, peaks = report["phases"], report["peak_mib"]
      epoch = report["epochs"][0]
      num_train = report["num_train"]
      rows.append((
          f"{num_train:,}", phases["setup (data, splits, model, optimizer)"],
          phases["init params and optimizer"], phases["pseudo labels"],
          phases.get("pseudo labels/k-means and thresholds (Eqs. 1-2)", 0.0),
          phases["train epochs"], sum(data_wait_seconds(report)),
          epoch["images_per_s"], phases[_EVALUATION], report["total_s"],
          1e3 * report["total_s"] / num_train))
      memory_rows.append((
          f"{num_train:,}", peaks["setup (data, splits, model, optimizer)"],
          peaks["pseudo labels"], peaks["train epochs"],
          peaks[_EVALUATION], peaks["total"]))
      quality_rows.append(_quality_row(report)
                          + (report["quality"]["validation_map_all"],))
      print(f"done: {num_train:,} training images in {report['total_s']:.0f} s",
            flush=True)
  print(f"\n### Time (seconds) per phase, database {report['num_database']:,} "
        "images\n")
  print_table(("train images", "setup", "init params", "pseudo labels",
               "of which k-means",
               "train epoch", "of which data wait", "img/s (incl. compile)",
               "evaluation and validation", "total", "total ms / train image"), rows)
  print("\n### Peak resident memory (VmHWM, MiB) at the end of each phase\n")
  print_table(("train images", "after setup", "after pseudo labels",
               "after train epoch", "after evaluation", "at end"), memory_rows)
  print("\n### Quality of the pseudo labels, and validation mAP@all after the epoch\n")
  print_table(QUALITY_HEADER + ("validation mAP@all",), quality_rows)
  load = os.getloadavg()
  print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_scaling")
