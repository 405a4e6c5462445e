"""Jit-compiled k-means: k-means++ seeding, Lloyd iterations, restarts, sharded rows.

The clustering behind the pseudo labels (docs/method.md, section 1): it minimises the
inertia `sum_i min_k ||z_i - c_k||^2` (Eq. 1).

- Seeding: k-means++ (D^2 sampling). With `n_local_trials > 1` it is greedy k-means++
  (scikit-learn's default): each step draws that many candidates and keeps the one
  that lowers the inertia most; `n_local_trials=1` is the standard k-means++.
- Lloyd iterations in a `lax.while_loop` until the centroids settle: the summed squared
  shift of all centroids is at most `tol` times the mean per-feature variance of the
  data (scikit-learn's rule, so `tol` does not depend on the scale of the data), or
  `max_iter` iterations. A cluster left empty is re-seeded with the points farthest
  from their centroids. Inside the iterations the distance to the chosen centroid is
  the expansion's (it only ranks points for re-seeding); the final pass, which gives
  the returned distances and inertia, computes it exactly.
- `n_init` restarts run one after the other (`lax.map`), all reading the same copy of
  the data; the restart with the lowest inertia wins.
- Per-cluster sums: a one-hot matrix product for K <= 32 and on accelerators, a
  scatter-add (`segment_sum`) for larger K on CPU, where the product would cost as
  much as the distances (see `sums_by_scatter`).
- Memory: squared distances come from `||x||^2 - 2 x.c + ||c||^2` over equal row
  chunks of at most `chunk_size` rows and about 2 MiB, so nothing of size N x K x D
  exists and a chunk stays in cache for the sums. The padded (and, if asked,
  normalised) data is the one extra copy, none when the rows split evenly into
  chunks and are not normalised (docs/benchmarks.md, k-means, has XLA's memory
  analysis of a large case).

Sharding. Points are split by rows over the mesh axis "data" with `jax.shard_map`;
each device scans its own rows and the per-cluster sums, counts and inertia are
`psum`-reduced. shard_map rather than global-view jit because the chunked scan must
run over each device's own rows; in global view the partitioner would have to keep a
reshape of the row axis sharded, which it does not promise. Row count N need not
divide by the device count or the chunk count: rows are padded with zeros and masked.
Randomness does not depend on the layout either: a row's random numbers come from
`fold_in(key, global row index)`, ties between candidates are broken by the global
row index, so 1 device and 8 devices pick the same seeds and give centroids equal to
float rounding (the order of the sums differs).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from psch_jax import sharding
from psch_jax.errors import UserError

# The distance expansion subtracts large terms; TF32 or bf16 passes on accelerators
# would change assignments and break the 1-vs-8-device equality.
_PRECISION = lax.Precision.HIGHEST
# Score of a row at distance 0 from every centre in k-means++: far below any real
# log-distance (log of the smallest float32 is about -104) but finite, so such rows
# still win over the padding rows when nothing else is left.
_ZERO_DISTANCE_SCORE = -1e4
# Rows per chunk are capped so a (R, D) float32 chunk is about this size and stays
# in cache between the distance product and the per-cluster sums that read it again
# (docs/benchmarks.md, k-means); but not below _MIN_CHUNK_ROWS, so that the distance
# product keeps a useful size for large D.
_CHUNK_BYTES = 2 * 1024 * 1024
_MIN_CHUNK_ROWS = 256
# Up to this K the per-cluster sums are a one-hot product, above it (on CPU) a
# scatter-add; see sums_by_scatter.
_MAX_ONE_HOT_CLUSTERS = 32


@flax.struct.dataclass
class KMeansResult:
  """What `kmeans` returns.

  Attributes:
    centroids: (K, D) float32 cluster centres.
    assignments: (N,) int32 index of each point's nearest centroid.
    distances: (N,) float32 Euclidean distance of each point to its centroid.
    inertia: () float32 sum of squared distances to the centroids (Eq. 1).
    num_iterations: () int32 Lloyd iterations run by the winning restart.
  """
  centroids: jax.Array
  assignments: jax.Array
  distances: jax.Array
  inertia: jax.Array
  num_iterations: jax.Array


class _Shard(NamedTuple):
  """One device's rows, cut into chunks; C chunks of R rows, global row count N."""
  points: jax.Array  # (C, R, D) float32, padding rows are zero.
  sq_norms: jax.Array  # (C, R) float32 ||x||^2.
  valid: jax.Array  # (C, R) bool, False on padding rows.
  row_ids: jax.Array  # (C, R) int32 global row index.
  offset: jax.Array  # () int32 global index of this device's first row.


