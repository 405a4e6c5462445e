"""Retrieval metrics for binary hash codes: Hamming ranking, mAP@K, tie-aware mAP, curves.

The numbers users quote (docs/method.md, "Training and evaluation protocols"; the lead
copies this docstring into docs/evaluation.md). Every metric is a mean over ALL queries.

Conventions
- Codes are +-1 (int8 or float) `(n, L)`; labels are multi-hot uint8 `(n, num_labels)`
  (one-hot for single-label sets). A database item is relevant to a query when the two
  share at least one label.
- Ranking: the database is sorted by Hamming distance to the query; ties are broken by
  database index (a stable sort, as `np.argsort(kind="stable")` in public hashing code).
- AP@K = (1/R_K) sum_{k <= K, item k relevant} P@k, where P@k = (relevant items in the
  top k) / k and R_K = the number of relevant items in the top K. A query with no
  relevant item in its top K has AP@K = 0 and stays in the mean. K larger than the
  database means the whole database; "map@all" is K = database size.
- Tie-aware mAP@all (He et al., "Hashing as Tie-Aware Learning to Rank", CVPR 2018):
  the expected AP@all when the items at each Hamming distance come in a uniformly random
  order. At distance d let n items (r relevant) tie after C items (R' relevant) at
  smaller distances. A relevant item of the group lands on each of the n places with
  probability 1/n; with k group members before it, E[relevant among them] =
  k (r - 1) / (n - 1) (hypergeometric), so its expected precision is
      (1/n) sum_{k=0}^{n-1} (R' + 1 + k b) / (C + 1 + k),  b = (r-1)/(n-1) (0 if n = 1)
    = (1/n) [n b + (R' + 1 - b (C + 1)) (H(C + n) - H(C))],   H(m) = sum_{t <= m} 1/t,
  and the group adds r times that to the sum that is divided by R (all relevant items).
  It needs only the per-distance counts, and it does not change under any permutation
  of the database.
- precision@radius2: relevant / retrieved among the items within Hamming distance 2;
  0 when nothing lies inside (the query stays in the mean).
- PR curve, radius 0..L: per query, precision = relevant retrieved / retrieved (0 when
  nothing is retrieved) and recall = relevant retrieved / relevant in the database (0
  for a query without any relevant item); the curve is the mean over queries per radius.
- precision@N = relevant in the top N / N under the same ranking; N larger than the
  database means the whole database (divided by the database size).

Algorithm (no sort, no query x database matrix). One jit-compiled step takes
`query_chunk` queries per device, shares them over `devices` (default: all local
devices) with `jax.shard_map`, the packed database replicated, and runs two passes:
1. Histogram pass: the database is scanned in blocks of `db_chunk`; a block's
   distances (`query_chunk x db_chunk` int32, by popcount of XOR-ed packed words) are
   scatter-added into per-query counts of (irrelevant, relevant) items per distance
   0..L. The tie-aware mAP, precision@radius and the PR curve come from these counts
   alone (in float64, on the host; the tie-aware form subtracts harmonic numbers).
2. Ranking pass: the rank of database item j is (items at smaller distance) + (items at
   the same distance with smaller index) + 1. A `lax.scan` over the database in index
   order carries, per query and distance, the running (items, relevant items) so far,
   started at the counts of all smaller distances; adding item j and reading its slot
   back gives its rank and the number of relevant items ranked up to it, so its
   precision. That is exact integer arithmetic; precisions are added in float32 per
   `db_chunk` block and the blocks in compensated (two-float) sums, into one bucket
   per rank interval between the requested K and N, so one pass serves mAP@all, every
   mAP@K and every precision@N.
Why this and not a sort (CPU, per query-item pair, one thread, measured on a shared
2-core machine): `lax.sort` of (distance, index) keys costs about 60 ns; cumulative
counts from an (L + 1)-wide one-hot, about 900 ns at 64 bits; `lax.top_k` about 12 ns
for k = 1,000 (it keeps the lower index first on ties) but 500 ns for k = database
size, and it needs the query x database distances in memory; the two passes here cost
about 25-35 ns together and give every metric, mAP@all included. Each scan step is a
few small kernels, so on an accelerator use a large `query_chunk` (thousands).

Memory per device: O(query_chunk x (db_chunk + L)) plus the packed database; with the
defaults (256 x 1,024) the working set is a few MB whatever the database size: for
NUS-WIDE (2,100 queries x 193,734 items, 64 bits) XLA reports 3 MB of arguments and
2 MB of temporaries, where the dense distance matrix alone would take 1.6 GB.
Limit: fewer than 2^24 database items.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from psch_jax.errors import UserError

# Printed and saved with every result (docs/evaluation.md states them in full).
METRIC_CONVENTIONS = (
    "Hamming ranking, ties by database index; AP@K averaged over all queries (0 when "
    "none relevant in the top K); tie-aware mAP@all of He et al. 2018; "
    "docs/evaluation.md")
DEFAULT_TOPN = tuple(range(100, 1001, 100))
_WORD_BITS = 32
_QUERY_AXIS = "queries"
# Ranks and counts of relevant items pass through float32: exact below 2^24.
_MAX_DATABASE = 2**24
_EULER_GAMMA = 0.57721566490153286061
# Below this argument harmonic numbers come from an exact table, above it from the
# asymptotic series, whose first omitted term is then below 1e-16.
_HARMONIC_TABLE_SIZE = 64


# ------------------------------------------------------------------ packed codes

def _check_codes(codes: Any, name: str) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 2 or codes.shape[0] == 0 or codes.shape[1] == 0:
    raise UserError(f"{name} must be a non-empty (n, L) array of +-1 codes, got shape "
                    f"{codes.shape}; stack the codes of all images into one matrix.")
  if not np.all(np.abs(codes) == 1):
    raise UserError(f"{name} must hold only -1 and +1; binarise with "
                    "models.hash_codes (sign with sign(0) = +1) before evaluating.")
  return codes


def _check_labels(labels: Any, num_rows: int, name: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 2 or labels.shape[0] != num_rows or labels.shape[1] == 0:
    raise UserError(f"{name} must be a multi-hot (n, num_labels) matrix with one row per "
                    f"code ({num_rows} rows), got shape {labels.shape}; one-hot encode "
                    "single-label datasets.")
  if not np.all((labels == 0) | (labels == 1)):
    raise UserError(f"{name} must hold only 0 and 1 (multi-hot); turn class ids into "
                    "one-hot rows with np.eye(num_classes, dtype=np.uint8)[ids].")
  return labels


@jax.jit
def _pack_bits(bits: jax.Array) -> jax.Array:
  """bool (n, m) -> uint32 (n, ceil(m/32)); bit i of word w is column 32 w + i."""
  num_rows, num_bits = bits.shape
  num_words = -(-num_bits // _WORD_BITS)
  padded = jnp.zeros((num_rows, num_words * _WORD_BITS), jnp.uint32)
  padded = padded.at[:, :num_bits].set(bits.astype(jnp.uint32))
  shifts = jnp.arange(_WORD_BITS, dtype=jnp.uint32)
  # The shifted bits are disjoint, so their sum is their bitwise OR.
  return jnp.sum(padded.reshape(num_rows, num_words, _WORD_BITS) << shifts, axis=-1,
                 dtype=jnp.uint32)


def pack_codes(codes: Any) -> jax.Array:
  """Packs +-1 codes into 32-bit words, bit 1 for +1.

  Args:
    codes: int8 or float `(n, L)` with entries in {-1, +1}.

  Returns:
    uint32 `(n, ceil(L / 32))`; bit i of word w is code bit 32 w + i, padding bits 0.
  """
  return _pack_bits(jnp.asarray(_check_codes(codes, "codes") > 0))


def _hamming(query_packed: jax.Array, db_packed: jax.Array) -> jax.Array:
  """uint32 (q, W), (n, W) -> int32 (q, n) Hamming distances."""
  distances = None
  for word in range(query_packed.shape[1]):  # W is small: one XOR-popcount per word.
    bits = lax.population_count(query_packed[:, None, word] ^ db_packed[None, :, word])
    distances = bits if distances is None else distances + bits
  return distances.astype(jnp.int32)


@jax.jit
def _hamming_jit(query_packed: jax.Array, db_packed: jax.Array) -> jax.Array:
  return _hamming(query_packed, db_packed)


def hamming_distance_packed(query_packed: Any, db_packed: Any) -> jax.Array:
  """Hamming distances between packed codes, for one chunk (the result is dense).

  Args:
    query_packed: uint32 `(nq, W)` from `pack_codes`.
    db_packed: uint32 `(ndb, W)` from `pack_codes`, same W.

  Returns:
    int32 `(nq, ndb)`: number of differing bits.
  """
  query_packed, db_packed = jnp.asarray(query_packed), jnp.asarray(db_packed)
  if (query_packed.ndim != 2 or db_packed.ndim != 2
      or query_packed.shape[1] != db_packed.shape[1]
      or query_packed.dtype != jnp.uint32 or db_packed.dtype != jnp.uint32):
    raise UserError(f"packed codes must be uint32 (n, W) with the same W, got "
                    f"{query_packed.dtype}{query_packed.shape} and "
                    f"{db_packed.dtype}{db_packed.shape}; pack both with pack_codes.")
  return _hamming_jit(query_packed, db_packed)


# ------------------------------------------------------------- per-chunk kernel

def _relevance(query_labels: jax.Array, db_labels: jax.Array) -> jax.Array:
  """uint32 (q, Wl), (n, Wl) packed labels -> bool (q, n): at least one shared label."""
  return jnp.any((query_labels[:, None, :] & db_labels[None, :, :]) != 0, axis=-1)


def _two_sum(hi: jax.Array, lo: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Compensated float32 accumulation: hi + lo += x, keeping the rounding error in lo."""
  total = hi + x
  x_part = total - hi
  error = (hi - (total - x_part)) + (x - x_part)
  return total, lo + error


