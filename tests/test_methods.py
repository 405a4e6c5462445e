"""The deep peers' defining operations against hand-computed examples and their
authors' procedures (docs/method.md, "Deep peers"), and each method end to end:
trained, SIGKILLed, resumed to the codes of an uninterrupted run, evaluated."""
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import norm

from psch_jax import config as psch_config
from psch_jax import methods
from psch_jax import targets
from psch_jax.methods import bihalf, cibhash, greedyhash, ssdh
from psch_jax.preprocess import augment, contrastive_view
from tests import test_train
from tests.helpers import needs_fashion_mnist, repo_config


def test_every_configured_method_is_registered():
  assert tuple(methods.get(name).name for name in psch_config.METHODS) == \
      psch_config.METHODS
  with pytest.raises(ValueError, match="unknown method 'dsh'"):
    methods.get("dsh")


# ------------------------------------------------------------------- GreedyHash

def test_greedy_sign_is_sign_forward_and_identity_backward():
  h = jnp.array([[-0.3, 0.0, 2.0], [1e-9, -5.0, 0.7]])
  np.testing.assert_array_equal(greedyhash.greedy_sign(h),
                                [[-1, 1, 1], [1, -1, 1]])
  weights = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  grad = jax.grad(lambda x: jnp.sum(weights * greedyhash.greedy_sign(x)))(h)
  np.testing.assert_array_equal(grad, weights)  # db/dh := 1, also at 0


def test_greedyhash_loss_by_hand():
  """Two pairs: (row 0, row 2) and (row 1, row 3)."""
  h = jnp.array([[0.5, -2.0], [1.0, 1.0], [0.2, 0.3], [-1.0, 3.0]])
  x = jnp.array([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  # b = [[1, -1], [1, 1], [1, 1], [-1, 1]]: cos(b0, b2) = 0, cos(b1, b3) = 0;
  # cos(x0, x2) = 1, cos(x1, x3) = 1/sqrt(2).
  cosine = ((0 - 1) ** 2 + (0 - 2 ** -0.5) ** 2) / 2
  cubic = np.mean(np.abs(np.abs(np.asarray(h)) - 1) ** 3)
  total, terms = greedyhash.greedyhash_loss(h, x, cubic_weight=0.1)
  np.testing.assert_allclose(terms["loss_cosine"], cosine, rtol=1e-6)
  np.testing.assert_allclose(terms["loss_cubic"], cubic, rtol=1e-6)
  np.testing.assert_allclose(total, cosine + 0.1 * cubic, rtol=1e-6)
  # The features are constants: no gradient reaches them.
  assert not np.any(jax.grad(lambda f: greedyhash.greedyhash_loss(
      h, f, cubic_weight=0.1)[0])(x))


# ----------------------------------------------------------------------- BiHalf

def test_bi_half_gives_each_bit_half_plus_ones_by_rank():
  u = jnp.array([[0.3, -1.0], [0.1, 2.0], [-0.5, 0.0], [0.9, 0.5]])
  np.testing.assert_array_equal(bihalf.bi_half(u, 6.0),
                                [[1, -1], [-1, 1], [-1, -1], [1, 1]])
  # Odd batch: floor(5 / 2) = 2 rows get +1; equal values rank by row index.
  v = jnp.array([[1.0], [1.0], [1.0], [0.0], [2.0]])
  np.testing.assert_array_equal(bihalf.bi_half(v, 6.0)[:, 0], [1, -1, -1, -1, 1])


def test_bi_half_gradient_adds_gamma_u_minus_b_over_its_size():
  u = jnp.array([[0.3, -1.0], [0.1, 2.0], [-0.5, 0.0], [0.9, 0.5]])
  b = np.array([[1, -1], [-1, 1], [-1, -1], [1, 1]], np.float32)
  g = jnp.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0], [-1.0, 2.0]])
  _, vjp = jax.vjp(lambda x: bihalf.bi_half(x, 6.0), u)
  expected = np.asarray(g) + 6.0 * (np.asarray(u) - b) / 8
  np.testing.assert_allclose(vjp(g)[0], expected, rtol=1e-6)


# ---------------------------------------------------------------------- CIBHash

