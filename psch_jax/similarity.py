"""Soft multi-part corresponding similarity (Eq. 6) and the target matrix (Eq. 7).

`soft_similarity` compares images part by part: part p of image i only with part p
of image j ("corresponding"), each cosine weighted by the mean of the two images'
part weights. `target_similarity` turns it and a batch's pseudo labels into the
target S and pair weights m that L_sim regresses the codes onto (Eq. 8).

Neither function stops gradients: callers build the target from features under
`jax.lax.stop_gradient` (and `psch_jax.loss.psch_loss` treats the target as a
constant anyway).
"""
import functools

import jax
import jax.numpy as jnp

from psch_jax.errors import UserError

# A descriptor with a smaller norm counts as a zero vector: its cosine with
# anything is 0 instead of NaN (a dead ReLU group gives all-zero descriptors).
_NORM_EPS = 1e-12


def _unit(descriptors: jax.Array) -> jax.Array:
  squared_norm = jnp.sum(descriptors * descriptors, axis=-1, keepdims=True)
  return descriptors * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORM_EPS**2))


@jax.jit
def soft_similarity_between(desc_a: jax.Array, weights_a: jax.Array,
                            desc_b: jax.Array, weights_b: jax.Array) -> jax.Array:
  """Soft multi-part corresponding similarity of every image of A to every of B.

  s_ij = sum_p 0.5 (omega_i^p + omega_j^p) cos(v_i^p, v_j^p)   (Eq. 6)

  With weights summing to 1 over parts, s_ij lies in [-1, 1], in [0, 1] for
  non-negative (ReLU) descriptors, and s_ii = 1 for an image without zero parts.

  Args:
    desc_a: (A, P, d) part descriptors v^p of set A (Eq. 4).
    weights_a: (A, P) part weights omega^p of set A (Eq. 5).
    desc_b: (B, P, d) part descriptors of set B.
    weights_b: (B, P) part weights of set B.

  Returns:
    (A, B) float32 similarities; rows are set A, columns set B.

  Raises:
    UserError: the shapes do not agree.
  """
  if (desc_a.ndim != 3 or desc_b.ndim != 3 or weights_a.shape != desc_a.shape[:2]
      or weights_b.shape != desc_b.shape[:2]
      or desc_a.shape[1:] != desc_b.shape[1:]):
    raise UserError(
        f"soft similarity needs descriptors (N, P, d) with weights (N, P) and the "
        f"same P and d in both sets; got descriptors {desc_a.shape} / "
        f"{desc_b.shape} and weights {weights_a.shape} / {weights_b.shape}. Pass "
        f"GroupedAttention outputs of the same module config.")
  dtype = jnp.promote_types(desc_a.dtype, jnp.float32)
  unit_a = _unit(desc_a.astype(dtype))
  unit_b = _unit(desc_b.astype(dtype))
  # sum_p 0.5 (w_i^p + w_j^p) cos_ij^p splits into two weighted inner products
  # over (p, d), so no (A, B, P) cosine tensor is materialised.
  weighted_a = unit_a * weights_a.astype(dtype)[..., None]
  weighted_b = unit_b * weights_b.astype(dtype)[..., None]
  highest = jax.lax.Precision.HIGHEST
  return 0.5 * (jnp.einsum("ipd,jpd->ij", weighted_a, unit_b, precision=highest)
                + jnp.einsum("ipd,jpd->ij", unit_a, weighted_b, precision=highest))


def soft_similarity(descriptors: jax.Array, weights: jax.Array) -> jax.Array:
  """Soft multi-part corresponding similarity within a batch (Eq. 6).

  Args:
    descriptors: (B, P, d) part descriptors (Eq. 4).
    weights: (B, P) part weights (Eq. 5).

  Returns:
    (B, B) float32 symmetric similarity matrix s.
  """
  return soft_similarity_between(descriptors, weights, descriptors, weights)


