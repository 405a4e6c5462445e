"""Benchmark: mAP@1000 for 10,000 queries x 50,000 database items at 64 bits.

Compares psch_jax.evaluation.map_at_k (the top-K path: mAP@1000 alone) and
psch_jax.evaluation.retrieval_metrics (every metric in one pass: mAP@1000, mAP@all,
the tie-aware mAP and precision@radius2), each timed after a compile warm-up, with the
per-query NumPy loop of public hashing code (Hamming distances by a matrix product,
`np.argsort(kind="stable")`, cumulative precision; timed on a subset of the queries and
extrapolated linearly) and, when installed, faiss `IndexBinaryFlat` top-1000 search
(search only; faiss does not promise an order among tied items). The ratios are
against map_at_k; the two psch_jax paths must agree to 1e-6 on every query set, and
map_at_k with the NumPy loop on the subset.

Run from the repository root:  python -m benchmarks.bench_evaluation
      (--num-queries / --num-database / --numpy-queries to resize).
With --per-pair it instead prints the CPU time per query-item pair of each pass of the
two psch_jax paths and of the formulations the top-K path was chosen over (one device,
256 queries against the same database; the figures of psch_jax/evaluation.py's
docstring).
Unless XLA_FLAGS already sets it, the script gives XLA one CPU device per core
(--xla_force_host_platform_device_count), so the queries are shared over all cores
as they are over the GPUs of a multi-GPU host; NumPy's BLAS and faiss use all cores too.
Codes are class prototypes with 20 % of the bits flipped, 10 single-label classes, so
rankings are neither trivial nor all ties.
"""
from __future__ import annotations

import argparse
import functools
import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                             f"platform_device_count={os.cpu_count()}")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax import lax  # pylint: disable=wrong-import-position

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


