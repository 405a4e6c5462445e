"""Classical hashing baselines: ITQ's optimisation, PCA, codes, and retrieval on blobs."""
import jax
import numpy as np
import pytest

from psch_jax import baselines, ranking
from psch_jax.errors import UserError

METHODS = sorted(baselines.FIT)


def correlated_features(seed: int, num_rows: int = 400, dimension: int = 24
                        ) -> np.ndarray:
  """float32 (N, D) with a distinct, decaying spectrum and a non-zero mean."""
  rng = np.random.default_rng(seed)
  rotation, _ = np.linalg.qr(rng.normal(size=(dimension, dimension)))
  scales = np.linspace(3.0, 0.2, dimension)
  return (rng.normal(size=(num_rows, dimension)) * scales @ rotation + 1.5
          ).astype(np.float32)


def two_blobs(seed: int, per_blob: int = 150, dimension: int = 16
              ) -> tuple[np.ndarray, np.ndarray]:
  """Two tight, far-apart Gaussian blobs: features float32 (2n, D), one-hot labels."""
  rng = np.random.default_rng(seed)
  axis = rng.normal(size=dimension)
  axis /= np.linalg.norm(axis)
  centres = np.stack([20 * axis, -20 * axis])
  classes = np.repeat([0, 1], per_blob)
  features = centres[classes] + 0.5 * rng.normal(size=(2 * per_blob, dimension))
  return features.astype(np.float32), np.eye(2, dtype=np.uint8)[classes]


def test_itq_loss_never_increases_and_rotation_stays_orthogonal():
  features = correlated_features(0)
  mean, directions, _ = baselines.principal_directions(features, 16)
  projected = (features - np.asarray(mean)) @ np.asarray(directions)
  rotation, losses = baselines.itq_rotation(jax.random.key(3), projected,
                                            num_iterations=50)
  losses = np.asarray(losses)
  assert losses.shape == (51,)
  assert np.all(losses[1:] <= losses[:-1] * (1 + 1e-5)), np.diff(losses).max()
  assert losses[-1] < 0.95 * losses[0]  # it did optimise, from a random start
  rotation = np.asarray(rotation)
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(16), atol=1e-5)
  # The loss it reports is the loss of the rotation it returns.
  rotated = projected @ rotation
  final = np.sum((np.where(rotated >= 0, 1.0, -1.0) - rotated) ** 2)
  np.testing.assert_allclose(losses[-1], final, rtol=1e-4)


def test_itq_projection_is_pca_then_rotation():
  features = correlated_features(1)
  params = baselines.fit_itq(jax.random.key(0), features, 8)
  _, directions, _ = baselines.principal_directions(features, 8)
  # projection = W_pca R with R orthogonal: W_pca^T projection is orthogonal.
  rotation = np.asarray(directions).T @ np.asarray(params.projection)
  np.testing.assert_allclose(rotation.T @ rotation, np.eye(8), atol=1e-5)


def test_pcah_directions_match_numpy_svd_up_to_sign():
  features = correlated_features(2)
  params = baselines.fit_pcah(jax.random.key(0), features, 6)
  centred = features.astype(np.float64) - features.mean(axis=0, dtype=np.float64)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  ours = np.asarray(params.projection)
  signs = np.sign(np.sum(ours * vt[:6].T, axis=0))
  np.testing.assert_allclose(ours, vt[:6].T * signs, atol=1e-4)
  np.testing.assert_allclose(np.asarray(params.mean), features.mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_codes_are_plus_minus_one_with_the_right_shape_and_deterministic(method):
  features = correlated_features(3)
  fit = baselines.FIT[method]
  first = baselines.encode(fit(jax.random.key(7), features, 12), features[:50],
                           chunk_size=16)  # a padded last chunk
  again = baselines.encode(fit(jax.random.key(7), features, 12), features[:50])
  assert first.shape == (50, 12) and first.dtype == np.int8
  assert set(np.unique(first)) == {-1, 1}
  np.testing.assert_array_equal(first, again)


def test_random_methods_depend_on_the_key():
  features = correlated_features(4)
  for method in ("lsh", "itq"):
    codes = [baselines.encode(baselines.fit_itq(key, features, 12)
                              if method == "itq" else
                              baselines.fit_lsh(key, features, 12), features)
             for key in (jax.random.key(0), jax.random.key(1))]
    assert not np.array_equal(*codes), method


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_every_baseline_separates_two_far_apart_blobs(method):
  train, _ = two_blobs(0)
  test_features, test_labels = two_blobs(1)
  params = baselines.FIT[method](jax.random.key(0), train, 16)
  codes = baselines.encode(params, test_features)
  metrics = ranking.retrieval_metrics(codes[::10], test_labels[::10], codes,
                                         test_labels, topk=(None,), curves=False)
  assert metrics["map@all"] > 0.95, metrics


def test_spectral_modes_pick_the_smallest_frequencies():
  # Ranges 2 and 1: frequencies pi/2, pi, 3pi/2, ... on dimension 0 and pi, 2pi on 1.
  dimensions, frequencies = baselines.spectral_modes(np.array([0.0, 5.0]),
                                                     np.array([2.0, 6.0]), 3)
  np.testing.assert_array_equal(dimensions, [0, 0, 1])
  np.testing.assert_allclose(frequencies, [np.pi / 2, np.pi, np.pi], rtol=1e-6)


def test_spectral_hashing_thresholds_the_eigenfunction():
  features = correlated_features(5)
  params = baselines.fit_sh(jax.random.key(0), features, 10)
  _, directions, _ = baselines.principal_directions(features, 10)
  projected = (features - features.mean(axis=0)) @ np.asarray(directions)
  low, high = projected.min(axis=0), projected.max(axis=0)
  dimensions, frequencies = baselines.spectral_modes(low, high, 10)
  # Largest-range direction, lowest mode first: a cut through the middle of its box.
  assert dimensions[0] == np.argmax(high - low)
  expected = np.sin(np.pi / 2 + frequencies * (projected[:, dimensions] - low[dimensions]))
  keep = np.abs(expected) > 1e-3  # away from the zero crossings float32 may flip
  codes = baselines.encode(params, features)
  np.testing.assert_array_equal(codes[keep], np.where(expected >= 0, 1, -1)[keep])


def test_bad_input_raises_user_error():
  features = correlated_features(6, dimension=8)
  with pytest.raises(UserError, match="num_bits"):
    baselines.fit_pcah(jax.random.key(0), features, 9)
  with pytest.raises(UserError, match="pixel_features"):
    baselines.fit_lsh(jax.random.key(0), features.astype(np.uint8), 4)
  params = baselines.fit_lsh(jax.random.key(0), features, 4)
  with pytest.raises(UserError, match=r"\(n, 8\)"):
    baselines.encode(params, features[:, :5])


def test_pixel_features_scale_to_unit_interval():
  images = np.array([[[[0], [255]], [[51], [102]]]], np.uint8)  # (1, 2, 2, 1)
  np.testing.assert_allclose(baselines.pixel_features(images), [[0, 1, 0.2, 0.4]],
                             rtol=1e-6)
