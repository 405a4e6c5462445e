"""Pseudo labels: k-means on features plus a per-cluster distance threshold.

docs/method.md, section 1: the features are L2-normalised, clustered with
`psch_jax.kmeans.kmeans` (Eq. 1), and sample i keeps its cluster as pseudo label only
if its distance to the centroid is at most tau of its cluster (Eq. 2); the others get
-1 ("unlabelled"). tau_c is the `keep_quantile`-quantile of the distances in cluster c,
or one global `absolute_threshold`. `purity` scores pseudo labels against the true
labels, for diagnostics only: training never sees the true labels.

Sanity checks that need no true labels (`check_labelling`): a labelling is
degenerate, and `pseudo_labels` raises `DegenerateLabels` instead of training on it
(from MIN_SAMPLES_PER_CLUSTER_TO_CHECK samples per cluster on), when one cluster holds more than `max_cluster_fraction(K)` of the images, or when the
k-means inertia (Eq. 1) divided by the features' total variance (sum of squared
deviations from their mean) is above `MAX_INERTIA_RATIO_VS_NOISE` times the same
ratio for structureless data of the same shape (isotropic Gaussian noise,
`noise_inertia_ratio`): k-means then finds no more clusters in the features than in
noise. Measured on the Fashion-MNIST train split (docs/benchmarks.md, "Scaling"):
the spectral embedding has ratio 0.12-0.13 against the noise's 0.69 at 5,000 and
60,000 images, raw pixels 0.52 against 0.99; the unconverged embedding that
collapsed purity to 0.18 had 0.70 against 0.72, and fails.
"""
from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from psch_jax import kmeans as kmeans_lib
from psch_jax.errors import UserError

# A labelling is degenerate when its inertia ratio exceeds this fraction of the ratio
# of Gaussian noise of the same shape (docs/benchmarks.md, "Scaling").
MAX_INERTIA_RATIO_VS_NOISE = 0.9
# The checks run from this many samples per cluster on (N >= 50 K): with a few
# dozen samples per cluster one k-means run says little about structure, and the
# smoke configs of the tests (40-80 random or mock images) are below it.
MIN_SAMPLES_PER_CLUSTER_TO_CHECK = 50


class DegenerateLabels(UserError):
  """The pseudo labels carry no cluster structure; training on them is pointless."""


def max_cluster_fraction(num_clusters: int) -> float:
  """Largest share of the images one of K clusters may hold: max(1/2, 2/K).

  "Most images" in one cluster (1/2) for K >= 4, relaxed for K = 2, 3 where a
  legitimate split can be that unequal; K = 1 is never degenerate by size.
  """
  return max(0.5, 2.0 / num_clusters)


