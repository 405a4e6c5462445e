"""On-device preprocessing: what the network sees is the image, normalised, and
augmentation is a seeded, shape-preserving transform."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psch_jax.preprocess import augment, preprocess


def test_preprocess_normalises_and_repeats_grey_channels():
  images = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) * 7
  out = preprocess(images, image_size=4, channels=3, mean=(0.5, 0.4, 0.3),
                   std=(0.25, 0.5, 1.0))
  assert out.shape == (2, 4, 4, 3) and out.dtype == jnp.float32
  pixels = images[..., 0].astype(np.float32) / 255.0
  for c, (m, s) in enumerate(zip((0.5, 0.4, 0.3), (0.25, 0.5, 1.0))):
    np.testing.assert_allclose(out[..., c], (pixels - m) / s, rtol=1e-6, atol=1e-6)


def test_preprocess_resizes_to_the_network_input():
  images = np.full((3, 28, 28, 1), 255, np.uint8)
  out = preprocess(images, image_size=32, channels=1, mean=(0.0,), std=(1.0,))
  assert out.shape == (3, 32, 32, 1)
  np.testing.assert_allclose(out, 1.0, atol=1e-5)  # a constant image stays constant


def test_preprocess_rejects_impossible_channel_conversion():
  with pytest.raises(ValueError, match="channels"):
    preprocess(np.zeros((1, 4, 4, 3), np.uint8), image_size=4, channels=1,
               mean=(0.0,), std=(1.0,))


@pytest.mark.parametrize("kind", ["flip", "crop_flip"])
def test_augment_is_seeded_and_keeps_shape(kind):
  images = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
  a = augment(jax.random.key(1), images, kind=kind)
  b = augment(jax.random.key(1), images, kind=kind)
  c = augment(jax.random.key(2), images, kind=kind)
  assert a.shape == images.shape
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_flip_only_mirrors():
  images = jax.random.normal(jax.random.key(0), (32, 5, 5, 1))
  out = augment(jax.random.key(3), images, kind="flip")
  for x, y in zip(np.asarray(images), np.asarray(out)):
    assert np.array_equal(x, y) or np.array_equal(x[:, ::-1], y)
  assert any(not np.array_equal(x, y) for x, y in zip(np.asarray(images), np.asarray(out)))


def test_augment_none_is_identity_and_unknown_kind_fails():
  images = jnp.ones((2, 4, 4, 1))
  assert augment(jax.random.key(0), images, kind="none") is images
  with pytest.raises(ValueError, match="unknown augmentation"):
    augment(jax.random.key(0), images, kind="rotate")
