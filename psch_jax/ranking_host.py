"""The ranking passes as compiled loops on the host: the "host" form, for CPUs.

On a CPU the ranking is a counting sort per query, and a compiled loop over the items
is the fastest way to run one; XLA's CPU backend runs the same loop ("scan" in
`ranking_passes`) as a scatter and a gather per step. Here numba compiles it: for each
query (queries spread over the host's cores by `numba.prange`), pass 1 computes every
item's distance and relevance once, into one uint16 per item (distance | relevant << 15),
and counts them per distance; pass 2 walks those items in index order with the running
counts, giving each relevant item its rank r and hits h, so its precision h / r
(float32, as the device forms round it) and its rank bucket.

The precisions are summed exactly: a float32 h / r with r < 2^24 is a multiple of
2^-48 below 1, so it is an integer v < 2^48 in units of 2^-48, summed as two int64
parts (v >> 24 and v & (2^24 - 1), each sum below 2^48 for fewer than 2^24 items) and
returned as the four limbs of `ranking_passes.limbs_to_float`: the same bits as the
device forms, whatever the order of the additions.

Memory: the packed database and two bytes per database item per thread.
"""
from __future__ import annotations

import numba
import numba.extending
import numpy as np

# An item of pass 1 is one uint16: its distance, and this bit when it is relevant.
_RELEVANT_BIT = 15
_DISTANCE_MASK = (1 << _RELEVANT_BIT) - 1
_PART_BITS = 24
_PART_MASK = (1 << _PART_BITS) - 1
_LIMB_BITS = 16
_LIMB_MASK = (1 << _LIMB_BITS) - 1
# 2^48: a float32 precision h / r (r < 2^24) times this is an exact integer.
_FIXED_POINT_SCALE = float(1 << 48)


@numba.extending.intrinsic
def _popcount(typing_context, word):
  """LLVM's ctpop on an unsigned integer: one popcnt instruction where the CPU has
  it (numba has no popcount of its own)."""
  del typing_context
  def codegen(context, builder, signature, args):
    del context, signature
    return builder.ctpop(args[0])
  return word(word), codegen


@numba.njit(nogil=True, cache=True)
def _items(query_code, query_label, db_codes, db_labels, items):
  """Pass 1's loop for one query: items[i] = distance | relevant << 15 (uint16).

  Codes and labels are uint64 words. One word each (codes of at most 64 bits, at most
  64 labels) is the loop the compiler vectorizes (a vector popcount per 8 items on
  AVX-512); anything longer takes the general loop."""
  if db_codes.shape[1] == 1 and db_labels.shape[1] == 1:
    code, label = query_code[0], query_label[0]
    for i in range(db_codes.shape[0]):
      relevant = np.uint16((label & db_labels[i, 0]) != 0)
      items[i] = np.uint16(_popcount(code ^ db_codes[i, 0])) | (relevant << _RELEVANT_BIT)
    return
  for i in range(db_codes.shape[0]):
    distance = 0
    for w in range(db_codes.shape[1]):
      distance += np.int64(_popcount(query_code[w] ^ db_codes[i, w]))
    relevant = 0
    for w in range(db_labels.shape[1]):
      relevant |= np.int64((query_label[w] & db_labels[i, w]) != 0)
    items[i] = distance | (relevant << _RELEVANT_BIT)


