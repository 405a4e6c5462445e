"""Tests for psch_jax.evaluation against a plain NumPy reference and hand-computed cases.

The reference ranks each query's database with `np.argsort(kind="stable")`, the loop
of public hashing code, and computes every metric from that ranking. Chunk sizes do
not divide the query or database counts, so padding is always exercised; most calls
run on the 8 fake CPU devices of conftest.py, the reference comparison also on 2
devices with several steps.
"""
import itertools
import json
import math

import jax
import numpy as np
import pytest

from psch_jax import evaluation
from psch_jax.errors import UserError

QUERY_CHUNK = 5  # per device: 23 queries on 2 devices take 3 steps
DB_CHUNK = 17


# ------------------------------------------------------------- NumPy reference

def _reference_ranking(query_code, query_labels, db_codes, db_labels):
  """Distances (ndb,), and relevance (ndb,) bool in ranked order."""
  distances = np.sum(db_codes != query_code[None, :], axis=1)
  order = np.argsort(distances, kind="stable")
  relevant = (db_labels.astype(np.int64) @ query_labels.astype(np.int64)) > 0
  return distances, relevant[order]


def _reference_ap(ranked_relevant, k=None):
  top = ranked_relevant[:k]
  if not top.any():
    return 0.0
  precision = np.cumsum(top) / np.arange(1, len(top) + 1)
  return float(np.sum(precision * top) / top.sum())


def _reference_tie_aware_ap(distances, relevant, code_length):
  """He et al.'s expected AP, summed position by position (no closed form)."""
  total_relevant = relevant.sum()
  if total_relevant == 0:
    return 0.0
  before = hits_before = 0
  expected = 0.0
  for d in range(code_length + 1):
    n = int(np.sum(distances == d))
    r = int(np.sum(relevant & (distances == d)))
    slope = (r - 1) / (n - 1) if n > 1 else 0.0
    for k in range(n):  # k group members before a relevant item
      expected += r / n * (hits_before + 1 + k * slope) / (before + 1 + k)
    before += n
    hits_before += r
  return expected / total_relevant


def _reference(query_codes, query_labels, db_codes, db_labels, *, topk, topn, radius):
  code_length = query_codes.shape[1]
  cutoffs = {f"ap@{'all' if k is None else k}": k for k in topk}
  cutoffs["ap@all"] = None
  out = {key: [] for key in cutoffs}
  out.update({"ap@all_tie_aware": [], f"precision@radius{radius}": [],
              "pr_precision": [], "pr_recall": []})
  out.update({f"precision@top{n}": [] for n in topn})
  for q in range(len(query_codes)):
    distances, ranked = _reference_ranking(query_codes[q], query_labels[q], db_codes,
                                           db_labels)
    relevant = (db_labels.astype(np.int64) @ query_labels[q].astype(np.int64)) > 0
    for key, k in cutoffs.items():
      out[key].append(_reference_ap(ranked, k))
    out["ap@all_tie_aware"].append(
        _reference_tie_aware_ap(distances, relevant, code_length))
    precisions, recalls = [], []
    for r in range(code_length + 1):
      inside = distances <= r
      precisions.append(relevant[inside].mean() if inside.any() else 0.0)
      recalls.append(relevant[inside].sum() / relevant.sum() if relevant.any() else 0.0)
    out["pr_precision"].append(precisions)
    out["pr_recall"].append(recalls)
    out[f"precision@radius{radius}"].append(precisions[min(radius, code_length)])
    for n in topn:
      out[f"precision@top{n}"].append(ranked[:n].sum() / min(n, len(ranked)))
  return {key: np.array(value) for key, value in out.items()}