def _chunk_statistics(query_packed: jax.Array, query_labels: jax.Array,
                      db_blocks: jax.Array, db_label_blocks: jax.Array,
                      bucket_of_rank: jax.Array, *, code_length: int, num_database: int,
                      num_buckets: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Both passes for one chunk of queries (one device's share under shard_map).

  Args:
    query_packed: uint32 (Q, W) packed query codes.
    query_labels: uint32 (Q, Wl) packed query labels.
    db_blocks: uint32 (B, T, W) packed database codes in index order, zero-padded.
    db_label_blocks: uint32 (B, T, Wl) packed database labels, padding rows all zero.
    bucket_of_rank: int32 (num_database + 1,): rank -> number of breakpoints below it.
    code_length: L.
    num_database: number of real database items (the rest of B x T is padding).
    num_buckets: number of breakpoints + 1.

  Returns:
    counts: int32 (Q, L + 1, 2): items at each distance, [irrelevant, relevant].
    precision_sums: float32 (Q, num_buckets, 2): per rank bucket, a two-float sum
      (hi, lo) of P@rank over the relevant items ranked in the bucket.
    relevant_counts: int32 (Q, num_buckets): relevant items ranked in each bucket.
  """
  num_queries = query_packed.shape[0]
  num_blocks, block_size, _ = db_blocks.shape
  num_distances = code_length + 1
  query_rows = jnp.arange(num_queries, dtype=jnp.int32)

  # Pass 1: per-distance counts. Padding items go to an extra slot that is dropped.
  def histogram_step(counts, block):
    codes, labels, start = block
    distances = _hamming(query_packed, codes)
    relevant = _relevance(query_labels, labels).astype(jnp.int32)
    is_real = start + jnp.arange(block_size) < num_database
    slot = jnp.where(is_real[None, :], distances, num_distances)
    flat = (query_rows[:, None] * (num_distances + 1) + slot) * 2 + relevant
    return counts.at[flat.reshape(-1)].add(1, mode="promise_in_bounds"), None

  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  counts, _ = lax.scan(
      histogram_step, jnp.zeros((num_queries * (num_distances + 1) * 2,), jnp.int32),
      (db_blocks, db_label_blocks, starts))
  counts = counts.reshape(num_queries, num_distances + 1, 2)[:, :num_distances]

  # Pass 2: ranks in index order. `running[q, d]` starts at (items, relevant items)
  # at distances < d and counts the items at distance d seen so far, so after adding
  # item j its own slot holds (rank_j, relevant items ranked <= rank_j).
  per_distance = jnp.stack([counts.sum(-1), counts[..., 1]], axis=-1)
  running = (jnp.cumsum(per_distance, axis=1) - per_distance).reshape(-1, 2)
  bucket_rows = query_rows * num_buckets

  def item_step(carry, item):
    running, block_sums = carry
    code, labels = item
    distances = _hamming(query_packed, code[None, :])[:, 0]
    relevant = _relevance(query_labels, labels[None, :])[:, 0]
    slot = query_rows * num_distances + distances
    increment = jnp.stack([jnp.ones_like(distances), relevant.astype(jnp.int32)], -1)
    # Scatter first, then read back: a read before an in-place scatter of the same
    # carried buffer makes XLA copy the buffer every step.
    running = running.at[slot].add(increment, mode="promise_in_bounds")
    rank_and_hits = running.at[slot].get(mode="promise_in_bounds")
    rank = rank_and_hits[:, 0]
    precision = jnp.where(relevant, rank_and_hits[:, 1].astype(jnp.float32)
                          / rank.astype(jnp.float32), 0.0)
    # Padding items (never relevant, after all real ones) may rank past the table.
    bucket = bucket_of_rank.at[jnp.minimum(rank, num_database)].get(
        mode="promise_in_bounds")
    update = jnp.stack([precision, relevant.astype(jnp.float32)], -1)
    block_sums = block_sums.at[bucket_rows + bucket].add(update, mode="promise_in_bounds")
    return (running, block_sums), None

  def block_step(carry, block):
    running, hi, lo, relevant_counts = carry
    block_sums = jnp.zeros((num_queries * num_buckets, 2), jnp.float32)
    (running, block_sums), _ = lax.scan(item_step, (running, block_sums), block)
    block_sums = block_sums.reshape(num_queries, num_buckets, 2)
    hi, lo = _two_sum(hi, lo, block_sums[..., 0])
    relevant_counts = relevant_counts + block_sums[..., 1].astype(jnp.int32)
    return (running, hi, lo, relevant_counts), None

  zeros = jnp.zeros((num_queries, num_buckets), jnp.float32)
  (_, hi, lo, relevant_counts), _ = lax.scan(
      block_step, (running, zeros, zeros, jnp.zeros_like(zeros, jnp.int32)),
      (db_blocks, db_label_blocks))
  return counts, jnp.stack([hi, lo], -1), relevant_counts


@functools.partial(jax.jit, static_argnames=("mesh", "code_length", "num_database",
                                             "num_buckets"))
def _sharded_statistics(query_packed: jax.Array, query_labels: jax.Array,
                        db_blocks: jax.Array, db_label_blocks: jax.Array,
                        bucket_of_rank: jax.Array, *, mesh: Mesh, code_length: int,
                        num_database: int, num_buckets: int
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`_chunk_statistics` with the queries split over the mesh, database replicated."""
  body = functools.partial(_chunk_statistics, code_length=code_length,
                           num_database=num_database, num_buckets=num_buckets)
  split = P(_QUERY_AXIS)
  # No collectives: each device works alone, so the varying-axis type check (which
  # would ask for pcasts of every zero-initialised scan carry) buys nothing.
  return jax.shard_map(body, mesh=mesh, in_specs=(split, split, P(), P(), P()),
                       out_specs=(split, split, split), check_vma=False)(
                           query_packed, query_labels, db_blocks, db_label_blocks,
                           bucket_of_rank)


# ------------------------------------------------- float64 metrics from counts

def _harmonic(m: np.ndarray) -> np.ndarray:
  """H(m) = sum_{t=1}^m 1/t for int m >= 0, float64."""
  table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, _HARMONIC_TABLE_SIZE + 1))])
  small = m <= _HARMONIC_TABLE_SIZE
  big = np.maximum(m, _HARMONIC_TABLE_SIZE + 1).astype(np.float64)
  series = (np.log(big) + _EULER_GAMMA + _harmonic_tail(big))
  return np.where(small, table[np.minimum(m, _HARMONIC_TABLE_SIZE)], series)