def per_pair_costs(query_codes, query_labels, db_codes, db_labels, *, k: int,
                   num_queries: int = 256, block_size: int = 1024,
                   top_k_block: int = 8192, repeats: int = 3) -> None:
  """Prints the process CPU time per query-item pair (median of `repeats`) of each
  pass of both psch_jax paths and of the alternatives, on one device."""
  # pylint: disable=protected-access
  ev = evaluation
  num_database, code_length = db_codes.shape
  queries = jnp.asarray(ev._pack_rows(query_codes[:num_queries] > 0))
  labels = jnp.asarray(ev._pack_rows(query_labels[:num_queries] != 0))

  def blocks(size):
    rows = -(-num_database // size) * size
    return tuple(map(jnp.asarray, ev._database_blocks(
        db_codes, db_labels, 0, num_database, num_rows=rows, block_size=size,
        code_length=code_length)))

  db_blocks, db_label_blocks = blocks(block_size)
  total = jnp.int32(num_database)
  first = jnp.int32(0)

  def report(name, function, *args):
    jax.block_until_ready(function(*args))  # compile
    times = []
    for _ in range(repeats):
      start = time.process_time()
      jax.block_until_ready(function(*args))
      times.append(time.process_time() - start)
    per_pair = np.median(times) / (num_queries * num_database) * 1e9
    print(f"  {name:<68s} {per_pair:7.2f} ns", flush=True)

  print(f"CPU time per query-item pair, {num_queries} queries x {num_database} items, "
        f"{code_length} bits, K = {k}, one device (median of {repeats}); load average "
        f"{os.getloadavg()[0]:.1f}")
  print("top-K path (map_at_k):")
  count_pass = jax.jit(functools.partial(ev._distance_count_pass,
                                         code_length=code_length))
  zero_counts = jnp.zeros((num_queries, code_length + 1), jnp.int32)
  report("pass 1: distances + histogram (scatter-add)", count_pass, zero_counts,
         queries, db_blocks, first, total)
  counts = count_pass(zero_counts, queries, db_blocks, first, total)
  table = (jnp.zeros(num_queries, jnp.int32), jnp.zeros(num_queries, jnp.int32),
           jnp.zeros((num_queries, k), jnp.int32), jnp.zeros((num_queries, k), bool))
  selection = jax.jit(ev._selection_pass)
  selection_args = (table, counts, queries, labels, db_blocks, db_label_blocks, first,
                    total)
  report("pass 2: distances + bit masks + copy of the top K into the table",
         selection, *selection_args)
  table = selection(*selection_args)
  report("ranking scan over the K table",
         jax.jit(functools.partial(ev._top_k_precision_sums, code_length=code_length)),
         table[2], table[3])
  print("all-metrics path (retrieval_metrics), for comparison:")
  report("histogram + ranking passes over the database", jax.jit(functools.partial(
      ev._chunk_statistics, code_length=code_length, num_database=num_database,
      num_buckets=3)), queries, labels, db_blocks, db_label_blocks,
         jnp.asarray(ev._bucket_table(np.array([k, num_database]))))
  print("alternatives:")

  def distances_only(queries, db_blocks):
    return lax.scan(lambda total, codes: (
        total + jnp.sum(ev._hamming(queries, codes), axis=1), None),
                    jnp.zeros(num_queries, jnp.int32), db_blocks)[0]

  report("distances alone (XOR + popcount, summed)", jax.jit(distances_only), queries,
         db_blocks)

  def top_k_merge(queries, db_blocks):
    def merge(best, codes):  # lax.top_k keeps the lower index first on ties
      keys = -ev._hamming(queries, codes).astype(jnp.float32)
      return lax.top_k(jnp.concatenate([best, keys], axis=1), k)[0], None
    return lax.scan(merge, jnp.full((num_queries, k), -jnp.inf), db_blocks)[0]

  report(f"lax.top_k of the running top K and each {top_k_block}-item block",
         jax.jit(top_k_merge), queries, blocks(top_k_block)[0])
  keys = table[2] * k + jnp.arange(k)
  report("lax.sort of the K table by (distance, index), instead of the scan",
         jax.jit(lambda keys, relevant: lax.sort((keys, relevant), num_keys=1)),
         keys, table[3])

  def one_hot_histogram(queries, db_blocks):
    values = jnp.arange(code_length + 1)[:, None]
    def add(counts, codes):
      distances = ev._hamming(queries, codes)
      return counts + jnp.sum(distances[:, None, :] == values, axis=2,
                              dtype=jnp.int32), None
    return lax.scan(add, jnp.zeros((num_queries, code_length + 1), jnp.int32),
                    db_blocks)[0]

  report("histogram by comparing with each of the L + 1 distances",
         jax.jit(one_hot_histogram), queries, db_blocks)

  def cumsum_positions(queries, db_blocks):
    def add(filled, codes):
      selected = ev._hamming(queries, codes) < code_length // 4
      return filled + jnp.cumsum(selected, axis=1, dtype=jnp.int32)[:, -1], None
    return lax.scan(add, jnp.zeros(num_queries, jnp.int32), db_blocks)[0]

  report("table positions by jnp.cumsum over the items, instead of bit masks",
         jax.jit(cumsum_positions), queries, db_blocks)


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
  parser.add_argument("--per-pair", action="store_true",
                      help="print the CPU time per query-item pair of each pass and "
                      "alternative instead")
  args = parser.parse_args()
  k = 1000
  query_codes, query_labels, db_codes, db_labels = make_data(
      args.num_queries, args.num_database, args.num_bits, num_classes=10)
  if args.per_pair:
    per_pair_costs(query_codes, query_labels, db_codes, db_labels, k=k,
                   block_size=args.db_chunk)
    return
  print(f"{args.num_queries} queries x {args.num_database} database items, "
        f"{args.num_bits} bits, mAP@{k}; {os.cpu_count()} CPUs, "
        f"{len(jax.local_devices())} JAX devices, load average "
        f"{os.getloadavg()[0]:.1f} at start", flush=True)

  chunks = {"query_chunk": args.query_chunk, "db_chunk": args.db_chunk}
  warm_up = slice(0, args.query_chunk * len(jax.local_devices()))  # same shapes: compile
  top_k = lambda queries: evaluation.map_at_k(
      query_codes[queries], query_labels[queries], db_codes, db_labels, k=k, **chunks)
  every_metric = lambda queries: evaluation.retrieval_metrics(
      query_codes[queries], query_labels[queries], db_codes, db_labels, topk=(k,),
      curves=False, **chunks)
  everything = slice(None)
  top_k(warm_up)
  top_k_seconds, top_k_map = best_of(args.repeats, lambda: top_k(everything))
  every_metric(warm_up)
  full_seconds, full = best_of(args.repeats, lambda: every_metric(everything))

  subset = slice(0, args.numpy_queries)
  numpy_seconds, numpy_subset_map = best_of(args.repeats, lambda: numpy_map_at_k(
      query_codes[subset], query_labels[subset], db_codes, db_labels, k))
  numpy_seconds *= args.num_queries / args.numpy_queries
  top_k_subset = top_k(subset)
  faiss_seconds = faiss_search_seconds(query_codes, db_codes, k, args.repeats)

  print(f"\nmAP@{k}: map_at_k {top_k_map:.8f}, retrieval_metrics {full[f'map@{k}']:.8f} "
        f"(|diff| {abs(top_k_map - full[f'map@{k}']):.1e}); the latter also gives "
        f"mAP@all = {full['map@all']:.6f}, tie-aware mAP@all = "
        f"{full['map@all_tie_aware']:.6f}, precision@radius2 = "
        f"{full['precision@radius2']:.6f}")
  print(f"check on the first {args.numpy_queries} queries: map_at_k {top_k_subset:.8f}, "
        f"NumPy {numpy_subset_map:.8f}, "
        f"|diff| {abs(top_k_subset - numpy_subset_map):.1e}\n")
  rows = [("psch_jax map_at_k (top-K path)", top_k_seconds, "measured"),
          ("psch_jax retrieval_metrics (all metrics)", full_seconds, "measured"),
          ("NumPy argsort loop", numpy_seconds,
           f"extrapolated from {args.numpy_queries} queries")]
  if faiss_seconds is None:
    rows.append(("faiss IndexBinaryFlat top-1000 search", None, "faiss not installed"))
  else:
    rows.append(("faiss IndexBinaryFlat top-1000 search", faiss_seconds,
                 "measured, search only"))
  print(f"{'method':<46s} {'seconds':>9s} {'/ top-K':>8s}  note (best of {args.repeats})")
  for name, seconds, note in rows:
    if seconds is None:
      print(f"{name:<46s} {'-':>9s} {'-':>8s}  {note}")
    else:
      print(f"{name:<46s} {seconds:9.2f} {seconds / top_k_seconds:7.2f}x  {note}")
  print(f"load average at end {os.getloadavg()[0]:.1f}")

if __name__ == "__main__":
  main()
