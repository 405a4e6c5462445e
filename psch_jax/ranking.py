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
`db_chunk` by the device passes of `ranking_passes`, or, on CPUs, packed whole and
ranked by the compiled loops of `ranking_host` (`ALGORITHMS`, the same bits). Pass 1
(histogram) counts per query the (irrelevant, relevant) items at each distance 0..L;
the tie-aware mAP, precision@radius and the PR curve come from these counts alone
(float64, on the host). Pass 2 (ranking) gives each item its exact rank and precision
and sums the precisions exactly per rank bucket between the requested K and N, so
one pass serves every mAP@K, mAP@all and precision@N. `top_k` (search) ranks with
the device passes.
Limit: fewer than 2^24 database items (ranks pass through float32).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from psch_jax import ranking_host
from psch_jax import ranking_passes
from psch_jax import sharding
from psch_jax.errors import UserError

# Printed and saved with every result (docs/evaluation.md states them in full).
METRIC_CONVENTIONS = (
    "Hamming ranking, ties by database index; AP@K averaged over all queries (0 when "
    "none relevant in the top K); tie-aware mAP@all of He et al. 2018; "
    "docs/evaluation.md")
DEFAULT_TOPN = tuple(range(100, 1001, 100))
# Ranks and counts of relevant items pass through float32: exact below 2^24.
_MAX_DATABASE = 2**24
_EULER_GAMMA = 0.57721566490153286061
# Below this argument harmonic numbers come from an exact table, above it from the
# asymptotic series, whose first omitted term is then below 1e-16.
_HARMONIC_TABLE_SIZE = 64


# How the ranking pass runs, all with the same bits: "host", compiled loops on the host
# (`ranking_host`; CPUs); "scan" and "sort", the device passes (`ranking_passes`; "sort"
# has no loop over items, for GPUs and TPUs).
ALGORITHMS = ("host", *ranking_passes.ALGORITHMS)


def default_algorithm(mesh: Mesh) -> str:
  """The default form of the ranking on `mesh`'s devices: "host" on CPUs, "sort" on
  GPUs and TPUs (docs/benchmarks.md, "Retrieval evaluation", gives the reasons)."""
  return "host" if mesh.devices.flat[0].platform == "cpu" else "sort"


# ------------------------------------------------------------------ packed codes

