"""The PSCH loss: similarity, pseudo-label classification and quantisation (Eqs. 8-11).

    L = L_sim + alpha L_cls + beta L_q                                   (Eq. 11)

Plain `jnp` ops over the global batch, so the loss runs unchanged under `jax.jit`
with the batch sharded across devices: XLA inserts the collectives that the
(B, B) code inner products and the batch means need.
"""
import jax
import jax.numpy as jnp
import optax

from psch_jax.errors import UserError

# Guards the normalisation of L_sim when every pair weight is 0 (for example a batch
# without labelled pairs and mu = 0): the loss term is then 0, not NaN.
_MIN_TOTAL_PAIR_WEIGHT = 1e-12


def psch_loss(
    relaxed_codes: jax.Array, class_logits: jax.Array, pseudo_labels: jax.Array,
    target: jax.Array, pair_weight: jax.Array, *, alpha: float = 0.1,
    beta: float = 0.01, fine_logits: jax.Array | None = None,
    fine_labels: jax.Array | None = None, fine_alpha: float = 0.1
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Total PSCH loss of a batch and its unweighted terms.

  - L_sim = sum_ij m_ij (u_i . u_j / L - S_ij)^2 / max(sum_ij m_ij, eps)  (Eq. 8);
    S and m are constants (under `stop_gradient`).
  - L_cls = mean cross-entropy of the logits against y_i over the images with
    y_i >= 0 (Eq. 9); 0 when no image of the batch is labelled.
  - L_q = mean_i ||u_i - sign(u_i)||^2 / L with sign(0) = +1 (Eq. 10). sign(u) is a
    constant, so dL_q/du = 2 (u - sign(u)) / (L B).

  Args:
    relaxed_codes: (B, L) relaxed codes u in (-1, 1) (Eq. 12).
    class_logits: (B, K) logits of the linear classifier on u, K = number of
      pseudo classes.
    pseudo_labels: (B,) int pseudo labels in [0, K), -1 = unlabelled.
    target: (B, B) target similarity S (Eq. 7).
    pair_weight: (B, B) pair weights m >= 0 (Eq. 7).
    alpha: weight of L_cls; 0 is the ablation "no L_cls".
    fine_logits, fine_labels: (B, K_f) logits of the fine classifier and (B,) fine
      pseudo labels (Eq. 2b), -1 = unlabelled; with them the loss adds
      fine_alpha times their cross-entropy L_cls^f (Eq. 9b). None for one level.
    fine_alpha: alpha_f of Eq. 11b, the weight of L_cls^f.
    beta: weight of L_q; 0 is the ablation "no L_q".

  Returns:
    (total, terms): the scalar total (Eq. 11) and {"sim", "cls", "quant"}, the
    unweighted scalar terms. float32 (float64 for float64 codes).

  Raises:
    UserError: the shapes do not agree.
  """
  if relaxed_codes.ndim != 2:
    raise UserError(
        f"relaxed_codes must be (batch, code_length), got shape "
        f"{relaxed_codes.shape}.")
  batch, code_length = relaxed_codes.shape
  if (class_logits.ndim != 2 or class_logits.shape[0] != batch
      or pseudo_labels.shape != (batch,) or target.shape != (batch, batch)
      or pair_weight.shape != (batch, batch)):
    raise UserError(
        f"psch_loss needs relaxed_codes (B, L), class_logits (B, K), "
        f"pseudo_labels (B,), target and pair_weight (B, B) for one batch B; got "
        f"{relaxed_codes.shape}, {class_logits.shape}, {pseudo_labels.shape}, "
        f"{target.shape}, {pair_weight.shape}.")

  dtype = jnp.promote_types(relaxed_codes.dtype, jnp.float32)
  codes = relaxed_codes.astype(dtype)
  target = jax.lax.stop_gradient(target.astype(dtype))
  pair_weight = jax.lax.stop_gradient(pair_weight.astype(dtype))

  inner = jnp.matmul(codes, codes.T, precision=jax.lax.Precision.HIGHEST)
  residual = inner / code_length - target
  sim = jnp.sum(pair_weight * residual**2) / jnp.maximum(
      jnp.sum(pair_weight), _MIN_TOTAL_PAIR_WEIGHT)  # (Eq. 8)

  cls = _masked_cross_entropy(class_logits.astype(dtype), pseudo_labels)  # (Eq. 9)
  terms = {}
  if fine_logits is not None:
    if fine_logits.shape[0] != batch or fine_labels.shape != (batch,):
      raise UserError(
          f"psch_loss needs fine_logits (B, K_f) and fine_labels (B,) for the batch "
          f"of {batch}; got {fine_logits.shape} and {fine_labels.shape}.")
    terms["cls_fine"] = _masked_cross_entropy(fine_logits.astype(dtype),
                                              fine_labels)  # (Eq. 9b)

  signs = jax.lax.stop_gradient(jnp.where(codes >= 0, 1.0, -1.0).astype(dtype))
  quant = jnp.mean(jnp.sum((codes - signs)**2, axis=-1)) / code_length  # (Eq. 10)

  total = sim + alpha * cls + beta * quant  # (Eq. 11)
  if "cls_fine" in terms:
    total = total + fine_alpha * terms["cls_fine"]  # (Eq. 11b)
  return total, {"sim": sim, "cls": cls, "quant": quant, **terms}


def _masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean cross-entropy over the rows with a label >= 0; 0 when there is none."""
  labelled = labels >= 0
  # Unlabelled rows get a dummy class 0 so the cross-entropy stays finite; the
  # mask then removes them (and their gradient) from the mean.
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.where(labelled, labels, 0))
  return jnp.sum(jnp.where(labelled, cross_entropy, 0.0)) / jnp.maximum(
      jnp.sum(labelled), 1).astype(logits.dtype)
