"""Benchmark: every retrieval metric at 64 bits for 10,000 queries x 50,000 items,
NUS-WIDE's 2,100 x 193,734 and 10,000 x 1,000,000.

Per row, after a compile warm-up: psch_jax.ranking.retrieval_metrics_per_query
(mAP@1000, mAP@all, the tie-aware mAP, precision@radius2) by each form of its ranking
("host", "scan", "sort"; they must give the same bits) with the sequential loop steps
of the device forms' compiled step, the distances alone (the popcount limit), faiss
`IndexBinaryFlat` top-1000 search (search only; faiss does not promise an order among
tied items; installed by requirements-test.txt) and, up to 200,000 items, the NumPy
reference (psch_jax/reference.py: a stable argsort per query, the loop of public
hashing code; timed on a subset of the queries and extrapolated linearly, agreeing to
1e-6).

Run from the repository root:  python -m benchmarks.bench_evaluation
      (--sizes=10000x50000,... to choose rows, --algorithms=host,scan the forms;
      --quick for a seconds-long smoke run at 512 x 5,000).
With --per-pair it instead prints the CPU time per query-item pair of the ranking
(one device, 256 queries against the same database) and of the formulations it was
chosen over; docs/benchmarks.md holds the figures.
Unless XLA_FLAGS already sets it, the script gives XLA one CPU device per core
(--xla_force_host_platform_device_count), so the queries are shared over all cores
as they are over the GPUs of a multi-GPU host; NumPy's BLAS and faiss use all cores too.
Codes are class prototypes with 20 % of the bits flipped, 10 single-label classes, so
rankings are neither trivial nor all ties. Each row ends with the default form's
time against the issue-23 goals (<= 3x the distances alone, <= 0.5x faiss).
"""
from __future__ import annotations

import os
import time
from collections.abc import Sequence

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                             f"platform_device_count={os.cpu_count()}")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax import lax  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

from psch_jax import cli  # pylint: disable=wrong-import-position
from psch_jax import ranking  # pylint: disable=wrong-import-position
from psch_jax import ranking_passes  # pylint: disable=wrong-import-position
from psch_jax import reference  # pylint: disable=wrong-import-position
from psch_jax import sharding  # pylint: disable=wrong-import-position
from psch_jax.errors import UserError  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS


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


