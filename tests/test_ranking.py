"""Tests for psch_jax.ranking against the NumPy reference and hand-computed cases.

The reference (psch_jax/reference.py) ranks each query's database with
`np.argsort(kind="stable")`, the loop of public hashing code, and computes every
metric from that ranking. Chunk sizes do
not divide the query or database counts, so padding is always exercised; most calls
run on the 4 fake CPU devices of conftest.py, the reference comparison also on 2
devices with several steps.
"""
import itertools
import json
import math

import jax
import numpy as np
import pytest

from psch_jax import ranking
from psch_jax import reference
from psch_jax.errors import UserError

QUERY_CHUNK = 5  # per device: 23 queries on 2 devices take 3 steps
DB_CHUNK = 17


# ------------------------------------------------------------- NumPy reference

def _reference(query_codes, query_labels, db_codes, db_labels, *, topk, topn, radius):
  return reference.retrieval_metrics_per_query(
      query_codes, query_labels, db_codes, db_labels, topk=topk, topn=topn,
      radius=radius)


def _reference_ap(query_codes, query_labels, db_codes, db_labels, k=None):
  """(nq,) AP@k by the NumPy reference."""
  ranked = reference.ranked_relevance(reference.hamming_distances(query_codes, db_codes),
                                      reference.shares_a_label(query_labels, db_labels))
  return reference.average_precision(ranked, k)


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
  packed = ranking.pack_codes(query)
  assert packed.dtype == np.uint32 and packed.shape == (5, -(-code_length // 32))
  distances = np.asarray(ranking.hamming_distance_packed(
      packed, ranking.pack_codes(database)))
  assert distances.dtype == np.int32
  np.testing.assert_array_equal(distances, np.sum(query[:, None] != database[None], -1))


def test_pack_codes_sets_bit_i_for_positive_code_bit_i():
  codes = -np.ones((1, 33), np.int8)
  codes[0, [0, 5, 32]] = 1
  np.testing.assert_array_equal(np.asarray(ranking.pack_codes(codes)),
                                [[(1 << 0) | (1 << 5), 1]])


# ------------------------------------------------------------- against the reference

TOPK = (1, 7, 50, 290, 1000, None)  # 290 > database size 263: the whole database
TOPN = (1, 5, 100, 400)


@pytest.mark.parametrize("algorithm", list(ranking.ALGORITHMS))
# 100 bits and 70 labels: more than one 64-bit word each (the host form's general loop).
@pytest.mark.parametrize("single_label,code_length,num_labels",
                         [(False, 12, 6), (True, 40, 6), (False, 100, 70)])
def test_every_metric_matches_stable_argsort_reference(single_label, code_length,
                                                       num_labels, algorithm):
  case = _random_case(seed=code_length, num_queries=23, num_database=263,
                      code_length=code_length, num_labels=num_labels,
                      single_label=single_label)
  ours = ranking.retrieval_metrics_per_query(
      *case, topk=TOPK, topn=TOPN, radius=2, query_chunk=QUERY_CHUNK, db_chunk=DB_CHUNK,
      mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",)),
      algorithm=algorithm)
  want = _reference(*case, topk=TOPK, topn=TOPN, radius=2)
  assert ours["ap@all"].shape == (23,)
  # The 12-bit case has ties at every distance; a query that gets nothing relevant
  # within its top K exists, so the zeros really enter the means below.
  assert np.any(want["ap@1"] == 0) and np.any(want["ap@1"] == 1)
  for key, expected in want.items():
    np.testing.assert_allclose(ours[key], expected, rtol=0, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(ours["ap@290"], ours["ap@all"])

  means = ranking.retrieval_metrics(*case, topk=TOPK, topn=TOPN, db_chunk=DB_CHUNK)
  assert len(jax.devices()) == 4  # this call shares the queries over 4 devices
  json.dumps(means)
  for k in TOPK:
    name = "all" if k is None else k
    assert means[f"map@{name}"] == pytest.approx(want[f"ap@{name}"].mean(), abs=1e-6)
  assert means["map@all_tie_aware"] == pytest.approx(
      want["ap@all_tie_aware"].mean(), abs=1e-6)
  assert means["precision@radius2"] == pytest.approx(
      want["precision@radius2"].mean(), abs=1e-6)
  assert means["pr_curve"]["radius"] == list(range(code_length + 1))
  np.testing.assert_allclose(means["pr_curve"]["precision"],
                             want["pr_precision"].mean(0), atol=1e-6)
  np.testing.assert_allclose(means["pr_curve"]["recall"],
                             want["pr_recall"].mean(0), atol=1e-6)
  assert means["pr_curve"]["recall"][-1] == pytest.approx(
      np.mean(want["pr_recall"][:, -1]))
  assert sorted(means["precision@topn"]) == sorted(TOPN)
  for n in TOPN:
    assert means["precision@topn"][n] == pytest.approx(
        want[f"precision@top{n}"].mean(), abs=1e-6)


def _exact_average_precision(case, k):
  """(nq,) AP@k as the ranking defines its bits: P@rank = hits / rank rounded to
  float32, summed exactly (math.fsum) over the relevant items of the stable ranking's
  top k, divided in float64."""
  ranked = reference.ranked_relevance(reference.hamming_distances(case[0], case[2]),
                                      reference.shares_a_label(case[1], case[3]))
  result = []
  for row in ranked[:, :k]:
    ranks = np.flatnonzero(row) + 1
    precisions = (np.arange(1, len(ranks) + 1, dtype=np.float32)
                  / ranks.astype(np.float32))
    result.append(math.fsum(precisions.tolist()) / len(ranks) if len(ranks) else 0.0)
  return np.asarray(result)


def test_average_precision_is_the_exact_sum_whatever_the_blocks_and_segments():
  # 3,000 items: a relevant item ranked below 1,000 has a precision with bits down to
  # 2^-34, so a float32 running sum would lose some and depend on its order.
  case = _random_case(seed=11, num_queries=9, num_database=3000, code_length=10,
                      num_labels=3, single_label=True)
  runs = [ranking.retrieval_metrics_per_query(*case, topk=(100, None), topn=(),
                                              db_chunk=chunk, db_segment=segment,
                                              algorithm=algorithm)
          for chunk, segment in ((1024, 65_536), (17, 65_536), (100, 700))
          for algorithm in ranking.ALGORITHMS]
  for k, name in ((100, "ap@100"), (3000, "ap@all")):
    want = _exact_average_precision(case, k)
    for run in runs:
      np.testing.assert_array_equal(run[name], want, err_msg=name)


@pytest.mark.parametrize("k", [1, 37, 500])
def test_top_k_is_the_stable_argsort_of_the_distances(k):
  # 10-bit codes: every distance is tied many times; 17-item blocks leave padding.
  query_codes, _, db_codes, _ = _random_case(seed=k, num_queries=6, num_database=300,
                                             code_length=10, num_labels=2,
                                             single_label=True)
  rows, distances = ranking.top_k(ranking.pack_codes(query_codes),
                                  ranking.pack_codes(db_codes), k=k, db_chunk=17)
  every_distance = reference.hamming_distances(query_codes, db_codes)
  want = np.argsort(every_distance, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(rows, want)
  np.testing.assert_array_equal(distances,
                                np.take_along_axis(every_distance, want, axis=1))
  assert rows.dtype == np.int64 and distances.dtype == np.int32


def test_one_device_and_four_devices_agree():
  case = _random_case(seed=4, num_queries=19, num_database=50, code_length=12,
                      num_labels=4, single_label=False)
  one_device = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  one = ranking.retrieval_metrics(*case, topk=(5, None), mesh=one_device,
                                  query_chunk=4, db_chunk=DB_CHUNK)
  four = ranking.retrieval_metrics(*case, topk=(5, None), query_chunk=4,
                                   db_chunk=DB_CHUNK)
  assert one == four


def test_tie_aware_matches_reference_when_groups_are_large():
  # 4 bits, 700 items: groups of up to ~260 tied items after hundreds of items, so the
  # harmonic-number series (arguments above the exact table) is exercised.
  case = _random_case(seed=3, num_queries=4, num_database=700, code_length=4,
                      num_labels=3, single_label=True)
  ours = ranking.retrieval_metrics_per_query(*case, topk=(), topn=(), db_chunk=256)
  want = _reference(*case, topk=(), topn=(), radius=2)
  np.testing.assert_allclose(ours["ap@all_tie_aware"], want["ap@all_tie_aware"],
                             rtol=1e-12, atol=0)
  np.testing.assert_allclose(ours["ap@all"], want["ap@all"], atol=1e-6)


@pytest.mark.parametrize("db_chunk,db_segment", [(17, 65_536), (100, 700)])
def test_every_algorithm_gives_the_same_bits(db_chunk, db_segment):
  case = _random_case(seed=3, num_queries=21, num_database=1100, code_length=12,
                      num_labels=5, single_label=False)
  first, *others = (ranking.retrieval_metrics_per_query(
      *case, topk=(1, 50, None), topn=(10, 1000), db_chunk=db_chunk,
      db_segment=db_segment, query_chunk=QUERY_CHUNK, algorithm=algorithm)
                    for algorithm in ranking.ALGORITHMS)
  for other in others:
    assert first.keys() == other.keys()
    for key in first:
      np.testing.assert_array_equal(first[key], other[key], err_msg=key)


def test_the_cpu_default_is_the_host_form():
  cpu = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  assert ranking.default_algorithm(cpu) == "host"
  with pytest.raises(UserError, match="algorithm must be one of"):
    ranking.retrieval_metrics_per_query(*_random_case(
        seed=0, num_queries=2, num_database=10, code_length=8, num_labels=2,
        single_label=True), algorithm="gpu")


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
  per_query = ranking.retrieval_metrics_per_query(
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
  means = ranking.retrieval_metrics(*_hand_case(), topk=(3, None), topn=(2,))
  assert means["map@3"] == pytest.approx((1 / 2 + 2 / 3) / 2 / 2)
  assert means["map@all"] == pytest.approx(q0["ap@all"] / 2)
  assert means["precision@radius2"] == pytest.approx(2 / 4 / 2)
  assert means["precision@topn"] == {2: pytest.approx(1 / 4)}


def test_precision_at_radius_is_zero_when_nothing_falls_inside():
  query_codes = np.ones((1, 8), np.int8)
  db_codes = -np.ones((3, 8), np.int8)  # every item at distance 8
  labels = np.ones((1, 2), np.uint8)
  metrics = ranking.retrieval_metrics(query_codes, labels, db_codes,
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
  return ranking.retrieval_metrics_per_query(*case, topk=(3, 10, None), topn=(5,),
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
    total += _reference_ap(query_codes, query_labels, db_codes[permutation],
                           db_labels[permutation])
    num_orders += 1
  ours = ranking.retrieval_metrics_per_query(query_codes, query_labels, db_codes,
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
  metrics = ranking.retrieval_metrics(query_codes, query_labels, db_codes, db_labels,
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
    ranking.retrieval_metrics(**call)