def _pack_bits(bits: np.ndarray) -> np.ndarray:
  """bool (n, m) -> uint32 (n, ceil(m/32)) on the host; bit i of word w is column
  32 w + i, padding bits 0. The one bit packer: codes, labels and database segments."""
  num_rows, num_bits = bits.shape
  num_words = -(-num_bits // ranking_passes.WORD_BITS)
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
    word_bits = ranking_passes.WORD_BITS
    spare_bits = -code_length % word_bits
    if spare_bits and np.any(rows[:, -1] >> np.uint32(word_bits - spare_bits)):
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


@jax.jit
def _hamming_jit(query_packed: jax.Array, db_packed: jax.Array) -> jax.Array:
  return ranking_passes.hamming(query_packed, db_packed)


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
    length = code_length or ranking_passes.WORD_BITS * next(iter(widths.values()))
  num_words = -(-length // ranking_passes.WORD_BITS)
  for name, width in widths.items():
    if width != num_words:
      raise UserError(f"{name} are packed in {width} words, but {length}-bit codes take "
                      f"{num_words}; pack query and database codes of one model with "
                      "pack_codes (and pass code_length= when both are packed).")
  return length, num_words


def _in_blocks(packed: np.ndarray, *, num_rows: int, block_size: int) -> np.ndarray:
  """uint32 (n, W) rows -> uint32 (num_rows / block_size, block_size, W), the rows
  past n zero (padding); num_rows is a multiple of block_size, at least n."""
  padded = np.zeros((num_rows, packed.shape[1]), np.uint32)
  padded[:len(packed)] = packed
  return padded.reshape(num_rows // block_size, block_size, -1)


def _segments(num_database: int, segment_size: int) -> list[tuple[int, int]]:
  """(start, stop) of the database segments, in index order."""
  return [(start, min(start + segment_size, num_database))
          for start in range(0, num_database, segment_size)]


def _packed_segment(db_codes: Any, db_labels: Any, start: int, stop: int, *,
                    code_length: int) -> tuple[np.ndarray, np.ndarray]:
  """Database items start..stop-1, read (from disk for a memmap), checked and packed:
  uint32 (stop - start, W) codes and (stop - start, Wl) labels."""
  return (_packed_codes(db_codes[start:stop], "db_codes", code_length=code_length),
          _packed_labels(db_labels[start:stop], "db_labels"))


def _database_blocks(db_codes: Any, db_labels: Any, start: int, stop: int, *,
                     num_rows: int, block_size: int, code_length: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """`_packed_segment` in blocks.

  Returns:
    uint32 (num_rows / block_size, block_size, W) codes and (..., Wl) labels, rows
    past stop - start zero (padding).
  """
  codes, labels = _packed_segment(db_codes, db_labels, start, stop,
                                  code_length=code_length)
  return (_in_blocks(codes, num_rows=num_rows, block_size=block_size),
          _in_blocks(labels, num_rows=num_rows, block_size=block_size))


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
  for start, stop in _segments(num_database, segment_size):
    segment = jax.device_put(read_segment(start, stop), replicated)
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
  split = NamedSharding(mesh, ranking_passes.query_spec(mesh))
  total = jnp.int32(num_database)

  def sweep(states, update):
    return _sweep_segments(states, query_steps, update, read_segment,
                           num_database=num_database, segment_size=segment_size,
                           mesh=mesh)

  counts = sweep(
      [jax.device_put(np.zeros((len(query), code_length + 2, 2), np.int32), split)
       for query, _ in query_steps],
      lambda counts, query, segment, start: ranking_passes.sharded_histogram(
          counts, *query, *segment, jnp.int32(start), total, mesh=mesh,
          code_length=code_length))
  states = sweep(
      [ranking_passes.sharded_initial_state(
          c, mesh=mesh, num_buckets=breakpoints.shape[0] + 1) for c in counts],
      lambda state, query, segment, start: ranking_passes.sharded_ranking(
          state, *query, *segment, breakpoints, bucket_of_rank, jnp.int32(start), total,
          mesh=mesh, code_length=code_length, algorithm=algorithm))
  return [(c[:, :-1], limbs, relevant) for c, (_, limbs, relevant) in zip(counts, states)]


# ------------------------------------------------------------- top k (search)

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
  block_size = min(db_chunk, num_database, ranking_passes.MAX_BLOCK)
  blocks = _in_blocks(db_packed, block_size=block_size,
                      num_rows=-(-num_database // block_size) * block_size)
  best_rows, best_distances = ranking_passes.top_k_device(
      jnp.asarray(query_packed), jnp.asarray(blocks),
      code_length=ranking_passes.WORD_BITS * num_words, k=min(int(k), num_database),
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
  if db_chunk > ranking_passes.MAX_BLOCK:
    raise UserError(f"db_chunk={db_chunk} is above {ranking_passes.MAX_BLOCK}, the most "
                    "items a block's exact sums hold; use the default 1024.")
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
  split = NamedSharding(mesh, ranking_passes.query_spec(mesh))
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


def _host_statistics(query_packed: np.ndarray, query_labels: np.ndarray, db_codes: Any,
                     db_labels: Any, *, segment_size: int, code_length: int,
                     breakpoints: np.ndarray) -> tuple[np.ndarray, ...]:
  """Both passes on the host (`ranking_host`): the database is read, checked and
  packed `segment_size` items at a time, and ranked packed, whole."""
  segments = [_packed_segment(db_codes, db_labels, start, stop, code_length=code_length)
              for start, stop in _segments(db_codes.shape[0], segment_size)]
  return ranking_host.statistics(
      query_packed, query_labels, np.concatenate([codes for codes, _ in segments]),
      np.concatenate([labels for _, labels in segments]), code_length=code_length,
      bucket_of_rank=_bucket_table(breakpoints), num_buckets=len(breakpoints) + 1)


def _device_statistics(query_packed: np.ndarray, query_labels: np.ndarray,
                       db_codes: Any, db_labels: Any, *, mesh: Mesh, query_chunk: int,
                       db_chunk: int, num_segments: int, segment_size: int,
                       code_length: int, breakpoints: np.ndarray, algorithm: str
                       ) -> list:
  """Both passes on the devices of `mesh` (`ranking_passes`), queries split over
  them, the database held whole on every device or read in segments.

  Returns:
    [(counts, precision_limbs, relevant_counts)] per query step, device arrays.
  """
  num_database = db_codes.shape[0]
  query_steps = _query_steps(query_packed, query_labels, mesh=mesh,
                             query_chunk=query_chunk)
  replicated = sharding.replicated(mesh)
  device_breakpoints = jax.device_put(breakpoints.astype(np.int32), replicated)
  bucket_of_rank = jax.device_put(_bucket_table(breakpoints), replicated)
  if num_segments == 1:
    num_rows = -(-num_database // db_chunk) * db_chunk
    # Copied to every device once, not at every step.
    database = jax.device_put(_database_blocks(
        db_codes, db_labels, 0, num_database, num_rows=num_rows, block_size=db_chunk,
        code_length=code_length), replicated)
    # Dispatched asynchronously, collected by the caller.
    return [ranking_passes.sharded_statistics(
        *query, *database, device_breakpoints, bucket_of_rank, mesh=mesh,
        code_length=code_length, num_database=num_database, algorithm=algorithm)
            for query in query_steps]
  return _segmented_statistics(
      query_steps, functools.partial(
          _database_blocks, db_codes, db_labels, num_rows=segment_size,
          block_size=db_chunk, code_length=code_length),
      num_database=num_database, segment_size=segment_size, mesh=mesh,
      code_length=code_length, breakpoints=device_breakpoints,
      bucket_of_rank=bucket_of_rank, algorithm=algorithm)


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
      larger one is read twice, segment by segment (once per pass), so device memory
      does not grow with ndb. The "host" form reads it once, segment by segment, and
      ranks it packed (L / 8 bytes and the packed labels per item).
    code_length: L, needed only when query and database codes are both packed and
      L is not a multiple of 32 (default: 32 W).
    mesh: the devices that share the queries: this process's devices of `mesh` (a
      run passes its one mesh, `sharding.make_mesh`); None: every local device (on CPU
      the threads of --xla_force_host_platform_device_count).
    algorithm: how the ranking passes run (`ALGORITHMS`): "host" (compiled loops on
      the host's cores, `ranking_host`), "scan" (on the devices, a loop over database
      items, all queries at once) or "sort" (on the devices, a loop over blocks of
      `db_chunk` items, each sorted per query); None: `default_algorithm(mesh)`. The
      results are the same bits.

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
    raise UserError(f"algorithm must be one of {list(ALGORITHMS)} or None (the mesh's "
                    f"default), got {algorithm!r}.")
  db_chunk = min(db_chunk, num_database)
  num_segments, segment_size = _segment_layout(num_database, db_segment, db_chunk)
  if algorithm == "host":
    pending = [_host_statistics(query_packed, query_labels, db_codes, db_labels,
                                segment_size=segment_size, code_length=code_length,
                                breakpoints=breakpoints)]
  else:
    pending = _device_statistics(
        query_packed, query_labels, db_codes, db_labels, mesh=mesh,
        query_chunk=query_chunk, db_chunk=db_chunk, num_segments=num_segments,
        segment_size=segment_size, code_length=code_length, breakpoints=breakpoints,
        algorithm=algorithm)
  counts, precision_limbs, relevant_counts = (
      [np.asarray(output) for output in outputs] for outputs in zip(*pending))
  counts = np.concatenate(counts)[:num_queries].astype(np.int64)
  precision_limbs = np.concatenate(precision_limbs)[:num_queries].astype(np.int64)
  relevant_counts = np.concatenate(relevant_counts)[:num_queries].astype(np.int64)

  totals, relevant = counts.sum(-1), counts[..., 1]
  num_relevant = relevant.sum(axis=1)
  # Cumulative over buckets: column i covers ranks <= breakpoints[i]; summed as
  # integers, so each column is its exact sum rounded once.
  precision_upto = ranking_passes.limbs_to_float(np.cumsum(precision_limbs, axis=1))
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