@flax.struct.dataclass
class PseudoLabelStats:
  """Statistics of one pseudo-labelling round.

  Attributes:
    cluster_sizes: (K,) int32 samples per cluster.
    kept_counts: (K,) int32 samples per cluster that keep their label.
    kept_fraction_per_cluster: (K,) float32 kept_counts / cluster_sizes (0 for an
      empty cluster).
    kept_fraction: () float32 fraction of all samples that keep a label.
    thresholds: (K,) float32 tau_c of Eq. 2 (+inf for an empty cluster).
    centroids: (K, D) float32 k-means centroids of the (normalised) features.
    inertia: () float32 k-means objective (Eq. 1).
    num_iterations: () int32 Lloyd iterations of the winning k-means restart.
    total_variance: () float32 sum_i ||z_i - mean z||^2 of the clustered (normalised)
      features: the inertia of one cluster.
    noise_inertia_ratio: () float32 inertia / total variance of k-means with the same
      K on Gaussian noise of the same shape (`noise_inertia_ratio`); NaN when the
      check was not run (too few samples per cluster, or check=False).
  """
  cluster_sizes: jax.Array
  kept_counts: jax.Array
  kept_fraction_per_cluster: jax.Array
  kept_fraction: jax.Array
  thresholds: jax.Array
  centroids: jax.Array
  inertia: jax.Array
  num_iterations: jax.Array
  total_variance: jax.Array
  noise_inertia_ratio: jax.Array

  def sanity(self) -> dict:
    """The label-free checks of `check_labelling` as JSON-able floats."""
    sizes = np.asarray(self.cluster_sizes)
    return {"inertia_ratio": float(self.inertia) / max(float(self.total_variance), 1e-30),
            "noise_inertia_ratio": (float(self.noise_inertia_ratio) if np.isfinite(
                self.noise_inertia_ratio) else None),
            "largest_cluster_fraction": float(sizes.max() / max(sizes.sum(), 1)),
            "total_variance": float(self.total_variance)}


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def quantile_thresholds(assignments: jax.Array, distances: jax.Array,
                        keep_quantile: float | jax.Array, *,
                        num_clusters: int) -> jax.Array:
  """tau_c of Eq. 2: the `keep_quantile`-quantile of each cluster's distances.

  The quantile is the lower empirical one: tau_c is the ceil(q n_c)-th smallest
  distance of cluster c's n_c samples, so `d <= tau_c` keeps ceil(q n_c) of them
  (more only when distances tie at tau_c) and q = 1 keeps all of them.

  Args:
    assignments: (N,) int32 cluster of each sample, in [0, num_clusters).
    distances: (N,) float32 distance of each sample to its centroid.
    keep_quantile: q in (0, 1].
    num_clusters: K.

  Returns:
    (K,) float32 thresholds; +inf for an empty cluster.
  """
  num_points = assignments.shape[0]
  sizes = jnp.bincount(assignments, length=num_clusters)
  starts = jnp.cumsum(sizes) - sizes
  sorted_assignments, sorted_distances = jax.lax.sort(
      (assignments.astype(jnp.int32), distances.astype(jnp.float32)), num_keys=2)
  del sorted_assignments
  # ceil(q n) in float32; the slack absorbs float32 rounding of q * n (below 1e-7 n),
  # so that q n landing exactly on an integer does not keep one extra sample.
  target = jnp.asarray(keep_quantile, jnp.float32) * sizes.astype(jnp.float32)
  slack = 2e-7 * sizes.astype(jnp.float32) + 1e-4
  num_kept = jnp.clip(jnp.ceil(target - slack).astype(jnp.int32), 1, sizes)
  position = jnp.clip(starts + num_kept - 1, 0, num_points - 1)
  return jnp.where(sizes > 0, sorted_distances[position], jnp.inf)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _apply_thresholds(assignments, distances, thresholds, *, num_clusters):
  """Pseudo labels (Eq. 2) and their per-cluster counts."""
  kept = distances <= thresholds[assignments]
  labels = jnp.where(kept, assignments, -1).astype(jnp.int32)
  sizes = jnp.bincount(assignments, length=num_clusters).astype(jnp.int32)
  kept_counts = jnp.bincount(assignments, weights=kept.astype(jnp.int32),
                             length=num_clusters).astype(jnp.int32)
  fraction = jnp.where(sizes > 0, kept_counts / jnp.maximum(sizes, 1), 0.0)
  return (labels, sizes, kept_counts, fraction.astype(jnp.float32),
          jnp.mean(kept.astype(jnp.float32)))


def _check_keep_quantile(keep_quantile) -> float:
  if isinstance(keep_quantile, bool) or not isinstance(
      keep_quantile, (int, float, np.integer, np.floating)) or not (
          0.0 < keep_quantile <= 1.0):
    raise UserError(f"keep_quantile must lie in (0, 1], got {keep_quantile!r}; "
                    "use 1.0 to keep every sample (no threshold).")
  return float(keep_quantile)