def _nt_xent_by_loops(z_a, z_b, temperature):
  """NT-Xent written out row by row, as SimCLR's paper states it."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  n, batch = len(z), len(z_a)
  cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
  losses = []
  for i in range(n):
    positive = (i + batch) % n
    others = [np.exp(cos(z[i], z[k]) / temperature) for k in range(n) if k != i]
    losses.append(-np.log(np.exp(cos(z[i], z[positive]) / temperature) / sum(others)))
  return np.mean(losses)


def test_nt_xent_by_hand_and_by_loops():
  # One image: its two views are the only candidates of each other, so the loss is 0.
  z = jnp.array([[1.0, -1.0]])
  np.testing.assert_allclose(cibhash.nt_xent(z, -z, temperature=0.3), 0.0, atol=1e-7)
  # Two images of two bits: every cosine is +-1 or 0.
  z_a = jnp.array([[1.0, 1.0], [1.0, -1.0]])
  z_b = jnp.array([[1.0, 1.0], [-1.0, 1.0]])
  # Row 0: positive cos 1, others cos 0 (row 1), 0 (row 3) -> -log(e^{1/t} / (e^{1/t}
  # + 2)); row 1: positive cos -1 (row 3), others 0, 0.
  t = 0.5
  e = np.exp(1 / t)
  expected = np.mean([-np.log(e / (e + 2)), -np.log((1 / e) / (1 / e + 2)),
                      -np.log(e / (e + 2)), -np.log((1 / e) / (1 / e + 2))])
  np.testing.assert_allclose(cibhash.nt_xent(z_a, z_b, temperature=t), expected,
                             rtol=1e-6)
  rng = np.random.default_rng(0)
  z_a, z_b = rng.choice([-1.0, 1.0], (2, 6, 8))
  np.testing.assert_allclose(cibhash.nt_xent(jnp.asarray(z_a), jnp.asarray(z_b),
                                             temperature=0.3),
                             _nt_xent_by_loops(z_a, z_b, 0.3), rtol=1e-5)


def test_bernoulli_kl_by_hand_and_only_p_gets_a_gradient():
  logit = lambda p: np.log(p / (1 - p))
  h, h_target = jnp.array([[0.0, logit(0.9)]]), jnp.array([[logit(0.25), logit(0.9)]])
  # KL(0.5 || 0.25) = 0.5 ln 2 + 0.5 ln (2 / 3) = 0.5 ln (4 / 3); the second bit 0.
  np.testing.assert_allclose(cibhash.bernoulli_kl(h, h_target), 0.5 * np.log(4 / 3),
                             rtol=1e-5)
  assert not np.any(jax.grad(lambda x: cibhash.bernoulli_kl(h, x))(h_target))
  # d KL / dh = (ln(p / q) - ln((1 - p) / (1 - q))) p (1 - p) (the authors' e aside).
  np.testing.assert_allclose(jax.grad(lambda x: cibhash.bernoulli_kl(x, h_target))(h),
                             [[(np.log(2) - np.log(2 / 3)) * 0.25, 0.0]], atol=1e-5)


def test_bernoulli_kl_stays_finite_where_p_rounds_to_one_under_jit():
  """The authors' formula on probabilities is NaN under XLA once sigmoid(h) rounds to
  1 (h > 17): (1 - p) + 1e-8 is reassociated to (1 + 1e-8) - p = 0. From the logits it
  is the authors' number: e bounds each log at log(1e-8)."""
  h = jnp.array([[17.0, -30.0, 88.0]])
  h_target = jnp.array([[15.0, 25.0, -88.0]])
  kl = jax.jit(cibhash.bernoulli_kl)(h, h_target)
  p, q = (1 / (1 + np.exp(-np.asarray(x, np.float64))) for x in (h, h_target))
  e = 1e-8
  expected = np.sum(p * (np.log(p + e) - np.log(q + e))
                    + (1 - p) * (np.log(1 - p + e) - np.log(1 - q + e)))
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  grad = jax.jit(jax.grad(cibhash.bernoulli_kl))(h, h_target)
  assert np.all(np.isfinite(grad))


