"""Tests of psch_jax.attention: grouped attention, part descriptors and weights."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psch_jax.attention import GroupedAttention, PartFeatures
from psch_jax.errors import UserError

BATCH, HEIGHT, WIDTH, CHANNELS = 3, 4, 5, 12


def _feature_map(seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.normal(size=(BATCH, HEIGHT, WIDTH, CHANNELS)).astype(np.float32)


def _apply(module: GroupedAttention, feature_map) -> PartFeatures:
  # One compiled call per module config: op-by-op dispatch is slow on small CPUs.
  return jax.jit(module.apply)({}, jnp.asarray(feature_map))


def test_shapes_dtypes_and_no_parameters():
  module = GroupedAttention(num_parts=4)
  variables = module.init(jax.random.key(0), jnp.asarray(_feature_map()))
  assert not jax.tree.leaves(variables)
  parts = _apply(module, _feature_map())
  assert parts.descriptors.shape == (BATCH, 4, CHANNELS // 4)
  assert parts.weights.shape == (BATCH, 4)
  assert parts.attention.shape == (BATCH, 4, HEIGHT * WIDTH)
  for array in parts:
    assert array.dtype == jnp.float32


def test_attention_and_weights_are_distributions():
  parts = _apply(GroupedAttention(num_parts=3), _feature_map())
  np.testing.assert_allclose(parts.attention.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(parts.weights.sum(-1), 1.0, rtol=1e-6)
  assert np.all(np.asarray(parts.attention) > 0)


def test_matches_equations_3_to_5_in_numpy():
  maps = _feature_map(1)
  num_parts, temperature = 4, 0.7
  parts = _apply(GroupedAttention(num_parts=num_parts, temperature=temperature),
                 maps)
  size = CHANNELS // num_parts
  flat = maps.reshape(BATCH, HEIGHT * WIDTH, CHANNELS).astype(np.float64)
  for i in range(BATCH):
    norms = []
    for p in range(num_parts):
      group = flat[i, :, p * size:(p + 1) * size]
      logits = group.mean(-1) / temperature
      attention = np.exp(logits - logits.max())
      attention /= attention.sum()
      descriptor = attention @ group
      norms.append(np.linalg.norm(descriptor))
      np.testing.assert_allclose(parts.attention[i, p], attention, rtol=1e-5)
      np.testing.assert_allclose(parts.descriptors[i, p], descriptor,
                                 rtol=1e-5, atol=1e-6)
    weights = np.exp(np.array(norms) - max(norms))
    np.testing.assert_allclose(parts.weights[i], weights / weights.sum(),
                               rtol=1e-5)


def test_uniform_is_mean_pooling():
  maps = _feature_map(2)
  parts = _apply(GroupedAttention(num_parts=4, uniform=True), maps)
  pooled = maps.mean(axis=(1, 2)).reshape(BATCH, 4, CHANNELS // 4)
  np.testing.assert_allclose(parts.descriptors, pooled, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(parts.attention, 1.0 / (HEIGHT * WIDTH), rtol=1e-6)


def test_single_part():
  maps = _feature_map(3)
  parts = _apply(GroupedAttention(num_parts=1), maps)
  assert parts.descriptors.shape == (BATCH, 1, CHANNELS)
  np.testing.assert_allclose(parts.weights, 1.0)


@pytest.mark.parametrize("num_parts", [5, 0, 24])
def test_bad_num_parts_names_the_divisors(num_parts):
  with pytest.raises(UserError, match="1, 2, 3, 4, 6, 12"):
    _apply(GroupedAttention(num_parts=num_parts), _feature_map())


def test_bad_temperature_and_rank_raise():
  with pytest.raises(UserError, match="temperature"):
    _apply(GroupedAttention(temperature=0.0), _feature_map())
  with pytest.raises(UserError, match="height, width, channels"):
    _apply(GroupedAttention(), _feature_map()[0])


def test_large_temperature_flattens_attention():
  maps = 5.0 * _feature_map(4)
  sharp = _apply(GroupedAttention(num_parts=4, temperature=1.0), maps)
  flat = _apply(GroupedAttention(num_parts=4, temperature=1e6), maps)
  uniform = 1.0 / (HEIGHT * WIDTH)
  assert np.max(np.abs(sharp.attention - uniform)) > 0.05
  np.testing.assert_allclose(flat.attention, uniform, rtol=1e-4)
  pooled = _apply(GroupedAttention(num_parts=4, uniform=True), maps)
  np.testing.assert_allclose(flat.descriptors, pooled.descriptors, atol=1e-4)


def test_zero_feature_map_is_finite_with_finite_gradient():
  maps = jnp.zeros((2, 2, 2, 8))
  parts = _apply(GroupedAttention(num_parts=2), maps)
  np.testing.assert_allclose(parts.weights, 0.5)
  gradient = jax.jit(jax.grad(
      lambda m: _apply(GroupedAttention(num_parts=2), m).weights[:, 0].sum()))(maps)
  assert np.all(np.isfinite(gradient))
