"""k-NN graph and spectral embedding (psch_jax/spectral.py, Eq. 1a)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psch_jax import kmeans as kmeans_lib
from psch_jax import spectral
from psch_jax.errors import UserError


def _rings(num_per_ring: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Two concentric noisy rings in 2-D, shifted so that cosines still separate them
  only along the manifold: k-means on the coordinates cuts both rings in half."""
  rng = np.random.default_rng(seed)
  angles = rng.uniform(0, 2 * np.pi, size=2 * num_per_ring)
  radius = np.repeat([1.0, 3.0], num_per_ring) + rng.normal(0, 0.05, 2 * num_per_ring)
  points = np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)
  # A constant third coordinate turns Euclidean geometry into cosine geometry
  # without merging the rings.
  points = np.concatenate([points, np.full((2 * num_per_ring, 1), 8.0)], axis=1)
  return points.astype(np.float32), np.repeat([0, 1], num_per_ring)


def _agreement(assignments: np.ndarray, truth: np.ndarray) -> float:
  same = np.mean(assignments == truth)
  return max(same, 1.0 - same)


def test_knn_graph_matches_brute_force_with_chunks_and_duplicates():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(37, 6)).astype(np.float32)
  features[5] = features[4]  # a duplicate row must not count as its own neighbour
  neighbors = np.asarray(spectral.knn_graph(jnp.asarray(features), num_neighbors=4,
                                            chunk_size=8))
  unit = features / np.linalg.norm(features, axis=1, keepdims=True)
  cosine = unit @ unit.T
  np.fill_diagonal(cosine, -np.inf)
  for row in range(len(features)):
    expected = np.argsort(-cosine[row], kind="stable")[:4]
    np.testing.assert_allclose(cosine[row, neighbors[row]], cosine[row, expected],
                               atol=1e-6)
  assert neighbors.dtype == np.int32 and neighbors.shape == (37, 4)
  assert not np.any(neighbors == np.arange(37)[:, None])
  assert neighbors[4, 0] == 5 and neighbors[5, 0] == 4


def _blobs() -> np.ndarray:
  rng = np.random.default_rng(0)
  centers = np.array([[0, 0, 5], [3, 0, 5], [0, 4, 5]], np.float64)
  return np.concatenate([rng.normal(c, s, (m, 3)) for c, m, s in
                         zip(centers, (40, 70, 100), (0.6, 0.9, 1.2))]).astype(np.float32)


def test_embedding_spans_the_leading_eigenvectors_of_the_normalised_adjacency():
  points, num_components, k = _blobs(), 3, 8
  embedding = np.asarray(spectral.spectral_embedding(
      jax.random.key(0), jnp.asarray(points), num_components=num_components,
      num_neighbors=k))
  neighbors = np.asarray(spectral.knn_graph(jnp.asarray(points), num_neighbors=k))
  adjacency = np.zeros((len(points),) * 2)
  adjacency[np.repeat(np.arange(len(points)), k), neighbors.reshape(-1)] = 1.0
  weights = 0.5 * (adjacency + adjacency.T)
  inv_sqrt_degree = 1.0 / np.sqrt(weights.sum(1))
  normalised = inv_sqrt_degree[:, None] * weights * inv_sqrt_degree[None, :]
  _, vectors = np.linalg.eigh(normalised)
  leading = vectors[:, ::-1][:, :num_components]
  leading /= np.linalg.norm(leading, axis=1, keepdims=True)
  # Same rows up to a rotation of the embedding: equal Gram matrices. The float32
  # LOBPCG stops at a residual of about n x eps; with eigenvalue gaps near 0.006
  # that leaves errors near 0.01 (a wrong subspace differs by O(1)).
  np.testing.assert_allclose(embedding @ embedding.T, leading @ leading.T, atol=0.03)
  np.testing.assert_allclose(np.linalg.norm(embedding, axis=1), 1.0, atol=1e-5)


def test_kmeans_on_the_embedding_separates_what_kmeans_on_the_points_cannot():
  points, truth = _rings(100)
  key = jax.random.key(3)
  raw = kmeans_lib.kmeans(key, jnp.asarray(points), num_clusters=2, normalize=True)
  embedding = spectral.spectral_embedding(key, jnp.asarray(points), num_components=2,
                                          num_neighbors=5)
  embedded = kmeans_lib.kmeans(key, embedding, num_clusters=2, normalize=True)
  assert _agreement(np.asarray(raw.assignments), truth) < 0.8
  assert _agreement(np.asarray(embedded.assignments), truth) == 1.0


def test_embedding_is_deterministic_for_a_key():
  points, _ = _rings(50)
  first, second = (np.asarray(spectral.spectral_embedding(
      jax.random.key(7), jnp.asarray(points), num_components=3)) for _ in range(2))
  np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("kwargs,message", [
    ({"num_neighbors": 0, "num_components": 3}, "spectral_neighbors"),
    ({"num_neighbors": 100, "num_components": 3}, "spectral_neighbors"),
    ({"num_neighbors": 10, "num_components": 0}, "spectral_components"),
    ({"num_neighbors": 10, "num_components": 20}, "spectral_components"),
])
def test_bad_graph_or_embedding_sizes_raise_user_error(kwargs, message):
  with pytest.raises(UserError, match=message):
    spectral.check_arguments(100, **kwargs)
