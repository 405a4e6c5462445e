"""Spectral embedding of a k-nearest-neighbour graph: features for pseudo labels.

docs/method.md, section 1, `pseudo_labels.features = "spectral"` (Eq. 1a). Raw pixels
measure similarity in a straight line; images of one class lie on a curved manifold
(a sandal is close to a sneaker, a sneaker to an ankle boot). A k-NN graph follows
the manifold, and the leading eigenvectors of its normalised adjacency embed it so
that k-means separates connected regions instead of straight-line balls (the
normalised spectral clustering of Ng, Jordan and Weiss, 2002).

`knn_graph` finds the neighbours in row chunks (JAX), so memory is O(chunk x N),
never N x N. `normalised_adjacency` turns the (N, k) neighbour lists into a sparse
matrix of at most 2 N k entries, and `graph_embedding` finds its top eigenvectors with
ARPACK (`scipy.sparse.linalg.eigsh`, implicitly restarted Lanczos, float64, on the
host): the eigenvalue gaps near 1 of a large graph are small, where a fixed number
of float32 LOBPCG iterations stops far from the eigenvectors (docs/benchmarks.md,
"Scaling", has the comparison). Every
embedding's residuals ||M v - lambda v|| are checked; above the tolerance the run
stops with `EmbeddingNotConverged` instead of clustering a wrong subspace.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse
import scipy.sparse.linalg

from psch_jax.errors import UserError

# ARPACK's stopping tolerance (relative to each |eigenvalue|, here near 1).
EIGEN_TOLERANCE = 1e-6
# Largest accepted residual ||M v - lambda v|| of a unit eigenvector. ARPACK at
# EIGEN_TOLERANCE gives < 1e-6 on Fashion-MNIST at 5,000 and 60,000 images; the
# unconverged LOBPCG this replaced had residuals of ~1e-2 (docs/benchmarks.md).
RESIDUAL_TOLERANCE = 1e-4


class EmbeddingNotConverged(UserError):
  """The eigenvectors of Eq. 1a are not accurate enough to cluster."""


@dataclasses.dataclass(frozen=True)
class SpectralEmbedding:
  """The spectral embedding of Eq. 1a and how accurate its eigenvectors are.

  Attributes:
    embedding: (N, d) float32 rows of the top d eigenvectors, L2-normalised.
    eigenvalues: (d,) float64 eigenvalues of D^-1/2 W D^-1/2, largest first.
    residuals: (d,) float64 ||M v - lambda v|| of each unit eigenvector v.
  """
  embedding: np.ndarray
  eigenvalues: np.ndarray
  residuals: np.ndarray

  def stats(self) -> dict:
    """JSON-able summary, for the pseudo-label statistics in metrics.jsonl."""
    return {"eigenvalues": [float(v) for v in self.eigenvalues.round(6)],
            "eigen_residuals": [float(f"{r:.3g}") for r in self.residuals],
            "max_eigen_residual": float(np.max(self.residuals)),
            "residual_tolerance": RESIDUAL_TOLERANCE}


def _unit_rows(features):
  norms = jnp.linalg.norm(features, axis=1, keepdims=True)
  return features / jnp.maximum(norms, 1e-12)


@functools.partial(jax.jit, static_argnames=("num_neighbors", "chunk_size"))
def knn_graph(features: jax.Array, *, num_neighbors: int,
              chunk_size: int = 512) -> jax.Array:
  """The `num_neighbors` most cosine-similar other rows of each row.

  Args:
    features: (N, D) float features.
    num_neighbors: k, in [1, N - 1].
    chunk_size: rows whose (chunk, N) similarities are held at a time.

  Returns:
    (N, k) int32 neighbour indices, most similar first; a row is never its own
    neighbour (even with duplicate rows); ties go to the lower index.
  """
  unit = _unit_rows(features.astype(jnp.float32))
  num = unit.shape[0]
  num_chunks = -(-num // chunk_size)
  padded = jnp.pad(unit, ((0, num_chunks * chunk_size - num), (0, 0)))

  def neighbours(chunk_index):
    rows = chunk_index * chunk_size + jnp.arange(chunk_size)
    block = jax.lax.dynamic_slice_in_dim(padded, chunk_index * chunk_size, chunk_size)
    similarity = jnp.matmul(block, unit.T, precision=jax.lax.Precision.HIGHEST)
    similarity = jnp.where(rows[:, None] == jnp.arange(num)[None, :], -jnp.inf,
                           similarity)
    return jax.lax.top_k(similarity, num_neighbors)[1]

  indices = jax.lax.map(neighbours, jnp.arange(num_chunks))
  return indices.reshape(-1, num_neighbors)[:num].astype(jnp.int32)


def normalised_adjacency(neighbors: np.ndarray) -> scipy.sparse.csr_matrix:
  """M = D^-1/2 W D^-1/2 for W = (A + A^T) / 2, A the k-NN connectivity (Eq. 1a).

  Args:
    neighbors: (N, k) int neighbour indices (`knn_graph`), no row its own neighbour.

  Returns:
    (N, N) float64 symmetric CSR matrix with at most 2 N k stored entries (memory
    O(N k)); W_ij is 1 for mutual neighbours and 1/2 for one-sided ones, and every
    degree is at least k / 2, so D^-1/2 is finite. Its eigenvalues lie in [-1, 1].
  """
  neighbors = np.asarray(neighbors)
  num, k = neighbors.shape
  rows = np.repeat(np.arange(num, dtype=np.int64), k)
  connectivity = scipy.sparse.csr_matrix(
      (np.ones(num * k), (rows, neighbors.reshape(-1).astype(np.int64))),
      shape=(num, num))
  weights = (0.5 * (connectivity + connectivity.T)).tocsr()
  inv_sqrt_degree = 1.0 / np.sqrt(np.asarray(weights.sum(axis=1)).ravel())
  scale = scipy.sparse.diags(inv_sqrt_degree)
  return (scale @ weights @ scale).tocsr()


def eigen_residuals(matrix, vectors: np.ndarray, eigenvalues: np.ndarray) -> np.ndarray:
  """||M v_j - lambda_j v_j||_2 per column; (N, d) vectors, (d,) eigenvalues -> (d,)."""
  vectors = np.asarray(vectors, np.float64)
  return np.linalg.norm(matrix @ vectors - vectors * np.asarray(eigenvalues), axis=0)


def graph_embedding(key: jax.Array, neighbors: np.ndarray, *, num_components: int,
                    tol: float = EIGEN_TOLERANCE,
                    residual_tolerance: float = RESIDUAL_TOLERANCE
                    ) -> SpectralEmbedding:
  """Eq. 1a on a given k-NN graph: the top eigenvectors of its normalised adjacency.

  ARPACK (`eigsh`, which="LA") from the starting vector v0 ~ N(0, I) drawn from
  `key`, so a key gives bitwise the same embedding run to run on one machine.

  Args:
    key: PRNG key of ARPACK's starting vector.
    neighbors: (N, k) int neighbour indices (`knn_graph`).
    num_components: d, in [1, N - 2].
    tol: ARPACK's relative stopping tolerance.
    residual_tolerance: largest accepted residual of a unit eigenvector.

  Returns:
    SpectralEmbedding: rows L2-normalised (Ng, Jordan and Weiss), eigenvalues
    largest first, and the residuals.

  Raises:
    EmbeddingNotConverged (a UserError): ARPACK did not converge, or a residual
      exceeds `residual_tolerance`.
  """
  matrix = normalised_adjacency(neighbors)
  num = matrix.shape[0]
  start = np.asarray(jax.random.normal(key, (num,), jnp.float32), np.float64)
  try:
    eigenvalues, vectors = scipy.sparse.linalg.eigsh(
        matrix, k=num_components, which="LA", tol=tol, v0=start)
  except scipy.sparse.linalg.ArpackNoConvergence as error:
    raise EmbeddingNotConverged(
        f"the spectral embedding (Eq. 1a) of {num} images did not converge: ARPACK "
        f"found {len(error.eigenvalues)} of {num_components} eigenvectors. "
        + _fix(num_components)) from error
  order = np.argsort(-eigenvalues, kind="stable")
  eigenvalues, vectors = eigenvalues[order], vectors[:, order]
  residuals = eigen_residuals(matrix, vectors, eigenvalues)
  if not np.all(residuals <= residual_tolerance):  # also catches NaN
    raise EmbeddingNotConverged(
        f"the spectral embedding (Eq. 1a) of {num} images is not converged: the "
        f"largest eigenpair residual ||M v - lambda v|| is {np.max(residuals):.3g}, "
        f"above the tolerance {residual_tolerance:g} (residuals "
        f"{np.array2string(residuals, precision=2)}). " + _fix(num_components))
  embedding = np.asarray(_unit_rows(jnp.asarray(vectors, jnp.float32)))
  return SpectralEmbedding(embedding=embedding, eigenvalues=eigenvalues,
                           residuals=residuals)


def _fix(num_components: int) -> str:
  return (f"Use fewer components (pseudo_labels.spectral_components, now "
          f"{num_components}), a better connected graph (raise "
          "pseudo_labels.spectral_neighbors), or pseudo_labels.features='pixels'.")