def _harmonic_tail(m: np.ndarray) -> np.ndarray:
  """H(m) - ln m - gamma by its asymptotic series (m > 64: error below 1e-17)."""
  inv2 = 1.0 / (m * m)
  return 1.0 / (2 * m) - inv2 * (1 / 12 - inv2 * (1 / 120 - inv2 / 252))


def _harmonic_difference(low: np.ndarray, high: np.ndarray) -> np.ndarray:
  """H(high) - H(low) for int 0 <= low <= high, without cancellation for large low."""
  both_big = low > _HARMONIC_TABLE_SIZE
  safe_low = np.maximum(low, _HARMONIC_TABLE_SIZE + 1).astype(np.float64)
  safe_high = np.maximum(high, _HARMONIC_TABLE_SIZE + 1).astype(np.float64)
  from_series = (np.log1p((safe_high - safe_low) / safe_low)
                 + _harmonic_tail(safe_high) - _harmonic_tail(safe_low))
  return np.where(both_big, from_series, _harmonic(high) - _harmonic(low))


def _tie_aware_average_precision(totals: np.ndarray, relevant: np.ndarray) -> np.ndarray:
  """Expected AP@all over random orders within each distance (He et al. 2018).

  Args:
    totals: int (nq, L + 1) items at each Hamming distance.
    relevant: int (nq, L + 1) relevant items at each distance.

  Returns:
    float64 (nq,); 0 for a query without relevant items.
  """
  n = totals.astype(np.float64)
  r = relevant.astype(np.float64)
  before = np.cumsum(totals, axis=1) - totals  # C: items at smaller distances
  hits_before = np.cumsum(relevant, axis=1) - relevant  # R'
  slope = np.where(n > 1, (r - 1) / np.maximum(n - 1, 1), 0.0)
  harmonic = _harmonic_difference(before, before + totals)
  group_sum = n * slope + (hits_before + 1 - slope * (before + 1)) * harmonic
  contribution = np.where(r > 0, r / np.maximum(n, 1) * group_sum, 0.0)
  num_relevant = r.sum(axis=1)
  return np.where(num_relevant > 0,
                  contribution.sum(axis=1) / np.maximum(num_relevant, 1), 0.0)