def _random_case(seed, num_queries, num_database, code_length, num_labels, single_label):
  rng = np.random.default_rng(seed)
  query_codes = rng.choice(np.array([-1, 1], np.int8), (num_queries, code_length))
  db_codes = rng.choice(np.array([-1, 1], np.int8), (num_database, code_length))
  if single_label:
    eye = np.eye(num_labels, dtype=np.uint8)
    query_labels = eye[rng.integers(0, num_labels, num_queries)]
    db_labels = eye[rng.integers(0, num_labels, num_database)]
  else:
    query_labels = (rng.random((num_queries, num_labels)) < 0.25).astype(np.uint8)
    db_labels = (rng.random((num_database, num_labels)) < 0.25).astype(np.uint8)
  return query_codes, query_labels, db_codes, db_labels


# ------------------------------------------------------------- packed codes

@pytest.mark.parametrize("code_length", [7, 40, 64])
def test_packed_hamming_distance_counts_differing_bits(code_length):
  rng = np.random.default_rng(code_length)
  query = rng.choice([-1.0, 1.0], (5, code_length)).astype(np.float32)
  database = rng.choice(np.array([-1, 1], np.int8), (9, code_length))
  packed = evaluation.pack_codes(query)
  assert packed.dtype == np.uint32 and packed.shape == (5, -(-code_length // 32))
  distances = np.asarray(evaluation.hamming_distance_packed(
      packed, evaluation.pack_codes(database)))
  assert distances.dtype == np.int32
  np.testing.assert_array_equal(distances, np.sum(query[:, None] != database[None], -1))


def test_pack_codes_sets_bit_i_for_positive_code_bit_i():
  codes = -np.ones((1, 33), np.int8)
  codes[0, [0, 5, 32]] = 1
  np.testing.assert_array_equal(np.asarray(evaluation.pack_codes(codes)),
                                [[(1 << 0) | (1 << 5), 1]])


# ------------------------------------------------------------- against the reference

TOPK = (1, 7, 50, 290, 1000, None)  # 290 > database size 263: the whole database
TOPN = (1, 5, 100, 400)


@pytest.mark.parametrize("single_label,code_length", [(False, 12), (True, 40)])
def test_every_metric_matches_stable_argsort_reference(single_label, code_length):
  case = _random_case(seed=code_length, num_queries=23, num_database=263,
                      code_length=code_length, num_labels=6, single_label=single_label)
  ours = evaluation.retrieval_metrics_per_query(
      *case, topk=TOPK, topn=TOPN, radius=2, query_chunk=QUERY_CHUNK, db_chunk=DB_CHUNK,
      devices=jax.devices()[:2])
  reference = _reference(*case, topk=TOPK, topn=TOPN, radius=2)
  assert ours["ap@all"].shape == (23,)
  # The 12-bit case has ties at every distance; a query that gets nothing relevant
  # within its top K exists, so the zeros really enter the means below.
  assert np.any(reference["ap@1"] == 0) and np.any(reference["ap@1"] == 1)
  for key, expected in reference.items():
    np.testing.assert_allclose(ours[key], expected, rtol=0, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(ours["ap@290"], ours["ap@all"])

  means = evaluation.retrieval_metrics(*case, topk=TOPK, topn=TOPN, db_chunk=DB_CHUNK)
  assert len(jax.devices()) == 8  # this call shares the queries over 8 devices
  json.dumps(means)
  for k in TOPK:
    name = "all" if k is None else k
    assert means[f"map@{name}"] == pytest.approx(reference[f"ap@{name}"].mean(), abs=1e-6)
  assert means["map@all_tie_aware"] == pytest.approx(
      reference["ap@all_tie_aware"].mean(), abs=1e-6)
  assert means["precision@radius2"] == pytest.approx(
      reference["precision@radius2"].mean(), abs=1e-6)
  assert means["pr_curve"]["radius"] == list(range(code_length + 1))
  np.testing.assert_allclose(means["pr_curve"]["precision"],
                             reference["pr_precision"].mean(0), atol=1e-6)
  np.testing.assert_allclose(means["pr_curve"]["recall"],
                             reference["pr_recall"].mean(0), atol=1e-6)
  assert means["pr_curve"]["recall"][-1] == pytest.approx(
      np.mean(reference["pr_recall"][:, -1]))
  assert sorted(means["precision@topn"]) == sorted(TOPN)
  for n in TOPN:
    assert means["precision@topn"][n] == pytest.approx(
        reference[f"precision@top{n}"].mean(), abs=1e-6)


def test_one_device_and_eight_devices_agree():
  case = _random_case(seed=4, num_queries=19, num_database=50, code_length=12,
                      num_labels=4, single_label=False)
  one = evaluation.retrieval_metrics(*case, topk=(5, None), devices=jax.devices()[:1],
                                     query_chunk=4, db_chunk=DB_CHUNK)
  eight = evaluation.retrieval_metrics(*case, topk=(5, None), query_chunk=4,
                                       db_chunk=DB_CHUNK)
  assert one == eight


def test_tie_aware_matches_reference_when_groups_are_large():
  # 4 bits, 700 items: groups of up to ~260 tied items after hundreds of items, so the
  # harmonic-number series (arguments above the exact table) is exercised.
  case = _random_case(seed=3, num_queries=4, num_database=700, code_length=4,
                      num_labels=3, single_label=True)
  ours = evaluation.retrieval_metrics_per_query(*case, topk=(), topn=(), db_chunk=256)
  reference = _reference(*case, topk=(), topn=(), radius=2)
  np.testing.assert_allclose(ours["ap@all_tie_aware"], reference["ap@all_tie_aware"],
                             rtol=1e-12, atol=0)
  np.testing.assert_allclose(ours["ap@all"], reference["ap@all"], atol=1e-6)


def test_device_memory_stays_small_for_a_nus_wide_sized_database():
  # Compiled, not run: 256 queries x 193,734 items at 64 bits, 1,024-item blocks.
  num_database, block = 193_734, 1024
  num_blocks = -(-num_database // block)
  shapes = [((256, 2), np.uint32), ((256, 1), np.uint32),
            ((num_blocks, block, 2), np.uint32), ((num_blocks, block, 1), np.uint32),
            ((num_database + 1,), np.int32)]
  compiled = evaluation._sharded_statistics.lower(  # pylint: disable=protected-access
      *(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in shapes),
      mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ("queries",)), code_length=64,
      num_database=num_database, num_buckets=3).compile()
  memory = compiled.memory_analysis()
  assert memory.temp_size_in_bytes < 32 * 2**20
  assert memory.argument_size_in_bytes < 8 * 2**20


# ------------------------------------------------------------- top-K path

def _cut_inside_a_tie_group(case, k):
  """Queries whose K-th item shares its distance with items ranked after K."""
  query_codes, _, db_codes, _ = case
  distances = np.sum(query_codes[:, None, :] != db_codes[None, :, :], axis=2)
  kth = np.sort(distances, axis=1)[:, k - 1]
  return np.sum(distances <= kth[:, None], axis=1) > k


_ONE_SEGMENT = {"query_chunk": QUERY_CHUNK, "db_chunk": DB_CHUNK, "devices": (0, 1)}
# Segments of 64 items, queries over the 8 devices of conftest.py.
_SEGMENTS = {"query_chunk": 2, "db_chunk": 40, "db_segment": 100}


# 263 is the database size; 290 and 1000 exceed it (the whole database). Each (K,
# options) pair compiles anew, so each case runs a few.
@pytest.mark.parametrize("single_label,code_length,runs", [
    (False, 5, [(1, _ONE_SEGMENT), (50, _SEGMENTS), (290, _ONE_SEGMENT)]),
    (True, 12, [(50, _SEGMENTS), (262, _ONE_SEGMENT), (1000, _SEGMENTS)])])
def test_top_k_path_matches_full_path_and_stable_argsort_reference(single_label,
                                                                   code_length, runs):
  # 5 bits for 263 items: tie groups of up to ~80 items, so the cut at the K-th item
  # falls inside a group and only its first members (by index) are in the top K.
  case = _random_case(seed=20 + code_length, num_queries=23, num_database=263,
                      code_length=code_length, num_labels=6, single_label=single_label)
  ks = sorted({k for k, _ in runs})
  full = evaluation.retrieval_metrics_per_query(
      *case, topk=ks, topn=(), query_chunk=QUERY_CHUNK, db_chunk=DB_CHUNK)
  reference = {k: np.array([_reference_ap(_reference_ranking(*query, case[2], case[3])[1],
                                          k) for query in zip(case[0], case[1])])
               for k in ks}
  assert np.any(_cut_inside_a_tie_group(case, 50))
  if 1 in ks:  # some queries miss at K = 1, so their zeros enter the mean
    assert np.any(reference[1] == 0) and np.any(reference[1] == 1)
  for k, options in runs:
    if "devices" in options:
      options = {**options, "devices": [jax.devices()[i] for i in options["devices"]]}
    ours = evaluation.average_precision_at_k(*case, k=k, **options)
    assert ours.shape == (23,) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, full[f"ap@{k}"], rtol=0, atol=1e-6,
                               err_msg=f"k={k} {options}")
    np.testing.assert_allclose(ours, reference[k], rtol=0, atol=1e-6,
                               err_msg=f"k={k} {options}")
  assert len(jax.devices()) == 8  # the call below shares the queries over 8 devices
  assert evaluation.map_at_k(*case, k=50, **_SEGMENTS) == pytest.approx(
      reference[50].mean(), abs=1e-6)


def test_top_k_path_with_packed_codes_segments_and_query_groups(monkeypatch):
  # K much smaller than the database, 40-bit codes packed beforehand, 4 segments of
  # 768 items read in each pass, and (with the table budget at 1 byte) each of the 3
  # query steps run as its own group.
  monkeypatch.setattr(evaluation, "_TOP_K_TABLE_BYTES", 1)
  case = _random_case(seed=31, num_queries=6, num_database=3000, code_length=40,
                      num_labels=5, single_label=False)
  query_codes, query_labels, db_codes, db_labels = case
  ours = evaluation.average_precision_at_k(
      np.asarray(evaluation.pack_codes(query_codes)), query_labels,
      np.asarray(evaluation.pack_codes(db_codes)), db_labels, k=700, code_length=40,
      query_chunk=1, db_chunk=256, db_segment=1000, devices=jax.devices()[:2])
  full = evaluation.retrieval_metrics_per_query(*case, topk=(700,), topn=())
  np.testing.assert_allclose(ours, full["ap@700"], rtol=0, atol=1e-6)
  assert np.all(ours[query_labels.any(axis=1)] > 0)


def test_top_k_path_hand_computed_ties_and_a_query_without_relevant_items():
  # Query 0 ranks items 1, 3, 0, 2, 4 (relevance 0 1 1 0 1); query 1 has no relevant
  # item, so its AP is 0 and it stays in the mean.
  # K = 3 cuts the distance-1 group after its first item; K = 100 > 5 items.
  expected = {3: (1 / 2 + 2 / 3) / 2, 100: (1 / 2 + 2 / 3 + 3 / 5) / 3}
  for k, ap in expected.items():
    per_query = evaluation.average_precision_at_k(*_hand_case(), k=k)
    np.testing.assert_allclose(per_query, [ap, 0.0], rtol=0, atol=1e-7, err_msg=k)
    assert evaluation.map_at_k(*_hand_case(), k=k) == pytest.approx(ap / 2)


def test_bit_helpers_match_a_plain_loop():
  # pylint: disable=protected-access
  rng = np.random.default_rng(7)
  words = rng.integers(0, 2**32, 400, dtype=np.uint64).astype(np.uint32)
  words[:4] = [0, 1, 2**31, 2**32 - 1]
  set_bits = [[bit for bit in range(32) if word >> bit & 1] for word in words]
  ranks = np.array([rng.integers(0, len(bits)) if bits else 0 for bits in set_bits],
                   np.int32)
  positions = np.asarray(jax.jit(evaluation._select_bit)(words, ranks))
  for word, bits, rank, position in zip(words, set_bits, ranks, positions):
    if bits:
      assert position == bits[rank], (word, rank)
  counts = rng.integers(-2, 34, words.shape).astype(np.int32)
  kept = np.asarray(jax.jit(evaluation._keep_first_bits)(words, counts))
  for word, bits, count, result in zip(words, set_bits, counts, kept):
    assert result == sum(1 << bit for bit in bits[:max(count, 0)]), (word, count)
  mask = rng.random((3, 96)) < 0.3
  packed = np.asarray(jax.jit(evaluation._pack_mask)(mask))
  np.testing.assert_array_equal(packed, evaluation._pack_rows(mask))
  counts = rng.integers(0, 33, (3, 70)).astype(np.int32)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(evaluation._exclusive_prefix_sums)(counts)),
      np.cumsum(counts, axis=1) - counts)


