"""Hamming ranking of packed hash codes and the retrieval metrics it gives.

The one ranking and average-precision implementation of the package (its NumPy
reference is `psch_jax/reference.py`). docs/evaluation.md states the conventions in
full and derives the algorithm; in short:
- Codes are +-1 (int8 or float) `(n, L)`, or uint32 `(n, ceil(L / 32))` words from
  `pack_codes`; labels are multi-hot uint8 `(n, num_labels)`. A database item is
  relevant to a query when the two share a label.
- The database is ranked by Hamming distance to the query, ties by database index.
  AP@K = (1/R_K) sum_{k <= K, item k relevant} P@k (0 when R_K = 0, kept in the mean);
  "all" is K = database size. Tie-aware mAP@all is He et al. (CVPR 2018): the
  expected AP@all over random orders of the items at each distance.
- precision@radius r, the PR curve over radii 0..L and precision@N use the same
  ranking (0 for an empty denominator).

Algorithm (no sort of the database, no query x database matrix): queries are split
over this process's devices of the mesh (`jax.shard_map`; a run passes its one mesh),
the packed database read in segments of `db_segment` items and scanned in blocks of
`db_chunk`. Pass 1 (histogram) counts per query the (irrelevant, relevant) items at
each distance 0..L; the tie-aware mAP, precision@radius and the PR curve come from
these counts alone (float64, on the host). Pass 2 (ranking)
carries running counts per distance, which give each item's exact rank and
precision, in one of two forms with the same bits: "scan" walks the items in index
order (fastest on CPUs), "sort" sorts each block per query and has no loop over
items (GPUs, TPUs). The precisions are summed exactly (integer limbs) per rank bucket
between the requested K and N, so one pass serves every mAP@K, mAP@all and
precision@N. `top_k` (search) ranks with the same passes.
Limit: fewer than 2^24 database items (ranks pass through float32).
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

from psch_jax import sharding
from psch_jax.errors import UserError

# Printed and saved with every result (docs/evaluation.md states them in full).
METRIC_CONVENTIONS = (
    "Hamming ranking, ties by database index; AP@K averaged over all queries (0 when "
    "none relevant in the top K); tie-aware mAP@all of He et al. 2018; "
    "docs/evaluation.md")
DEFAULT_TOPN = tuple(range(100, 1001, 100))
_WORD_BITS = 32
# The axis of the default mesh: the name sharding.make_mesh gives the run's mesh, so a
# stand-alone call compiles as the run's evaluation does.
# Ranks and counts of relevant items pass through float32: exact below 2^24.
_MAX_DATABASE = 2**24
_EULER_GAMMA = 0.57721566490153286061
# Below this argument harmonic numbers come from an exact table, above it from the
# asymptotic series, whose first omitted term is then below 1e-16.
_HARMONIC_TABLE_SIZE = 64
# Sums of precisions are exact: fixed point in int32 limbs of 16 bits, so they do not
# depend on the order of the additions (nor on block sizes or the algorithm).
_LIMB_BITS = 16
_LIMB_SCALE = float(1 << _LIMB_BITS)
# Items per database block: a block's limb sums (each limb below 2^16) stay in int32.
_MAX_BLOCK = 2**14


# ------------------------------------------------------------------ packed codes

def _pack_bits(bits: np.ndarray) -> np.ndarray:
  """bool (n, m) -> uint32 (n, ceil(m/32)) on the host; bit i of word w is column
  32 w + i, padding bits 0. The one bit packer: codes, labels and database segments."""
  num_rows, num_bits = bits.shape
  num_words = -(-num_bits // _WORD_BITS)
  as_bytes = np.packbits(bits, axis=1, bitorder="little")  # bit i of byte k: column 8k+i
  padded = np.zeros((num_rows, 4 * num_words), np.uint8)
  padded[:, :as_bytes.shape[1]] = as_bytes
  return padded.view("<u4").astype(np.uint32)


def _check_code_shape(shape: tuple, name: str) -> None:
  if len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
    raise UserError(f"{name} must be a non-empty (n, L) array of +-1 codes or (n, W) "
                    f"uint32 words from pack_codes, got shape {shape}; stack the codes "
                    "of all images into one matrix.")


def _check_label_shape(shape: tuple, num_rows: int, name: str) -> None:
  if len(shape) != 2 or shape[0] != num_rows or shape[1] == 0:
    raise UserError(f"{name} must be a multi-hot (n, num_labels) matrix with one row per "
                    f"code ({num_rows} rows), got shape {shape}; one-hot encode "
                    "single-label datasets.")


def _sign_bits(rows: np.ndarray, name: str) -> np.ndarray:
  """+-1 rows -> bool, True for +1; anything else is refused."""
  if not np.all(np.abs(rows) == 1):
    raise UserError(f"{name} must hold only -1 and +1; binarise with "
                    "models.hash_codes (sign with sign(0) = +1) before evaluating.")
  return rows > 0


def _packed_codes(rows: Any, name: str, *, code_length: int) -> np.ndarray:
  """+-1 (n, L) or packed uint32 (n, W) rows -> checked packed uint32 (n, W)."""
  rows = np.asarray(rows)
  if rows.dtype == np.uint32:
    spare_bits = -code_length % _WORD_BITS
    if spare_bits and np.any(rows[:, -1] >> np.uint32(_WORD_BITS - spare_bits)):
      raise UserError(f"{name} has bits set past the code length {code_length} in its "
                      "last word; pack the codes with pack_codes, and pass the real "
                      "code_length= when query and database are both packed.")
    return rows
  return _pack_bits(_sign_bits(rows, name))


def _packed_labels(rows: Any, name: str) -> np.ndarray:
  """Multi-hot (n, num_labels) rows -> checked packed uint32 (n, Wl)."""
  rows = np.asarray(rows)
  if not np.all((rows == 0) | (rows == 1)):
    raise UserError(f"{name} must hold only 0 and 1 (multi-hot); turn class ids into "
                    "one-hot rows with np.eye(num_classes, dtype=np.uint8)[ids].")
  return _pack_bits(rows != 0)


def pack_codes(codes: Any) -> np.ndarray:
  """Packs +-1 codes into 32-bit words, bit 1 for +1.

  Args:
    codes: int8 or float `(n, L)` with entries in {-1, +1}.

  Returns:
    uint32 `(n, ceil(L / 32))`; bit i of word w is code bit 32 w + i, padding bits 0.
  """
  codes = np.asarray(codes)
  _check_code_shape(codes.shape, "codes")
  return _pack_bits(_sign_bits(codes, "codes"))


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
  _check_packed_pair(query_packed, db_packed)
  return _hamming_jit(query_packed, db_packed)


def _check_packed_pair(query_packed: Any, db_packed: Any) -> None:
  """Refuses anything but two uint32 (n, W) matrices of packed codes with one W."""
  if (query_packed.ndim != 2 or db_packed.ndim != 2
      or query_packed.shape[1] != db_packed.shape[1]
      or query_packed.dtype != np.uint32 or db_packed.dtype != np.uint32):
    raise UserError(f"packed codes must be uint32 (n, W) with the same W, got "
                    f"{query_packed.dtype}{query_packed.shape} and "
                    f"{db_packed.dtype}{db_packed.shape}; pack both with pack_codes.")


# ------------------------------------------------------------- per-chunk kernel

def _relevance(query_labels: jax.Array, db_labels: jax.Array) -> jax.Array:
  """uint32 (q, Wl), (n, Wl) packed labels -> bool (q, n): at least one shared label."""
  return jnp.any((query_labels[:, None, :] & db_labels[None, :, :]) != 0, axis=-1)


def _precision_limbs(precision: jax.Array) -> jax.Array:
  """float32 (...) in [0, 1] -> int32 (..., 3): the limbs (a, b, c) of its exact value
  p = a 2^-16 + b 2^-32 + c 2^-48, each below 2^16 (a <= 2^16).

  Exact: a precision is h / r rounded to float32 with r < 2^24, so p >= 2^-24 (or 0)
  and its 24-bit significand ends at or above 2^-47; every product and difference
  below keeps at most 24 significant bits.
  """
  scaled = precision * _LIMB_SCALE
  high = jnp.floor(scaled)
  rest = (scaled - high) * _LIMB_SCALE
  middle = jnp.floor(rest)
  low = (rest - middle) * _LIMB_SCALE
  return jnp.stack([high, middle, low], -1).astype(jnp.int32)


def _add_limbs(total: jax.Array, block: jax.Array) -> jax.Array:
  """Exact sum of precisions: int32 (..., 4) limbs (d, a, b, c) of sum p =
  (d 2^16 + a) 2^-16 + b 2^-32 + c 2^-48, a, b, c < 2^16, plus int32 (..., 3) limb
  sums (a, b, c) of at most 2^14 precisions (`_precision_limbs`); carries propagated."""
  low = total[..., 3] + block[..., 2]
  middle = total[..., 2] + block[..., 1] + (low >> _LIMB_BITS)
  high = total[..., 1] + block[..., 0] + (middle >> _LIMB_BITS)
  top = total[..., 0] + (high >> _LIMB_BITS)
  mask = (1 << _LIMB_BITS) - 1
  return jnp.stack([top, high & mask, middle & mask, low & mask], -1)


def _limbs_to_float(limbs: np.ndarray) -> np.ndarray:
  """int (..., 4) limbs of `_add_limbs` -> float64 (...): the exact sum, rounded once."""
  limbs = limbs.astype(np.int64)
  whole = (limbs[..., 0] << _LIMB_BITS) + limbs[..., 1]     # units of 2^-16, < 2^40
  fraction = (limbs[..., 2] << _LIMB_BITS) + limbs[..., 3]  # units of 2^-48, < 2^32
  return np.ldexp(whole.astype(np.float64), -_LIMB_BITS) + np.ldexp(
      fraction.astype(np.float64), -3 * _LIMB_BITS)


def _histogram_pass(counts: jax.Array, query_packed: jax.Array, query_labels: jax.Array,
                    db_blocks: jax.Array, db_label_blocks: jax.Array,
                    first_item: jax.Array, num_database: jax.Array, *,
                    code_length: int) -> jax.Array:
  """Pass 1 over a run of database blocks: adds their items to per-distance counts.

  Args:
    counts: int32 (Q, L + 2, 2): items counted so far at each distance 0..L,
      [irrelevant, relevant]; slot L + 1 collects padding items and is dropped.
    query_packed: uint32 (Q, W) packed query codes.
    query_labels: uint32 (Q, Wl) packed query labels.
    db_blocks: uint32 (B, T, W) packed database codes of items `first_item`,
      `first_item + 1`, ... in index order, zero-padded.
    db_label_blocks: uint32 (B, T, Wl) packed database labels, padding rows all zero.
    first_item: int32 (): database index of the first item of `db_blocks`.
    num_database: int32 (): real items in the whole database; later ones are padding.
    code_length: L.

  Returns:
    int32 (Q, L + 2, 2): `counts` plus these blocks' items.
  """
  num_queries = query_packed.shape[0]
  num_blocks, block_size, _ = db_blocks.shape
  num_slots = code_length + 2
  query_rows = jnp.arange(num_queries, dtype=jnp.int32)

  def histogram_step(flat_counts, block):
    codes, labels, start = block
    distances = _hamming(query_packed, codes)
    relevant = _relevance(query_labels, labels).astype(jnp.int32)
    is_real = start + jnp.arange(block_size) < num_database
    slot = jnp.where(is_real[None, :], distances, code_length + 1)
    flat = (query_rows[:, None] * num_slots + slot) * 2 + relevant
    return flat_counts.at[flat.reshape(-1)].add(1, mode="promise_in_bounds"), None

  starts = first_item + jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  flat_counts, _ = lax.scan(histogram_step, counts.reshape(-1),
                            (db_blocks, db_label_blocks, starts))
  return flat_counts.reshape(counts.shape)


def _initial_ranking_state(counts: jax.Array, *, num_buckets: int
                           ) -> tuple[jax.Array, ...]:
  """Pass 2's carry before the first database item, from pass 1's complete counts.

  `running[q, d]` starts at (items, relevant items) at distances < d; the ranking
  pass adds the items at distance d in index order, so with the items before item j
  added, rank_j = running[q, d_j, 0] + 1 + (items at d_j before j in its block).

  Args:
    counts: int32 (Q, L + 2, 2) from `_histogram_pass` over the whole database.
    num_buckets: number of rank breakpoints + 1.

  Returns:
    (running int32 (Q, L + 1, 2), precision_limbs int32 (Q, num_buckets, 4) as in
    `_add_limbs`, relevant_counts int32 (Q, num_buckets)), the sums at zero.
  """
  counts = counts[:, :-1]
  per_distance = jnp.stack([counts.sum(-1), counts[..., 1]], axis=-1)
  running = jnp.cumsum(per_distance, axis=1) - per_distance
  return (running, jnp.zeros((counts.shape[0], num_buckets, 4), jnp.int32),
          jnp.zeros((counts.shape[0], num_buckets), jnp.int32))


def _scan_ranking_pass(state: tuple[jax.Array, ...], query_packed: jax.Array,
                       query_labels: jax.Array, db_blocks: jax.Array,
                       db_label_blocks: jax.Array, breakpoints: jax.Array,
                       bucket_of_rank: jax.Array, first_item: jax.Array,
                       num_database: jax.Array, *, code_length: int
                       ) -> tuple[jax.Array, ...]:
  """Pass 2 as a loop over the database items, all queries at once ("scan").

  Each step adds one item to `running` and reads back its rank and hits: a counting
  sort done by every query in parallel; each block's precisions are then split into
  limbs and summed per bucket at once. The fastest form on XLA's CPU backend, whose
  sort is slow; on GPUs and TPUs its one small step per item is loop overhead.
  Arguments and result as in `_ranking_pass` (padding items rank after every real
  one, are never relevant, and fall in the last bucket of `bucket_of_rank`).
  """
  del breakpoints, first_item, num_database
  running, precision_limbs, relevant_counts = state
  num_queries = query_packed.shape[0]
  num_distances = code_length + 1
  num_buckets = precision_limbs.shape[1]
  query_rows = jnp.arange(num_queries, dtype=jnp.int32)
  bucket_rows = query_rows * num_buckets
  last_rank = bucket_of_rank.shape[0] - 1

  def item_step(running, item):
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
    bucket = bucket_of_rank.at[jnp.minimum(rank, last_rank)].get(
        mode="promise_in_bounds")
    return running, (precision, bucket)

  def block_step(carry, block):
    running, precision_limbs, relevant_counts = carry
    # The step only ranks; the block's precisions are split into limbs and summed
    # per bucket afterwards, all at once.
    running, (precision, bucket) = lax.scan(item_step, running, block)  # (T, Q)
    update = jnp.concatenate([_precision_limbs(precision),
                              (precision > 0).astype(jnp.int32)[..., None]], -1)
    block_sums = jnp.zeros((num_queries * num_buckets, 4), jnp.int32).at[
        (bucket_rows[None, :] + bucket).reshape(-1)].add(
            update.reshape(-1, 4), mode="promise_in_bounds")
    block_sums = block_sums.reshape(num_queries, num_buckets, 4)
    precision_limbs = _add_limbs(precision_limbs, block_sums[..., :3])
    relevant_counts = relevant_counts + block_sums[..., 3]
    return (running, precision_limbs, relevant_counts), None

  (running, precision_limbs, relevant_counts), _ = lax.scan(
      block_step, (running.reshape(-1, 2), precision_limbs, relevant_counts),
      (db_blocks, db_label_blocks))
  return (running.reshape(num_queries, num_distances, 2), precision_limbs,
          relevant_counts)


def _searchsorted_rows(rows: jax.Array, values: jax.Array, side: str) -> jax.Array:
  """int32 (Q, T) rows, each sorted, and (M,) values -> int32 (Q, M): per row, the
  number of entries < value (side "left") or <= value ("right"). A binary search of
  log2(T) unrolled steps: no loop in the compiled program."""
  search = functools.partial(jnp.searchsorted, side=side, method="scan_unrolled")
  return jax.vmap(search, in_axes=(0, None))(rows, values).astype(jnp.int32)


def _with_zero_first(through: jax.Array) -> jax.Array:
  """(Q, T, ...) inclusive running sums -> (Q, T + 1, ...) with a zero row first, so
  entry t is the sum of the first t items."""
  return jnp.concatenate([jnp.zeros_like(through[:, :1]), through], axis=1)


def _per_bucket(upto: jax.Array, total: jax.Array) -> jax.Array:
  """(Q, M, ...) sums over ranks <= each breakpoint and (Q, ...) sums over the block
  -> (Q, M + 1, ...) sums per bucket (ranks between consecutive breakpoints)."""
  bounds = jnp.concatenate([jnp.zeros_like(upto[:, :1]), upto, total[:, None]], axis=1)
  return jnp.diff(bounds, axis=1)


def _sorted_block_ranks(running: jax.Array, distances: jax.Array, relevant: jax.Array,
                        *, code_length: int) -> dict[str, jax.Array]:
  """One block of the "sort" ranking pass: each query's items sorted by (distance,
  index), with their ranks and hits.

  Args:
    running: int32 (Q, L + 1, 2): per distance, the items and relevant items ranked
      before this block's first item at that distance.
    distances: int32 (Q, T): the block's distances in index order; L + 1 marks a
      padding item (ranked after every real one).
    relevant: int32 (Q, T) 0/1, likewise.
    code_length: L.

  Returns:
    int32 (Q, T) "position" (the item's index in the block), "distance", "relevant",
    "rank" (int32 max for padding) and "hits" in sorted order; "relevant_through"
    (inclusive running count along the sorted row); int32 (Q, L + 1, 2) "block_counts"
    (the block's items and relevant items per distance).
  """
  block_size = distances.shape[1]
  positions = jnp.arange(block_size, dtype=jnp.int32)
  # A key orders by (distance, index) and carries relevance in its lowest bit.
  keys = lax.sort(((distances * block_size + positions[None, :]) << 1) | relevant,
                  dimension=1)
  sorted_distance = (keys >> 1) // block_size
  sorted_relevant = keys & 1
  # Per distance d: the block's items at distances < d, and the relevant ones.
  group_keys = jnp.arange(code_length + 2, dtype=jnp.int32) * (2 * block_size)
  group_start = _searchsorted_rows(keys, group_keys, "left")  # (Q, L + 2)
  relevant_through = jnp.cumsum(sorted_relevant, axis=1)
  relevant_before = jnp.take_along_axis(_with_zero_first(relevant_through),
                                        group_start, axis=1)
  # rank = items ranked before the group's first item in the block + 1 + offset.
  offsets = jnp.stack([running[..., 0] + 1 - group_start[:, :-1],
                       running[..., 1] - relevant_before[:, :-1]], axis=-1)
  group = jnp.minimum(sorted_distance, code_length)[..., None]
  item_offsets = jnp.take_along_axis(offsets, group, axis=1)  # (Q, T, 2)
  rank = jnp.where(sorted_distance <= code_length,
                   item_offsets[..., 0] + positions[None, :], jnp.iinfo(jnp.int32).max)
  return {"position": (keys >> 1) % block_size, "distance": sorted_distance,
          "relevant": sorted_relevant, "rank": rank,
          "hits": item_offsets[..., 1] + relevant_through,
          "relevant_through": relevant_through,
          "block_counts": jnp.stack([jnp.diff(group_start, axis=1),
                                     jnp.diff(relevant_before, axis=1)], axis=-1)}


def _sort_ranking_pass(state: tuple[jax.Array, ...], query_packed: jax.Array,
                       query_labels: jax.Array, db_blocks: jax.Array,
                       db_label_blocks: jax.Array, breakpoints: jax.Array,
                       bucket_of_rank: jax.Array, first_item: jax.Array,
                       num_database: jax.Array, *, code_length: int
                       ) -> tuple[jax.Array, ...]:
  """Pass 2 as a loop over blocks, each sorted per query ("sort"): no loop over items.

  Each query's items of a block are sorted by (distance, index) (`_sorted_block_ranks`):
  an item's rank is then the rank of its distance group's first item in the block
  (from `running`) plus its offset in the group, and the ranks increase along the
  sorted row, so the sums over ranks <= K are running sums read at one position per
  breakpoint (docs/evaluation.md). For GPUs and TPUs; XLA's CPU sort makes it slower
  there than `_scan_ranking_pass`. Arguments and result as in `_ranking_pass`.
  """
  del bucket_of_rank
  num_blocks, block_size, _ = db_blocks.shape
  positions = jnp.arange(block_size, dtype=jnp.int32)

  def block_step(carry, block):
    running, precision_limbs, relevant_counts = carry
    codes, labels, start = block
    is_real = start + positions < num_database
    ranked = _sorted_block_ranks(
        running, jnp.where(is_real[None, :], _hamming(query_packed, codes),
                           code_length + 1),
        _relevance(query_labels, labels).astype(jnp.int32), code_length=code_length)
    rank, relevant_through = ranked["rank"], ranked["relevant_through"]
    precision = jnp.where(ranked["relevant"] == 1, ranked["hits"].astype(jnp.float32)
                          / rank.astype(jnp.float32), 0.0)
    limbs_through = jnp.cumsum(_precision_limbs(precision), axis=1)  # (Q, T, 3)
    ranked_upto = _searchsorted_rows(rank, breakpoints, "right")  # (Q, M)
    limbs_upto = jnp.take_along_axis(_with_zero_first(limbs_through),
                                     ranked_upto[..., None], axis=1)
    relevant_upto = jnp.take_along_axis(_with_zero_first(relevant_through),
                                        ranked_upto, axis=1)
    precision_limbs = _add_limbs(precision_limbs,
                                 _per_bucket(limbs_upto, limbs_through[:, -1]))
    relevant_counts = relevant_counts + _per_bucket(relevant_upto,
                                                    relevant_through[:, -1])
    return (running + ranked["block_counts"], precision_limbs, relevant_counts), None

  starts = first_item + jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  state, _ = lax.scan(block_step, state, (db_blocks, db_label_blocks, starts))
  return state


# The forms of pass 2, by name; both give the same bits (the sums are exact).
ALGORITHMS = {"scan": _scan_ranking_pass, "sort": _sort_ranking_pass}


def default_algorithm(mesh: Mesh) -> str:
  """The default form of the ranking pass on `mesh`'s devices: "scan" on CPUs, "sort"
  on GPUs and TPUs (docs/benchmarks.md, "Retrieval evaluation", gives the reasons)."""
  return "scan" if mesh.devices.flat[0].platform == "cpu" else "sort"


def _ranking_pass(state: tuple[jax.Array, ...], query_packed: jax.Array,
                  query_labels: jax.Array, db_blocks: jax.Array,
                  db_label_blocks: jax.Array, breakpoints: jax.Array,
                  bucket_of_rank: jax.Array, first_item: jax.Array,
                  num_database: jax.Array, *, code_length: int, algorithm: str
                  ) -> tuple[jax.Array, ...]:
  """Pass 2 over a run of database blocks, in index order, continuing `state`.

  Args:
    state: the carry of `_initial_ranking_state`, or of this pass over the blocks
      before these.
    query_packed, query_labels, db_blocks, db_label_blocks, first_item,
      num_database: as in `_histogram_pass`; blocks of at most 2^14 items.
    breakpoints: int32 (M,) increasing rank breakpoints (every K and N, and the
      database size).
    bucket_of_rank: int32 (R + 1,): rank r -> number of breakpoints below r, for
      r <= R; every rank above R is in the bucket of R (`_bucket_table`).
    code_length: L.
    algorithm: a key of `ALGORITHMS`.

  Returns:
    The carry after these blocks: running (Q, L + 1, 2), and per rank bucket (ranks
    in (breakpoints[b - 1], breakpoints[b]], the last one past the database) the
    exact sum of P@rank over the relevant items ranked in it (int32 (Q, M + 1, 4),
    `_add_limbs`) and their number (int32 (Q, M + 1)).
  """
  return ALGORITHMS[algorithm](
      state, query_packed, query_labels, db_blocks, db_label_blocks, breakpoints,
      bucket_of_rank, first_item, num_database, code_length=code_length)


def _chunk_statistics(query_packed: jax.Array, query_labels: jax.Array,
                      db_blocks: jax.Array, db_label_blocks: jax.Array,
                      breakpoints: jax.Array, bucket_of_rank: jax.Array, *,
                      code_length: int, num_database: int, algorithm: str
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Both passes for one chunk of queries over a database held whole on the device.

  Args:
    query_packed: uint32 (Q, W) packed query codes.
    query_labels: uint32 (Q, Wl) packed query labels.
    db_blocks: uint32 (B, T, W) packed database codes in index order, zero-padded.
    db_label_blocks: uint32 (B, T, Wl) packed database labels, padding rows all zero.
    breakpoints, bucket_of_rank, algorithm: as in `_ranking_pass`.
    code_length: L.
    num_database: number of real database items (the rest of B x T is padding).

  Returns:
    counts: int32 (Q, L + 1, 2): items at each distance, [irrelevant, relevant].
    precision_limbs: int32 (Q, M + 1, 4): per rank bucket, the exact sum of P@rank
      over the relevant items ranked in the bucket (`_add_limbs`).
    relevant_counts: int32 (Q, M + 1): relevant items ranked in each bucket.
  """
  num_queries = query_packed.shape[0]
  counts = _histogram_pass(
      jnp.zeros((num_queries, code_length + 2, 2), jnp.int32), query_packed,
      query_labels, db_blocks, db_label_blocks, jnp.int32(0), jnp.int32(num_database),
      code_length=code_length)
  state = _initial_ranking_state(counts, num_buckets=breakpoints.shape[0] + 1)
  _, precision_limbs, relevant_counts = _ranking_pass(
      state, query_packed, query_labels, db_blocks, db_label_blocks, breakpoints,
      bucket_of_rank, jnp.int32(0), jnp.int32(num_database), code_length=code_length,
      algorithm=algorithm)
  return counts[:, :-1], precision_limbs, relevant_counts


def _query_spec(mesh: Mesh) -> P:
  """Query rows split over every axis of `mesh` (one axis, `sharding.AXIS`, in a
  run)."""
  return P(mesh.axis_names)


# No collectives below: each device works alone, so the varying-axis type check (which
# would ask for pcasts of every zero-initialised scan carry) buys nothing.

@functools.partial(jax.jit, static_argnames=("mesh", "code_length", "num_database",
                                             "algorithm"))
def sharded_statistics(query_packed: jax.Array, query_labels: jax.Array,
                        db_blocks: jax.Array, db_label_blocks: jax.Array,
                        breakpoints: jax.Array, bucket_of_rank: jax.Array, *,
                        mesh: Mesh, code_length: int, num_database: int,
                        algorithm: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The device step of `retrieval_metrics_per_query` for a database held whole: both
  passes (`_chunk_statistics`, whose docstring gives the shapes) with the queries split
  over every axis of `mesh` and the database replicated. Public so that its
  compiled memory can be checked (`.lower(...).compile().memory_analysis()`)."""
  body = functools.partial(_chunk_statistics, code_length=code_length,
                           num_database=num_database, algorithm=algorithm)
  split = _query_spec(mesh)
  return jax.shard_map(body, mesh=mesh, in_specs=(split, split, P(), P(), P(), P()),
                       out_specs=(split, split, split), check_vma=False)(
                           query_packed, query_labels, db_blocks, db_label_blocks,
                           breakpoints, bucket_of_rank)


@functools.partial(jax.jit, static_argnames=("mesh", "code_length"))
def _sharded_histogram(counts: jax.Array, query_packed: jax.Array,
                       query_labels: jax.Array, db_blocks: jax.Array,
                       db_label_blocks: jax.Array, first_item: jax.Array,
                       num_database: jax.Array, *, mesh: Mesh, code_length: int
                       ) -> jax.Array:
  """`_histogram_pass` over one database segment, queries split over the mesh."""
  split = _query_spec(mesh)
  return jax.shard_map(
      functools.partial(_histogram_pass, code_length=code_length), mesh=mesh,
      in_specs=(split, split, split, P(), P(), P(), P()), out_specs=split,
      check_vma=False)(counts, query_packed, query_labels, db_blocks, db_label_blocks,
                       first_item, num_database)


@functools.partial(jax.jit, static_argnames=("mesh", "num_buckets"))
def _sharded_initial_state(counts: jax.Array, *, mesh: Mesh, num_buckets: int
                           ) -> tuple[jax.Array, ...]:
  """`_initial_ranking_state` with the queries split over the mesh."""
  split = _query_spec(mesh)
  return jax.shard_map(
      functools.partial(_initial_ranking_state, num_buckets=num_buckets),
      mesh=mesh, in_specs=(split,), out_specs=split, check_vma=False)(counts)


@functools.partial(jax.jit, static_argnames=("mesh", "code_length", "algorithm"))
def _sharded_ranking(state: tuple[jax.Array, ...], query_packed: jax.Array,
                     query_labels: jax.Array, db_blocks: jax.Array,
                     db_label_blocks: jax.Array, breakpoints: jax.Array,
                     bucket_of_rank: jax.Array, first_item: jax.Array,
                     num_database: jax.Array, *, mesh: Mesh, code_length: int,
                     algorithm: str) -> tuple[jax.Array, ...]:
  """`_ranking_pass` over one database segment, queries split over the mesh."""
  split = _query_spec(mesh)
  return jax.shard_map(
      functools.partial(_ranking_pass, code_length=code_length, algorithm=algorithm),
      mesh=mesh, in_specs=(split, split, split, P(), P(), P(), P(), P(), P()),
      out_specs=split, check_vma=False)(
          state, query_packed, query_labels, db_blocks, db_label_blocks, breakpoints,
          bucket_of_rank, first_item, num_database)


def _loop_steps(jaxpr) -> list[int]:
  """The sequential steps of every loop in a jaxpr, nested loops multiplied out; a
  fully unrolled scan is straight-line code, not a loop."""
  steps = []
  for equation in jaxpr.eqns:
    params = equation.params
    if equation.primitive.name == "while":
      raise ValueError(f"a while loop of unknown trip count: {equation}")
    if equation.primitive.name == "scan":
      length, unroll = params["length"], params["unroll"]
      inner = _loop_steps(params["jaxpr"].jaxpr)
      if unroll is True or unroll >= length:
        steps += inner
      else:
        steps += [length] + [length * n for n in inner]
      continue
    for value in params.values():
      for sub in value if isinstance(value, (list, tuple)) else [value]:
        sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, "eqns"):
          steps += _loop_steps(sub)
  return steps


def sequential_loop_steps(*, num_queries: int, num_database: int, code_length: int,
                          algorithm: str, db_chunk: int = 1024,
                          num_breakpoints: int = 2) -> int:
  """The longest chain of sequential loop steps in the device step of
  `retrieval_metrics_per_query` (both passes, one device, the database held whole),
  read from its jaxpr: how many steps one query chunk waits for, whatever the
  hardware does per step."""
  num_blocks = -(-num_database // db_chunk)
  num_words = -(-code_length // _WORD_BITS)
  shapes = [((num_queries, num_words), jnp.uint32), ((num_queries, 1), jnp.uint32),
            ((num_blocks, db_chunk, num_words), jnp.uint32),
            ((num_blocks, db_chunk, 1), jnp.uint32), ((num_breakpoints,), jnp.int32),
            ((2,), jnp.int32)]
  step = functools.partial(
      sharded_statistics, mesh=Mesh(np.array(jax.devices()[:1]), (sharding.AXIS,)),
      code_length=code_length, num_database=num_database, algorithm=algorithm)
  jaxpr = jax.make_jaxpr(step)(*(jax.ShapeDtypeStruct(shape, dtype)
                                 for shape, dtype in shapes))
  return max(_loop_steps(jaxpr.jaxpr), default=0)


# ------------------------------------------------------- reading the database

def _code_layout(query_codes: Any, db_codes: Any, code_length: int | None
                 ) -> tuple[int, int]:
  """(L, W) of the two code matrices, each +-1 (n, L) or packed uint32 (n, W)."""
  if code_length is not None and (isinstance(code_length, bool) or not isinstance(
      code_length, (int, np.integer)) or code_length < 1):
    raise UserError(f"code_length must be a positive int or None, got {code_length!r}.")
  lengths, widths = {}, {}
  for name, codes in (("query_codes", query_codes), ("db_codes", db_codes)):
    _check_code_shape(codes.shape, name)
    (widths if codes.dtype == np.uint32 else lengths)[name] = codes.shape[1]
  if len(set(lengths.values())) > 1:
    raise UserError(f"query codes have {lengths['query_codes']} bits and database codes "
                    f"{lengths['db_codes']}; encode both with the same model.")
  if lengths:
    length = next(iter(lengths.values()))
    if code_length is not None and code_length != length:
      raise UserError(f"code_length={code_length} but the +-1 codes have {length} "
                      "bits; drop code_length or pass the codes' length.")
  else:
    length = code_length or _WORD_BITS * next(iter(widths.values()))
  num_words = -(-length // _WORD_BITS)
  for name, width in widths.items():
    if width != num_words:
      raise UserError(f"{name} are packed in {width} words, but {length}-bit codes take "
                      f"{num_words}; pack query and database codes of one model with "
                      "pack_codes (and pass code_length= when both are packed).")
  return length, num_words


def _database_blocks(db_codes: Any, db_labels: Any, start: int, stop: int, *,
                     num_rows: int, block_size: int, code_length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Database items start..stop-1, read (from disk for a memmap), checked and packed.

  Returns:
    uint32 (num_rows / block_size, block_size, W) codes and (..., Wl) labels, rows
    past stop - start zero (padding).
  """
  codes = _packed_codes(db_codes[start:stop], "db_codes", code_length=code_length)
  labels = _packed_labels(db_labels[start:stop], "db_labels")
  blocks = []
  for packed in (codes, labels):
    padded = np.zeros((num_rows, packed.shape[1]), np.uint32)
    padded[:stop - start] = packed
    blocks.append(padded.reshape(num_rows // block_size, block_size, -1))
  return blocks[0], blocks[1]


def _bucket_table(breakpoints: np.ndarray) -> np.ndarray:
  """int32 (R + 1,): rank r -> number of breakpoints below r (its bucket), r <= R.

  R is one past the second-largest breakpoint: every rank above it up to the largest
  breakpoint (the database size) shares the last bucket, so the table grows with the
  requested K and N, not with the database.
  """
  limit = int(breakpoints[-2]) + 1 if len(breakpoints) > 1 else 1
  return np.searchsorted(breakpoints, np.arange(limit + 1), side="left").astype(np.int32)


def _segment_layout(num_database: int, db_segment: int, block_size: int
                    ) -> tuple[int, int]:
  """(num_segments, segment_size): segments of equal size, whole blocks of
  `block_size` items and at most about `db_segment` items, so one compile serves them
  all and the last one is not mostly padding."""
  num_segments = -(-num_database // max(db_segment // block_size * block_size,
                                        block_size))
  segment_size = -(-num_database // (num_segments * block_size)) * block_size
  return num_segments, segment_size


def _sweep_segments(states: list, query_steps: list, update, read_segment, *,
                    num_database: int, segment_size: int, mesh: Mesh) -> list:
  """One pass over the database, segment by segment, for every query step.

  Args:
    states: one per query step, threaded through `update`.
    query_steps: [(query_packed, query_labels)], each split over the mesh.
    update: (state, query, segment, start) -> state, `start` the segment's first
      database index (a Python int).
    read_segment: (start, stop) -> (codes, labels) blocks of `segment_size` rows.

  Returns:
    The states after the last segment.
  """
  replicated = sharding.replicated(mesh)
  in_flight = None
  for start in range(0, num_database, segment_size):
    segment = jax.device_put(
        read_segment(start, min(start + segment_size, num_database)), replicated)
    states = [update(state, query, segment, start)
              for state, query in zip(states, query_steps)]
    # Dispatch is asynchronous: wait for the previous segment's work, so the host
    # reads ahead by one segment and no more.
    if in_flight is not None:
      jax.block_until_ready(in_flight)
    in_flight = states
  return states


def _segmented_statistics(query_steps: list, read_segment, *, num_database: int,
                          segment_size: int, mesh: Mesh, code_length: int,
                          breakpoints: jax.Array, bucket_of_rank: jax.Array,
                          algorithm: str) -> list:
  """Both passes with the database read in segments of `segment_size` items.

  Each pass reads every segment once and runs it for all query steps, so host and
  device memory hold a few segments, whatever the database size.

  Args:
    query_steps: [(query_packed, query_labels)], each split over the mesh.
    read_segment: (start, stop) -> (codes, labels) blocks of `segment_size` rows.

  Returns:
    [(counts, precision_limbs, relevant_counts)] per query step, as
    `sharded_statistics` returns them.
  """
  split = NamedSharding(mesh, _query_spec(mesh))
  total = jnp.int32(num_database)

  def sweep(states, update):
    return _sweep_segments(states, query_steps, update, read_segment,
                           num_database=num_database, segment_size=segment_size,
                           mesh=mesh)

  counts = sweep(
      [jax.device_put(np.zeros((len(query), code_length + 2, 2), np.int32), split)
       for query, _ in query_steps],
      lambda counts, query, segment, start: _sharded_histogram(
          counts, *query, *segment, jnp.int32(start), total, mesh=mesh,
          code_length=code_length))
  states = sweep(
      [_sharded_initial_state(c, mesh=mesh, num_buckets=breakpoints.shape[0] + 1)
       for c in counts],
      lambda state, query, segment, start: _sharded_ranking(
          state, *query, *segment, breakpoints, bucket_of_rank, jnp.int32(start), total,
          mesh=mesh, code_length=code_length, algorithm=algorithm))
  return [(c[:, :-1], limbs, relevant) for c, (_, limbs, relevant) in zip(counts, states)]


# ------------------------------------------------------------- top k (search)

@functools.partial(jax.jit, static_argnames=("code_length", "k", "num_database"))
def _top_k_device(query_packed: jax.Array, db_blocks: jax.Array, *, code_length: int,
                  k: int, num_database: int) -> tuple[jax.Array, jax.Array]:
  """Both passes without labels, keeping each item ranked <= k at its place.

  Args:
    query_packed: uint32 (Q, W); db_blocks: uint32 (B, T, W) zero-padded.

  Returns:
    int32 (Q, k) database rows and int32 (Q, k) their distances, best first.
  """
  num_queries = query_packed.shape[0]
  num_blocks, block_size, _ = db_blocks.shape
  no_query_labels = jnp.zeros((num_queries, 1), jnp.uint32)
  no_db_labels = jnp.zeros((num_blocks, block_size, 1), jnp.uint32)
  counts = _histogram_pass(
      jnp.zeros((num_queries, code_length + 2, 2), jnp.int32), query_packed,
      no_query_labels, db_blocks, no_db_labels, jnp.int32(0), jnp.int32(num_database),
      code_length=code_length)
  running, _, _ = _initial_ranking_state(counts, num_buckets=1)
  positions = jnp.arange(block_size, dtype=jnp.int32)
  query_rows = jnp.arange(num_queries, dtype=jnp.int32)[:, None]

  def block_step(carry, block):
    running, best_rows, best_distances = carry
    codes, start = block
    is_real = start + positions < num_database
    ranked = _sorted_block_ranks(
        running, jnp.where(is_real[None, :], _hamming(query_packed, codes),
                           code_length + 1),
        jnp.zeros((num_queries, block_size), jnp.int32), code_length=code_length)
    place = ranked["rank"] - 1  # past k (or padding): dropped
    best_rows = best_rows.at[query_rows, place].set(start + ranked["position"],
                                                    mode="drop")
    best_distances = best_distances.at[query_rows, place].set(ranked["distance"],
                                                              mode="drop")
    return (running + ranked["block_counts"], best_rows, best_distances), None

  starts = jnp.arange(num_blocks, dtype=jnp.int32) * block_size
  (_, best_rows, best_distances), _ = lax.scan(
      block_step, (running, jnp.zeros((num_queries, k), jnp.int32),
                   jnp.zeros((num_queries, k), jnp.int32)), (db_blocks, starts))
  return best_rows, best_distances


def top_k(query_packed: Any, db_packed: Any, *, k: int, db_chunk: int = 1024
          ) -> tuple[np.ndarray, np.ndarray]:
  """The first k items of each query's ranking: by Hamming distance, ties by database
  row, as the evaluation ranks them (the "sort" form of its ranking pass).

  For a few queries (search, report grids); memory is O(queries x (db_chunk + L + k))
  plus the packed database.

  Args:
    query_packed: uint32 (nq, W) from `pack_codes`.
    db_packed: uint32 (ndb, W) from `pack_codes`.
    k: items per query (clipped to ndb).
    db_chunk: database items per block.

  Returns:
    rows: int64 (nq, min(k, ndb)) database rows, best first.
    distances: int32 (nq, min(k, ndb)) their Hamming distances.
  """
  query_packed, db_packed = np.asarray(query_packed), np.asarray(db_packed)
  _check_packed_pair(query_packed, db_packed)
  if len(db_packed) == 0:
    raise UserError("the database holds no codes; search needs at least one item.")
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise UserError(f"k must be a positive int, got {k!r}; e.g. k=10.")
  _check_sizes((db_chunk,), "db_chunk", allow_none=False)
  num_database, num_words = db_packed.shape
  block_size = min(db_chunk, num_database, _MAX_BLOCK)
  rows = -(-num_database // block_size) * block_size
  blocks = np.zeros((rows, num_words), np.uint32)
  blocks[:num_database] = db_packed
  best_rows, best_distances = _top_k_device(
      jnp.asarray(query_packed), jnp.asarray(blocks.reshape(-1, block_size, num_words)),
      code_length=_WORD_BITS * num_words, k=min(int(k), num_database),
      num_database=num_database)
  return np.asarray(best_rows).astype(np.int64), np.asarray(best_distances)


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


def _checked_inputs(query_codes: Any, query_labels: Any, db_codes: Any, db_labels: Any,
                    *, code_length: int | None, query_chunk: int, db_chunk: int,
                    db_segment: int) -> tuple[np.ndarray, np.ndarray, Any, Any, int]:
  """Checks the arguments shared by the public functions (their docstrings say what).

  Returns:
    (uint32 (nq, W) packed query codes, uint32 (nq, Wl) packed query labels, db_codes
    and db_labels as arrays that slice into numpy rows (a memmap stays one), L).
  """
  if not hasattr(query_codes, "shape"):
    query_codes = np.asarray(query_codes)
  if not hasattr(db_codes, "shape"):
    db_codes = np.asarray(db_codes)
  if not hasattr(db_labels, "shape"):
    db_labels = np.asarray(db_labels)
  code_length, _ = _code_layout(query_codes, db_codes, code_length)
  query_packed = _packed_codes(query_codes, "query_codes", code_length=code_length)
  num_queries, num_database = query_packed.shape[0], db_codes.shape[0]
  query_labels = np.asarray(query_labels)
  _check_label_shape(query_labels.shape, num_queries, "query_labels")
  _check_label_shape(db_labels.shape, num_database, "db_labels")
  if query_labels.shape[1] != db_labels.shape[1]:
    raise UserError(f"query labels have {query_labels.shape[1]} columns and database "
                    f"labels {db_labels.shape[1]}; both must use the dataset's label "
                    "list.")
  query_labels = _packed_labels(query_labels, "query_labels")
  _check_sizes((query_chunk, db_chunk, db_segment),
               "query_chunk, db_chunk and db_segment", allow_none=False)
  if db_chunk > _MAX_BLOCK:
    raise UserError(f"db_chunk={db_chunk} is above {_MAX_BLOCK}, the most items a "
                    "block's exact sums hold; use the default 1024.")
  if num_database >= _MAX_DATABASE:
    raise UserError(f"the database has {num_database} items; this evaluation supports "
                    f"fewer than {_MAX_DATABASE}: evaluate on a subset.")
  return query_packed, query_labels, db_codes, db_labels, code_length


def _local_mesh(mesh: Mesh | None) -> Mesh:
  """This process's devices of `mesh` (the ranking reads host arrays and returns
  host arrays), or a mesh of every local device."""
  if mesh is not None and not isinstance(mesh, Mesh):
    raise UserError(f"mesh must be a jax.sharding.Mesh (e.g. the run's, "
                    f"sharding.make_mesh()) or None for every local device, got {mesh!r}.")
  return sharding.local_mesh(mesh)


def _query_steps(query_packed: np.ndarray, query_labels: np.ndarray, *, mesh: Mesh,
                 query_chunk: int) -> list:
  """The queries in steps of `query_chunk` per device of `mesh`.

  Returns:
    [(uint32 (S, W) codes, uint32 (S, Wl) labels)] split over the mesh, S the step
    size; the last step is zero-padded (no labels, so the padding queries are dropped
    afterwards) to keep one shape, so one compile.
  """
  split = NamedSharding(mesh, _query_spec(mesh))
  num_queries = query_packed.shape[0]
  # Each step sends `query_chunk` queries to every device; fewer when that is plenty.
  query_chunk = min(query_chunk, -(-num_queries // mesh.size))
  step_size = query_chunk * mesh.size
  num_steps = -(-num_queries // step_size)
  pad = ((0, num_steps * step_size - num_queries), (0, 0))
  query_packed = np.pad(query_packed, pad)
  query_label_packed = np.pad(query_labels, pad)
  return [jax.device_put((query_packed[rows], query_label_packed[rows]), split)
          for rows in (slice(step * step_size, (step + 1) * step_size)
                       for step in range(num_steps))]


def retrieval_metrics_per_query(query_codes: Any, query_labels: Any, db_codes: Any,
                                db_labels: Any, *, topk: Sequence[int | None] = (1000,),
                                topn: Sequence[int] = DEFAULT_TOPN, radius: int = 2,
                                query_chunk: int = 256, db_chunk: int = 1024,
                                db_segment: int = 65_536, code_length: int | None = None,
                                mesh: Mesh | None = None, algorithm: str | None = None
                                ) -> dict[str, np.ndarray]:
  """Per-query retrieval metrics (conventions: the module docstring, docs/evaluation.md).

  Args:
    query_codes: int8 or float (nq, L) +-1 codes, or uint32 (nq, W) from `pack_codes`.
    query_labels: uint8 (nq, num_labels) multi-hot.
    db_codes: int8 or float (ndb, L) +-1 codes, or uint32 (ndb, W) from `pack_codes`;
      any array that slices into numpy rows, e.g. `np.load(path, mmap_mode="r")`: it
      is read `db_segment` rows at a time, never whole.
    db_labels: uint8 (ndb, num_labels) multi-hot; a memmap is read like `db_codes`.
    topk: cut-offs K of mAP@K; None (or K >= ndb) means the whole database.
    topn: list sizes N of precision@N.
    radius: Hamming radius of "precision@radius{radius}".
    query_chunk: queries per device per step; device memory is
      O(query_chunk x (db_chunk + L)) plus the packed database segment.
    db_chunk: database items per block of either pass (at most 2^14), each sorted
      per query in the ranking pass.
    db_segment: at most this many database items are read, checked, packed and sent
      to the devices at a time (equal segments of whole `db_chunk` blocks). A
      database of at most this many items stays on the devices for all queries; a
      larger one is read twice, segment by segment (once per pass), so memory does
      not grow with ndb.
    code_length: L, needed only when query and database codes are both packed and
      L is not a multiple of 32 (default: 32 W).
    mesh: the devices that share the queries: this process's devices of `mesh` (a
      run passes its one mesh, `sharding.make_mesh`); None: every local device (on CPU
      the threads of --xla_force_host_platform_device_count).
    algorithm: how the ranking pass runs: "scan" (a loop over database items, all
      queries at once) or "sort" (a loop over blocks of `db_chunk` items, each sorted
      per query); None: `default_algorithm(mesh)`. The results are the same bits.

  Returns:
    float64 arrays: "ap@{K}" / "ap@all" / "ap@all_tie_aware" / "precision@radius{r}"
    (nq,), "precision@top{N}" (nq,), "pr_precision" and "pr_recall" (nq, L + 1) per
    radius 0..L, and int64 "num_relevant" (nq,) relevant items in the database.
  """
  query_packed, query_labels, db_codes, db_labels, code_length = _checked_inputs(
      query_codes, query_labels, db_codes, db_labels, code_length=code_length,
      query_chunk=query_chunk, db_chunk=db_chunk, db_segment=db_segment)
  num_queries, num_database = query_packed.shape[0], db_codes.shape[0]
  _check_sizes(topk, "topk", allow_none=True)
  _check_sizes(topn, "topn", allow_none=False)
  if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
    raise UserError(f"radius must be a non-negative int, got {radius!r}.")

  # Rank breakpoints: every K and N, clipped to the database size.
  cutoffs = {k: num_database if k is None else min(int(k), num_database) for k in topk}
  list_sizes = {n: min(int(n), num_database) for n in topn}
  breakpoints = np.unique(
      np.array([num_database, *cutoffs.values(), *list_sizes.values()]))

  mesh = _local_mesh(mesh)
  if algorithm is None:
    algorithm = default_algorithm(mesh)
  elif algorithm not in ALGORITHMS:
    raise UserError(f"algorithm must be one of {sorted(ALGORITHMS)} or None (the "
                    f"mesh's default), got {algorithm!r}.")
  query_steps = _query_steps(query_packed, query_labels, mesh=mesh,
                             query_chunk=query_chunk)
  replicated = sharding.replicated(mesh)
  device_breakpoints = jax.device_put(breakpoints.astype(np.int32), replicated)
  bucket_of_rank = jax.device_put(_bucket_table(breakpoints), replicated)
  db_chunk = min(db_chunk, num_database)

  num_segments, segment_size = _segment_layout(num_database, db_segment, db_chunk)
  if num_segments == 1:
    num_rows = -(-num_database // db_chunk) * db_chunk
    # Copied to every device once, not at every step.
    database = jax.device_put(_database_blocks(
        db_codes, db_labels, 0, num_database, num_rows=num_rows, block_size=db_chunk,
        code_length=code_length), replicated)
    pending = [sharded_statistics(  # dispatched asynchronously, collected below
        *query, *database, device_breakpoints, bucket_of_rank, mesh=mesh,
        code_length=code_length, num_database=num_database, algorithm=algorithm)
               for query in query_steps]
  else:
    pending = _segmented_statistics(
        query_steps, functools.partial(
            _database_blocks, db_codes, db_labels, num_rows=segment_size,
            block_size=db_chunk, code_length=code_length),
        num_database=num_database, segment_size=segment_size, mesh=mesh,
        code_length=code_length, breakpoints=device_breakpoints,
        bucket_of_rank=bucket_of_rank, algorithm=algorithm)
  counts, precision_limbs, relevant_counts = (
      [np.asarray(output) for output in outputs] for outputs in zip(*pending))
  counts = np.concatenate(counts)[:num_queries].astype(np.int64)
  precision_limbs = np.concatenate(precision_limbs)[:num_queries].astype(np.int64)
  relevant_counts = np.concatenate(relevant_counts)[:num_queries].astype(np.int64)

  totals, relevant = counts.sum(-1), counts[..., 1]
  num_relevant = relevant.sum(axis=1)
  # Cumulative over buckets: column i covers ranks <= breakpoints[i]; summed as
  # integers, so each column is its exact sum rounded once.
  precision_upto = _limbs_to_float(np.cumsum(precision_limbs, axis=1))
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
                      db_segment: int = 65_536, code_length: int | None = None,
                      mesh: Mesh | None = None, algorithm: str | None = None
                      ) -> dict[str, Any]:
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
      db_chunk=db_chunk, db_segment=db_segment, code_length=code_length,
      mesh=mesh, algorithm=algorithm)
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
