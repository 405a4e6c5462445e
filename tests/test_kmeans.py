"""Tests for psch_jax.kmeans: quality, determinism, sharding, chunking, empty clusters.

Most tests share one static configuration (N, D, K, n_init, chunk size) so the
k-means program compiles a handful of times for the whole file.
"""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from psch_jax import kmeans as kmeans_lib
from psch_jax.errors import UserError
from psch_jax.kmeans import assign, kmeans

NUM_POINTS = 203  # Not divisible by 4 devices nor by CHUNK.
DIM = 8
NUM_CLUSTERS = 5
N_INIT = 3
CHUNK = 32


def _fit(points, key=0, **kwargs):
  kwargs = {"num_clusters": NUM_CLUSTERS, "n_init": N_INIT, "chunk_size": CHUNK,
            **kwargs}
  return jax.tree.map(np.asarray, kmeans(jax.random.key(key), points, **kwargs))


def _random_points(seed=0, num_points=NUM_POINTS):
  return np.random.default_rng(seed).normal(size=(num_points, DIM)).astype(np.float32)


def _blobs(seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(scale=10.0, size=(NUM_CLUSTERS, DIM))
  truth = np.arange(NUM_POINTS) % NUM_CLUSTERS
  points = centers[truth] + rng.normal(scale=0.3, size=(NUM_POINTS, DIM))
  return points.astype(np.float32), truth


def _mesh(devices):
  return Mesh(np.array(devices), ("data",))


def test_recovers_well_separated_blobs_and_reports_consistent_distances():
  points, truth = _blobs()
  result = _fit(points)
  assert adjusted_rand_score(truth, result.assignments) == 1.0
  assert result.assignments.dtype == np.int32
  assert result.assignments.shape == truth.shape
  assert result.centroids.shape == (NUM_CLUSTERS, DIM)
  expected = np.linalg.norm(points - result.centroids[result.assignments], axis=1)
  np.testing.assert_allclose(result.distances, expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(result.inertia, np.sum(expected**2), rtol=1e-4)
  assert 1 <= result.num_iterations <= 100


def test_inertia_within_one_percent_of_sklearn():
  points = _random_points(seed=1)
  ours = _fit(points, key=1)
  reference = KMeans(NUM_CLUSTERS, n_init=N_INIT, algorithm="lloyd",
                     random_state=1).fit(points)
  assert ours.inertia <= 1.01 * reference.inertia_
  # Each point sits at its nearest returned centroid (Lloyd's fixed point).
  sq = ((points[:, None, :] - ours.centroids[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(ours.assignments, sq.argmin(1))


def test_same_key_same_result_and_keys_matter():
  points = _random_points(seed=2)
  first, again = _fit(points, key=7), _fit(points, key=7)
  for name in ("centroids", "assignments", "distances", "inertia", "num_iterations"):
    np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
  others = [_fit(points, key=k) for k in (8, 9, 10)]
  assert any(not np.array_equal(first.centroids, other.centroids) for other in others)


@pytest.mark.slow
def test_four_devices_match_one_device():
  assert len(jax.devices()) == 4, "tests/conftest.py should give 4 CPU devices"
  points = _random_points(seed=3)
  one = _fit(points, key=3, mesh=_mesh(jax.devices()[:1]))
  four = _fit(points, key=3, mesh=_mesh(jax.devices()))
  np.testing.assert_allclose(four.centroids, one.centroids, atol=1e-5)
  np.testing.assert_array_equal(four.assignments, one.assignments)
  np.testing.assert_allclose(four.inertia, one.inertia, rtol=1e-5)
  assert four.num_iterations == one.num_iterations


def test_chunking_matches_one_chunk():
  points = _random_points(seed=4)
  chunked = _fit(points, key=4)
  whole = _fit(points, key=4, chunk_size=4096)
  np.testing.assert_allclose(chunked.centroids, whole.centroids, atol=1e-5)
  np.testing.assert_array_equal(chunked.assignments, whole.assignments)


def _numpy_lloyd(points, centroids, iterations):
  """Plain float64 Lloyd: (assignments, centroids) after `iterations` updates."""
  points, centroids = points.astype(np.float64), centroids.astype(np.float64)
  for _ in range(iterations):
    assignments = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(assignments, minlength=len(centroids))
    assert np.all(counts > 0), "the reference has no empty-cluster rule"
    centroids = np.stack([points[assignments == k].mean(0)
                          for k in range(len(centroids))])
  assignments = ((points[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
  return assignments, centroids


@pytest.mark.slow
def test_many_clusters_scatter_sums_match_numpy_lloyd_on_one_and_four_devices():
  num_clusters = 40  # Above the one-hot limit: sums by segment_sum on CPU.
  one_device, four_devices = _mesh(jax.devices()[:1]), _mesh(jax.devices())
  assert kmeans_lib.sums_by_scatter(one_device, num_clusters)
  rng = np.random.default_rng(11)
  centers = rng.normal(scale=3.0, size=(num_clusters, DIM))
  points = (centers[rng.integers(0, num_clusters, 997)]
            + rng.normal(size=(997, DIM))).astype(np.float32)
  init = points[rng.choice(len(points), num_clusters, replace=False)]
  expected_assignments, expected_centroids = _numpy_lloyd(points, init, 10)
  for mesh in (one_device, four_devices):
    result = jax.tree.map(np.asarray, kmeans(
        jax.random.key(0), points, num_clusters=num_clusters, max_iter=10, tol=0.0,
        init_centroids=init, chunk_size=32, mesh=mesh))
    # Fewer when the centroids stop moving (shift 0), after which Lloyd is a no-op.
    assert 1 <= result.num_iterations <= 10
    np.testing.assert_array_equal(result.assignments, expected_assignments)
    np.testing.assert_allclose(result.centroids, expected_centroids, atol=1e-5)
    expected_sq = ((points - expected_centroids[expected_assignments]) ** 2).sum(-1)
    np.testing.assert_allclose(result.distances ** 2, expected_sq, rtol=1e-4,
                               atol=1e-4)


def test_empty_cluster_is_reseeded_with_farthest_point():
  rng = np.random.default_rng(5)
  near = rng.normal(scale=0.1, size=(20, 2))
  far = rng.normal(scale=0.1, size=(20, 2)) + 5.0
  points = np.concatenate([near, far]).astype(np.float32)
  # The second start is so far away that no point picks it: an empty cluster at once.
  init = np.array([[2.5, 2.5], [1e3, 1e3]], np.float32)
  result = jax.tree.map(np.asarray, kmeans(
      jax.random.key(0), points, num_clusters=2, init_centroids=init, chunk_size=16))
  np.testing.assert_array_equal(np.bincount(result.assignments), [20, 20])
  np.testing.assert_allclose(np.sort(result.centroids[:, 0]),
                             [near[:, 0].mean(), far[:, 0].mean()], atol=1e-5)


def test_duplicate_points_and_as_many_clusters_as_points():
  rng = np.random.default_rng(6)
  distinct = rng.normal(size=(4, DIM)).astype(np.float32)
  duplicated = np.repeat(distinct, 3, axis=0)  # 12 points, 4 distinct.
  result = _fit(duplicated, num_clusters=12, chunk_size=5)
  assert np.all(np.isfinite(result.centroids))
  np.testing.assert_allclose(result.distances, 0.0, atol=1e-6)
  np.testing.assert_allclose(result.centroids[result.assignments], duplicated,
                             atol=1e-5)

  points = rng.normal(size=(12, DIM)).astype(np.float32)
  result = _fit(points, num_clusters=12, chunk_size=5)
  assert sorted(result.assignments.tolist()) == list(range(12))
  np.testing.assert_allclose(result.inertia, 0.0, atol=1e-10)


def test_assign_matches_brute_force():
  points = _random_points(seed=7, num_points=50)
  centroids = _random_points(seed=8, num_points=6)
  assignments, sq_distances = jax.tree.map(
      np.asarray, assign(points, centroids, chunk_size=16, mesh=_mesh(jax.devices())))
  sq = ((points[:, None, :] - centroids[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(assignments, sq.argmin(1))
  np.testing.assert_allclose(sq_distances, sq.min(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("points, kwargs", [
    (np.zeros((5, 2)), {"num_clusters": 0}),
    (np.zeros((5, 2)), {"num_clusters": 6}),
    (np.zeros(5), {"num_clusters": 2}),
    (np.array([[0.0, 1.0], [np.nan, 0.0]]), {"num_clusters": 1}),
    (np.zeros((5, 2)), {"num_clusters": 2, "n_init": 0}),
    (np.zeros((5, 2)), {"num_clusters": 2, "tol": -1.0}),
    (np.zeros((5, 2)),
     {"num_clusters": 2, "mesh": Mesh(np.array(jax.devices()), ("x",))}),
    (np.zeros((5, 2)),
     {"num_clusters": 2, "n_init": 2, "init_centroids": np.zeros((2, 2))}),
    (np.zeros((5, 2)), {"num_clusters": 2, "init_centroids": np.zeros((3, 2))}),
])
def test_bad_arguments_raise_user_error(points, kwargs):
  with pytest.raises(UserError):
    kmeans(jax.random.key(0), points, **kwargs)