def threshold_labels(assignments: jax.Array, distances: jax.Array, *,
                     num_clusters: int, keep_quantile: float = 0.7,
                     absolute_threshold: float | None = None
                     ) -> tuple[jax.Array, jax.Array]:
  """Pseudo labels from a clustering by the distance threshold (Eq. 2).

  Args:
    assignments: (N,) int cluster of each sample, in [0, num_clusters).
    distances: (N,) float distance of each sample to its centroid.
    num_clusters: K.
    keep_quantile: q in (0, 1]; tau_c is the q-quantile of cluster c's distances.
    absolute_threshold: one tau for every cluster; overrides keep_quantile.

  Returns:
    labels (N,) int32 (-1 where d_i > tau) and thresholds (K,) float32.
  """
  thresholds = _thresholds(assignments, distances, num_clusters=num_clusters,
                           keep_quantile=keep_quantile,
                           absolute_threshold=absolute_threshold)
  labels, *_ = _apply_thresholds(assignments, distances, thresholds,
                                 num_clusters=num_clusters)
  return labels, thresholds


def _check_absolute_threshold(absolute_threshold) -> float | None:
  if absolute_threshold is None:
    return None
  if isinstance(absolute_threshold, bool) or not isinstance(
      absolute_threshold, (int, float, np.integer, np.floating)) or not (
          absolute_threshold >= 0):
    raise UserError(f"absolute_threshold must be a distance >= 0 or None, got "
                    f"{absolute_threshold!r}.")
  return float(absolute_threshold)


def _thresholds(assignments, distances, *, num_clusters, keep_quantile,
                absolute_threshold) -> jax.Array:
  """tau (K,) float32: the global absolute_threshold if set, else the quantiles."""
  keep_quantile = _check_keep_quantile(keep_quantile)
  absolute_threshold = _check_absolute_threshold(absolute_threshold)
  if absolute_threshold is not None:
    return jnp.full((num_clusters,), absolute_threshold, jnp.float32)
  return quantile_thresholds(assignments, distances, keep_quantile,
                             num_clusters=num_clusters)


@functools.partial(jax.jit, static_argnames=("normalize",))
def total_variance(features: jax.Array, *, normalize: bool = True) -> jax.Array:
  """sum_i ||z_i - mean z||^2, () float32, of (N, D) features (L2-normalised first
  if `normalize`, as k-means sees them): the k-means inertia of a single cluster."""
  z = features.astype(jnp.float32)
  if normalize:
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=1, keepdims=True), 1e-12)
  return jnp.sum(jnp.square(z - jnp.mean(z, axis=0)))


@functools.lru_cache(maxsize=16)
def noise_inertia_ratio(num_rows: int, dim: int, num_clusters: int, *,
                        normalize: bool = True, **kmeans_kwargs) -> float:
  """Inertia / total variance of k-means on structureless data of a shape.

  k-means on (num_rows, dim) isotropic Gaussian noise (normalised like the
  features) from a fixed key: the ratio that features without any cluster
  structure reach. It depends on the dimension (Fashion-MNIST shapes, K = 10: 0.34
  in 4-D, 0.71 in 10-D, 0.99 in 784-D), which is why the degeneracy check compares
  with it rather than with 1. The same shape and `kmeans_kwargs` (n_init, max_iter,
  tol, chunk_size, mesh) as the features' k-means reuse its compiled program.
  Cached per shape and arguments.
  """
  if num_clusters <= 1 or num_rows <= num_clusters:
    return 1.0
  noise_key, kmeans_key = jax.random.split(jax.random.key(0))
  noise = jax.random.normal(noise_key, (num_rows, dim), jnp.float32)
  result = kmeans_lib.kmeans(kmeans_key, noise, num_clusters=num_clusters,
                             normalize=normalize, **kmeans_kwargs)
  return float(result.inertia) / float(total_variance(noise, normalize=normalize))


