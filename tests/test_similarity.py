"""Tests of psch_jax.similarity: soft similarity (Eq. 6) and targets (Eq. 7)."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from psch_jax.attention import GroupedAttention
from psch_jax.errors import UserError
from psch_jax.similarity import (pixel_similarity, soft_similarity,
                                 soft_similarity_between,
                                 target_similarity)


def _random_parts(seed: int, num: int = 6, parts: int = 3, size: int = 5):
  rng = np.random.default_rng(seed)
  descriptors = rng.normal(size=(num, parts, size)).astype(np.float32)
  logits = rng.normal(size=(num, parts))
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return descriptors, weights.astype(np.float32)


def _naive_similarity(desc_a, w_a, desc_b, w_b) -> np.ndarray:
  """Eq. 6 as a double loop; the cosine of a zero vector is 0."""
  result = np.zeros((len(desc_a), len(desc_b)))
  for i, j in itertools.product(range(len(desc_a)), range(len(desc_b))):
    for p in range(desc_a.shape[1]):
      u, v = desc_a[i, p].astype(np.float64), desc_b[j, p].astype(np.float64)
      denominator = np.linalg.norm(u) * np.linalg.norm(v)
      cosine = u @ v / denominator if denominator > 0 else 0.0
      result[i, j] += 0.5 * (w_a[i, p] + w_b[j, p]) * cosine
  return result


def test_matches_naive_double_loop_with_a_zero_part():
  descriptors, weights = _random_parts(0)
  descriptors[2, 1] = 0.0
  similarity = soft_similarity(jnp.asarray(descriptors), jnp.asarray(weights))
  assert similarity.shape == (6, 6) and similarity.dtype == jnp.float32
  np.testing.assert_allclose(
      similarity, _naive_similarity(descriptors, weights, descriptors, weights),
      atol=1e-5)
  np.testing.assert_allclose(similarity, similarity.T, atol=1e-6)


def test_between_two_sets_matches_naive_and_the_joint_matrix():
  desc_a, w_a = _random_parts(1, num=4)
  desc_b, w_b = _random_parts(2, num=7)
  between = soft_similarity_between(desc_a, w_a, desc_b, w_b)
  assert between.shape == (4, 7)
  np.testing.assert_allclose(
      between, _naive_similarity(desc_a, w_a, desc_b, w_b), atol=1e-5)
  joint = soft_similarity(np.concatenate([desc_a, desc_b]),
                          np.concatenate([w_a, w_b]))
  np.testing.assert_allclose(between, joint[:4, 4:], atol=1e-6)


def test_relu_feature_maps_give_values_in_unit_interval_and_unit_diagonal():
  rng = np.random.default_rng(0)
  maps = np.maximum(rng.normal(size=(8, 3, 3, 16)), 0).astype(np.float32)
  parts = GroupedAttention(num_parts=4).apply({}, maps)
  similarity = np.asarray(soft_similarity(parts.descriptors, parts.weights))
  assert np.all(similarity >= 0.0) and np.all(similarity <= 1.0 + 1e-6)
  np.testing.assert_allclose(np.diag(similarity), 1.0, rtol=1e-5)


def test_compares_corresponding_parts_only():
  descriptors, weights = _random_parts(3, num=5, parts=4)
  base = np.asarray(soft_similarity(descriptors, weights))
  permutation = np.array([1, 2, 3, 0])

  one_permuted = descriptors.copy(), weights.copy()
  one_permuted[0][0] = descriptors[0, permutation]
  one_permuted[1][0] = weights[0, permutation]
  changed = np.asarray(soft_similarity(*one_permuted))
  assert np.all(np.abs(changed[0, 1:] - base[0, 1:]) > 1e-4)
  np.testing.assert_allclose(changed[1:, 1:], base[1:, 1:], atol=1e-6)

  all_permuted = soft_similarity(descriptors[:, permutation],
                                 weights[:, permutation])
  np.testing.assert_allclose(all_permuted, base, atol=1e-6)


def test_mismatched_shapes_raise():
  descriptors, weights = _random_parts(4)
  with pytest.raises(UserError, match="same P and d"):
    soft_similarity_between(descriptors, weights, descriptors[:, :2],
                            weights[:, :2])
  with pytest.raises(UserError, match="weights"):
    soft_similarity(descriptors, weights[:, :2])


# Hand-made batch: classes 0 and 1 and two unlabelled images.
LABELS = np.array([0, 0, 1, -1, 1, 0, -1], np.int32)


def _soft_sim(seed: int = 5) -> np.ndarray:
  rng = np.random.default_rng(seed)
  upper = rng.uniform(size=(len(LABELS), len(LABELS)))
  return np.triu(upper) + np.triu(upper, 1).T


def test_soft_targets_follow_each_case_of_eq7():
  lam, mu = 0.3, 0.2
  soft_sim = _soft_sim()
  target, weight = target_similarity(
      jnp.asarray(soft_sim, jnp.float32), jnp.asarray(LABELS),
      same_class_floor=lam, unlabelled_weight=mu)
  assert target.dtype == jnp.float32 and weight.dtype == jnp.float32
  cases = set()
  for i, j in itertools.product(range(len(LABELS)), repeat=2):
    s, yi, yj = soft_sim[i, j], LABELS[i], LABELS[j]
    if yi < 0 or yj < 0:
      expected, expected_weight, case = 2 * s - 1, mu, "unlabelled"
    elif yi == yj:
      expected, expected_weight, case = lam + (1 - lam) * s, 1.0, "same"
    else:
      expected, expected_weight, case = -1.0, 1.0, "different"
    if i == j:
      expected_weight, case = 0.0, case + " diagonal"
    cases.add(case)
    np.testing.assert_allclose(target[i, j], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(weight[i, j], expected_weight, rtol=1e-6)
  assert cases == {"unlabelled", "same", "different", "unlabelled diagonal",
                   "same diagonal"}


def test_zero_unlabelled_weight_masks_unlabelled_pairs():
  _, weight = target_similarity(_soft_sim(), LABELS, unlabelled_weight=0.0)
  unlabelled = LABELS < 0
  assert np.all(np.asarray(weight)[unlabelled, :] == 0)
  assert np.all(np.asarray(weight)[:, unlabelled] == 0)
  assert np.sum(np.asarray(weight) > 0) == 5 * 4


def test_same_class_pairs_rank_above_the_others_with_floor_one_half():
  soft_sim = _soft_sim(6)
  target = np.asarray(target_similarity(soft_sim, LABELS)[0])
  off_diagonal = ~np.eye(len(LABELS), dtype=bool)
  labelled = LABELS >= 0
  same = (LABELS[:, None] == LABELS[None, :]) & labelled[:, None] & off_diagonal
  different = (labelled[:, None] & labelled[None, :]
               & (LABELS[:, None] != LABELS[None, :]))
  unlabelled = ~(labelled[:, None] & labelled[None, :]) & off_diagonal
  assert target[same].min() >= 0.5 > target[different].max()
  # Unlabelled pairs use 2 s - 1, below the same-class floor while s <= 0.75.
  low = unlabelled & (soft_sim <= 0.75)
  assert low.any() and target[same].min() >= target[low].max()
  # Inside a class the target keeps the order of the soft similarity.
  order_s = np.argsort(soft_sim[same], kind="stable")
  assert np.all(np.diff(target[same][order_s]) >= 0)


def test_hard_targets_ignore_soft_similarity_and_mask_unlabelled():
  target_a, weight_a = target_similarity(_soft_sim(7), LABELS, hard=True)
  target_b, weight_b = target_similarity(_soft_sim(8), LABELS, hard=True)
  np.testing.assert_array_equal(target_a, target_b)
  np.testing.assert_array_equal(weight_a, weight_b)
  labelled = LABELS >= 0
  for i, j in itertools.product(range(len(LABELS)), repeat=2):
    if labelled[i] and labelled[j]:
      assert target_a[i, j] == (1.0 if LABELS[i] == LABELS[j] else -1.0)
      assert weight_a[i, j] == (0.0 if i == j else 1.0)
    else:
      assert weight_a[i, j] == 0.0


def test_bad_target_arguments_raise():
  with pytest.raises(UserError, match="same_class_floor"):
    target_similarity(_soft_sim(), LABELS, same_class_floor=1.5)
  with pytest.raises(UserError, match="unlabelled_weight"):
    target_similarity(_soft_sim(), LABELS, unlabelled_weight=-0.1)
  with pytest.raises(UserError, match="pseudo_labels"):
    target_similarity(_soft_sim(), LABELS[:-1])


def _affinity(num_clusters: int = 3) -> np.ndarray:
  rng = np.random.default_rng(9)
  upper = rng.uniform(size=(num_clusters, num_clusters))
  affinity = np.triu(upper, 1) + np.triu(upper, 1).T
  np.fill_diagonal(affinity, 1.0)
  return affinity.astype(np.float32)


def test_cross_cluster_ceiling_grades_different_class_pairs_by_cluster_affinity():
  ceiling, affinity, soft_sim = 0.2, _affinity(), _soft_sim()
  graded, graded_weight = target_similarity(
      soft_sim, LABELS, cross_cluster_ceiling=ceiling, cluster_affinity=affinity)
  plain, plain_weight = target_similarity(soft_sim, LABELS)
  graded, plain = np.asarray(graded), np.asarray(plain)
  labelled = LABELS >= 0
  different = (labelled[:, None] & labelled[None, :]
               & (LABELS[:, None] != LABELS[None, :]))
  rows, cols = np.nonzero(different)
  np.testing.assert_allclose(
      graded[rows, cols], -1 + (1 + ceiling) * affinity[LABELS[rows], LABELS[cols]],
      rtol=1e-6)
  # Every other pair, and every pair weight, is that of Eq. 7.
  np.testing.assert_array_equal(graded[~different], plain[~different])
  np.testing.assert_array_equal(graded_weight, plain_weight)
  # Same-class pairs stay above every cross-cluster pair.
  same = (LABELS[:, None] == LABELS[None, :]) & labelled[:, None]
  assert graded[same].min() >= 0.5 > ceiling >= graded[different].max()


def test_cross_cluster_ceiling_needs_affinity_and_a_value_below_the_floor():
  with pytest.raises(UserError, match="cluster_affinity"):
    target_similarity(_soft_sim(), LABELS, cross_cluster_ceiling=0.0)
  with pytest.raises(UserError, match="same_class_floor"):
    target_similarity(_soft_sim(), LABELS, cross_cluster_ceiling=0.5,
                      cluster_affinity=_affinity())


def test_fine_labels_nest_the_targets_of_eq7c():
  lam, mu, ceiling, sibling = 0.5, 0.1, 0.0, 0.2
  soft_sim, affinity = _soft_sim(), _affinity()
  # Fine clusters split the coarse ones; -1 marks images rejected at that level.
  fine = np.where(LABELS >= 0, 2 * LABELS + np.arange(len(LABELS)) % 2, -1)
  fine[0] = -1 if LABELS[0] >= 0 else 0
  kwargs = dict(same_class_floor=lam, unlabelled_weight=mu,
                cross_cluster_ceiling=ceiling, cluster_affinity=affinity)
  target, weight = target_similarity(soft_sim, LABELS, fine_labels=fine,
                                     sibling_target=sibling, **kwargs)
  one_level, one_level_weight = target_similarity(soft_sim, LABELS, **kwargs)
  target, weight = np.asarray(target), np.asarray(weight)
  labelled, fine_labelled = LABELS >= 0, fine >= 0
  same_fine = (fine[:, None] == fine[None, :]) & fine_labelled[:, None]
  same_class = (LABELS[:, None] == LABELS[None, :]) & labelled[:, None]
  siblings = same_class & ~same_fine
  off_diagonal = ~np.eye(len(LABELS), dtype=bool)
  assert (same_fine & off_diagonal).any() and siblings.any()
  np.testing.assert_allclose(target[same_fine], lam + (1 - lam) * soft_sim[same_fine],
                             rtol=1e-6)
  np.testing.assert_array_equal(target[siblings], np.float32(sibling))
  rest = ~same_fine & ~same_class
  np.testing.assert_array_equal(target[rest], np.asarray(one_level)[rest])
  np.testing.assert_array_equal(weight[same_fine & off_diagonal], 1.0)
  np.testing.assert_array_equal(weight[~same_fine], np.asarray(one_level_weight)[~same_fine])
  both = labelled[:, None] & labelled[None, :]
  assert (target[same_fine].min() >= lam > sibling
          > target[both & ~same_class].max())


def test_fine_labels_need_a_sibling_target_below_the_floor_and_hard_mode_ignores_them():
  fine = np.arange(len(LABELS))
  with pytest.raises(UserError, match="sibling_target=0.6"):
    target_similarity(_soft_sim(), LABELS, fine_labels=fine, sibling_target=0.6)
  with pytest.raises(UserError, match=r"shape \(7,\)"):
    target_similarity(_soft_sim(), LABELS, fine_labels=fine[:3])
  hard = [np.asarray(m) for m in target_similarity(_soft_sim(), LABELS, hard=True)]
  hard_fine = [np.asarray(m) for m in target_similarity(
      _soft_sim(), LABELS, fine_labels=fine, hard=True)]
  for one_level, two_levels in zip(hard, hard_fine):
    np.testing.assert_array_equal(one_level, two_levels)


def test_pixel_similarity_is_the_cosine_of_non_negative_pixels():
  rng = np.random.default_rng(11)
  pixels = rng.uniform(size=(6, 20)).astype(np.float32)
  pixels[2] = 0.0
  pixels[2, :3] = 1.0
  unit = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
  similarity = np.asarray(pixel_similarity(jnp.asarray(unit)))
  np.testing.assert_allclose(similarity, unit @ unit.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-6)
  assert similarity.min() >= 0.0 and similarity.max() <= 1.0 + 1e-6
  # Signed features (not pixels) are clipped at 0, the floor of Eq. 7's scale.
  signed = np.asarray(pixel_similarity(jnp.asarray([[1.0, 0.0], [-1.0, 0.0]])))
  np.testing.assert_array_equal(signed, [[1.0, 0.0], [0.0, 1.0]])