def test_top_k_path_memory_stays_small_for_a_full_database_segment():
  # Compiled, not run: 256 queries x one 65,536-item segment at 64 bits, K = 5,000.
  queries, segment, k = 256, 65_536, 5_000
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("queries",))
  table = [((queries,), np.int32), ((queries,), np.int32), ((queries, k), np.int32),
           ((queries, k), np.bool_)]
  others = [((queries, 65), np.int32), ((queries, 2), np.uint32),
            ((queries, 1), np.uint32), ((segment // 1024, 1024, 2), np.uint32),
            ((segment // 1024, 1024, 1), np.uint32), ((), np.int32), ((), np.int32)]
  structs = lambda shapes: [jax.ShapeDtypeStruct(s, d) for s, d in shapes]
  compiled = evaluation._sharded_selection.lower(  # pylint: disable=protected-access
      tuple(structs(table)), *structs(others), mesh=mesh).compile()
  # Two bit masks of the segment (2 MB each) and the K table; a float32 distance
  # matrix of the segment alone would take 64 MB.
  assert compiled.memory_analysis().temp_size_in_bytes < 32 * 2**20


def test_top_k_path_bad_input_raises_user_error():
  for k in (0, -3, True, None, 2.5):
    with pytest.raises(UserError, match="k must hold positive ints"):
      evaluation.map_at_k(*_hand_case(), k=k)
  query_codes, query_labels, db_codes, db_labels = _hand_case()
  with pytest.raises(UserError, match="one row per"):
    evaluation.average_precision_at_k(query_codes, query_labels, db_codes,
                                      db_labels[:-1], k=2)


# ------------------------------------------------------------- hand-computed cases

def _hand_case():
  """One query (code +1 +1 +1 +1) and 5 database items, distances 1, 0, 1, 0, 3."""
  query_codes = np.ones((2, 4), np.int8)
  db_codes = np.ones((5, 4), np.int8)
  db_codes[0, 0] = db_codes[2, 1] = -1
  db_codes[4, :3] = -1
  # Labels over 3 concepts. Query 0 has concepts 0 and 1; query 1 has concept 2 only.
  query_labels = np.array([[1, 1, 0], [0, 0, 1]], np.uint8)
  db_labels = np.array([[0, 1, 0],   # d=1, shares concept 1: relevant to query 0
                        [0, 0, 0],   # d=0, no label in common
                        [0, 0, 0],   # d=1
                        [1, 1, 0],   # d=0, relevant
                        [1, 0, 0]],  # d=3, relevant
                       np.uint8)
  return query_codes, query_labels, db_codes, db_labels


def test_hand_computed_ties_multilabel_and_query_without_relevant_items():
  # Query 0 ranking by (distance, index): items 1, 3, 0, 2, 4 -> relevance 0 1 1 0 1.
  per_query = evaluation.retrieval_metrics_per_query(
      *_hand_case(), topk=(1, 2, 3, 100, None), topn=(1, 2, 3, 9), radius=1)
  q0 = {key: value[0] for key, value in per_query.items()}
  assert q0["ap@1"] == 0.0
  assert q0["ap@2"] == pytest.approx(1 / 2)
  assert q0["ap@3"] == pytest.approx((1 / 2 + 2 / 3) / 2)
  assert q0["ap@all"] == pytest.approx((1 / 2 + 2 / 3 + 3 / 5) / 3)
  assert q0["ap@100"] == pytest.approx(q0["ap@all"])  # K larger than the database
  assert [q0[f"precision@top{n}"] for n in (1, 2, 3, 9)] == pytest.approx(
      [0, 1 / 2, 2 / 3, 3 / 5])
  assert q0["precision@radius1"] == pytest.approx(2 / 4)
  np.testing.assert_allclose(q0["pr_precision"], [1 / 2, 2 / 4, 2 / 4, 3 / 5, 3 / 5])
  np.testing.assert_allclose(q0["pr_recall"], [1 / 3, 2 / 3, 2 / 3, 1, 1])
  # Tie-aware: distance 0 holds 1 relevant of 2 (precision 1 or 1/2), distance 1 also
  # 1 of 2 after 1 relevant of 2 (2/3 or 2/4), distance 3 the last item (3/5).
  assert q0["ap@all_tie_aware"] == pytest.approx(((1 + 1 / 2) / 2 + (2 / 3 + 2 / 4) / 2
                                                  + 3 / 5) / 3)
  # Query 1 has no relevant item anywhere: every AP is 0 and it stays in the mean.
  for key in ("ap@1", "ap@all", "ap@all_tie_aware", "precision@top9", "pr_recall"):
    assert np.all(per_query[key][1] == 0), key
  means = evaluation.retrieval_metrics(*_hand_case(), topk=(3, None), topn=(2,))
  assert means["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 2 / 2)
  assert means["map@all"] == pytest.approx(q0["ap@all"] / 2)
  assert means["precision@radius2"] == pytest.approx(2 / 4 / 2)
  assert means["precision@topn"] == {2: pytest.approx(1 / 4)}


def test_precision_at_radius_is_zero_when_nothing_falls_inside():
  query_codes = np.ones((1, 8), np.int8)
  db_codes = -np.ones((3, 8), np.int8)  # every item at distance 8
  labels = np.ones((1, 2), np.uint8)
  metrics = evaluation.retrieval_metrics(query_codes, labels, db_codes,
                                         np.ones((3, 2), np.uint8), topk=(2,))
  assert metrics["precision@radius2"] == 0.0
  assert metrics["pr_curve"]["precision"][:8] == [0.0] * 8
  assert metrics["pr_curve"]["precision"][8] == 1.0
  assert metrics["map@2"] == metrics["map@all"] == 1.0


# ------------------------------------------------------------- invariances

def _one_code_case(seed, num_database=60, code_length=6):
  """Queries that share one code, so the distance groups are the same for all."""
  rng = np.random.default_rng(seed)
  _, query_labels, db_codes, db_labels = _random_case(
      seed, num_queries=5, num_database=num_database, code_length=code_length,
      num_labels=4, single_label=False)
  query_codes = np.repeat(rng.choice(np.array([-1, 1], np.int8), (1, code_length)), 5, 0)
  return query_codes, query_labels, db_codes, db_labels


def _metrics(case):
  return evaluation.retrieval_metrics_per_query(*case, topk=(3, 10, None), topn=(5,),
                                                query_chunk=3, db_chunk=7)


def test_map_unchanged_by_permutations_that_keep_tied_items_in_index_order():
  query_codes, query_labels, db_codes, db_labels = _one_code_case(seed=5)
  distances = np.sum(db_codes != query_codes[:1], axis=1)
  rng = np.random.default_rng(0)
  group_order = rng.permutation(np.unique(distances))
  # Groups in a random order, each group's items in increasing index order.
  permutation = np.concatenate([np.flatnonzero(distances == d) for d in group_order])
  before = _metrics((query_codes, query_labels, db_codes, db_labels))
  after = _metrics((query_codes, query_labels, db_codes[permutation],
                    db_labels[permutation]))
  for key in ("ap@3", "ap@10", "ap@all", "precision@top5", "ap@all_tie_aware"):
    np.testing.assert_allclose(after[key], before[key], atol=1e-7, err_msg=key)


def test_tie_aware_map_is_invariant_to_any_database_permutation():
  case = _random_case(seed=8, num_queries=12, num_database=60, code_length=6,
                      num_labels=4, single_label=False)
  query_codes, query_labels, db_codes, db_labels = case
  permutation = np.random.default_rng(1).permutation(len(db_codes))
  before = _metrics(case)
  after = _metrics((query_codes, query_labels, db_codes[permutation],
                    db_labels[permutation]))
  np.testing.assert_allclose(after["ap@all_tie_aware"], before["ap@all_tie_aware"],
                             rtol=1e-12)
  # The index-ordered mAP does move: the invariance above is not vacuous.
  assert np.max(np.abs(after["ap@all"] - before["ap@all"])) > 1e-3


def test_tie_aware_equals_mean_ap_over_all_orders_of_tied_items():
  query_codes, query_labels, db_codes, db_labels = _one_code_case(
      seed=11, num_database=8, code_length=3)
  distances = np.sum(db_codes != query_codes[:1], axis=1)
  groups = [np.flatnonzero(distances == d) for d in np.unique(distances)]
  assert math.prod(math.factorial(len(g)) for g in groups) > 4  # real ties to average
  total = np.zeros(len(query_codes))
  num_orders = 0
  for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
    permutation = np.concatenate(orders)
    for q in range(len(query_codes)):
      _, ranked = _reference_ranking(query_codes[q], query_labels[q],
                                     db_codes[permutation], db_labels[permutation])
      total[q] += _reference_ap(ranked)
    num_orders += 1
  ours = evaluation.retrieval_metrics_per_query(query_codes, query_labels, db_codes,
                                                db_labels, topk=(), topn=())
  np.testing.assert_allclose(ours["ap@all_tie_aware"], total / num_orders, atol=1e-12)


def test_tie_aware_equals_standard_map_when_all_distances_differ():
  code_length = 8
  query_codes = np.ones((3, code_length), np.int8)
  db_codes = np.ones((code_length + 1, code_length), np.int8)
  for i in range(code_length + 1):
    db_codes[i, :i] = -1  # item i at distance i
  db_codes = db_codes[np.random.default_rng(2).permutation(code_length + 1)]
  rng = np.random.default_rng(3)
  query_labels = (rng.random((3, 3)) < 0.5).astype(np.uint8)
  query_labels[:, 0] = 1
  db_labels = (rng.random((code_length + 1, 3)) < 0.4).astype(np.uint8)
  metrics = evaluation.retrieval_metrics(query_codes, query_labels, db_codes, db_labels,
                                         topk=(None,), curves=False)
  assert metrics["map@all"] > 0
  assert metrics["map@all_tie_aware"] == pytest.approx(metrics["map@all"], abs=1e-7)


# ------------------------------------------------------------- bad input

@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(query_codes=c["query_codes"] * 0), "-1 and \\+1"),
    (lambda c: c.update(db_codes=c["db_codes"][:, :3]), "bits"),
    (lambda c: c.update(db_labels=c["db_labels"][:-1]), "one row per"),
    (lambda c: c.update(query_labels=c["query_labels"][:, :2]), "columns"),
    (lambda c: c.update(db_labels=c["db_labels"] * 2), "0 and 1"),
    (lambda c: c.update(topk=(0,)), "topk"),
    (lambda c: c.update(topn=(None,)), "topn"),
    (lambda c: c.update(query_chunk=0), "query_chunk"),
])
def test_bad_input_raises_user_error(change, message):
  query_codes, query_labels, db_codes, db_labels = _hand_case()
  call = {"query_codes": query_codes, "query_labels": query_labels,
          "db_codes": db_codes, "db_labels": db_labels}
  change(call)
  with pytest.raises(UserError, match=message):
    evaluation.retrieval_metrics(**call)
