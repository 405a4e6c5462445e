"""CIBHash (Qiu et al., IJCAI 2021): two augmented views of each image, binary codes
b = sign(p - u) of Bernoulli probabilities p = sigmoid(h) with a straight-through
gradient, an NT-Xent contrastive loss between the views' codes and the symmetric
Bernoulli KL between their probabilities (the authors' zexuanqiu/CIBHash,
model/CIBHash.py; docs/method.md, "CIBHash")."""
import jax
import jax.numpy as jnp
import ml_collections
import optax

from psch_jax.methods.interface import Method, TrainingData
from psch_jax.methods.greedyhash import greedy_sign

# The authors' log(p + 1e-8): keeps the KL finite where a probability saturates.
_LOG_EPS = 1e-8


def nt_xent(z_a: jax.Array, z_b: jax.Array, *, temperature: float) -> jax.Array:
  """SimCLR's NT-Xent over the 2B codes of two views (Eq. C2): for each of the 2B
  rows, the cross-entropy of its cosine with its other view against its cosines
  with the 2B - 2 other rows, all divided by the temperature, averaged over 2B.

  Args:
    z_a, z_b: float (B, L), row i of each a view of image i.
    temperature: tau > 0.

  Returns:
    float32 scalar.
  """
  batch = z_a.shape[0]
  z = jnp.concatenate([z_a, z_b]).astype(jnp.float32)
  unit = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-8)
  logits = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST) / temperature
  # Each row's own cosine is no candidate; its other view is the class to predict.
  logits = jnp.where(jnp.eye(2 * batch, dtype=bool), -jnp.inf, logits)
  positive = jnp.concatenate([jnp.arange(batch, 2 * batch), jnp.arange(batch)])
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, positive))


def bernoulli_kl(logits: jax.Array, logits_target: jax.Array) -> jax.Array:
  """mean over rows of sum over bits of KL(Bern(p) || Bern(q)), p = sigmoid(logits),
  q = sigmoid(logits_target) a constant (Eq. C3): the authors' compute_kl,
  p (log(p + e) - log(q + e)) + (1 - p) (log(1 - p + e) - log(1 - q + e)) with
  e = 1e-8.

  The logs are taken from the logits, log(p + e) = logaddexp(log sigmoid(h), log e)
  and log(1 - p + e) = logaddexp(log sigmoid(-h), log e): the same numbers without
  forming 1 - p + e, which XLA's constant reassociation turns into (1 + e) - p = 0
  once p rounds to 1 (h > 17), a log(0) that made CIBHash's loss NaN within an
  epoch on Fashion-MNIST.

  Args:
    logits, logits_target: float (B, L) hash-layer outputs h of the two views.

  Returns:
    float32 scalar.
  """
  h, h_target = logits, jax.lax.stop_gradient(logits_target)
  log_eps = jnp.log(_LOG_EPS)

  def log_plus_eps(x):
    return jnp.logaddexp(jax.nn.log_sigmoid(x), log_eps)

  p = jax.nn.sigmoid(h)
  kl = (p * (log_plus_eps(h) - log_plus_eps(h_target))
        + (1 - p) * (log_plus_eps(-h) - log_plus_eps(-h_target)))
  return jnp.mean(jnp.sum(kl, axis=-1))


def cibhash_loss(hash_logits_a: jax.Array, hash_logits_b: jax.Array, key: jax.Array,
                 *, temperature: float, kl_weight: float, stochastic: bool
                 ) -> tuple[jax.Array, dict]:
  """L = NT-Xent(b_a, b_b) + beta (KL(p_a || p_b) + KL(p_b || p_a)) / 2 (Eq. C4),
  p = sigmoid(h), b = greedy_sign(p - u) with u ~ U(0, 1) per bit (`stochastic`,
  the paper's Eq. C1) or u = 1/2 (the authors' public code).

  Args:
    hash_logits_a, hash_logits_b: (B, L) float32 h of the two views.
    key: PRNG key of u (used once; unused when not stochastic).

  Returns:
    (total, {"loss_contrastive", "loss_kl"}), float32 scalars.
  """
  p_a, p_b = jax.nn.sigmoid(hash_logits_a), jax.nn.sigmoid(hash_logits_b)
  if stochastic:
    u_a, u_b = jax.random.uniform(key, (2, *p_a.shape), p_a.dtype)
  else:
    u_a = u_b = 0.5
  b_a, b_b = greedy_sign(p_a - u_a), greedy_sign(p_b - u_b)
  contrastive = nt_xent(b_a, b_b, temperature=temperature)
  kl = (bernoulli_kl(hash_logits_a, hash_logits_b)
        + bernoulli_kl(hash_logits_b, hash_logits_a)) / 2
  return contrastive + kl_weight * kl, {"loss_contrastive": contrastive, "loss_kl": kl}


def _epoch_targets(config: ml_collections.ConfigDict, key: jax.Array,
                   data: TrainingData, params, *, epoch: int, previous=None):
  """CIBHash keeps no per-image state."""
  del config, key, data, params, previous
  return {}, {"epoch": epoch}


def _loss(config, outputs, targets, position, *, key, attention):
  del targets, position, attention
  c = config.method.cibhash
  view_a, view_b = outputs
  return cibhash_loss(view_a["hash_logits"], view_b["hash_logits"], key,
                      temperature=c.temperature, kl_weight=c.kl_weight,
                      stochastic=c.stochastic)


METHOD = Method(
    name="cibhash", num_views=2,
    view_augmentation=lambda config: config.method.cibhash.augment,
    classifier_outputs=lambda config: 0, epoch_targets=_epoch_targets,
    refresh_due=lambda config, epoch: False,
    abstract_targets=lambda config, num_train, model, sharding, *, pixel_dim,
    attention: {},
    loss=_loss, describe=lambda stats: "cibhash: two views per image, no targets")