def _safe_ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0."""
  return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


# ------------------------------------------------------------------- public API

def _check_sizes(values: Sequence[Any], name: str, allow_none: bool) -> None:
  for value in values:
    if value is None and allow_none:
      continue
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
      allowed = "positive ints or None (= all)" if allow_none else "positive ints"
      raise UserError(f"{name} must hold {allowed}, got {value!r}; e.g. {name}=(1000,).")


def retrieval_metrics_per_query(query_codes: Any, query_labels: Any, db_codes: Any,
                                db_labels: Any, *, topk: Sequence[int | None] = (1000,),
                                topn: Sequence[int] = DEFAULT_TOPN, radius: int = 2,
                                query_chunk: int = 256, db_chunk: int = 1024,
                                devices: Sequence[jax.Device] | None = None
                                ) -> dict[str, np.ndarray]:
  """Per-query retrieval metrics (the conventions are in the module docstring).

  Args:
    query_codes: int8 or float (nq, L), entries +-1.
    query_labels: uint8 (nq, num_labels) multi-hot.
    db_codes: int8 or float (ndb, L), entries +-1.
    db_labels: uint8 (ndb, num_labels) multi-hot.
    topk: cut-offs K of mAP@K; None (or K >= ndb) means the whole database.
    topn: list sizes N of precision@N.
    radius: Hamming radius of "precision@radius{radius}".
    query_chunk: queries per device per step; device memory is
      O(query_chunk x (db_chunk + L)) plus a copy of the packed database.
    db_chunk: database items per histogram step and per float32 partial sum.
    devices: the devices that share the queries (default: all local devices; on CPU
      these are the threads of --xla_force_host_platform_device_count).

  Returns:
    float64 arrays: "ap@{K}" / "ap@all" / "ap@all_tie_aware" / "precision@radius{r}"
    (nq,), "precision@top{N}" (nq,), "pr_precision" and "pr_recall" (nq, L + 1) per
    radius 0..L, and int64 "num_relevant" (nq,) relevant items in the database.
  """
  query_codes = _check_codes(query_codes, "query_codes")
  db_codes = _check_codes(db_codes, "db_codes")
  if query_codes.shape[1] != db_codes.shape[1]:
    raise UserError(f"query codes have {query_codes.shape[1]} bits and database codes "
                    f"{db_codes.shape[1]}; encode both with the same model.")
  query_labels = _check_labels(query_labels, query_codes.shape[0], "query_labels")
  db_labels = _check_labels(db_labels, db_codes.shape[0], "db_labels")
  if query_labels.shape[1] != db_labels.shape[1]:
    raise UserError(f"query labels have {query_labels.shape[1]} columns and database "
                    f"labels {db_labels.shape[1]}; both must use the dataset's label "
                    "list.")
  _check_sizes(topk, "topk", allow_none=True)
  _check_sizes(topn, "topn", allow_none=False)
  _check_sizes((query_chunk, db_chunk), "query_chunk and db_chunk", allow_none=False)
  if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
    raise UserError(f"radius must be a non-negative int, got {radius!r}.")
  num_queries, code_length = query_codes.shape
  num_database = db_codes.shape[0]
  if num_database >= _MAX_DATABASE:
    raise UserError(f"the database has {num_database} items; this evaluation supports "
                    f"fewer than {_MAX_DATABASE}: evaluate on a subset.")

  # Rank breakpoints: every K and N, clipped to the database size.
  cutoffs = {k: num_database if k is None else min(int(k), num_database) for k in topk}
  list_sizes = {n: min(int(n), num_database) for n in topn}
  breakpoints = np.unique(
      np.array([num_database, *cutoffs.values(), *list_sizes.values()]))
  bucket_of_rank = np.searchsorted(breakpoints, np.arange(num_database + 1), side="left")

  devices = list(jax.local_devices() if devices is None else devices)
  if not devices:
    raise UserError("devices is empty; pass None to use all local devices.")
  mesh = Mesh(np.array(devices), (_QUERY_AXIS,))
  # Each step sends `query_chunk` queries to every device; fewer when that is plenty.
  query_chunk = min(query_chunk, -(-num_queries // len(devices)))
  step_size = query_chunk * len(devices)
  db_chunk = min(db_chunk, num_database)
  num_blocks = -(-num_database // db_chunk)
  db_packed = np.zeros((num_blocks * db_chunk, -(-code_length // _WORD_BITS)), np.uint32)
  db_packed[:num_database] = np.asarray(pack_codes(db_codes))
  label_words = -(-db_labels.shape[1] // _WORD_BITS)
  db_label_packed = np.zeros((num_blocks * db_chunk, label_words), np.uint32)
  db_label_packed[:num_database] = np.asarray(_pack_bits(jnp.asarray(db_labels != 0)))
  # Copied to every device once, not at every step.
  replicated = jax.device_put(
      (db_packed.reshape(num_blocks, db_chunk, -1),
       db_label_packed.reshape(num_blocks, db_chunk, -1),
       bucket_of_rank.astype(np.int32)), NamedSharding(mesh, P()))
  # Zero padding to whole steps keeps one shape, so one compile; padded queries have
  # no labels and are dropped.
  num_steps = -(-num_queries // step_size)
  pad = ((0, num_steps * step_size - num_queries), (0, 0))
  query_packed = np.pad(np.asarray(pack_codes(query_codes)), pad)
  query_label_packed = np.pad(np.asarray(_pack_bits(jnp.asarray(query_labels != 0))), pad)
  split = NamedSharding(mesh, P(_QUERY_AXIS))
  pending = []
  for step in range(num_steps):  # dispatched asynchronously, collected below
    rows = slice(step * step_size, (step + 1) * step_size)
    pending.append(_sharded_statistics(
        jax.device_put(query_packed[rows], split),
        jax.device_put(query_label_packed[rows], split), *replicated, mesh=mesh,
        code_length=code_length, num_database=num_database,
        num_buckets=len(breakpoints) + 1))
  counts, precision_sums, relevant_counts = (
      [np.asarray(output) for output in outputs] for outputs in zip(*pending))
  counts = np.concatenate(counts)[:num_queries].astype(np.int64)
  precision_sums = np.concatenate(precision_sums)[:num_queries].astype(np.float64).sum(-1)
  relevant_counts = np.concatenate(relevant_counts)[:num_queries].astype(np.int64)

  totals, relevant = counts.sum(-1), counts[..., 1]
  num_relevant = relevant.sum(axis=1)
  # Cumulative over buckets: column i covers ranks <= breakpoints[i].
  precision_upto = np.cumsum(precision_sums, axis=1)
  relevant_upto = np.cumsum(relevant_counts, axis=1)
  result: dict[str, np.ndarray] = {"num_relevant": num_relevant}
  for k, cutoff in cutoffs.items():
    column = np.searchsorted(breakpoints, cutoff)
    result["ap@all" if k is None else f"ap@{k}"] = _safe_ratio(
        precision_upto[:, column], relevant_upto[:, column])
  result["ap@all"] = _safe_ratio(precision_upto[:, -1], num_relevant)
  result["ap@all_tie_aware"] = _tie_aware_average_precision(totals, relevant)
  retrieved = np.cumsum(totals, axis=1)
  hits = np.cumsum(relevant, axis=1)
  pr_precision = _safe_ratio(hits, retrieved)
  result[f"precision@radius{radius}"] = pr_precision[:, min(radius, code_length)]
  result["pr_precision"] = pr_precision
  result["pr_recall"] = _safe_ratio(hits, num_relevant[:, None])
  for n, size in list_sizes.items():
    column = np.searchsorted(breakpoints, size)
    result[f"precision@top{n}"] = relevant_upto[:, column] / size
  return result


def retrieval_metrics(query_codes: Any, query_labels: Any, db_codes: Any, db_labels: Any,
                      *, topk: Sequence[int | None] = (1000,), curves: bool = True,
                      topn: Sequence[int] = DEFAULT_TOPN, radius: int = 2,
                      query_chunk: int = 256, db_chunk: int = 1024,
                      devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Mean retrieval metrics over all queries, as JSON-serialisable Python values.

  Arguments as in `retrieval_metrics_per_query`; `curves=False` skips the PR and
  precision@N curves in the output (their cost is negligible either way).

  Returns:
    {"map@{K}" for each K in topk ("map@all" for None), "map@all", "map@all_tie_aware",
     "precision@radius{radius}": float; with curves also "pr_curve": {"radius",
     "precision", "recall"}: lists over radius 0..L, and "precision@topn": {N: float}
     (int keys; json.dumps writes them as strings)}.
  """
  per_query = retrieval_metrics_per_query(
      query_codes, query_labels, db_codes, db_labels, topk=topk,
      topn=topn if curves else (), radius=radius, query_chunk=query_chunk,
      db_chunk=db_chunk, devices=devices)
  metrics: dict[str, Any] = {}
  for k in topk:
    name = "all" if k is None else str(int(k))
    metrics[f"map@{name}"] = float(per_query[f"ap@{name}"].mean())
  metrics["map@all"] = float(per_query["ap@all"].mean())
  metrics["map@all_tie_aware"] = float(per_query["ap@all_tie_aware"].mean())
  metrics[f"precision@radius{radius}"] = float(
      per_query[f"precision@radius{radius}"].mean())
  if curves:
    metrics["pr_curve"] = {
        "radius": list(range(per_query["pr_precision"].shape[1])),
        "precision": per_query["pr_precision"].mean(axis=0).tolist(),
        "recall": per_query["pr_recall"].mean(axis=0).tolist()}
    metrics["precision@topn"] = {int(n): float(per_query[f"precision@top{n}"].mean())
                                 for n in topn}
  return metrics