def test_cibhash_codes_are_sign_of_p_minus_u_with_straight_through():
  h_a = jnp.array([[2.0, -2.0, 0.1]])
  h_b = jnp.array([[1.0, -1.0, -0.1]])
  key = jax.random.key(3)
  total, terms = cibhash.cibhash_loss(h_a, h_b, key, temperature=0.3, kl_weight=0.5,
                                      stochastic=True)
  u_a, u_b = jax.random.uniform(key, (2, 1, 3))
  b_a = np.where(jax.nn.sigmoid(h_a) - u_a >= 0, 1.0, -1.0)
  b_b = np.where(jax.nn.sigmoid(h_b) - u_b >= 0, 1.0, -1.0)
  np.testing.assert_allclose(terms["loss_contrastive"],
                             cibhash.nt_xent(b_a, b_b, temperature=0.3), rtol=1e-6)
  np.testing.assert_allclose(total, terms["loss_contrastive"] + 0.5 * terms["loss_kl"],
                             rtol=1e-6)
  # The authors' public code: u = 1/2, so b = sign(h).
  _, terms = cibhash.cibhash_loss(h_a, h_b, key, temperature=0.3, kl_weight=0.5,
                                  stochastic=False)
  np.testing.assert_allclose(
      terms["loss_contrastive"],
      cibhash.nt_xent(jnp.sign(h_a), jnp.sign(h_b), temperature=0.3), rtol=1e-6)


def test_contrastive_views_are_random_views_of_the_same_image():
  # Jitted as training runs them (op by op, the many small ops take seconds).
  view_of = jax.jit(contrastive_view, static_argnames=("mean", "std"))
  augmented = jax.jit(augment, static_argnames=("kind", "mean", "std"))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.random((4, 16, 16, 3)), jnp.float32)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  normalised = (images - jnp.asarray(mean)) / jnp.asarray(std)
  view_a = view_of(jax.random.key(0), normalised, mean=mean, std=std)
  view_b = augmented(jax.random.key(1), normalised, kind="contrastive", mean=mean,
                     std=std)
  assert view_a.shape == normalised.shape and view_a.dtype == jnp.float32
  pixels = np.asarray(view_a) * np.asarray(std) + np.asarray(mean)
  assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
  assert not np.allclose(view_a, view_b)
  np.testing.assert_array_equal(
      view_a, view_of(jax.random.key(0), normalised, mean=mean, std=std))
  # A flat grey image stays flat under crops, flips and jitter.
  flat = jnp.full((2, 8, 8, 1), 0.25)
  view = view_of(jax.random.key(5), flat, mean=(0.5,), std=(0.5,))
  assert np.ptp(np.asarray(view).reshape(2, -1), axis=1).max() < 1e-5


# ------------------------------------------------------------------------- SSDH

def test_ssdh_similarity_and_loss_by_hand():
  # Unit features at angles 0, 10 and 90 degrees: distances 1 - cos.
  angles = np.deg2rad([0.0, 10.0, 90.0])
  features = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], 1), jnp.float32)
  s = ssdh.batch_similarity(features, jnp.array([0.05, 0.8]))
  # d(0, 1) = 1 - cos 10deg = 0.015 < 0.05: similar; d(., 2) >= 0.83 > 0.8: dissimilar.
  np.testing.assert_array_equal(s, [[1, 1, -1], [1, 1, -1], [-1, -1, 1]])
  s = jnp.array([[1.0, 0.0], [0.0, 1.0]]).at[0, 1].set(-1.0).at[1, 0].set(-1.0)
  u = jnp.array([[0.5, 0.5], [0.5, -1.0]])
  # u u^T / L = [[0.25, -0.125], [-0.125, 0.625]]
  expected = ((0.25 - 1) ** 2 + 2 * (-0.125 + 1) ** 2 + (0.625 - 1) ** 2) / 4
  loss, terms = ssdh.ssdh_loss(u, s)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(terms["known_pair_fraction"], 1.0)


def _authors_thresholds(features: np.ndarray, left_stds: float, right_stds: float):
  """SSDH's threshold fit as its authors state it: histogram of the pairwise cosine
  distances in 0.01 bins, the mode's lower edge, scipy's norm.fit of each side
  mirrored about it (over the pairs i < j)."""
  cos = features @ features.T
  distances = (1 - cos)[np.triu_indices(len(features), 1)].astype(np.float64)
  counts = [np.sum((distances >= k / 100) & (distances < (k + 1) / 100))
            for k in range(100)]
  mode = np.argmax(counts) / 100
  left, right = distances[distances <= mode], distances[distances > mode]
  left_mean, left_std = norm.fit(np.concatenate([left, 2 * mode - left]))
  right_mean, right_std = norm.fit(np.concatenate([2 * mode - right, right]))
  return mode, left_mean - left_stds * left_std, right_mean + right_stds * right_std