def check_labelling(stats: PseudoLabelStats) -> None:
  """Raises DegenerateLabels when the labelling is no better than noise.

  Degenerate: one cluster holds more than `max_cluster_fraction(K)` of the samples,
  or the inertia ratio exceeds MAX_INERTIA_RATIO_VS_NOISE x `noise_inertia_ratio`
  (skipped when that is NaN, i.e. not computed).
  """
  sanity = stats.sanity()
  sizes = np.asarray(stats.cluster_sizes)
  num_clusters, num = len(sizes), int(sizes.sum())
  fix = ("The features carry no cluster structure k-means can use: check "
         "pseudo_labels.features ('spectral' or 'pixels' for a backbone trained "
         "from scratch; 'global' needs pretrained weights), model.pretrained, or "
         "pseudo_labels.num_clusters.")
  limit = max_cluster_fraction(num_clusters)
  if sanity["largest_cluster_fraction"] > limit:
    raise DegenerateLabels(
        f"degenerate pseudo labels: cluster {int(sizes.argmax())} holds "
        f"{sanity['largest_cluster_fraction']:.3f} of the {num} images (at most "
        f"{limit:.2f} allowed for {num_clusters} clusters; sizes {sizes.tolist()}). "
        + fix)
  noise = sanity["noise_inertia_ratio"]
  if num_clusters > 1 and noise is not None and (
      not sanity["inertia_ratio"] <= MAX_INERTIA_RATIO_VS_NOISE * noise):
    raise DegenerateLabels(
        f"degenerate pseudo labels: k-means inertia is {sanity['inertia_ratio']:.3f} "
        f"of the features' total variance, no better than Gaussian noise of the "
        f"same shape ({noise:.3f}; at most {MAX_INERTIA_RATIO_VS_NOISE} x that is "
        f"accepted). " + fix)


def pseudo_labels(key: jax.Array, features: jax.Array, *, num_clusters: int,
                  keep_quantile: float = 0.7, absolute_threshold: float | None = None,
                  n_init: int = 1, max_iter: int = 100, tol: float = 1e-4,
                  normalize: bool = True, chunk_size: int = 4096,
                  mesh: Mesh | None = None, check: bool = True
                  ) -> tuple[jax.Array, PseudoLabelStats]:
  """Clusters `features` and keeps the labels of the samples near their centroid.

  Args:
    key: PRNG key for k-means.
    features: (N, D) float features z_i, one row per training image.
    num_clusters: K_c, between 1 and N.
    keep_quantile: q in (0, 1]: each cluster keeps its ceil(q n_c) samples closest to
      its centroid (Eq. 2); 1.0 keeps all (the "no threshold" ablation).
    absolute_threshold: a global distance tau instead of the per-cluster quantile.
    n_init, max_iter, tol, chunk_size: passed to `psch_jax.kmeans.kmeans`.
    normalize: L2-normalise the features before clustering (distances are then
      between unit vectors, in [0, 2]).
    mesh: a Mesh with a "data" axis to shard the rows over; None uses one device.
    check: run `check_labelling` (and compute the noise reference it needs) when
      there are at least MIN_SAMPLES_PER_CLUSTER_TO_CHECK samples per cluster.

  Returns:
    labels (N,) int32 with -1 for rejected samples, and PseudoLabelStats.

  Raises:
    UserError: for num_clusters outside [1, N], keep_quantile outside (0, 1], a
      negative absolute_threshold, or NaN / infinite features.
    DegenerateLabels (a UserError): the labelling is checked and degenerate.
  """
  check = check and features.shape[0] >= MIN_SAMPLES_PER_CLUSTER_TO_CHECK * num_clusters
  # Checked before the clustering, not after, so a typo fails fast.
  _check_keep_quantile(keep_quantile)
  _check_absolute_threshold(absolute_threshold)
  result = kmeans_lib.kmeans(
      key, features, num_clusters=num_clusters, n_init=n_init, max_iter=max_iter,
      tol=tol, chunk_size=chunk_size, normalize=normalize, mesh=mesh)
  thresholds = _thresholds(
      result.assignments, result.distances, num_clusters=num_clusters,
      keep_quantile=keep_quantile, absolute_threshold=absolute_threshold)
  labels, sizes, kept_counts, fraction, kept_fraction = _apply_thresholds(
      result.assignments, result.distances, thresholds, num_clusters=num_clusters)
  stats = PseudoLabelStats(
      cluster_sizes=sizes, kept_counts=kept_counts,
      kept_fraction_per_cluster=fraction, kept_fraction=kept_fraction,
      thresholds=thresholds, centroids=result.centroids, inertia=result.inertia,
      num_iterations=result.num_iterations,
      total_variance=total_variance(jnp.asarray(features), normalize=normalize),
      noise_inertia_ratio=jnp.asarray(
          noise_inertia_ratio(
              features.shape[0], features.shape[1], num_clusters,
              normalize=normalize, n_init=n_init, max_iter=max_iter, tol=tol,
              chunk_size=chunk_size, mesh=mesh) if check else jnp.nan,
          jnp.float32))
  if check:
    check_labelling(stats)
  return labels, stats


