"""Spectral embedding of a k-nearest-neighbour graph: features for pseudo labels.

docs/method.md, section 1, `pseudo_labels.features = "spectral"` (Eq. 1a). Raw pixels
measure similarity in a straight line; images of one class lie on a curved manifold
(a sandal is close to a sneaker, a sneaker to an ankle boot). A k-NN graph follows
the manifold, and the leading eigenvectors of its normalised adjacency embed it so
that k-means separates connected regions instead of straight-line balls (the
normalised spectral clustering of Ng, Jordan and Weiss, 2002).

`knn_graph` finds the neighbours in row chunks, so memory is O(chunk x N), never
N x N; `spectral_embedding` needs only the (N, k) neighbour lists: the matrix is
applied as gathers and scatter-adds inside LOBPCG.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.sparse import linalg as sparse_linalg

from psch_jax.errors import UserError


def _unit_rows(features: jax.Array) -> jax.Array:
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


def _normalised_adjacency(neighbors: jax.Array):
  """x -> D^-1/2 W D^-1/2 x for W = (A + A^T) / 2, A the k-NN connectivity."""
  num, k = neighbors.shape
  rows = jnp.repeat(jnp.arange(num), k)
  cols = neighbors.reshape(-1)
  in_degree = jnp.zeros(num, jnp.float32).at[cols].add(1.0)
  inv_sqrt_degree = jax.lax.rsqrt(0.5 * (k + in_degree))

  def apply(x):  # x: (N, m)
    scaled = x * inv_sqrt_degree[:, None]
    outgoing = jnp.sum(scaled[neighbors], axis=1)                 # A x
    incoming = jnp.zeros_like(scaled).at[cols].add(scaled[rows])  # A^T x
    return 0.5 * (outgoing + incoming) * inv_sqrt_degree[:, None]

  return apply, inv_sqrt_degree


@functools.partial(jax.jit, static_argnames=("num_components", "num_neighbors",
                                             "max_iterations"))
def spectral_embedding(key: jax.Array, features: jax.Array, *, num_components: int,
                       num_neighbors: int = 10,
                       max_iterations: int = 200) -> jax.Array:
  """Spectral embedding of the k-NN graph of `features` (Eq. 1a).

  The top `num_components` eigenvectors of D^-1/2 W D^-1/2 (LOBPCG from a random
  start drawn from `key`), L2-normalised per row (Ng, Jordan and Weiss): on a graph
  of d disconnected parts they span the parts' indicators, and the rows of one
  part become one point.

  Args:
    key: PRNG key of LOBPCG's starting block.
    features: (N, D) float features, e.g. L2-normalised pixels.
    num_components: d, the embedding size (about the number of clusters); 5 d
      must be below N.
    num_neighbors: k of the k-NN graph.
    max_iterations: LOBPCG iterations at most.

  Returns:
    (N, d) float32 unit-norm rows.
  """
  neighbors = knn_graph(features, num_neighbors=num_neighbors)
  apply, _ = _normalised_adjacency(neighbors)
  # Shift by the identity so that the spectrum is in [0, 2]: LOBPCG finds the
  # largest eigenvalues, and the cluster indicators are the largest of W's.
  start = jax.random.normal(key, (features.shape[0], num_components), jnp.float32)
  _, vectors, _ = sparse_linalg.lobpcg_standard(
      lambda x: apply(x) + x, start, m=max_iterations)
  return _unit_rows(vectors)


def check_arguments(num_examples: int, *, num_components: int,
                    num_neighbors: int) -> None:
  """Raises UserError when the graph or the embedding cannot be built."""
  if not 1 <= num_neighbors < num_examples:
    raise UserError(
        f"pseudo_labels.spectral_neighbors={num_neighbors} must lie in [1, "
        f"{num_examples - 1}] for {num_examples} training images; 10 is typical.")
  if num_components < 1 or 5 * num_components >= num_examples:
    raise UserError(
        f"pseudo_labels.spectral_components={num_components} must be >= 1 and "
        f"5 x components below the {num_examples} training images; use "
        f"about the number of clusters.")