@jax.jit
def pixel_similarity(unit_pixels: jax.Array) -> jax.Array:
  """Cosine similarity of L2-normalised pixel vectors within a batch (Eq. 6b).

  s_ij = max(0, x_i . x_j), the `similarity.source = "pixels"` alternative to Eq. 6:
  on small grey images whose class is mostly their silhouette, the pixel layout ranks
  neighbours better than attention-pooled parts of a random network.

  Args:
    unit_pixels: (B, D) float rows of unit norm (non-negative pixels give s >= 0
      without the clip).

  Returns:
    (B, B) float32 symmetric similarity in [0, 1].
  """
  unit_pixels = unit_pixels.astype(jnp.float32)
  return jnp.clip(jnp.matmul(unit_pixels, unit_pixels.T,
                             precision=jax.lax.Precision.HIGHEST), 0.0, 1.0)


@functools.partial(
    jax.jit, static_argnames=("same_class_floor", "unlabelled_weight", "hard",
                              "cross_cluster_ceiling", "sibling_target"))
def target_similarity(
    soft_sim: jax.Array, pseudo_labels: jax.Array, *,
    same_class_floor: float = 0.5, unlabelled_weight: float = 0.1,
    hard: bool = False, cross_cluster_ceiling: float | None = None,
    cluster_affinity: jax.Array | None = None, fine_labels: jax.Array | None = None,
    sibling_target: float = 0.2) -> tuple[jax.Array, jax.Array]:
  """Target similarity S and pair weights m of a batch (Eq. 7).

  Soft mode (default), with lam = `same_class_floor`, mu = `unlabelled_weight`:

  | pair (i, j)                          | S_ij                | m_ij |
  |--------------------------------------|---------------------|------|
  | y_i = y_j >= 0 (same pseudo class)   | lam + (1 - lam) s_ij | 1    |
  | y_i != y_j, both >= 0                | -1                  | 1    |
  | y_i = -1 or y_j = -1 (unlabelled)    | 2 s_ij - 1          | mu   |
  | i = j                                | as above            | 0    |

  With s in [0, 1], same-class targets lie in [lam, 1] and keep the order of s
  inside a class; every same-class pair is above every pair of two different
  pseudo classes (-1). Unlabelled pairs live on the full [-1, 1] scale, so they
  are below every same-class pair only when s_ij <= (1 + lam) / 2. mu = 0 masks
  unlabelled pairs.

  Cross-cluster structure (Eq. 7b): with `cross_cluster_ceiling` c set, a pair of
  two different pseudo classes k, l gets S_ij = -1 + (1 + c) r_kl instead of -1,
  r = `cluster_affinity` in [0, 1]: the closest two clusters get c, the farthest
  -1, so codes keep which clusters are neighbours (an over-split class stays
  together) while every same-class pair stays above when c < lam.

  Two levels (Eq. 7c): with `fine_labels` y^f (a finer clustering, -1 =
  unlabelled), only a pair of one fine cluster gets lam + (1 - lam) s_ij; a pair of
  one pseudo class in two fine clusters (or unlabelled at the fine level) gets
  t = `sibling_target`, and the rows above apply to the rest. A pair of one fine
  cluster has m_ij = 1 even when a coarse label is missing. With c < t < lam the
  targets nest: one fine cluster > one pseudo class > two pseudo classes.

  Hard mode (`hard=True`, the SSDH-like ablation) ignores s and `fine_labels`: S_ij = +1 for the
  same pseudo class, -1 for different ones, m_ij = 1 for off-diagonal pairs of
  two labelled images and 0 for any pair with an unlabelled image.

  Args:
    soft_sim: (B, B) soft similarity s (Eq. 6).
    pseudo_labels: (B,) int pseudo labels, -1 = unlabelled.
    same_class_floor: lam in [0, 1], the lowest target of a same-class pair.
    unlabelled_weight: mu >= 0, pair weight of pairs with an unlabelled image.
    hard: binary targets from pseudo labels only.
    cross_cluster_ceiling: c in [-1, lam), the target of the closest two clusters
      (Eq. 7b); None keeps -1 for every pair of different pseudo classes (Eq. 7).
    cluster_affinity: (K, K) r of `psch_jax.pseudo_labels.cluster_affinity`,
      needed when `cross_cluster_ceiling` is set.
    fine_labels: (B,) int fine pseudo labels y^f (Eq. 2b), -1 = unlabelled; None
      for one level.
    sibling_target: t of Eq. 7c, used with `fine_labels` only.

  Returns:
    (target, pair_weight): two (B, B) float32 matrices, S and m.

  Raises:
    UserError: shapes disagree, or lam / mu are out of range.
  """
  num = pseudo_labels.shape[0] if pseudo_labels.ndim == 1 else -1
  if pseudo_labels.ndim != 1 or soft_sim.shape != (num, num):
    raise UserError(
        f"target_similarity needs soft_sim (B, B) and pseudo_labels (B,), got "
        f"{soft_sim.shape} and {pseudo_labels.shape}; pass the batch's similarity "
        f"matrix and its pseudo labels.")
  if not 0.0 <= same_class_floor <= 1.0:
    raise UserError(
        f"same_class_floor={same_class_floor} must lie in [0, 1] (default 0.5).")
  if not unlabelled_weight >= 0.0:
    raise UserError(
        f"unlabelled_weight={unlabelled_weight} must be >= 0 (default 0.1; 0 masks "
        f"pairs with an unlabelled image).")

  if cross_cluster_ceiling is not None and (
      cluster_affinity is None or not -1.0 <= cross_cluster_ceiling < same_class_floor):
    raise UserError(
        f"cross_cluster_ceiling={cross_cluster_ceiling} needs a (K, K) "
        f"cluster_affinity and must lie in [-1, same_class_floor={same_class_floor}) "
        f"so that every same-class pair stays above every cross-cluster pair.")

  dtype = jnp.promote_types(soft_sim.dtype, jnp.float32)
  soft_sim = soft_sim.astype(dtype)
  labelled = pseudo_labels >= 0
  both_labelled = labelled[:, None] & labelled[None, :]
  same_class = both_labelled & (pseudo_labels[:, None] == pseudo_labels[None, :])
  off_diagonal = ~jnp.eye(num, dtype=bool)

  if fine_labels is not None and (fine_labels.shape != pseudo_labels.shape
                                  or not -1.0 <= sibling_target < same_class_floor):
    raise UserError(
        f"fine_labels need the shape {pseudo_labels.shape} of the pseudo labels (got "
        f"{fine_labels.shape}) and a sibling_target={sibling_target} in "
        f"[-1, same_class_floor={same_class_floor}).")

  if hard:
    target = jnp.where(same_class, 1.0, -1.0).astype(dtype)
    pair_weight = both_labelled & off_diagonal
  else:
    if cross_cluster_ceiling is None:
      cross = -1.0
    else:
      clusters = jnp.maximum(pseudo_labels, 0)
      cross = -1.0 + (1.0 + cross_cluster_ceiling) * cluster_affinity.astype(dtype)[
          clusters[:, None], clusters[None, :]]
    soft_target = same_class_floor + (1.0 - same_class_floor) * soft_sim
    target = jnp.where(same_class, soft_target,
                       jnp.where(both_labelled, cross, 2.0 * soft_sim - 1.0))
    if fine_labels is not None:  # Eq. 7c
      same_fine = ((fine_labels[:, None] == fine_labels[None, :])
                   & (fine_labels >= 0)[:, None] & (fine_labels >= 0)[None, :])
      target = jnp.where(same_fine, soft_target,
                         jnp.where(same_class, sibling_target, target))
      both_labelled = both_labelled | same_fine
    pair_weight = jnp.where(both_labelled, 1.0, unlabelled_weight) * off_diagonal
  return target.astype(dtype), pair_weight.astype(dtype)
