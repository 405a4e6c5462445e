"""BiHalf (Li and van Gemert, AAAI 2021): the bi-half layer, which gives each bit
+1 on the half of the batch where its value is largest and -1 on the other half,
trained with GreedyHash's cosine-preserving loss (the authors'
liyunqianggyn/Deep-Unsupervised-Image-Hashing, ImageHashing/Cifar10_I.py;
docs/method.md, "BiHalf")."""
import functools

import jax
import jax.numpy as jnp

from psch_jax.methods.interface import Method
from psch_jax.methods import peer_features


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def bi_half(u: jax.Array, gamma: float) -> jax.Array:
  """The bi-half layer (Eq. H1): per bit (column), the floor(N/2) rows with the
  largest u get +1 and the others -1; rows of equal value rank by row index.

  Backward (Eq. H2): dL/du = dL/db + gamma (u - b) / (N L).

  Args:
    u: float (N, L), the batch's hash-layer outputs.
    gamma: the weight of the (u - b) term of the gradient.

  Returns:
    float (N, L) of u's dtype, entries in {-1, +1}, each column with floor(N/2)
    entries +1.
  """
  # The rank of each row within its column, largest first; a stable sort of -u
  # keeps equal values in row order.
  order = jnp.argsort(-u, axis=0, stable=True)
  rank = jnp.argsort(order, axis=0, stable=True)
  return jnp.where(rank < u.shape[0] // 2, 1.0, -1.0).astype(u.dtype)


def _bi_half_forward(u, gamma):
  b = bi_half(u, gamma)
  return b, (u, b)


def _bi_half_backward(gamma, residuals, grad):
  u, b = residuals
  return (grad + gamma * (u - b) / b.size,)


bi_half.defvjp(_bi_half_forward, _bi_half_backward)


def bihalf_loss(hash_logits: jax.Array, features: jax.Array, *, gamma: float
                ) -> tuple[jax.Array, dict]:
  """mean_i (cos(b_i, b_i') - cos(x_i, x_i'))^2 with b = bi_half(h) (Eqs. G1, H1).

  Args:
    hash_logits: (B, L) float32 h of the whole (global) batch.
    features: (B, D) the images' fixed features x (constants).

  Returns:
    (total, {"loss_cosine"}), float32 scalars.
  """
  cosine = peer_features.cosine_preserving_loss(bi_half(hash_logits, gamma), features)
  return cosine, {"loss_cosine": cosine}


_epoch_targets, _abstract_targets = peer_features.feature_targets("bihalf")


def _loss(config, outputs, targets, position, *, key, attention):
  del key, attention
  out, = outputs
  return bihalf_loss(out["hash_logits"], targets["features"][position],
                     gamma=config.method.bihalf.gamma)


METHOD = Method(
    name="bihalf", num_views=1, view_augmentation=lambda config: config.data.augment,
    classifier_outputs=lambda config: 0, epoch_targets=_epoch_targets,
    refresh_due=lambda config, epoch: False,
    abstract_targets=_abstract_targets,
    loss=_loss,
    describe=lambda stats: (f"bihalf: cosines of {stats['features']} features "
                            f"(D = {stats['feature_dim']})"))
