"""Tests for psch_jax.pseudo_labels: the distance threshold (Eq. 2), stats, purity."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from psch_jax import pseudo_labels as pseudo_labels_lib
from psch_jax.errors import UserError
from psch_jax.pseudo_labels import (cluster_affinity, purity, pseudo_labels,
                                    threshold_labels)

NUM_POINTS = 203
DIM = 8
NUM_CLUSTERS = 5
# Every call shares one static k-means configuration, on the 8-device data path.
MESH = Mesh(np.array(jax.devices()), ("data",))


def _features(seed=0, num_points=NUM_POINTS):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(NUM_CLUSTERS, DIM))
  points = centers[np.arange(num_points) % NUM_CLUSTERS]
  return (points + rng.normal(scale=0.7, size=(num_points, DIM))).astype(np.float32)


def _label(features, **kwargs):
  labels, stats = pseudo_labels(
      jax.random.key(0), features, num_clusters=NUM_CLUSTERS, n_init=2,
      chunk_size=16, mesh=MESH, **kwargs)
  return np.asarray(labels), jax.tree.map(np.asarray, stats)


def _assignments_and_distances(features, centroids):
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  sq = ((unit[:, None, :] - centroids[None]) ** 2).sum(-1)
  return sq.argmin(1), np.sqrt(sq.min(1))


@pytest.mark.parametrize("keep_quantile", [0.7, 0.35])
def test_keeps_the_quantile_closest_to_each_centroid(keep_quantile):
  features = _features()
  labels, stats = _label(features, keep_quantile=keep_quantile)
  assignments, distances = _assignments_and_distances(features, stats.centroids)
  assert labels.dtype == np.int32 and labels.shape == (NUM_POINTS,)
  for cluster in range(NUM_CLUSTERS):
    members = assignments == cluster
    size = int(members.sum())
    kept = members & (labels == cluster)
    assert stats.cluster_sizes[cluster] == size
    assert abs(int(kept.sum()) - math.ceil(keep_quantile * size)) <= 1
    assert stats.kept_counts[cluster] == kept.sum()
    # The kept ones are the closest ones (Eq. 2).
    rejected = members & (labels == -1)
    if rejected.any():
      assert distances[kept].max() <= distances[rejected].min() + 1e-5
  assert np.all((labels == -1) | (labels == assignments))
  np.testing.assert_allclose(stats.kept_fraction, np.mean(labels >= 0), rtol=1e-6)
  np.testing.assert_allclose(stats.kept_fraction_per_cluster,
                             stats.kept_counts / stats.cluster_sizes, rtol=1e-6)


def test_keep_quantile_one_keeps_everything():
  features = _features()
  labels, stats = _label(features, keep_quantile=1.0)
  assignments, _ = _assignments_and_distances(features, stats.centroids)
  np.testing.assert_array_equal(labels, assignments)
  assert stats.kept_fraction == 1.0


def test_absolute_threshold_overrides_quantile():
  features = _features()
  threshold = 0.5
  labels, stats = _label(features, absolute_threshold=threshold)
  assignments, distances = _assignments_and_distances(features, stats.centroids)
  expected = np.where(distances <= threshold, assignments, -1)
  near_threshold = np.abs(distances - threshold) < 1e-5
  np.testing.assert_array_equal(labels[~near_threshold], expected[~near_threshold])
  np.testing.assert_array_equal(stats.thresholds, np.full(NUM_CLUSTERS, threshold))
  assert 0.0 < stats.kept_fraction < 1.0


def test_features_are_l2_normalised_first():
  features = _features()
  scales = np.random.default_rng(1).uniform(0.1, 10.0, size=(NUM_POINTS, 1))
  labels, stats = _label(features)
  scaled_labels, scaled_stats = _label((features * scales).astype(np.float32))
  np.testing.assert_array_equal(scaled_labels, labels)
  np.testing.assert_allclose(scaled_stats.centroids, stats.centroids, atol=1e-5)
  # Means of unit vectors; the raw features have norms near 3.
  assert np.all(np.linalg.norm(stats.centroids, axis=1) <= 1.0 + 1e-5)


def test_threshold_labels_counts_per_cluster():
  assignments = np.array([0] * 10 + [1] * 3 + [2] * 1, np.int32)
  distances = np.concatenate([np.arange(10.0), [5.0, 1.0, 3.0], [2.0]])
  labels, thresholds = threshold_labels(assignments, distances, num_clusters=4,
                                        keep_quantile=0.7)
  # ceil(0.7 * 10) = 7, ceil(0.7 * 3) = 3, ceil(0.7 * 1) = 1; cluster 3 is empty.
  np.testing.assert_array_equal(thresholds, [6.0, 5.0, 2.0, np.inf])
  np.testing.assert_array_equal(labels, [0] * 7 + [-1] * 3 + [1] * 3 + [2])
  labels, _ = threshold_labels(assignments, distances, num_clusters=4,
                               keep_quantile=0.5)
  np.testing.assert_array_equal(labels[:13], [0] * 5 + [-1] * 5 + [-1, 1, 1])


def test_purity_single_and_multi_label():
  pseudo = np.array([0, 0, 0, 1, 1, -1])
  one_hot = np.eye(3, dtype=np.uint8)[[2, 2, 1, 0, 0, 1]]
  # Cluster 0: majority class 2, 2 of 3 pure; cluster 1: 2 of 2; -1 is ignored.
  np.testing.assert_allclose(purity(pseudo, one_hot), 4 / 5, rtol=1e-6)
  multi_hot = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 1], [0, 0, 1], [0, 1, 1],
                        [1, 1, 1]], np.uint8)
  # Cluster 0: label 0 and 1 tie at 2, the lower (0) wins, rows 0 and 2 have it;
  # cluster 1: label 2 (2 votes), both have it.
  np.testing.assert_allclose(purity(pseudo, multi_hot), 4 / 5, rtol=1e-6)
  assert np.isnan(purity(np.full(4, -1), one_hot[:4]))


@pytest.mark.parametrize("kwargs", [
    {"num_clusters": 0},
    {"num_clusters": 11},
    {"num_clusters": 2, "keep_quantile": 0.0},
    {"num_clusters": 2, "keep_quantile": 1.5},
    {"num_clusters": 2, "absolute_threshold": -1.0},
])
def test_bad_arguments_raise_user_error(kwargs):
  with pytest.raises(UserError):
    pseudo_labels(jax.random.key(0), np.ones((10, 3), np.float32), **kwargs)


def test_nan_features_and_bad_label_shapes_raise_user_error():
  features = np.ones((10, 3), np.float32)
  features[4, 1] = np.nan
  with pytest.raises(UserError):
    pseudo_labels(jax.random.key(0), features, num_clusters=2)
  with pytest.raises(UserError):
    purity(np.zeros(4, np.int32), np.zeros(4, np.uint8))


def test_cluster_affinity_ranks_cluster_pairs_by_centroid_cosine_in_unit_range():
  centroids = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.1]], np.float32)
  affinity = np.asarray(cluster_affinity(jnp.asarray(centroids)))
  unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
  cosine = unit @ unit.T
  off = ~np.eye(4, dtype=bool)
  expected = (cosine - cosine[off].min()) / (cosine[off].max() - cosine[off].min())
  np.testing.assert_allclose(affinity[off], expected[off], atol=1e-6)
  np.testing.assert_array_equal(np.diag(affinity), 1.0)
  np.testing.assert_allclose(affinity, affinity.T)
  assert affinity[0, 1] == pytest.approx(1.0) and affinity[off].min() == 0.0


def test_cluster_affinity_without_spread_is_zero_off_the_diagonal():
  affinity = np.asarray(cluster_affinity(jnp.asarray([[1.0, 0.0], [0.0, 1.0]])))
  np.testing.assert_array_equal(affinity, np.eye(2))


# Enough samples per cluster for the degeneracy checks to run.
NUM_CHECKED = pseudo_labels_lib.MIN_SAMPLES_PER_CLUSTER_TO_CHECK * NUM_CLUSTERS


def test_sanity_statistics_of_a_clustered_labelling():
  features = _features(num_points=NUM_CHECKED)
  _, stats = _label(features)
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  expected_variance = np.sum((unit - unit.mean(0)) ** 2)
  np.testing.assert_allclose(stats.total_variance, expected_variance, rtol=1e-5)
  sanity = stats.sanity()
  assert sanity["inertia_ratio"] == pytest.approx(stats.inertia / expected_variance,
                                                  rel=1e-5)
  assert sanity["largest_cluster_fraction"] == pytest.approx(
      stats.cluster_sizes.max() / NUM_CHECKED)
  # Overlapping clusters (noise 0.7 around centres ~1 apart): clearly below the
  # noise of the same shape (8-D, K = 5), whose ratio is about 0.7.
  assert 0.5 < sanity["noise_inertia_ratio"] < 0.9
  assert sanity["inertia_ratio"] < 0.75 * sanity["noise_inertia_ratio"]
  json.dumps(sanity)  # logged in metrics.jsonl


@pytest.mark.slow
def test_noise_reference_ratio_grows_with_the_dimension():
  ratios = [pseudo_labels_lib.noise_inertia_ratio(500, dim, 5) for dim in (3, 10, 100)]
  assert 0.0 < ratios[0] < ratios[1] < ratios[2] < 1.0
  assert pseudo_labels_lib.noise_inertia_ratio(500, 10, 1) == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("dim", [10, 64])
def test_features_without_structure_are_degenerate(dim):
  noise = np.random.default_rng(dim).normal(size=(NUM_CHECKED, dim)).astype(np.float32)
  with pytest.raises(pseudo_labels_lib.DegenerateLabels,
                     match="no better than Gaussian noise.*pseudo_labels.features"):
    _label(noise)
  _, stats = _label(noise, check=False)  # the check can be skipped, and says so
  assert stats.sanity()["noise_inertia_ratio"] is None
  # Below 50 samples per cluster nothing is checked (the tests' smoke configs).
  _, stats = _label(noise[:NUM_CHECKED - 1])
  assert stats.sanity()["noise_inertia_ratio"] is None


def test_one_cluster_holding_most_images_is_degenerate():
  features = np.repeat(_features()[:1], NUM_CHECKED, axis=0)
  features[:50] = _features(seed=1)[:50]  # 200 of 250 images are one point
  with pytest.raises(pseudo_labels_lib.DegenerateLabels, match="holds 0.8"):
    _label(features)
  assert issubclass(pseudo_labels_lib.DegenerateLabels, UserError)  # exit code 2


def test_largest_cluster_limit_relaxes_only_for_few_clusters():
  assert [pseudo_labels_lib.max_cluster_fraction(k) for k in (1, 2, 4, 10, 50)] == [
      2.0, 1.0, 0.5, 0.5, 0.5]
