"""GreedyHash (Su et al., NeurIPS 2018), unsupervised: the greedy sign layer with a
straight-through gradient, trained to make the cosines of code pairs those of
feature pairs (the authors' ssppp/GreedyHash, unsupervised_vgg.py; docs/method.md,
"GreedyHash")."""
import jax
import jax.numpy as jnp

from psch_jax.methods.interface import Method
from psch_jax.methods import peer_features


@jax.custom_vjp
def greedy_sign(h: jax.Array) -> jax.Array:
  """b = sign(h) with sign(0) = +1 forward, identity backward: db/dh := 1
  (GreedyHash's hash layer, Eq. G2).

  Args:
    h: float (..., L) hash-layer outputs.

  Returns:
    float (..., L) of h's dtype, entries in {-1, +1}.
  """
  return jnp.where(h >= 0, 1.0, -1.0).astype(h.dtype)


def _greedy_sign_forward(h):
  return greedy_sign(h), None


def _greedy_sign_backward(_, grad):
  return (grad,)


greedy_sign.defvjp(_greedy_sign_forward, _greedy_sign_backward)


def greedyhash_loss(hash_logits: jax.Array, features: jax.Array, *,
                    cubic_weight: float) -> tuple[jax.Array, dict]:
  """L = mean_i (cos(b_i, b_i') - cos(x_i, x_i'))^2 + w mean | |h| - 1 |^3
  (Eqs. G1, G3), pairing the batch's first half with its second.

  Args:
    hash_logits: (B, L) float32 h; b = greedy_sign(h).
    features: (B, D) the images' fixed features x (constants).
    cubic_weight: w, 0.1 in the authors' code.

  Returns:
    (total, {"loss_cosine", "loss_cubic"}), float32 scalars.
  """
  codes = greedy_sign(hash_logits)
  cosine = peer_features.cosine_preserving_loss(codes, features)
  cubic = jnp.mean(jnp.abs(jnp.abs(hash_logits) - 1.0) ** 3)
  return cosine + cubic_weight * cubic, {"loss_cosine": cosine, "loss_cubic": cubic}


_epoch_targets, _abstract_targets = peer_features.feature_targets("greedyhash")


def _loss(config, outputs, targets, position, *, key, attention):
  del key, attention
  out, = outputs
  return greedyhash_loss(out["hash_logits"], targets["features"][position],
                         cubic_weight=config.method.greedyhash.cubic_weight)


METHOD = Method(
    name="greedyhash", num_views=1,
    view_augmentation=lambda config: config.data.augment,
    classifier_outputs=lambda config: 0, epoch_targets=_epoch_targets,
    refresh_due=lambda config, epoch: False,
    abstract_targets=_abstract_targets,
    loss=_loss,
    describe=lambda stats: (f"greedyhash: cosines of {stats['features']} features "
                            f"(D = {stats['feature_dim']})"))
