"""SSDH (Yang et al., IJCAI 2018): a pairwise similarity from thresholded cosine
distances of fixed features, and codes whose inner products regress onto it (the
authors' yangerkun/IJCAI2018_SSDH, main.py; TreezzZ/SSDH_PyTorch, ssdh.py;
docs/method.md, "SSDH").

The cosine distances d of the training pairs are modelled as two half-Gaussians
around their mode m (Eq. S1); pairs closer than m - a sigma_l are similar (S = +1),
pairs farther than m + b sigma_r dissimilar (S = -1), the rest left out (S = 0)
(Eq. S2). The N x N matrix is never stored: the targets hold the unit features and
the two thresholds, and a batch's S is computed from them on the device.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from psch_jax import reference
from psch_jax.errors import UserError
from psch_jax.methods.interface import Method, TrainingData
from psch_jax.methods import peer_features

# The authors' histogram: bins of width 0.01 from 0. Their features are
# non-negative (fc7 after a ReLU), so their distances lie in [0, 1] and 100 bins
# cover them; features with negative entries ("spectral") reach 2, hence 200.
_NUM_BINS = 200
_BIN_WIDTH = 0.01
_FIT_CHUNK_ROWS = 512


def _pair_distances(rows: jax.Array, features: jax.Array, start: jax.Array):
  """Cosine distances (c, N) of `rows` (global rows start .. start + c - 1) with
  every row of `features`, and the mask of the pairs i < j counted once."""
  distances = 1.0 - jnp.matmul(rows, features.T, precision=jax.lax.Precision.HIGHEST)
  row = start + jnp.arange(rows.shape[0])
  return distances, jnp.arange(features.shape[0])[None, :] > row[:, None]


@jax.jit
def _histogram_chunk(rows, features, start):
  distances, pairs = _pair_distances(rows, features, start)
  in_range = pairs & (distances >= 0) & (distances < _NUM_BINS * _BIN_WIDTH)
  bins = jnp.where(in_range, jnp.floor(distances / _BIN_WIDTH).astype(jnp.int32),
                   _NUM_BINS)
  return jnp.zeros(_NUM_BINS + 1, jnp.int32).at[bins.ravel()].add(1)[:_NUM_BINS]


@jax.jit
def _spread_chunk(rows, features, start, mode):
  """Per side of the mode m: [sum of (d - m)^2 over d <= m, their count, the same
  over d > m] of one chunk of rows (float32; the chunks are summed in float64)."""
  distances, pairs = _pair_distances(rows, features, start)
  squared = (distances - mode) ** 2
  left, right = pairs & (distances <= mode), pairs & (distances > mode)
  return jnp.stack([jnp.sum(jnp.where(left, squared, 0.0)), jnp.sum(left),
                    jnp.sum(jnp.where(right, squared, 0.0)), jnp.sum(right)])


def _chunks(features: np.ndarray):
  for start in range(0, len(features), _FIT_CHUNK_ROWS):
    rows = features[start:start + _FIT_CHUNK_ROWS]
    padded = np.zeros((_FIT_CHUNK_ROWS, features.shape[1]), np.float32)
    padded[:len(rows)] = rows
    # Padding rows have global indices >= N, so none of their pairs counts.
    yield padded, np.int32(start)


def fit_thresholds(features: np.ndarray, *, left_stds: float, right_stds: float
                   ) -> dict:
  """SSDH's thresholds from the distances of every pair i < j of `features` (Eqs.
  S1, S2).

  The mode m is the lower edge of the fullest 0.01-wide bin of distances in
  [0, 2) (the authors' [0, 1) holds every distance of non-negative features);
  sigma_l = sqrt(mean over d <= m of (d - m)^2) and sigma_r likewise over
  d > m (the maximum-likelihood fit of a Gaussian to each side mirrored about m,
  which is what the authors' scipy norm.fit computes).

  Args:
    features: float32 (n, D) unit rows.
    left_stds, right_stds: a and b of Eq. S2 (2 and 2 in the authors' code).

  Returns:
    {"mode", "left_std", "right_std", "similar_below", "dissimilar_above",
    "histogram"}: floats, and the bin counts as a list.
  """
  features = np.asarray(features, np.float32)
  device_features = jnp.asarray(features)
  histogram = np.zeros(_NUM_BINS, np.int64)
  for rows, start in _chunks(features):
    histogram += np.asarray(_histogram_chunk(rows, device_features, start))
  mode = float(np.argmax(histogram)) * _BIN_WIDTH
  spread = np.zeros(4, np.float64)
  for rows, start in _chunks(features):
    spread += np.asarray(_spread_chunk(rows, device_features, start,
                                       np.float32(mode)), np.float64)
  left_std = float(np.sqrt(spread[0] / max(spread[1], 1)))
  right_std = float(np.sqrt(spread[2] / max(spread[3], 1)))
  return {"mode": mode, "left_std": left_std, "right_std": right_std,
          "similar_below": mode - left_stds * left_std,
          "dissimilar_above": mode + right_stds * right_std,
          "histogram": histogram.tolist()}


def batch_similarity(features: jax.Array, thresholds: jax.Array) -> jax.Array:
  """S of a batch (Eq. S2): +1 where the cosine distance is below thresholds[0], -1
  above thresholds[1], else 0; float32 (B, B) of features (B, D) unit rows."""
  return similarity_rows(features, features, thresholds)


def similarity_rows(rows: jax.Array, features: jax.Array,
                    thresholds: jax.Array) -> jax.Array:
  """S (Eq. S2) of `rows` (c, D) against `features` (N, D): float32 (c, N)."""
  distances = 1.0 - jnp.matmul(rows, features.T, precision=jax.lax.Precision.HIGHEST)
  return (jnp.where(distances < thresholds[0], 1.0, 0.0)
          - jnp.where(distances > thresholds[1], 1.0, 0.0))


def ssdh_loss(relaxed_codes: jax.Array, similarity: jax.Array
              ) -> tuple[jax.Array, dict]:
  """L = sum_ij |S_ij| (u_i . u_j / L - S_ij)^2 / B^2 (Eq. S3), u = tanh(h).

  Args:
    relaxed_codes: (B, L) float32 u.
    similarity: (B, B) S in {-1, 0, +1} (a constant).

  Returns:
    (total, {"loss_pairs", "known_pair_fraction"}), float32 scalars.
  """
  batch, code_length = relaxed_codes.shape
  s = jax.lax.stop_gradient(similarity)
  inner = jnp.matmul(relaxed_codes, relaxed_codes.T,
                     precision=jax.lax.Precision.HIGHEST) / code_length
  loss = jnp.sum(jnp.abs(s) * (inner - s) ** 2) / batch**2
  return loss, {"loss_pairs": loss, "known_pair_fraction": jnp.mean(jnp.abs(s))}


_similarity_rows = jax.jit(similarity_rows)


def _epoch_targets(config: ml_collections.ConfigDict, key: jax.Array,
                   data: TrainingData, params, *, epoch: int, previous=None):
  """The unit features of the training set and SSDH's two thresholds (Eqs. S1-S2),
  with statistics of the pairs they make; the key draws the ARPACK start of
  "spectral" features and the fitted sample beyond `fit_rows` images."""
  del previous
  c = config.method.ssdh
  features_key, sample_key = jax.random.split(key)
  features = peer_features.training_features(config, c.features, data, params,
                                             features_key)
  n = len(features)
  fit_rows = np.arange(n)
  if n > c.fit_rows:
    fit_rows = np.sort(np.asarray(jax.random.choice(sample_key, n, (c.fit_rows,),
                                                    replace=False)))
  fit = fit_thresholds(features[fit_rows], left_stds=c.left_stds,
                       right_stds=c.right_stds)
  thresholds = np.array([fit["similar_below"], fit["dissimilar_above"]], np.float32)
  # The share of similar and dissimilar pairs among the fitted ones, and how often a
  # similar pair shares a true class (a diagnostic; training never reads labels).
  fitted = jnp.asarray(features[fit_rows])
  labels = np.asarray(data.source.labels)[data.train_indices[fit_rows]]
  similar = dissimilar = same_class_similar = 0
  for start in range(0, len(fit_rows), _FIT_CHUNK_ROWS):
    s = np.array(_similarity_rows(fitted[start:start + _FIT_CHUNK_ROWS], fitted,
                                  jnp.asarray(thresholds)))
    np.fill_diagonal(s[:, start:start + _FIT_CHUNK_ROWS], 0)
    same = _same_class(labels[start:start + _FIT_CHUNK_ROWS], labels)
    similar += int(np.sum(s > 0))
    dissimilar += int(np.sum(s < 0))
    same_class_similar += int(np.sum((s > 0) & same))
  pairs = len(fit_rows) * (len(fit_rows) - 1)
  stats = {"epoch": epoch, "features": c.features, "fit_rows": int(len(fit_rows)),
           **fit,
           "similar_fraction": similar / pairs,
           "dissimilar_fraction": dissimilar / pairs,
           "similar_precision": same_class_similar / max(similar, 1)}
  if similar == 0 or dissimilar == 0:
    none = "similar" if similar == 0 else "dissimilar"
    raise UserError(
        f"SSDH's thresholds leave no {none} pair among the {len(fit_rows)} training "
        f"images fitted (cosine-distance mode {fit['mode']:.2f}, thresholds "
        f"{thresholds[0]:.3f} and {thresholds[1]:.3f}), so its loss has nothing to "
        "learn from. Lower config.method.ssdh.left_stds / right_stds, or compare "
        "images by other features (config.method.ssdh.features).")
  return {"features": features, "thresholds": thresholds}, stats


def _same_class(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(len a, len b) bool: the images share a class (a label, for multi-label sets)."""
  if a.ndim == 1:
    return a[:, None] == b[None, :]
  return reference.shares_a_label(a, b)


def _loss(config, outputs, targets, position, *, key, attention):
  del config, key, attention
  out, = outputs
  similarity = batch_similarity(targets["features"][position], targets["thresholds"])
  return ssdh_loss(out["relaxed_codes"], similarity)


def _abstract_targets(config, num_train, model, sharding, *, pixel_dim, attention):
  del attention
  shapes = peer_features.abstract_features(config, config.method.ssdh.features,
                                           num_train, model, sharding,
                                           pixel_dim=pixel_dim)
  shapes["thresholds"] = jax.ShapeDtypeStruct((2,), jnp.float32, sharding=sharding)
  return shapes


def _describe(stats: dict) -> str:
  return (f"ssdh: cosine-distance mode {stats['mode']:.2f}, similar below "
          f"{stats['similar_below']:.3f} ({stats['similar_fraction']:.3f} of pairs, "
          f"{stats['similar_precision']:.3f} same class, diagnostic only), dissimilar "
          f"above {stats['dissimilar_above']:.3f} "
          f"({stats['dissimilar_fraction']:.3f})")


METHOD = Method(
    name="ssdh", num_views=1, view_augmentation=lambda config: config.data.augment,
    classifier_outputs=lambda config: 0, epoch_targets=_epoch_targets,
    refresh_due=lambda config, epoch: False, abstract_targets=_abstract_targets,
    loss=_loss, describe=_describe)
