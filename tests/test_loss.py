"""Tests of psch_jax.loss: the PSCH loss terms, their gradients and the ablations."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from psch_jax.attention import GroupedAttention
from psch_jax.errors import UserError
from psch_jax.loss import psch_loss
from psch_jax.similarity import soft_similarity, target_similarity

BATCH, CODE_LENGTH, NUM_CLASSES = 8, 6, 3
LABELS = np.array([0, 1, -1, 2, 0, -1, 1, 0], np.int32)
# One compiled loss for the whole file: op-by-op dispatch is slow on 2 CPU cores.
jitted_loss = jax.jit(psch_loss)


def _inputs(seed: int = 0, dtype=np.float32):
  """Codes kept at least 0.1 away from 0, so sign(u) is locally constant."""
  rng = np.random.default_rng(seed)
  magnitude = rng.uniform(0.1, 0.9, size=(BATCH, CODE_LENGTH))
  codes = magnitude * rng.choice([-1.0, 1.0], size=(BATCH, CODE_LENGTH))
  logits = rng.normal(size=(BATCH, NUM_CLASSES))
  soft_sim = rng.uniform(size=(BATCH, BATCH))
  target, weight = target_similarity(
      jnp.asarray((soft_sim + soft_sim.T) / 2, jnp.float32), jnp.asarray(LABELS))
  return (codes.astype(dtype), logits.astype(dtype), LABELS,
          np.asarray(target, dtype), np.asarray(weight, dtype))


def test_terms_match_the_equations_in_numpy():
  codes, logits, labels, target, weight = _inputs()
  total, terms = jitted_loss(codes, logits, labels, target, weight)
  assert total.shape == () and total.dtype == jnp.float32

  residual = codes @ codes.T / CODE_LENGTH - target
  sim = np.sum(weight * residual**2) / np.sum(weight)
  labelled = labels >= 0
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  cls = -np.mean(log_probs[labelled, labels[labelled]])
  quant = np.mean(np.sum((codes - np.where(codes >= 0, 1, -1))**2, -1)) / CODE_LENGTH
  np.testing.assert_allclose(terms["sim"], sim, rtol=1e-5)
  np.testing.assert_allclose(terms["cls"], cls, rtol=1e-5)
  np.testing.assert_allclose(terms["quant"], quant, rtol=1e-5)
  np.testing.assert_allclose(total, sim + 0.1 * cls + 0.01 * quant, rtol=1e-5)


def test_sign_of_zero_is_plus_one():
  codes = np.zeros((2, 4), np.float32)
  _, terms = jitted_loss(codes, np.zeros((2, 2), np.float32), np.array([0, 1]),
                       np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
  np.testing.assert_allclose(terms["quant"], 1.0)
  assert terms["sim"] == 0.0


@pytest.mark.parametrize("all_unlabelled", [False, True])
def test_loss_and_gradients_are_finite(all_unlabelled):
  codes, logits, labels, target, weight = _inputs(1)
  if all_unlabelled:
    labels = np.full_like(labels, -1)
    target, weight = target_similarity(target, labels, unlabelled_weight=0.0)

  def total(codes, logits):
    return jitted_loss(codes, logits, labels, target, weight)[0]

  value, grads = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(codes, logits)
  assert np.isfinite(value)
  for grad in grads:
    assert np.all(np.isfinite(grad))
  if all_unlabelled:
    _, terms = jitted_loss(codes, logits, labels, target, weight)
    assert terms["cls"] == 0.0 and terms["sim"] == 0.0
    np.testing.assert_array_equal(grads[1], 0.0)


def test_code_gradient_matches_central_finite_differences_in_float64():
  with jax.enable_x64(True):
    codes, logits, labels, target, weight = _inputs(2, np.float64)

    def total(codes):
      return jitted_loss(codes, logits, labels, target, weight,
                         alpha=0.3, beta=0.5)[0]

    grad = np.asarray(jax.grad(total)(codes))
    assert grad.dtype == np.float64
    step = 1e-6
    numeric = np.zeros_like(codes)
    for index in np.ndindex(codes.shape):
      shift = np.zeros_like(codes)
      shift[index] = step
      numeric[index] = (total(codes + shift) - total(codes - shift)) / (2 * step)
  assert not jax.config.jax_enable_x64
  np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_quantisation_gradient_treats_sign_as_constant():
  codes, logits, labels, target, _ = _inputs(3)
  no_pairs = np.zeros((BATCH, BATCH), np.float32)
  grad = jax.grad(lambda u: jitted_loss(u, logits, labels, target, no_pairs,
                                      alpha=0.0, beta=1.0)[0])(codes)
  expected = 2 * (codes - np.where(codes >= 0, 1, -1)) / (CODE_LENGTH * BATCH)
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-8)


def test_classification_uses_labelled_images_only():
  codes, logits, labels, target, weight = _inputs(4)
  other_logits = logits.copy()
  other_logits[labels < 0] += 10.0 * np.arange(NUM_CLASSES)
  _, terms = jitted_loss(codes, logits, labels, target, weight)
  _, other_terms = jitted_loss(codes, other_logits, labels, target, weight)
  np.testing.assert_allclose(terms["cls"], other_terms["cls"], rtol=1e-6)
  labelled = labels >= 0
  expected = np.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits[labelled], labels[labelled]))
  np.testing.assert_allclose(terms["cls"], expected, rtol=1e-5)


def test_fine_classifier_adds_its_own_cross_entropy_over_its_labelled_images():
  codes, logits, labels, target, weight = _inputs(5)
  rng = np.random.default_rng(6)
  fine_logits = rng.normal(size=(BATCH, 5)).astype(np.float32)
  fine_labels = np.array([0, 3, 4, -1, 1, -1, 3, 2], np.int32)
  total, terms = jitted_loss(codes, logits, labels, target, weight,
                             fine_logits=fine_logits, fine_labels=fine_labels)
  _, coarse_terms = jitted_loss(codes, logits, labels, target, weight)
  kept = fine_labels >= 0
  fine = np.mean(optax.softmax_cross_entropy_with_integer_labels(
      fine_logits[kept], fine_labels[kept]))
  np.testing.assert_allclose(terms["cls_fine"], fine, rtol=1e-5)
  for name in ("sim", "cls", "quant"):
    np.testing.assert_allclose(terms[name], coarse_terms[name], rtol=1e-6)
  np.testing.assert_allclose(
      total, terms["sim"] + 0.1 * terms["cls"] + 0.01 * terms["quant"] + 0.1 * fine,
      rtol=1e-5)
  heavier, _ = jitted_loss(codes, logits, labels, target, weight,
                           fine_logits=fine_logits, fine_labels=fine_labels,
                           fine_alpha=0.5)
  np.testing.assert_allclose(heavier - total, 0.4 * fine, rtol=1e-4)
  with pytest.raises(UserError, match="fine_logits"):
    psch_loss(codes, logits, labels, target, weight, fine_logits=fine_logits[:4],
              fine_labels=fine_labels)


def test_loss_on_a_batch_sharded_across_devices_matches_one_device():
  assert jax.device_count() == 4, "tests/conftest.py sets 4 CPU devices"
  inputs = _inputs(5)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  shardings = (NamedSharding(mesh, PartitionSpec("data")),) * 3 + (
      NamedSharding(mesh, PartitionSpec("data", None)),) * 2
  sharded = [jax.device_put(x, s) for x, s in zip(inputs, shardings)]
  total, terms = jax.jit(psch_loss)(*sharded)
  expected_total, expected_terms = jitted_loss(*inputs)
  np.testing.assert_allclose(total, expected_total, rtol=1e-5)
  for name in ("sim", "cls", "quant"):
    np.testing.assert_allclose(terms[name], expected_terms[name], rtol=1e-5)


def test_alpha_zero_and_beta_zero_remove_only_their_term():
  inputs = _inputs(6)
  total, terms = jitted_loss(*inputs, alpha=0.1, beta=0.01)
  total_no_cls, terms_no_cls = jitted_loss(*inputs, alpha=0.0, beta=0.01)
  total_no_quant, terms_no_quant = jitted_loss(*inputs, alpha=0.1, beta=0.0)
  assert terms["cls"] > 0 and terms["quant"] > 0
  for other_terms in (terms_no_cls, terms_no_quant):
    for name in terms:
      np.testing.assert_allclose(other_terms[name], terms[name], rtol=1e-6)
  np.testing.assert_allclose(total_no_cls, total - 0.1 * terms["cls"], rtol=1e-6)
  np.testing.assert_allclose(total_no_quant, total - 0.01 * terms["quant"],
                             rtol=1e-6)


def _terms_for(target, weight):
  codes, logits, labels, _, _ = _inputs(7)
  return jitted_loss(codes, logits, labels, target, weight)[1]


def _assert_only_sim_differs(terms, other_terms):
  assert abs(float(terms["sim"]) - float(other_terms["sim"])) > 1e-4
  for name in ("cls", "quant"):
    np.testing.assert_array_equal(terms[name], other_terms[name])


def test_hard_similarity_changes_only_the_similarity_term():
  soft_sim = _inputs(7)[3]
  terms = _terms_for(*target_similarity(soft_sim, LABELS))
  hard_terms = _terms_for(*target_similarity(soft_sim, LABELS, hard=True))
  _assert_only_sim_differs(terms, hard_terms)


@pytest.mark.parametrize("ablation", [dict(num_parts=1), dict(uniform=True)])
def test_attention_ablations_change_only_the_similarity_term(ablation):
  rng = np.random.default_rng(1)
  maps = np.maximum(rng.normal(size=(BATCH, 3, 3, 8)), 0).astype(np.float32)

  def terms_with(**attention_fields):
    module = GroupedAttention(**{"num_parts": 4, **attention_fields})
    parts = jax.jit(module.apply)({}, maps)
    soft_sim = soft_similarity(parts.descriptors, parts.weights)
    return soft_sim, _terms_for(*target_similarity(soft_sim, LABELS))

  soft_sim, terms = terms_with()
  ablated_sim, ablated_terms = terms_with(**ablation)
  assert np.max(np.abs(soft_sim - ablated_sim)) > 1e-3
  _assert_only_sim_differs(terms, ablated_terms)


def test_mismatched_shapes_raise():
  codes, logits, labels, target, weight = _inputs()
  with pytest.raises(UserError, match="pseudo_labels"):
    psch_loss(codes, logits, labels[:-1], target, weight)
  with pytest.raises(UserError, match="code_length"):
    psch_loss(codes[0], logits, labels, target, weight)
