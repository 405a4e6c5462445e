"""Benchmark: mAP@1000 for 10,000 queries x 50,000 database items at 64 bits.

Compares psch_jax.evaluation.retrieval_metrics (timed after a compile warm-up; it also
returns mAP@all, the tie-aware mAP and precision@radius2 from the same pass) with the
per-query NumPy loop of public hashing code (Hamming distances by a matrix product,
`np.argsort(kind="stable")`, cumulative precision; timed on a subset of the queries and
extrapolated linearly) and, when installed, faiss `IndexBinaryFlat` top-1000 search
(search only; faiss does not promise an order among tied items).

Run from the repository root:  python -m benchmarks.bench_evaluation
      (--num-queries / --num-database / --numpy-queries to resize).
Unless XLA_FLAGS already sets it, the script gives XLA one CPU device per core
(--xla_force_host_platform_device_count), so the queries are shared over all cores
as they are over the GPUs of a multi-GPU host; NumPy's BLAS and faiss use all cores too.
Codes are class prototypes with 20 % of the bits flipped, 10 single-label classes, so
rankings are neither trivial nor all ties.
"""
from __future__ import annotations

import argparse
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                             f"platform_device_count={os.cpu_count()}")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from psch_jax import evaluation  # pylint: disable=wrong-import-position


def make_data(num_queries: int, num_database: int, num_bits: int, num_classes: int,
              seed: int = 0) -> tuple[np.ndarray, ...]:
  """Prototype codes per class with 20 % flipped bits; one-hot labels."""
  rng = np.random.default_rng(seed)
  prototypes = rng.choice(np.array([-1, 1], np.int8), (num_classes, num_bits))

  def draw(n):
    classes = rng.integers(0, num_classes, n)
    flips = np.where(rng.random((n, num_bits)) < 0.2, -1, 1).astype(np.int8)
    return prototypes[classes] * flips, np.eye(num_classes, dtype=np.uint8)[classes]

  query_codes, query_labels = draw(num_queries)
  db_codes, db_labels = draw(num_database)
  return query_codes, query_labels, db_codes, db_labels


def numpy_map_at_k(query_codes, query_labels, db_codes, db_labels, k: int) -> float:
  """The loop of public hashing code, with a stable sort (ties by database index)."""
  num_bits = query_codes.shape[1]
  db_float = db_codes.astype(np.float32)
  db_labels = db_labels.astype(np.float32)
  average_precisions = []
  queries = zip(query_codes.astype(np.float32), query_labels.astype(np.float32))
  for code, labels in queries:
    hamming = 0.5 * (num_bits - db_float @ code)
    order = np.argsort(hamming, kind="stable")[:k]
    relevant = (db_labels[order] @ labels) > 0
    hits = relevant.sum()
    if hits == 0:
      average_precisions.append(0.0)
      continue
    precision = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
    average_precisions.append(float(np.sum(precision * relevant) / hits))
  return float(np.mean(average_precisions))


def best_of(repeats: int, run) -> tuple[float, object]:
  """Shortest wall time of `repeats` runs (the machine is shared), and a result."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    result = run()
    times.append(time.perf_counter() - start)
  return min(times), result


def faiss_search_seconds(query_codes, db_codes, k: int, repeats: int) -> float | None:
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  pack = lambda codes: np.packbits(codes > 0, axis=1)
  index = faiss.IndexBinaryFlat(query_codes.shape[1])
  index.add(pack(db_codes))
  queries = pack(query_codes)
  index.search(queries[:100], k)  # warm-up
  return best_of(repeats, lambda: index.search(queries, k))[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num-queries", type=int, default=10_000)
  parser.add_argument("--num-database", type=int, default=50_000)
  parser.add_argument("--num-bits", type=int, default=64)
  parser.add_argument("--numpy-queries", type=int, default=500,
                      help="queries timed for the NumPy loop (extrapolated linearly)")
  parser.add_argument("--query-chunk", type=int, default=256)
  parser.add_argument("--db-chunk", type=int, default=1024)
  parser.add_argument("--repeats", type=int, default=2,
                      help="each timing is the best of this many runs")
  args = parser.parse_args()
  k = 1000
  query_codes, query_labels, db_codes, db_labels = make_data(
      args.num_queries, args.num_database, args.num_bits, num_classes=10)
  print(f"{args.num_queries} queries x {args.num_database} database items, "
        f"{args.num_bits} bits, mAP@{k}; {os.cpu_count()} CPUs, "
        f"{len(jax.local_devices())} JAX devices, load average "
        f"{os.getloadavg()[0]:.1f} at start", flush=True)

  chunks = {"query_chunk": args.query_chunk, "db_chunk": args.db_chunk}
  warm_up = slice(0, args.query_chunk * len(jax.local_devices()))  # same shapes: compile
  evaluation.retrieval_metrics(query_codes[warm_up], query_labels[warm_up], db_codes,
                               db_labels, topk=(k,), curves=False, **chunks)
  ours_seconds, ours = best_of(args.repeats, lambda: evaluation.retrieval_metrics(
      query_codes, query_labels, db_codes, db_labels, topk=(k,), curves=False, **chunks))

  subset = slice(0, args.numpy_queries)
  numpy_seconds, numpy_subset_map = best_of(args.repeats, lambda: numpy_map_at_k(
      query_codes[subset], query_labels[subset], db_codes, db_labels, k))
  numpy_seconds *= args.num_queries / args.numpy_queries
  ours_subset = evaluation.retrieval_metrics(
      query_codes[subset], query_labels[subset], db_codes, db_labels, topk=(k,),
      curves=False, **chunks)[f"map@{k}"]
  faiss_seconds = faiss_search_seconds(query_codes, db_codes, k, args.repeats)

  print(f"\nmAP@{k} (ours) = {ours[f'map@{k}']:.6f}; also mAP@all = "
        f"{ours['map@all']:.6f}, "
        f"tie-aware mAP@all = {ours['map@all_tie_aware']:.6f}, precision@radius2 = "
        f"{ours['precision@radius2']:.6f}")
  print(f"check on the first {args.numpy_queries} queries: ours {ours_subset:.8f}, "
        f"NumPy {numpy_subset_map:.8f}, "
        f"|diff| {abs(ours_subset - numpy_subset_map):.1e}\n")
  rows = [("psch_jax.evaluation (all metrics, one pass)", ours_seconds, "measured"),
          ("NumPy argsort loop", numpy_seconds,
           f"extrapolated from {args.numpy_queries} queries")]
  if faiss_seconds is None:
    rows.append(("faiss IndexBinaryFlat top-1000 search", None, "faiss not installed"))
  else:
    rows.append(("faiss IndexBinaryFlat top-1000 search", faiss_seconds,
                 "measured, search only"))
  print(f"{'method':<46s} {'seconds':>9s} {'vs ours':>8s}  note (best of {args.repeats})")
  for name, seconds, note in rows:
    if seconds is None:
      print(f"{name:<46s} {'-':>9s} {'-':>8s}  {note}")
    else:
      print(f"{name:<46s} {seconds:9.2f} {seconds / ours_seconds:7.2f}x  {note}")
  print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