def reference_map_at_k(query_codes, query_labels, db_codes, db_labels, k: int) -> float:
  """mAP@k by the NumPy reference (a stable argsort per query), in query blocks."""
  total = 0.0
  for start in range(0, len(query_codes), reference.QUERY_BLOCK):
    block = slice(start, start + reference.QUERY_BLOCK)
    ranked = reference.ranked_relevance(
        reference.hamming_distances(query_codes[block], db_codes),
        reference.shares_a_label(query_labels[block], db_labels))
    total += float(reference.average_precision(ranked, k).sum())
  return total / len(query_codes)


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
  """Prints the process CPU time per query-item pair (median of `repeats`) of the
  ranking and of the alternatives, on one device."""
  num_database, code_length = db_codes.shape
  queries = jnp.asarray(ranking.pack_codes(query_codes[:num_queries]))
  query_labels = query_labels[:num_queries]

  def blocks(size):
    packed = ranking.pack_codes(db_codes)
    rows = -(-num_database // size) * size
    padded = np.zeros((rows, packed.shape[1]), np.uint32)
    padded[:num_database] = packed
    return jnp.asarray(padded.reshape(rows // size, size, -1))

  db_blocks = blocks(block_size)
  hamming = ranking.hamming_distance_packed

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
  for algorithm in ranking.ALGORITHMS:
    report(f"ranking.retrieval_metrics_per_query, algorithm={algorithm!r} (both "
           "passes, host metrics included)",
           lambda a=algorithm: ranking.retrieval_metrics_per_query(
               query_codes[:num_queries], query_labels, db_codes, db_labels, topk=(k,),
               topn=(), query_chunk=num_queries, db_chunk=block_size,
               mesh=sharding.make_mesh(jax.devices()[:1]), algorithm=a))
  print("alternatives:")

  def distances_only(queries, db_blocks):
    return lax.scan(lambda total, codes: (
        total + jnp.sum(hamming(queries, codes), axis=1), None),
                    jnp.zeros(num_queries, jnp.int32), db_blocks)[0]

  report("distances alone (XOR + popcount, summed)", jax.jit(distances_only), queries,
         db_blocks)

  def top_k_merge(queries, db_blocks):
    def merge(best, codes):  # lax.top_k keeps the lower index first on ties
      keys = -hamming(queries, codes).astype(jnp.float32)
      return lax.top_k(jnp.concatenate([best, keys], axis=1), k)[0], None
    return lax.scan(merge, jnp.full((num_queries, k), -jnp.inf), db_blocks)[0]

  positions = jnp.arange(block_size, dtype=jnp.int32)

  def sort_keys(queries, db_blocks):  # the sort of the "sort" form, alone
    return lax.scan(lambda total, codes: (total + lax.sort(
        hamming(queries, codes) * block_size + positions, dimension=1)[:, -1], None),
                    jnp.zeros(num_queries, jnp.int32), db_blocks)[0]

  report(f"distances + lax.sort of each {block_size}-item block's keys per query",
         jax.jit(sort_keys), queries, db_blocks)
  report(f"lax.top_k of the running top K and each {top_k_block}-item block",
         jax.jit(top_k_merge), queries, blocks(top_k_block))

  def one_hot_histogram(queries, db_blocks):
    values = jnp.arange(code_length + 1)[:, None]
    def add(counts, codes):
      distances = hamming(queries, codes)
      return counts + jnp.sum(distances[:, None, :] == values, axis=2,
                              dtype=jnp.int32), None
    return lax.scan(add, jnp.zeros((num_queries, code_length + 1), jnp.int32),
                    db_blocks)[0]

  report("histogram by comparing with each of the L + 1 distances",
         jax.jit(one_hot_histogram), queries, db_blocks)


# (queries, database items): the issue-23 rows. NUS-WIDE's is its usual protocol
# (2,100 queries, 193,734 database images); the million-item row has no NumPy
# reference (an argsort per query of a million items).
SIZES = ((10_000, 50_000), (2_100, 193_734), (10_000, 1_000_000))
NUMPY_LIMIT = 200_000


def distances_alone_seconds(query_codes, db_codes, *, db_chunk: int, repeats: int
                            ) -> float:
  """Wall time of the Hamming distances alone (XOR, popcount, summed per query) over
  every local device, queries split as the ranking splits them: the popcount limit."""
  mesh = sharding.make_mesh(jax.local_devices())
  queries = ranking.pack_codes(query_codes)
  pad = -len(queries) % mesh.size
  queries = jax.device_put(np.pad(queries, ((0, pad), (0, 0))),
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
                               mesh.axis_names)))
  packed = ranking.pack_codes(db_codes)
  rows = -(-len(packed) // db_chunk) * db_chunk
  blocks = np.zeros((rows, packed.shape[1]), np.uint32)
  blocks[:len(packed)] = packed
  blocks = jax.device_put(blocks.reshape(rows // db_chunk, db_chunk, -1),
                          sharding.replicated(mesh))

  @jax.jit
  def distances(queries, blocks):
    return lax.scan(lambda total, codes: (total + jnp.sum(
        ranking.hamming_distance_packed(queries, codes), axis=1), None),
                    jnp.zeros(queries.shape[0], jnp.int32), blocks)[0]

  jax.block_until_ready(distances(queries, blocks))
  return best_of(repeats, lambda: jax.block_until_ready(distances(queries, blocks)))[0]


def benchmark_row(num_queries: int, num_database: int, *, num_bits: int, k: int,
                  numpy_queries: int, query_chunk: int, db_chunk: int, repeats: int,
                  algorithms: Sequence[str] = ranking.ALGORITHMS) -> None:
  """Times every metric by each form of the ranking pass, the distances alone, faiss
  and (below NUMPY_LIMIT items) the NumPy reference at one size, and prints the
  table; exits if the forms' bits or the reference disagree."""
  query_codes, query_labels, db_codes, db_labels = make_data(
      num_queries, num_database, num_bits, num_classes=10)
  print(f"\n{num_queries} queries x {num_database} database items, {num_bits} bits, "
        f"mAP@{k}; {os.cpu_count()} CPUs, {len(jax.local_devices())} JAX devices, "
        f"load average {os.getloadavg()[0]:.1f} at start", flush=True)
  chunks = {"query_chunk": query_chunk, "db_chunk": db_chunk}
  warm_up = slice(0, query_chunk * len(jax.local_devices()))  # same shapes: compile
  rows, results, algorithm_seconds = [], {}, {}
  for algorithm in algorithms:
    every_metric = lambda queries, a=algorithm: ranking.retrieval_metrics_per_query(
        query_codes[queries], query_labels[queries], db_codes, db_labels, topk=(k,),
        topn=(), algorithm=a, **chunks)
    every_metric(warm_up)
    seconds, results[algorithm] = best_of(repeats, lambda: every_metric(slice(None)))
    algorithm_seconds[algorithm] = seconds
    if algorithm in ranking_passes.ALGORITHMS:
      steps = ranking_passes.sequential_loop_steps(
          num_queries=query_chunk, num_database=num_database, code_length=num_bits,
          algorithm=algorithm, db_chunk=db_chunk)
      note = f"{steps:,} loop steps per query chunk"
    else:
      note = "compiled loops on the host, every core"
    rows.append((f"psch_jax, every metric, algorithm={algorithm!r}", seconds, note))
  first = results[algorithms[0]]
  if any(first[key].tobytes() != results[a][key].tobytes()
         for a in algorithms[1:] for key in first):
    raise SystemExit("the forms of the ranking gave different bits")
  default = ranking.default_algorithm(sharding.make_mesh(jax.local_devices()))
  if default not in results:
    default = algorithms[0]
  ours = results[default]
  print(f"mAP@{k} = {ours[f'ap@{k}'].mean():.8f}, mAP@all = {ours['ap@all'].mean():.6f}, "
        f"tie-aware mAP@all = {ours['ap@all_tie_aware'].mean():.6f}; "
        f"{', '.join(algorithms)} give the same bits", flush=True)
  distance_seconds = distances_alone_seconds(query_codes, db_codes, db_chunk=db_chunk,
                                             repeats=repeats)
  rows.append(("distances alone (XOR + popcount, summed)", distance_seconds,
               "the popcount limit"))
  faiss_seconds = faiss_search_seconds(query_codes, db_codes, k, repeats)
  rows.append(("faiss IndexBinaryFlat top-1000 search", faiss_seconds,
               "search only" if faiss_seconds is not None else "faiss not installed"))
  if num_database <= NUMPY_LIMIT:
    subset = slice(0, numpy_queries)
    numpy_seconds, numpy_map = best_of(repeats, lambda: reference_map_at_k(
        query_codes[subset], query_labels[subset], db_codes, db_labels, k))
    difference = abs(float(ours[f"ap@{k}"][subset].mean()) - numpy_map)
    if difference > 1e-6:
      raise SystemExit(f"retrieval_metrics and the NumPy reference differ by "
                       f"{difference}")
    rows.append(("NumPy reference (argsort per query)",
                 numpy_seconds * num_queries / numpy_queries,
                 f"extrapolated from {numpy_queries} queries; |diff| {difference:.0e}"))
  reference_seconds = rows[0][1]
  print(f"{'':<48s} {'seconds':>9s} {'/ ' + algorithms[0]:>8s}  note (best of "
        f"{repeats})")
  for name, seconds, note in rows:
    if seconds is None:
      print(f"{name:<48s} {'-':>9s} {'-':>8s}  {note}")
    else:
      print(f"{name:<48s} {seconds:9.2f} {seconds / reference_seconds:7.2f}x  {note}")
  default_seconds = algorithm_seconds[default]
  goals = [f"{default_seconds / distance_seconds:.2f}x the distances alone (goal <= 3x)"]
  if faiss_seconds is not None:
    goals.append(f"{default_seconds / faiss_seconds:.2f}x faiss's top-1000 search "
                 "(goal <= 0.5x)")
  print(f"every metric, {default!r}: " + ", ".join(goals))
  print(f"load average at end {os.getloadavg()[0]:.1f}", flush=True)


def define_flags() -> None:
  """The benchmark's flags (the module docstring has the commands)."""
  flags.DEFINE_list("sizes", None, "QUERIESxITEMS rows to run, e.g. 10000x50000 "
                    "(default: the three of SIZES)")
  flags.DEFINE_list("algorithms", list(ranking.ALGORITHMS), "forms of the ranking to "
                    "time and compare bit for bit, e.g. host,scan (without the slow "
                    "CPU sort)")
  flags.DEFINE_integer("num-bits", 64, "code length")
  flags.DEFINE_integer("numpy-queries", 500,
                       "queries timed for the NumPy loop (extrapolated linearly)")
  flags.DEFINE_integer("query-chunk", 256, "queries per device per step")
  flags.DEFINE_integer("db-chunk", 1024, "database items per block")
  flags.DEFINE_integer("repeats", 2, "each timing is the best of this many runs")
  flags.DEFINE_bool("per-pair", False, "print the CPU time per query-item pair of the "
                    "ranking and the alternatives instead")
  flags.DEFINE_bool("quick", False, "a seconds-long smoke run: 512 queries x 5,000 "
                    "items, 100 NumPy queries, one repeat")


def _parse_size(text: str) -> tuple[int, int]:
  queries, _, items = text.lower().partition("x")
  if not (queries.isdigit() and items.isdigit()):
    raise UserError(f"--sizes={text!r}: write QUERIESxITEMS, e.g. 10000x50000.")
  return int(queries), int(items)


def main(argv: Sequence[str]) -> None:
  del argv
  num_bits, numpy_queries = FLAGS["num-bits"].value, FLAGS["numpy-queries"].value
  query_chunk, db_chunk = FLAGS["query-chunk"].value, FLAGS["db-chunk"].value
  repeats, k = FLAGS.repeats, 1000
  sizes = [_parse_size(text) for text in FLAGS.sizes] if FLAGS.sizes else SIZES
  unknown = [a for a in FLAGS.algorithms if a not in ranking.ALGORITHMS]
  if unknown or not FLAGS.algorithms:
    raise UserError(f"--algorithms={','.join(FLAGS.algorithms)}: name some of "
                    f"{','.join(ranking.ALGORITHMS)}.")
  if FLAGS.quick:
    sizes, numpy_queries, repeats = [(512, 5_000)], 100, 1
    query_chunk = min(query_chunk, 64)
  if FLAGS["per-pair"].value:
    per_pair_costs(*make_data(*sizes[0], num_bits, num_classes=10), k=k,
                   block_size=db_chunk)
    return
  for num_queries, num_database in sizes:
    benchmark_row(num_queries, num_database, num_bits=num_bits, k=k,
                  numpy_queries=min(numpy_queries, num_queries),
                  query_chunk=query_chunk, db_chunk=db_chunk, repeats=repeats,
                  algorithms=FLAGS.algorithms)


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_evaluation")
