"""Classical (shallow, unsupervised) hashing baselines: LSH, PCAH, ITQ, spectral hashing.

Each method has `fit_<name>(key, train_features, num_bits) -> params`; `encode(params,
features)` turns features into +-1 codes for every method. The results table
(`psch_jax.experiments`) runs them on raw pixels in [0, 1] (`pixel_features`) of the
same training split PSCH trains on.

- LSH (Charikar 2002, sign random projections): b = sign((x - mean) W), W Gaussian.
- PCAH: W = the top-L principal directions of the centred training features.
- ITQ (Gong & Lazebnik, CVPR 2011): PCA to L dimensions, V = (x - mean) W_pca, then an
  orthogonal rotation R minimising the quantisation loss ||B - V R||_F^2 over
  B in {-1, +1}^{N x L} by alternating B = sign(V R) and the orthogonal Procrustes
  step R = argmax tr(B^T V R) (an SVD); b = sign(V R).
- Spectral hashing (Weiss, Torralba & Fergus, NIPS 2008): PCA to min(L, D) dimensions,
  each fitted with a uniform distribution on [a_d, b_d] (the training range). The
  one-dimensional Laplacian eigenfunctions there are
  phi_k(y) = sin(pi/2 + k pi / (b_d - a_d) (y - a_d)), with eigenvalue increasing in
  omega = k pi / (b_d - a_d); the L (dimension, k >= 1) pairs of smallest omega over
  all dimensions give the L bits, b = sign(phi_k(y_d)).

All four encoders are `sign(0) = +1` thresholds of `(x - mean) @ projection` (spectral
hashing through a cosine of it), so one parameter type serves them all.

Precision: float32 throughout; the matmuls that feed eigh and SVD use
`Precision.HIGHEST` (on accelerators the default would round inputs to bfloat16).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from psch_jax.errors import UserError

_HIGHEST = lax.Precision.HIGHEST
# PCA forms a D x D covariance; beyond this many dimensions that is gigabytes.
MAX_PCA_DIMENSIONS = 16384
DEFAULT_ITQ_ITERATIONS = 50


class HashParams(NamedTuple):
  """A fitted hash function: `b = sign(h((x - mean) @ projection))` (sign(0) = +1).

  Attributes:
    mean: float32 (D,), the training mean.
    projection: float32 (D, L).
    offset: float32 (L,), subtracted after projecting (spectral hashing: a_d; else 0).
    frequency: float32 (L,); 0 means h is the identity (LSH, PCAH, ITQ), > 0 means
      h(y) = sin(pi/2 + frequency (y - offset)) (spectral hashing's eigenfunction).
  """
  mean: jax.Array
  projection: jax.Array
  offset: jax.Array
  frequency: jax.Array


# --------------------------------------------------------------------- helpers

def pixel_features(images: np.ndarray) -> np.ndarray:
  """uint8 (n, H, W, C) images -> float32 (n, H * W * C) raw pixels in [0, 1]."""
  images = np.asarray(images)
  return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def _check_features(features: Any, name: str) -> jax.Array:
  features = jnp.asarray(features)
  if features.ndim != 2 or features.shape[0] < 2 or features.shape[1] < 1:
    raise UserError(f"{name} must be a float (N, D) matrix with N >= 2, got shape "
                    f"{features.shape}; flatten images with baselines.pixel_features.")
  if not jnp.issubdtype(features.dtype, jnp.floating):
    raise UserError(f"{name} must be floating point, got {features.dtype}; convert "
                    "uint8 images with baselines.pixel_features.")
  return features.astype(jnp.float32)


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_num_bits(num_bits: int, limit: int | None, method: str) -> None:
  if not _is_int(num_bits) or num_bits < 1:
    raise UserError(f"num_bits={num_bits!r} must be a positive int (e.g. 16, 32, 64).")
  if limit is not None and num_bits > limit:
    raise UserError(f"{method} takes num_bits <= the feature dimension ({limit}) "
                    f"principal directions, got num_bits={num_bits}; use fewer bits "
                    "or LSH.")


def _linear(mean: jax.Array, projection: jax.Array) -> HashParams:
  num_bits = projection.shape[1]
  zeros = jnp.zeros((num_bits,), jnp.float32)
  return HashParams(mean=mean, projection=projection, offset=zeros, frequency=zeros)


@jax.jit
def _mean_and_covariance(features: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 (N, D) -> mean (D,), covariance (D, D) with 1 / (N - 1)."""
  mean = jnp.mean(features, axis=0)
  centred = features - mean
  covariance = jnp.matmul(centred.T, centred, precision=_HIGHEST)
  return mean, covariance / (features.shape[0] - 1)


@functools.partial(jax.jit, static_argnames="num_components")
def _principal_directions(covariance: jax.Array, num_components: int
                          ) -> tuple[jax.Array, jax.Array]:
  """Top principal directions, largest variance first.

  Returns:
    directions float32 (D, num_components) orthonormal columns, each with its
    largest-magnitude entry positive (a fixed sign, so runs agree); variances
    float32 (num_components,).
  """
  variances, vectors = jnp.linalg.eigh(covariance)  # ascending
  order = jnp.argsort(-variances)[:num_components]
  directions = vectors[:, order]
  pivot = jnp.take_along_axis(directions, jnp.argmax(jnp.abs(directions), axis=0)[None],
                              axis=0)
  return directions * jnp.where(pivot < 0, -1.0, 1.0), variances[order]


def principal_directions(features: Any, num_components: int
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PCA of the centred features (eigh of the D x D covariance).

  Args:
    features: float (N, D), N >= 2.
    num_components: 1 <= k <= D.

  Returns:
    mean float32 (D,); directions float32 (D, k), orthonormal, largest variance first,
    each column's largest-magnitude entry positive; variances float32 (k,).
  """
  features = _check_features(features, "features")
  dimension = features.shape[1]
  if dimension > MAX_PCA_DIMENSIONS:
    raise UserError(f"PCA on {dimension}-dimensional features needs a {dimension} x "
                    f"{dimension} covariance; reduce the features to at most "
                    f"{MAX_PCA_DIMENSIONS} dimensions (e.g. smaller images) or use LSH.")
  _check_num_bits(num_components, dimension, "PCA")
  mean, covariance = _mean_and_covariance(features)
  directions, variances = _principal_directions(covariance, int(num_components))
  return mean, directions, variances


# ------------------------------------------------------------------------ LSH

def fit_lsh(key: jax.Array, train_features: Any, num_bits: int) -> HashParams:
  """LSH: signs of random Gaussian projections of the mean-centred features.

  Args:
    key: PRNG key for the projection.
    train_features: float (N, D) training features.
    num_bits: L, any positive number.

  Returns:
    HashParams with projection float32 (D, L) of i.i.d. N(0, 1) entries.
  """
  train_features = _check_features(train_features, "train_features")
  _check_num_bits(num_bits, None, "LSH")
  mean = jnp.mean(train_features, axis=0)
  projection = jax.random.normal(key, (train_features.shape[1], int(num_bits)),
                                 jnp.float32)
  return _linear(mean, projection)


# ----------------------------------------------------------------------- PCAH

def fit_pcah(key: jax.Array, train_features: Any, num_bits: int) -> HashParams:
  """PCAH: signs of the projections on the top-L principal directions.

  Args:
    key: unused (PCAH is deterministic); taken so every `fit_*` has one signature.
    train_features: float (N, D), L <= D.
    num_bits: L.

  Returns:
    HashParams with projection = the principal directions float32 (D, L).
  """
  del key
  mean, directions, _ = principal_directions(train_features, num_bits)
  return _linear(mean, directions)


# ------------------------------------------------------------------------ ITQ

def _quantisation_loss(projected: jax.Array, rotation: jax.Array) -> jax.Array:
  """||sign(V R) - V R||_F^2 for V (N, L), R (L, L); float32 scalar."""
  rotated = jnp.matmul(projected, rotation, precision=_HIGHEST)
  return jnp.sum(jnp.square(jnp.where(rotated >= 0, 1.0, -1.0) - rotated))


@functools.partial(jax.jit, static_argnames="num_iterations")
def _itq_iterations(projected: jax.Array, rotation: jax.Array, num_iterations: int
                    ) -> tuple[jax.Array, jax.Array]:
  def step(rotation, _):
    rotated = jnp.matmul(projected, rotation, precision=_HIGHEST)
    codes = jnp.where(rotated >= 0, 1.0, -1.0)  # B-step: optimal B for this R
    # R-step (orthogonal Procrustes): maximise tr(B^T V R); with
    # B^T V = U S W^T the maximiser is R = W U^T.
    u, _, wt = jnp.linalg.svd(jnp.matmul(codes.T, projected, precision=_HIGHEST),
                              full_matrices=False)
    rotation = jnp.matmul(wt.T, u.T, precision=_HIGHEST)
    return rotation, _quantisation_loss(projected, rotation)

  rotation_out, losses = lax.scan(step, rotation, None, length=num_iterations)
  initial = _quantisation_loss(projected, rotation)
  return rotation_out, jnp.concatenate([initial[None], losses])


def itq_rotation(key: jax.Array, projected: Any, *,
                 num_iterations: int = DEFAULT_ITQ_ITERATIONS
                 ) -> tuple[jax.Array, jax.Array]:
  """ITQ's rotation: alternating minimisation of ||B - V R||_F^2, R orthogonal.

  Args:
    key: PRNG key for the random orthogonal start.
    projected: float (N, L), V: PCA projections of the centred training features.
    num_iterations: alternations (B-step then Procrustes R-step); 50 as in the paper.

  Returns:
    rotation float32 (L, L), orthogonal; losses float32 (num_iterations + 1,): the
    quantisation loss ||sign(V R) - V R||_F^2 at the start and after each iteration
    (non-increasing: each half-step minimises it over one of B, R).
  """
  projected = _check_features(projected, "projected")
  if not _is_int(num_iterations) or num_iterations < 0:
    raise UserError(f"num_iterations={num_iterations!r} must be an int >= 0.")
  num_bits = projected.shape[1]
  start = jax.random.orthogonal(key, num_bits, dtype=jnp.float32)
  return _itq_iterations(projected, start, int(num_iterations))


def fit_itq(key: jax.Array, train_features: Any, num_bits: int, *,
            num_iterations: int = DEFAULT_ITQ_ITERATIONS) -> HashParams:
  """ITQ: PCA to L dimensions, then the rotation of `itq_rotation`.

  Args:
    key: PRNG key for the rotation's random orthogonal start.
    train_features: float (N, D), L <= D.
    num_bits: L.
    num_iterations: see `itq_rotation`.

  Returns:
    HashParams with projection = principal directions @ R, float32 (D, L).
  """
  mean, directions, _ = principal_directions(train_features, num_bits)
  projected = _project(jnp.asarray(train_features, jnp.float32), mean, directions)
  rotation, _ = itq_rotation(key, projected, num_iterations=num_iterations)
  return _linear(mean, jnp.matmul(directions, rotation, precision=_HIGHEST))


@jax.jit
def _project(features: jax.Array, mean: jax.Array, projection: jax.Array) -> jax.Array:
  return jnp.matmul(features - mean, projection, precision=_HIGHEST)


# ------------------------------------------------------------ spectral hashing

def spectral_modes(low: np.ndarray, high: np.ndarray, num_bits: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """The L eigenfunctions (dimension, k) of smallest frequency k pi / (b_d - a_d).

  As Weiss et al.'s trainSH: dimension d offers k = 1 .. ceil((L + 1) R_d / max R)
  (R_d = b_d - a_d), enough for any selection; ties keep dimension order (stable).

  Args:
    low, high: float (m,) per-dimension ranges a_d < b_d.
    num_bits: L.

  Returns:
    dimensions int32 (L,), frequencies float32 (L,) = k pi / R_d, in selection order.
  """
  ranges = np.asarray(high, np.float64) - np.asarray(low, np.float64)
  max_mode = np.ceil((num_bits + 1) * ranges / ranges.max()).astype(np.int64)
  dimensions = np.concatenate([np.full(m, d) for d, m in enumerate(max_mode)])
  modes = np.concatenate([np.arange(1, m + 1) for m in max_mode])
  frequencies = modes * np.pi / ranges[dimensions]
  chosen = np.argsort(frequencies, kind="stable")[:num_bits]
  return dimensions[chosen].astype(np.int32), frequencies[chosen].astype(np.float32)


def fit_sh(key: jax.Array, train_features: Any, num_bits: int) -> HashParams:
  """Spectral hashing: PCA, a uniform box per direction, analytic eigenfunctions.

  Args:
    key: unused (spectral hashing is deterministic); taken for the common signature.
    train_features: float (N, D).
    num_bits: L (several bits may share a principal direction at higher k).

  Returns:
    HashParams whose bit l projects on the chosen direction d_l, subtracts a_{d_l} and
    thresholds sin(pi/2 + omega_l (y - a_{d_l})).
  """
  del key
  train_features = _check_features(train_features, "train_features")
  _check_num_bits(num_bits, None, "spectral hashing")
  num_components = min(int(num_bits), train_features.shape[1])
  mean, directions, _ = principal_directions(train_features, num_components)
  projected = _project(train_features, mean, directions)
  # A small margin keeps the training extremes strictly inside the box, as trainSH.
  eps = np.finfo(np.float32).eps
  low = np.asarray(jnp.min(projected, axis=0)) - eps
  high = np.asarray(jnp.max(projected, axis=0)) + eps
  dimensions, frequencies = spectral_modes(low, high, int(num_bits))
  return HashParams(mean=mean, projection=directions[:, dimensions],
                    offset=jnp.asarray(low[dimensions], jnp.float32),
                    frequency=jnp.asarray(frequencies))


# --------------------------------------------------------------------- encode

@jax.jit
def _encode_chunk(params: HashParams, features: jax.Array) -> jax.Array:
  shifted = _project(features, params.mean, params.projection) - params.offset
  values = jnp.where(params.frequency > 0,
                     jnp.sin(jnp.pi / 2 + params.frequency * shifted), shifted)
  return jnp.where(values >= 0, 1, -1).astype(jnp.int8)


def encode(params: HashParams, features: Any, *, chunk_size: int = 8192) -> np.ndarray:
  """Hash codes of `features` under a fitted baseline.

  Args:
    params: from any `fit_*`.
    features: float (n, D), the same features the method was fitted on.
    chunk_size: rows per jit call (the last chunk is zero-padded, so one compile).

  Returns:
    int8 (n, L) numpy array with entries -1 / +1 (sign(0) = +1).
  """
  features = np.asarray(features)
  if features.ndim != 2 or features.shape[1] != params.projection.shape[0]:
    raise UserError(f"features must be (n, {params.projection.shape[0]}) like the "
                    f"training features, got shape {features.shape}.")
  if not np.issubdtype(features.dtype, np.floating):
    raise UserError(f"features must be floating point, got {features.dtype}; convert "
                    "uint8 images with baselines.pixel_features.")
  num_rows = features.shape[0]
  chunk_size = max(1, min(chunk_size, num_rows))
  codes = []
  for start in range(0, num_rows, chunk_size):
    chunk = features[start:start + chunk_size].astype(np.float32)
    valid = chunk.shape[0]
    if valid < chunk_size:
      chunk = np.pad(chunk, ((0, chunk_size - valid), (0, 0)))
    codes.append(np.asarray(_encode_chunk(params, jnp.asarray(chunk)))[:valid])
  if not codes:
    return np.zeros((0, params.projection.shape[1]), np.int8)
  return np.concatenate(codes)


# --------------------------------------------------------------------- registry

FitFn = Callable[[jax.Array, Any, int], HashParams]
FIT: dict[str, FitFn] = {"lsh": fit_lsh, "pcah": fit_pcah, "itq": fit_itq, "sh": fit_sh}