@jax.jit
def cluster_affinity(centroids: jax.Array) -> jax.Array:
  """How close each pair of clusters is, rescaled to [0, 1] (Eq. 7b).

  r_kl = (cos(c_k, c_l) - min) / (max - min), min and max over the pairs k != l, so
  the closest two clusters get 1 and the farthest two 0 whatever the feature scale
  (pixel centroids all have cosines near 1). r_kk = 1. With fewer than 3 clusters, or
  all pairs equally close, every off-diagonal r_kl is 0 (no structure to keep).

  Args:
    centroids: (K, D) float k-means centroids (Eq. 1).

  Returns:
    (K, K) float32 symmetric r.
  """
  centroids = centroids.astype(jnp.float32)
  norms = jnp.linalg.norm(centroids, axis=1, keepdims=True)
  unit = centroids / jnp.maximum(norms, 1e-12)
  cosine = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
  off_diagonal = ~jnp.eye(centroids.shape[0], dtype=bool)
  low = jnp.min(jnp.where(off_diagonal, cosine, jnp.inf))
  high = jnp.max(jnp.where(off_diagonal, cosine, -jnp.inf))
  spread = high - low
  scaled = jnp.where(spread > 1e-6, (cosine - low) / jnp.where(spread > 1e-6, spread, 1.0),
                     0.0)
  return jnp.where(off_diagonal, jnp.clip(scaled, 0.0, 1.0), 1.0)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _purity(labels, true_multi_hot, *, num_clusters):
  kept = labels >= 0
  cluster = jnp.where(kept, labels, 0)
  true_multi_hot = (true_multi_hot > 0).astype(jnp.float32)
  label_counts = jax.ops.segment_sum(
      true_multi_hot * kept[:, None], cluster, num_segments=num_clusters)
  majority = jnp.argmax(label_counts, axis=1)
  shares_majority = jnp.take_along_axis(
      true_multi_hot, majority[cluster][:, None], axis=1)[:, 0] > 0
  num_kept = jnp.sum(kept)
  pure = jnp.sum(shares_majority & kept)
  return jnp.where(num_kept > 0, pure / jnp.maximum(num_kept, 1), jnp.nan)


def purity(pseudo_labels: jax.Array, true_labels_multi_hot: jax.Array) -> jax.Array:
  """Fraction of labelled samples that carry their cluster's majority true label.

  A cluster's majority label is the true label most frequent among its labelled
  members (ties: the lower label index); a multi-label sample counts as pure if it
  has that label. Diagnostics only.

  Args:
    pseudo_labels: (N,) int pseudo labels, -1 = unlabelled (ignored).
    true_labels_multi_hot: (N, num_labels) multi-hot true labels (one-hot for
      single-label datasets).

  Returns:
    () float32 purity in [0, 1]; NaN when no sample is labelled.
  """
  labels = np.asarray(pseudo_labels)
  true_shape = np.shape(true_labels_multi_hot)
  if labels.ndim != 1 or len(true_shape) != 2 or true_shape[0] != labels.shape[0]:
    raise UserError(
        f"purity needs pseudo labels (N,) and a multi-hot label matrix (N, "
        f"num_labels); got {labels.shape} and {true_shape}. Convert class ids to "
        "one-hot first.")
  num_clusters = max(int(labels.max(initial=-1)) + 1, 1)
  return _purity(jnp.asarray(labels, jnp.int32), jnp.asarray(true_labels_multi_hot),
                 num_clusters=num_clusters)