@numba.njit(parallel=True, nogil=True, cache=True)
def _query_statistics(query_codes, query_labels, db_codes, db_labels, bucket_of_rank,
                      counts, high_sums, low_sums, relevant_counts):
  """Both passes for every query, into the output arrays (see `statistics`)."""
  num_items = db_codes.shape[0]
  num_distances = counts.shape[1]
  last_rank = bucket_of_rank.shape[0] - 1
  for q in numba.prange(query_codes.shape[0]):
    # Pass 1: each item's distance and relevance, once, and the counts per distance.
    items = np.empty(num_items, np.uint16)
    _items(query_codes[q], query_labels[q], db_codes, db_labels, items)
    for i in range(num_items):
      counts[q, items[i] & _DISTANCE_MASK, items[i] >> _RELEVANT_BIT] += 1
    # running[d]: items / relevant items ranked before the next item at distance d.
    running_items = np.zeros(num_distances, np.int64)
    running_hits = np.zeros(num_distances, np.int64)
    before, hits_before = 0, 0
    for d in range(num_distances):
      running_items[d] = before
      running_hits[d] = hits_before
      before += counts[q, d, 0] + counts[q, d, 1]
      hits_before += counts[q, d, 1]
    # Pass 2, over every item in index order: its rank. Stored for every item but kept
    # (the slot advanced) only for a relevant one, so there is no branch to mispredict.
    num_relevant = hits_before
    ranks = np.empty(num_relevant + 1, np.int64)
    distances = np.empty(num_relevant + 1, np.int64)
    kept = 0
    for i in range(num_items):
      distance = items[i] & _DISTANCE_MASK
      running_items[distance] += 1
      ranks[kept] = running_items[distance]
      distances[kept] = distance
      kept += items[i] >> _RELEVANT_BIT
    # Then over the relevant items alone, still in index order: hits, P@rank, bucket.
    for j in range(num_relevant):
      distance, rank = distances[j], ranks[j]
      running_hits[distance] += 1
      precision = np.float32(running_hits[distance]) / np.float32(rank)
      value = np.int64(np.float64(precision) * _FIXED_POINT_SCALE)
      bucket = bucket_of_rank[min(rank, last_rank)]
      high_sums[q, bucket] += value >> _PART_BITS
      low_sums[q, bucket] += value & _PART_MASK
      relevant_counts[q, bucket] += 1


def _words64(packed: np.ndarray) -> np.ndarray:
  """uint32 (n, W) packed words -> uint64 (n, ceil(W / 2)), a zero word appended when
  W is odd (popcounts and ANDs are the same on either width)."""
  packed = np.ascontiguousarray(packed, np.uint32)
  if packed.shape[1] % 2:
    packed = np.pad(packed, ((0, 0), (0, 1)))
  return packed.view(np.uint64)


def _limbs(high: np.ndarray, low: np.ndarray) -> np.ndarray:
  """int64 sums high 2^-24 + low 2^-48 (each below 2^48) -> int64 (..., 4) limbs
  (d, a, b, c) of `ranking_passes.limbs_to_float`: (d 2^16 + a) 2^-16 + b 2^-32 +
  c 2^-48 with a, b, c < 2^16."""
  lowest = low & _LIMB_MASK
  # Units of 2^-32: the rest of `low` and the part of `high` below 2^-16.
  middle = (low >> _LIMB_BITS) + ((high & 0xFF) << 8)
  # Units of 2^-16.
  upper = (middle >> _LIMB_BITS) + (high >> 8)
  return np.stack([upper >> _LIMB_BITS, upper & _LIMB_MASK, middle & _LIMB_MASK,
                   lowest], axis=-1)


def statistics(query_packed: np.ndarray, query_labels: np.ndarray,
               db_packed: np.ndarray, db_labels: np.ndarray, *, code_length: int,
               bucket_of_rank: np.ndarray, num_buckets: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per-distance counts and per-bucket exact sums of precisions, for every query.

  Args:
    query_packed: uint32 (Q, W) packed query codes.
    query_labels: uint32 (Q, Wl) packed query labels.
    db_packed: uint32 (N, W) packed database codes, N < 2^24.
    db_labels: uint32 (N, Wl) packed database labels.
    code_length: L, below 2^15.
    bucket_of_rank: int32 (R + 1,): rank r -> its bucket, for r <= R; every rank
      above R is in the bucket of R (`ranking._bucket_table`).
    num_buckets: number of rank buckets (breakpoints + 1).

  Returns:
    As the device forms (`ranking_passes.sharded_statistics`), in int64: counts
    (Q, L + 1, 2) [irrelevant, relevant] items per distance; precision_limbs
    (Q, num_buckets, 4) the exact sum of P@rank over the relevant items ranked in each
    bucket; relevant_counts (Q, num_buckets).
  """
  num_queries = query_packed.shape[0]
  counts = np.zeros((num_queries, code_length + 1, 2), np.int64)
  high = np.zeros((num_queries, num_buckets), np.int64)
  low = np.zeros((num_queries, num_buckets), np.int64)
  relevant_counts = np.zeros((num_queries, num_buckets), np.int64)
  _query_statistics(_words64(query_packed), _words64(query_labels),
                    _words64(db_packed), _words64(db_labels),
                    np.ascontiguousarray(bucket_of_rank, np.int64), counts, high, low,
                    relevant_counts)
  return counts, _limbs(high, low), relevant_counts
