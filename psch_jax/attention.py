"""Grouped attention: part descriptors and part weights from a conv feature map.

The C channels of the last convolutional feature map are split into P contiguous
groups ("parts"). Each part gets its own spatial attention map (Eq. 3), an
attention-pooled descriptor (Eq. 4) and a weight saying how strongly it responds
(Eq. 5). `psch_jax.similarity.soft_similarity` compares images part by part from
these (Eq. 6).

The module has no parameters. Two ablations are fields: `num_parts=1` (a single
part) and `uniform=True` (no attention: every position weighs 1/(h*w), so the
descriptor is the group's average pooling).
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from psch_jax.errors import UserError


class PartFeatures(NamedTuple):
  """What `GroupedAttention` returns for a batch of B images.

  Attributes:
    descriptors: (B, P, C/P) float32, part descriptors v_i^p (Eq. 4).
    weights: (B, P) float32, part weights omega_i^p, summing to 1 over P (Eq. 5).
    attention: (B, P, h*w) float32, attention maps A_i^p over the row-major
      flattened positions, summing to 1 over h*w (Eq. 3).
  """
  descriptors: jax.Array
  weights: jax.Array
  attention: jax.Array


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


# Below this squared norm the part weight treats a descriptor as zero; it keeps the
# gradient of the norm finite for an all-zero part (a dead ReLU group).
_MIN_SQUARED_NORM = 1e-24


class GroupedAttention(nn.Module):
  """Splits channels into parts and attention-pools each part (Eqs. 3-5).

  Attributes:
    num_parts: P, the number of contiguous channel groups; must divide C.
    temperature: T > 0 of the spatial softmax (Eq. 3); large T flattens the
      attention towards average pooling, small T sharpens it towards max pooling.
    uniform: ablation "no attention": A_i^p = 1/(h*w) everywhere, so v_i^p is the
      group's average pooling and `temperature` is unused.
  """
  num_parts: int = 4
  temperature: float = 1.0
  uniform: bool = False

  def __call__(self, feature_map: jax.Array) -> PartFeatures:
    """Part descriptors, part weights and attention maps of a batch.

    Args:
      feature_map: (B, h, w, C) feature maps M_i (NHWC); computed in float32 (or
        float64 when given float64).

    Returns:
      `PartFeatures` with descriptors (B, P, C/P), weights (B, P) and attention
      (B, P, h*w).

    Raises:
      UserError: the feature map is not 4-D, `num_parts` does not divide C, or
        `temperature` is not positive.
    """
    if feature_map.ndim != 4:
      raise UserError(
          f"GroupedAttention expects a (batch, height, width, channels) feature "
          f"map, got shape {tuple(feature_map.shape)}; pass the last conv "
          f"block's NHWC output.")
    batch, height, width, channels = feature_map.shape
    if self.num_parts < 1 or channels % self.num_parts != 0:
      divisors = ", ".join(str(k) for k in _divisors(channels))
      raise UserError(
          f"num_parts={self.num_parts} does not divide the {channels} channels "
          f"of the feature map; choose num_parts from the divisors of "
          f"{channels}: {divisors}.")
    if not self.uniform and not self.temperature > 0:
      raise UserError(
          f"temperature={self.temperature} must be > 0; use 1.0 (default) or "
          f"uniform=True for average pooling.")

    dtype = jnp.promote_types(feature_map.dtype, jnp.float32)
    num_positions = height * width
    part_size = channels // self.num_parts
    # (B, h, w, C) -> (B, P, h*w, C/P): channel c belongs to part c // (C/P).
    groups = feature_map.astype(dtype).reshape(
        batch, num_positions, self.num_parts, part_size).transpose(0, 2, 1, 3)

    if self.uniform:
      attention = jnp.full((batch, self.num_parts, num_positions),
                           1.0 / num_positions, dtype)
    else:
      logits = groups.mean(axis=-1) / self.temperature  # (Eq. 3)
      attention = jax.nn.softmax(logits, axis=-1)

    descriptors = jnp.einsum(  # (Eq. 4)
        "bps,bpsd->bpd", attention, groups,
        precision=jax.lax.Precision.HIGHEST)
    norms = jnp.sqrt(jnp.maximum(
        jnp.sum(descriptors * descriptors, axis=-1), _MIN_SQUARED_NORM))
    weights = jax.nn.softmax(norms, axis=-1)  # (Eq. 5)
    return PartFeatures(descriptors=descriptors, weights=weights,
                        attention=attention)