def test_ssdh_thresholds_are_the_authors_half_gaussian_fit():
  rng = np.random.default_rng(0)
  # Non-negative features, as fc7 after ReLU or pixels: distances in [0, 1].
  features = targets.unit_rows(rng.random((700, 12)) ** 3)
  fit = ssdh.fit_thresholds(features, left_stds=2.0, right_stds=1.5)
  mode, below, above = _authors_thresholds(features, 2.0, 1.5)
  assert fit["mode"] == pytest.approx(mode)
  assert fit["similar_below"] == pytest.approx(below, rel=1e-4)
  assert fit["dissimilar_above"] == pytest.approx(above, rel=1e-4)
  assert sum(fit["histogram"]) == 700 * 699 // 2


# ------------------------------------------------------------------ end to end

def _tiny_config(method: str):
  config = repo_config("fashion_mnist", "tiny")
  config.method.name = method
  return config


def _codes(workdir: str) -> dict[str, np.ndarray]:
  return {name: np.load(os.path.join(workdir, "codes", f"{name}.npy"))
          for name in ("query", "database")}


def _metrics(workdir: str) -> dict:
  import json
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return {k: v for k, v in results.items() if k.startswith(("map", "precision"))}


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("method", ["ssdh", "greedyhash", "bihalf", "cibhash"])
def test_method_killed_mid_training_resumes_to_the_uninterrupted_codes(
    method, tmp_path, capsys):
  """Every peer's `:tiny` run, trained, killed, resumed bitwise and evaluated (issue
  20 asks it of each method, though BiHalf checkpoints the same kind of state as
  GreedyHash).

  Only the killed run is a process of its own (`main.py`, SIGKILLed); the
  uninterrupted run, the resumption and `--mode=eval` are the same library calls
  `main.py` makes, in this process, where they share its compiled programs. The
  uninterrupted run goes first, so the killed process finds those programs in the
  session's compilation cache (tests/conftest.py) instead of compiling them."""
  from psch_jax import train
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "work")
  train.train_and_evaluate(_tiny_config(method), reference)
  # Train, and SIGKILL once a checkpoint before the last one is complete.
  checkpoints = os.path.join(workdir, "checkpoints")
  killed = test_train.run_main(workdir, f"--config.method.name={method}")
  deadline = time.monotonic() + 300
  while not (os.path.isdir(checkpoints) and any(
      n.isdigit() and int(n) < 10 for n in os.listdir(checkpoints))):
    assert killed.poll() is None and time.monotonic() < deadline, (
        killed.communicate()[0])
    time.sleep(0.005)
  killed.kill()
  killed.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  capsys.readouterr()
  train.train_and_evaluate(_tiny_config(method), workdir)
  assert "resumed from step" in capsys.readouterr().out
  for name, codes in _codes(reference).items():
    np.testing.assert_array_equal(_codes(workdir)[name], codes)
  assert _metrics(workdir) == _metrics(reference)
  # --mode=eval of the checkpoint gives the same numbers again.
  train.evaluate_checkpoint(_tiny_config(method), workdir)
  assert _metrics(workdir) == _metrics(reference)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ssdh", "greedyhash", "bihalf", "cibhash"])
def test_the_paper_setting_runs_every_peer_on_mock_cifar10(method, tmp_path):
  """configs/cifar10.py (RGB, crop-and-flip; `:tiny` on tfds mock data) with
  --config.method.name: trains, saves, evaluates, and logs finite losses. The
  feature-based peers compare images by the network's global feature, as the VGG-16
  configs do (the small CNN's default is the pixels, run above)."""
  import tensorflow_datasets as tfds
  from psch_jax import io_utils, train
  config = repo_config("cifar10", "tiny")
  config.method.name = method
  if "features" in config.method[method]:
    config.method[method].features = "global"
  with tfds.testing.mock_data(num_examples=60):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= results["map@all"] <= 1.0
  records = io_utils.read_jsonl(tmp_path / "metrics.jsonl")
  epochs = [r for r in records if "epoch" in r and "loss" in r]
  assert epochs and all(np.isfinite(r["loss"]) for r in epochs)
  assert any("targets" in r for r in records)