class RowLayout(NamedTuple):
  """Static row layout: N rows padded to num_devices x rows_per_device, each device's
  rows cut into equal chunks of `chunk` rows (`row_layout`)."""
  num_points: int
  num_devices: int
  rows_per_device: int
  chunk: int

  @property
  def padded_rows(self) -> int:
    return self.num_devices * self.rows_per_device


def row_layout(num_points: int, dim: int, num_devices: int, chunk_size: int
               ) -> RowLayout:
  """How `kmeans` and `assign` cut (N, D) float32 rows over devices and chunks.

  Balanced chunks of at most `chunk_size` rows and about 2 MiB each (_CHUNK_BYTES,
  never below 256 rows). A chunk small enough to stay in cache is read once from
  memory per pass (by the distance product; the sums then find it in cache), and equal
  chunks pad at most num_chunks - 1 rows per device instead of up to a whole chunk.

  Args:
    num_points: N, the number of rows.
    dim: D, the number of features per row.
    num_devices: devices the rows are split over.
    chunk_size: the most rows per chunk (`kmeans`'s `chunk_size`).

  Returns:
    The layout; `chunk` is the rows per chunk that one device scans.
  """
  rows = -(-num_points // num_devices)
  cap = min(chunk_size, max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (4 * dim)))
  num_chunks = -(-rows // cap)
  chunk = -(-rows // num_chunks)
  return RowLayout(num_points, num_devices, num_chunks * chunk, chunk)


def sums_by_scatter(mesh: Mesh, num_clusters: int) -> bool:
  """Whether `kmeans` on `mesh` forms the per-cluster sums of `num_clusters`
  clusters with a scatter-add rather than a one-hot product.

  The one-hot product costs K x R x D multiply-adds, as much as the distance product,
  which a scatter-add (R x D adds) saves on CPU when K is large; XLA runs it there as
  a serial loop, so the sums stay deterministic. Elsewhere the product stays: it is
  fast there, and a float scatter-add on GPU is not bitwise reproducible (atomics),
  which would break determinism for a key.
  """
  return (num_clusters > _MAX_ONE_HOT_CLUSTERS
          and mesh.devices.flat[0].platform == "cpu")


def _varying(x: jax.Array) -> jax.Array:
  """Marks a value as per-device, as a scan carry that mixes in local rows must be."""
  return lax.pcast(x, sharding.AXIS, to="varying")


def _make_shard(local_points: jax.Array, layout: RowLayout) -> _Shard:
  """Cuts this device's (rows_per_device, D) block into chunks with row metadata."""
  num_chunks = layout.rows_per_device // layout.chunk
  offset = lax.axis_index(sharding.AXIS).astype(jnp.int32) * layout.rows_per_device
  row_ids = offset + jnp.arange(layout.rows_per_device, dtype=jnp.int32)
  points = local_points.reshape(num_chunks, layout.chunk, -1)
  row_ids = row_ids.reshape(num_chunks, layout.chunk)
  sq_norms = jnp.sum(points * points, axis=-1)
  return _Shard(points, sq_norms, row_ids < layout.num_points, row_ids, offset)


def _sq_distances(x: jax.Array, x_sq: jax.Array, centers: jax.Array,
                  c_sq: jax.Array) -> jax.Array:
  """(R, D) rows against (M, D) centres -> (R, M) squared distances, clipped at 0."""
  cross = jnp.dot(x, centers.T, precision=_PRECISION)
  return jnp.maximum(x_sq[:, None] - 2.0 * cross + c_sq[None, :], 0.0)


def _distances_to(shard: _Shard, centers: jax.Array) -> jax.Array:
  """Squared distances of the local rows to (M, D) centres: (C, R, M)."""
  c_sq = jnp.sum(centers * centers, axis=-1)
  return lax.map(lambda chunk: _sq_distances(*chunk, centers, c_sq),
                 (shard.points, shard.sq_norms))


def _global_top(scores: jax.Array, shard: _Shard, k: int) -> jax.Array:
  """Global row ids of the k highest scores over all devices, (k,) int32.

  Ties go to the lower global row id, so the choice does not depend on how the rows
  are split over devices.
  """
  flat_scores = scores.reshape(-1)
  flat_ids = shard.row_ids.reshape(-1)
  k_local = min(k, flat_scores.shape[0])
  neg_scores, ids = lax.sort((-flat_scores, flat_ids), num_keys=2)
  candidates = (neg_scores[:k_local], ids[:k_local])
  neg_scores, ids = lax.all_gather(candidates, sharding.AXIS, tiled=True, to="invarying")
  _, ids = lax.sort((neg_scores, ids), num_keys=2)
  return ids[:k]


def _fetch_rows(shard: _Shard, row_ids: jax.Array) -> jax.Array:
  """The points at global `row_ids` (M,), gathered from whichever device holds them."""
  num_chunks, chunk, _ = shard.points.shape
  local = row_ids - shard.offset
  owned = (local >= 0) & (local < num_chunks * chunk)
  local = jnp.clip(local, 0, num_chunks * chunk - 1)
  # Indexed in the (C, R, D) layout, not through a flat view: see
  # _mean_feature_variance.
  rows = shard.points[local // chunk, local % chunk]
  return lax.psum(jnp.where(owned[:, None], rows, 0.0), sharding.AXIS)


def _row_gumbel(key: jax.Array, shard: _Shard) -> jax.Array:
  """Gumbel noise per local row (C, R), a function of the key and the global row id."""
  noise = jax.vmap(lambda i: jax.random.gumbel(jax.random.fold_in(key, i)))(
      shard.row_ids.reshape(-1))
  return noise.reshape(shard.row_ids.shape)


def _kmeans_plus_plus(key: jax.Array, shard: _Shard, num_clusters: int,
                      n_local_trials: int) -> jax.Array:
  """k-means++ seeds (K, D); greedy when `n_local_trials > 1`.

  D^2 sampling is done with the Gumbel-max trick: the top `n_local_trials` rows by
  `log d_i^2 + gumbel_i` are a draw without replacement with probability proportional
  to `d_i^2`, and need no cumulative sum across devices. Step 0 runs the same code
  with d_i = inf for every row: the top row is then a uniform draw, and it is taken
  without the greedy comparison, as in k-means++.
  """

  def add_centre(step, carry):
    centroids, closest_sq = carry
    noise = _row_gumbel(jax.random.fold_in(key, step), shard)
    log_sq = jnp.log(jnp.where(closest_sq > 0, closest_sq, 1.0))
    scores = jnp.where(closest_sq > 0, log_sq, _ZERO_DISTANCE_SCORE)
    scores = jnp.where(jnp.isinf(closest_sq), 0.0, scores) + noise
    scores = jnp.where(shard.valid, scores, -jnp.inf)
    candidates = _fetch_rows(shard, _global_top(scores, shard, n_local_trials))
    new_closest = jnp.minimum(closest_sq[..., None], _distances_to(shard, candidates))
    potentials = lax.psum(
        jnp.sum(jnp.where(shard.valid[..., None], new_closest, 0.0), axis=(0, 1)),
        sharding.AXIS)
    # Candidates come sorted by score, so candidate 0 is the plain D^2 (or, at step
    # 0, uniform) draw.
    best = jnp.where(step == 0, 0, jnp.argmin(potentials))
    return centroids.at[step].set(candidates[best]), new_closest[..., best]

  dim = shard.points.shape[-1]
  init = (jnp.zeros((num_clusters, dim), jnp.float32),
          _varying(jnp.full(shard.sq_norms.shape, jnp.inf, jnp.float32)))
  centroids, _ = lax.fori_loop(0, num_clusters, add_centre, init)
  return centroids


class _PassStatistics(NamedTuple):
  sums: jax.Array  # (K, D) float32 per-cluster sum of points, all devices.
  counts: jax.Array  # (K,) int32 cluster sizes, all devices.
  inertia: jax.Array  # () float32 (Eq. 1), all devices.
  assignments: jax.Array  # (C, R) int32 local.
  sq_distances: jax.Array  # (C, R) float32 local, to the assigned centroid.


def _assignment_pass(shard: _Shard, centroids: jax.Array, *, exact: bool,
                     scatter_sums: bool) -> _PassStatistics:
  """One pass over the rows: nearest centroid, per-cluster sums and counts.

  The nearest centroid comes from the distance expansion. With `exact`, the squared
  distance to it (and so the inertia) is then computed directly; without, it is the
  expansion's minimum, which is good enough where it only ranks points for
  re-seeding empty clusters (the Lloyd iterations). `scatter_sums` picks how the
  per-cluster sums are formed (see sums_by_scatter); both give the same sums up to
  float rounding.
  """
  num_clusters = centroids.shape[0]
  c_sq = jnp.sum(centroids * centroids, axis=-1)
  cluster_ids = jnp.arange(num_clusters, dtype=jnp.int32)

  def chunk_step(carry, chunk):
    sums, counts, inertia = carry
    x, x_sq, valid = chunk
    sq = _sq_distances(x, x_sq, centroids, c_sq)
    # argmin as two single-output reductions (the min, then the first index holding
    # it): the same index as jnp.argmin, but XLA's CPU backend vectorises these and
    # not argmin's two-output reduction (docs/benchmarks.md, k-means). The clip only
    # guards a NaN row, which matches no index.
    expansion_min = jnp.min(sq, axis=1)
    first_at_min = jnp.where(sq == expansion_min[:, None], cluster_ids[None, :],
                             num_clusters)
    assignment = jnp.minimum(jnp.min(first_at_min, axis=1), num_clusters - 1)
    if exact:
      # The expansion loses ~1e-7 ||x||^2 to cancellation, which a square root turns
      # into ~1e-3 errors on near-zero distances. O(R D), not O(R K D).
      min_sq = jnp.sum(jnp.square(x - centroids[assignment]), axis=1)
    else:
      min_sq = expansion_min
    if scatter_sums:
      # Padding rows go to an extra segment that is dropped.
      target = jnp.where(valid, assignment, num_clusters)
      sums = sums + jax.ops.segment_sum(x, target, num_clusters + 1)[:-1]
      counts = counts + jnp.bincount(target, length=num_clusters + 1)[:-1]
    else:
      member = (assignment[:, None] == cluster_ids[None, :]) & valid[:, None]
      sums = sums + jnp.dot(member.astype(jnp.float32).T, x, precision=_PRECISION)
      counts = counts + jnp.sum(member, axis=0, dtype=jnp.int32)
    inertia = inertia + jnp.sum(jnp.where(valid, min_sq, 0.0))
    return (sums, counts, inertia), (assignment, min_sq)

  init = _varying((jnp.zeros(centroids.shape, jnp.float32),
                   jnp.zeros((num_clusters,), jnp.int32),
                   jnp.zeros((), jnp.float32)))
  (sums, counts, inertia), (assignments, sq_distances) = lax.scan(
      chunk_step, init, (shard.points, shard.sq_norms, shard.valid))
  sums, counts, inertia = lax.psum((sums, counts, inertia), sharding.AXIS)
  return _PassStatistics(sums, counts, inertia, assignments, sq_distances)


def _lloyd_update(shard: _Shard, stats: _PassStatistics) -> jax.Array:
  """New centroids (K, D): cluster means; empty clusters take the farthest points.

  The j-th empty cluster gets the point with the j-th largest distance to its own
  centroid (scikit-learn's rule), so the next pass splits the worst-fit cluster.
  """
  counts = stats.counts
  means = stats.sums / jnp.maximum(counts, 1)[:, None].astype(jnp.float32)
  empty = counts == 0

  def reseed(means):
    scores = jnp.where(shard.valid, stats.sq_distances, -1.0)
    farthest = _fetch_rows(shard, _global_top(scores, shard, counts.shape[0]))
    rank = jnp.clip(jnp.cumsum(empty) - 1, 0)
    return jnp.where(empty[:, None], farthest[rank], means)

  return lax.cond(jnp.any(empty), reseed, lambda means: means, means)


def _lloyd(shard: _Shard, centroids: jax.Array, shift_tol: jax.Array,
           max_iter: int, scatter_sums: bool) -> tuple[jax.Array, jax.Array]:
  """Lloyd iterations from `centroids` (K, D) -> (centroids, iterations () int32)."""

  def keep_going(state):
    _, iteration, converged = state
    return (iteration < max_iter) & ~converged

  def iterate(state):
    centroids, iteration, _ = state
    stats = _assignment_pass(shard, centroids, exact=False,
                             scatter_sums=scatter_sums)
    new_centroids = _lloyd_update(shard, stats)
    shift = jnp.sum(jnp.square(new_centroids - centroids))
    return new_centroids, iteration + 1, shift <= shift_tol

  centroids, iterations, _ = lax.while_loop(
      keep_going, iterate, (centroids, jnp.zeros((), jnp.int32), jnp.array(False)))
  return centroids, iterations


def _mean_feature_variance(shard: _Shard, num_points: int) -> jax.Array:
  """Mean over features of the per-feature variance of the real rows, () float32."""
  # Both sums run chunk by chunk: a whole-array reduction is another consumer of the
  # padded data, and XLA may then materialise the padding twice.
  total, _ = lax.scan(lambda acc, x: (acc + jnp.sum(x, axis=0), None),
                      _varying(jnp.zeros(shard.points.shape[-1:], jnp.float32)),
                      shard.points)
  mean = lax.psum(total, sharding.AXIS) / num_points

  def chunk_step(acc, chunk):
    x, valid = chunk
    sq = jnp.sum(jnp.square(x - mean), axis=-1)
    return acc + jnp.sum(jnp.where(valid, sq, 0.0)), None

  acc, _ = lax.scan(chunk_step, _varying(jnp.zeros((), jnp.float32)),
                    (shard.points, shard.valid))
  return lax.psum(acc, sharding.AXIS) / (num_points * shard.points.shape[-1])


def _kmeans_local(key, local_points, tol, init_centroids, *, layout, num_clusters,
                  n_init, max_iter, n_local_trials, scatter_sums):
  """Per-device body of `kmeans` under shard_map."""
  shard = _make_shard(local_points, layout)
  shift_tol = tol * _mean_feature_variance(shard, layout.num_points)
  exact_pass = functools.partial(_assignment_pass, shard, exact=True,
                                 scatter_sums=scatter_sums)

  def restart(restart_key):
    if init_centroids is None:
      seeds = _kmeans_plus_plus(restart_key, shard, num_clusters, n_local_trials)
    else:
      seeds = init_centroids
    centroids, iterations = _lloyd(shard, seeds, shift_tol, max_iter, scatter_sums)
    # A lone restart wins anyway: its inertia would be one more pass for nothing.
    inertia = (exact_pass(centroids).inertia if n_init > 1
               else jnp.zeros((), jnp.float32))
    return centroids, iterations, inertia

  centroids, iterations, inertias = lax.map(restart, jax.random.split(key, n_init))
  best = jnp.argmin(inertias)
  final = exact_pass(centroids[best])
  return (centroids[best], final.inertia, iterations[best],
          final.assignments.reshape(-1), final.sq_distances.reshape(-1))


def _prepare_points(points: jax.Array, layout: RowLayout, normalize: bool) -> jax.Array:
  """float32, optionally L2-normalised rows, zero-padded to the layout's row count."""
  points = points.astype(jnp.float32)
  if normalize:
    norms = jnp.linalg.norm(points, axis=-1, keepdims=True)
    points = points / jnp.maximum(norms, 1e-12)
  extra = layout.padded_rows - layout.num_points
  if extra:
    points = jnp.pad(points, ((0, extra), (0, 0)))
  return points


@functools.partial(jax.jit, static_argnames=(
    "num_clusters", "n_init", "max_iter", "chunk_size", "n_local_trials", "mesh",
    "normalize"))
def _kmeans_jit(key, points, tol, init_centroids, *, num_clusters, n_init, max_iter,
                chunk_size, n_local_trials, mesh, normalize):
  layout = row_layout(*points.shape, mesh.shape[sharding.AXIS], chunk_size)
  padded = _prepare_points(points, layout, normalize)
  body = functools.partial(
      _kmeans_local, layout=layout, num_clusters=num_clusters, n_init=n_init,
      max_iter=max_iter, n_local_trials=n_local_trials,
      scatter_sums=sums_by_scatter(mesh, num_clusters))
  centroids, inertia, iterations, assignments, sq_distances = jax.shard_map(
      body, mesh=mesh, in_specs=(P(), P(sharding.AXIS, None), P(), P()),
      out_specs=(P(), P(), P(), P(sharding.AXIS), P(sharding.AXIS)),
  )(key, padded, jnp.asarray(tol, jnp.float32), init_centroids)
  num_points = layout.num_points
  return KMeansResult(
      centroids=centroids,
      assignments=assignments[:num_points],
      distances=jnp.sqrt(sq_distances[:num_points]),
      inertia=inertia,
      num_iterations=iterations)


@functools.partial(jax.jit, static_argnames=("chunk_size", "mesh"))
def _assign_jit(points, centroids, *, chunk_size, mesh):
  layout = row_layout(*points.shape, mesh.shape[sharding.AXIS], chunk_size)
  padded = _prepare_points(points, layout, normalize=False)

  def body(local_points, centroids):
    # The sums are not used; the scan's dead-code elimination drops them.
    stats = _assignment_pass(_make_shard(local_points, layout), centroids,
                             exact=True, scatter_sums=False)
    return stats.assignments.reshape(-1), stats.sq_distances.reshape(-1)

  assignments, sq_distances = jax.shard_map(
      body, mesh=mesh, in_specs=(P(sharding.AXIS, None), P()),
      out_specs=(P(sharding.AXIS), P(sharding.AXIS)),
  )(padded, centroids.astype(jnp.float32))
  return assignments[:layout.num_points], sq_distances[:layout.num_points]


def data_mesh(mesh: Mesh | None) -> Mesh:
  """The mesh to shard rows over: `mesh` checked for the `sharding.AXIS` axis, or one
  device."""
  if mesh is None:
    return sharding.make_mesh(jax.devices()[:1])
  if not isinstance(mesh, Mesh) or sharding.AXIS not in mesh.axis_names:
    raise UserError(
        f"mesh must be a jax.sharding.Mesh with a {sharding.AXIS!r} axis, got {mesh!r}; "
        f"build one with psch_jax.sharding.make_mesh() or pass None.")
  return mesh


def check_points(points, name: str = "points") -> None:
  """Raises UserError unless `points` is a non-empty (N, D) array of finite numbers."""
  shape = np.shape(points)
  if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
    raise UserError(f"{name} must be a non-empty (N, D) array, got shape {shape}; "
                    "flatten each sample's features into one row.")
  if isinstance(points, jax.core.Tracer):
    return
  if isinstance(points, jax.Array):
    finite = bool(jnp.all(jnp.isfinite(points)))
  else:
    finite = bool(np.all(np.isfinite(np.asarray(points))))
  if not finite:
    raise UserError(f"{name} contain NaN or infinite values; check the feature "
                    "extractor (for example a diverged network) before clustering.")


def _positive_int(value, name: str, minimum: int = 1) -> int:
  if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
      or value < minimum):
    raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def kmeans(key: jax.Array, points: jax.Array, *, num_clusters: int, n_init: int = 1,
           max_iter: int = 100, tol: float = 1e-4, chunk_size: int = 4096,
           n_local_trials: int | None = None, init_centroids: jax.Array | None = None,
           normalize: bool = False, mesh: Mesh | None = None) -> KMeansResult:
  """k-means clustering of the rows of `points` (Eq. 1); deterministic for a key.

  Args:
    key: PRNG key; the restarts and the k-means++ draws split it.
    points: (N, D) float array; other float or int dtypes are cast to float32.
    num_clusters: K, between 1 and N.
    n_init: restarts from independent k-means++ seeds; the lowest inertia wins.
    max_iter: most Lloyd iterations per restart (0: return the k-means++ seeds).
    tol: stop when the summed squared centroid shift is at most `tol` times the mean
      per-feature variance of `points` (scikit-learn's rule).
    chunk_size: most rows per distance block (blocks are further capped at about
      2 MiB of rows, for the cache); memory per device is about
      chunk_size x (K + D) floats on top of the data.
    n_local_trials: candidates per k-means++ step; None means scikit-learn's
      `2 + floor(ln K)` (greedy k-means++), 1 the standard k-means++.
    init_centroids: (K, D) starting centroids instead of k-means++ seeds, for
      example the previous ones when pseudo labels are refreshed; needs n_init=1.
    normalize: L2-normalise the rows first (inside the same jit, so the data is
      copied once, not twice); centroids and distances are then in that space.
    mesh: a Mesh with a "data" axis to split the rows over; None uses one device.

  Returns:
    KMeansResult: centroids (K, D) f32, assignments (N,) int32, distances (N,) f32,
    inertia () f32, num_iterations () int32.

  Raises:
    UserError: on a malformed `points`, non-finite values or out-of-range arguments.
  """
  check_points(points)
  num_points = np.shape(points)[0]
  num_clusters = _positive_int(num_clusters, "num_clusters")
  if num_clusters > num_points:
    raise UserError(f"num_clusters={num_clusters} exceeds the number of points "
                    f"{num_points}; use at most {num_points} clusters or more data.")
  n_init = _positive_int(n_init, "n_init")
  max_iter = _positive_int(max_iter, "max_iter", minimum=0)
  chunk_size = _positive_int(chunk_size, "chunk_size")
  if n_local_trials is None:
    n_local_trials = 2 + int(math.log(num_clusters))
  n_local_trials = min(_positive_int(n_local_trials, "n_local_trials"), num_points)
  if not (isinstance(tol, (int, float, np.floating)) and tol >= 0):
    raise UserError(f"tol must be a number >= 0, got {tol!r}.")
  if init_centroids is not None:
    check_points(init_centroids, "init_centroids")
    expected = (num_clusters, np.shape(points)[1])
    if np.shape(init_centroids) != expected:
      raise UserError(f"init_centroids must have shape {expected} (num_clusters, D), "
                      f"got {np.shape(init_centroids)}.")
    if n_init != 1:
      raise UserError(f"n_init={n_init} restarts from the same init_centroids would "
                      "all be identical; pass n_init=1 or drop init_centroids.")
    init_centroids = jnp.asarray(init_centroids, jnp.float32)
  return _kmeans_jit(
      key, jnp.asarray(points), float(tol), init_centroids,
      num_clusters=num_clusters, n_init=n_init,
      max_iter=max_iter, chunk_size=chunk_size, n_local_trials=n_local_trials,
      mesh=data_mesh(mesh), normalize=bool(normalize))


def assign(points: jax.Array, centroids: jax.Array, *, chunk_size: int = 4096,
           mesh: Mesh | None = None) -> tuple[jax.Array, jax.Array]:
  """Nearest centroid of each row, chunked like `kmeans`.

  Args:
    points: (N, D) float array.
    centroids: (K, D) float array.
    chunk_size: most rows per distance block, as in `kmeans`.
    mesh: a Mesh with a "data" axis to split the rows over; None uses one device.

  Returns:
    assignments (N,) int32 and squared Euclidean distances (N,) float32 to the
    assigned centroid.
  """
  check_points(points)
  check_points(centroids, "centroids")
  if np.shape(centroids)[1] != np.shape(points)[1]:
    raise UserError(f"centroids have {np.shape(centroids)[1]} features but points have "
                    f"{np.shape(points)[1]}; cluster and assign the same features.")
  chunk_size = _positive_int(chunk_size, "chunk_size")
  return _assign_jit(jnp.asarray(points), jnp.asarray(centroids),
                     chunk_size=chunk_size, mesh=data_mesh(mesh))
