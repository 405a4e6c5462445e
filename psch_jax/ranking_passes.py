"""The device passes of the Hamming ranking: what `ranking` runs on the mesh.

Everything here is a jit-traced function of packed uint32 codes and labels laid out
in blocks of the database (`ranking` packs, checks and reads the database, and turns
the counts and sums returned here into metrics; docs/evaluation.md derives both):
- pass 1, `histogram_pass`: per query, the (irrelevant, relevant) items at each
  Hamming distance 0..L;
- pass 2, the ranking pass, in two forms with the same bits (`ALGORITHMS`): "scan"
  walks the items in index order (fastest on CPUs), "sort" sorts each block per query
  and has no loop over items (GPUs, TPUs). Each item's exact rank
  (ties by database index) gives its precision h / r in float32, summed exactly as
  integer limbs per rank bucket;
- the same passes without labels keep each query's first k items (`top_k_device`);
- `sharded_statistics` and the `sharded_*` steps split the queries over the mesh;
  `sequential_loop_steps` counts the loop steps of the compiled evaluation, so a loop
  over database items cannot come back unnoticed.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from psch_jax import sharding

# Bits per packed word (`ranking.pack_codes`).
WORD_BITS = 32
# Sums of precisions are exact: fixed point in int32 limbs of 16 bits, so they do not
# depend on the order of the additions (nor on block sizes or the algorithm).
_LIMB_BITS = 16
_LIMB_SCALE = float(1 << _LIMB_BITS)
# Items per database block: a block's limb sums (each limb below 2^16) stay in int32.
MAX_BLOCK = 2**14


# -------------------------------------------------------------- distances

def hamming(query_packed: jax.Array, db_packed: jax.Array) -> jax.Array:
  """uint32 (q, W), (n, W) -> int32 (q, n) Hamming distances."""
  distances = None
  for word in range(query_packed.shape[1]):  # W is small: one XOR-popcount per word.
    bits = lax.population_count(query_packed[:, None, word] ^ db_packed[None, :, word])
    distances = bits if distances is None else distances + bits
  return distances.astype(jnp.int32)


# ------------------------------------------------------------- the two passes

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


def limbs_to_float(limbs: np.ndarray) -> np.ndarray:
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
    distances = hamming(query_packed, codes)
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
    distances = hamming(query_packed, code[None, :])[:, 0]
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
        running, jnp.where(is_real[None, :], hamming(query_packed, codes),
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


def query_spec(mesh: Mesh) -> P:
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
  split = query_spec(mesh)
  return jax.shard_map(body, mesh=mesh, in_specs=(split, split, P(), P(), P(), P()),
                       out_specs=(split, split, split), check_vma=False)(
                           query_packed, query_labels, db_blocks, db_label_blocks,
                           breakpoints, bucket_of_rank)


@functools.partial(jax.jit, static_argnames=("mesh", "code_length"))
def sharded_histogram(counts: jax.Array, query_packed: jax.Array,
                       query_labels: jax.Array, db_blocks: jax.Array,
                       db_label_blocks: jax.Array, first_item: jax.Array,
                       num_database: jax.Array, *, mesh: Mesh, code_length: int
                       ) -> jax.Array:
  """`_histogram_pass` over one database segment, queries split over the mesh."""
  split = query_spec(mesh)
  return jax.shard_map(
      functools.partial(_histogram_pass, code_length=code_length), mesh=mesh,
      in_specs=(split, split, split, P(), P(), P(), P()), out_specs=split,
      check_vma=False)(counts, query_packed, query_labels, db_blocks, db_label_blocks,
                       first_item, num_database)


@functools.partial(jax.jit, static_argnames=("mesh", "num_buckets"))
def sharded_initial_state(counts: jax.Array, *, mesh: Mesh, num_buckets: int
                           ) -> tuple[jax.Array, ...]:
  """`_initial_ranking_state` with the queries split over the mesh."""
  split = query_spec(mesh)
  return jax.shard_map(
      functools.partial(_initial_ranking_state, num_buckets=num_buckets),
      mesh=mesh, in_specs=(split,), out_specs=split, check_vma=False)(counts)


@functools.partial(jax.jit, static_argnames=("mesh", "code_length", "algorithm"))
def sharded_ranking(state: tuple[jax.Array, ...], query_packed: jax.Array,
                     query_labels: jax.Array, db_blocks: jax.Array,
                     db_label_blocks: jax.Array, breakpoints: jax.Array,
                     bucket_of_rank: jax.Array, first_item: jax.Array,
                     num_database: jax.Array, *, mesh: Mesh, code_length: int,
                     algorithm: str) -> tuple[jax.Array, ...]:
  """`_ranking_pass` over one database segment, queries split over the mesh."""
  split = query_spec(mesh)
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


def abstract_statistics_arguments(
    *, num_queries: int, num_database: int, code_length: int, db_chunk: int = 1024,
    num_breakpoints: int = 2, largest_breakpoint_rank: int = 1
) -> list[jax.ShapeDtypeStruct]:
  """The positional arguments of `sharded_statistics` for one query chunk over a
  database held whole, as shapes: to compile or trace it without data. The bucket
  table covers ranks 0..`largest_breakpoint_rank`."""
  num_blocks = -(-num_database // db_chunk)
  num_words = -(-code_length // WORD_BITS)
  shapes = [((num_queries, num_words), jnp.uint32), ((num_queries, 1), jnp.uint32),
            ((num_blocks, db_chunk, num_words), jnp.uint32),
            ((num_blocks, db_chunk, 1), jnp.uint32), ((num_breakpoints,), jnp.int32),
            ((largest_breakpoint_rank + 1,), jnp.int32)]
  return [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes]


def sequential_loop_steps(*, num_queries: int, num_database: int, code_length: int,
                          algorithm: str, db_chunk: int = 1024,
                          num_breakpoints: int = 2) -> int:
  """The longest chain of sequential loop steps in the device step of
  `retrieval_metrics_per_query` (both passes, one device, the database held whole),
  read from its jaxpr: how many steps one query chunk waits for, whatever the
  hardware does per step."""
  step = functools.partial(
      sharded_statistics, mesh=Mesh(np.array(jax.devices()[:1]), (sharding.AXIS,)),
      code_length=code_length, num_database=num_database, algorithm=algorithm)
  jaxpr = jax.make_jaxpr(step)(*abstract_statistics_arguments(
      num_queries=num_queries, num_database=num_database, code_length=code_length,
      db_chunk=db_chunk, num_breakpoints=num_breakpoints))
  return max(_loop_steps(jaxpr.jaxpr), default=0)


# ------------------------------------------------------------- top k (search)

@functools.partial(jax.jit, static_argnames=("code_length", "k", "num_database"))
def top_k_device(query_packed: jax.Array, db_blocks: jax.Array, *, code_length: int,
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
        running, jnp.where(is_real[None, :], hamming(query_packed, codes),
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
