"""The fixed features SSDH, GreedyHash and BiHalf compare training images by.

Their authors compare images by the fc7 features of a frozen ImageNet VGG
("global": the global feature of the network before training); on a small CNN
trained from scratch, whose random features carry little class structure, the
unit pixels take that place ("pixels"), or the spectral embedding of the pixels'
k-NN graph that PSCH clusters there ("spectral", Eq. 1a, with PSCH's
`pseudo_labels.spectral_neighbors` and `spectral_components`).
Computed once, before training, and held in the checkpoint as the targets entry
"features": float32 (N, D) rows of unit L2 norm (docs/method.md, "Deep peers").
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from psch_jax import config_schema
from psch_jax import encoding
from psch_jax import spectral
from psch_jax.methods.interface import TrainingData
from psch_jax.targets import unit_rows


def training_features(config: ml_collections.ConfigDict, kind: str,
                      data: TrainingData, params, key: jax.Array) -> np.ndarray:
  """float32 (N, D) unit rows of the training images' `kind` features ("pixels":
  H W C pixels in [0, 1]; "spectral": their Eq. 1a embedding, ARPACK started from
  `key`; "global": the network's global feature under `params`)."""
  if kind in ("pixels", "spectral"):
    pixels = data.source.read(data.train_indices).reshape(len(data.train_indices), -1)
    pixels = pixels.astype(np.float32) / 255.0
    if kind == "pixels":
      return unit_rows(pixels)
    neighbors = spectral.knn_graph(
        jnp.asarray(pixels), num_neighbors=config.pseudo_labels.spectral_neighbors)
    embedding = spectral.graph_embedding(
        key, np.asarray(neighbors),
        num_components=config_schema.spectral_components(config))
    return unit_rows(embedding.embedding)
  if kind == "global":
    encoded = encoding.encode_images(data.encode, params, data.source,
                                     data.train_indices,
                                     batch_size=config.eval.batch_size,
                                     mesh=data.mesh, keys=["global_feature"])
    return unit_rows(encoded["global_feature"])
  raise ValueError(f"unknown peer features {kind!r}; expected 'pixels', 'spectral' "
                   "or 'global'")


def feature_dim(config: ml_collections.ConfigDict, kind: str, model, *,
                pixel_dim: int) -> int:
  """D of `training_features`, from shapes alone."""
  if kind == "pixels":
    return pixel_dim
  if kind == "spectral":
    return config_schema.spectral_components(config)
  shape = (1, config.model.image_size, config.model.image_size, config.model.channels)
  out = jax.eval_shape(
      lambda k: model.init_with_output(k, jnp.zeros(shape, jnp.float32),
                                       train=False)[0],
      jax.random.key(0))
  return int(out["global_feature"].shape[-1])


def abstract_features(config: ml_collections.ConfigDict, kind: str, num_train: int,
                      model, sharding, *, pixel_dim: int) -> dict:
  """{"features": ShapeDtypeStruct (N, D) float32} placed by `sharding`."""
  dim = feature_dim(config, kind, model, pixel_dim=pixel_dim)
  return {"features": jax.ShapeDtypeStruct((num_train, dim), jnp.float32,
                                           sharding=sharding)}


def feature_targets(method: str):
  """(epoch_targets, abstract_targets) of a method whose only targets are the fixed
  features of `config.method.<method>.features` (GreedyHash, BiHalf):
  {"features": float32 (N, D) unit rows}, made once before training."""

  def epoch_targets(config: ml_collections.ConfigDict, key: jax.Array,
                    data: TrainingData, params, *, epoch: int, previous=None):
    del previous
    kind = config.method[method].features
    features = training_features(config, kind, data, params, key)
    return {"features": features}, {"epoch": epoch, "features": kind,
                                    "feature_dim": int(features.shape[1])}

  def abstract_targets(config, num_train, model, sharding, *, pixel_dim, attention):
    del attention
    return abstract_features(config, config.method[method].features, num_train,
                             model, sharding, pixel_dim=pixel_dim)

  return epoch_targets, abstract_targets


def cosine_of_halves(rows: jax.Array) -> jax.Array:
  """(B/2,) cosines of row i of the first half with row i of the second half of
  `rows` (B, D), as torch's F.cosine_similarity (each norm clamped at 1e-8)."""
  half = rows.shape[0] // 2
  first, second = rows[:half], rows[half:2 * half]
  norms = (jnp.maximum(jnp.linalg.norm(first, axis=-1), 1e-8)
           * jnp.maximum(jnp.linalg.norm(second, axis=-1), 1e-8))
  return jnp.sum(first * second, axis=-1) / norms


def cosine_preserving_loss(codes: jax.Array, features: jax.Array) -> jax.Array:
  """GreedyHash's unsupervised loss, which BiHalf keeps: the mean squared difference
  between the cosines of code pairs and of feature pairs, pairing the first half of
  the batch with the second (docs/method.md, Eq. G1).

  Args:
    codes: (B, L) float binary codes b (straight-through or bi-half).
    features: (B, D) float features x of the same images.

  Returns:
    float32 scalar.
  """
  features = jax.lax.stop_gradient(features)
  return jnp.mean((cosine_of_halves(codes) - cosine_of_halves(features)) ** 2)
