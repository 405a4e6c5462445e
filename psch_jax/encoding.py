"""The shared image encoder: uint8 images in, per-image network outputs out.

One forward pass serves every reader of the network outside the train step: the
pseudo labels and similarity sources (`psch_jax.targets`), retrieval codes of the
evaluation, and `psch_jax.search`. It is the training pipeline's own preprocessing
(`psch_jax.preprocess.preprocess`, on device) followed by the network in inference
mode (no dropout) and the grouped attention of the config (Eqs. 3-5).

- `make_attention(config)`: THE `GroupedAttention` of a config (every field of
  `config.attention`); build it once per run and pass it down.
- `make_forward(config, model, attention)`: the pure function (params, uint8
  images) -> outputs dict; not jitted.
- `make_encoder(config, model, mesh)`: jit of it over a device mesh, for batches of
  `psch_jax.data.pipeline.eval_batches` (index and mask travel along).
- `encode_images(...)`: runs an encoder over a set of images in fixed-size padded
  batches and returns numpy arrays in the order asked for.
- `make_code_encoder(config, model)`: jit (params, uint8 images) -> int8 hash codes
  (Eq. 12), for images that are not in the dataset (search).
"""
import functools
from typing import Any, Callable, Iterable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from psch_jax import models
from psch_jax import sharding
from psch_jax.attention import GroupedAttention
from psch_jax.data import pipeline
from psch_jax.preprocess import preprocess

# What `make_forward` returns per image; `encode_images(keys=...)` picks from these.
OUTPUT_KEYS = ("relaxed_codes", "global_feature", "pooled_feature", "part_descriptors",
               "part_weights")


def make_attention(config: ml_collections.ConfigDict) -> GroupedAttention:
  """The grouped attention (Eqs. 3-5) that `config.attention` describes."""
  return GroupedAttention(num_parts=config.attention.num_parts,
                          temperature=config.attention.temperature,
                          uniform=config.attention.uniform)


def make_forward(config: ml_collections.ConfigDict, model: models.PSCHNet,
                 attention: GroupedAttention
                 ) -> Callable[[Any, jax.Array], dict[str, jax.Array]]:
  """(params, uint8 (B, H, W, C) images) -> per-image outputs, inference mode.

  The outputs: "relaxed_codes" f32 (B, L) tanh codes (Eq. 12 binarises them),
  "global_feature" f32 (B, D) the backbone's global feature, "pooled_feature"
  f32 (B, C) the mean of the last feature map over positions, "part_descriptors"
  f32 (B, P, C/P) (Eq. 4) and "part_weights" f32 (B, P) (Eq. 5).
  """

  def forward(params, images):
    inputs = preprocess(images, image_size=config.model.image_size,
                        channels=config.model.channels, mean=config.data.mean,
                        std=config.data.std)
    out = model.apply({"params": params}, inputs, train=False)
    parts = attention.apply({}, out["feature_map"])
    return {"relaxed_codes": out["relaxed_codes"],
            "global_feature": out["global_feature"],
            "pooled_feature": out["feature_map"].mean(axis=(1, 2)),
            "part_descriptors": parts.descriptors,
            "part_weights": parts.weights}

  return forward


def make_encoder(config: ml_collections.ConfigDict, model: models.PSCHNet, mesh: Mesh,
                 *, attention: Optional[GroupedAttention] = None):
  """jit: (params, batch) -> replicated per-image outputs (`make_forward`'s) plus the
  batch's "index" and "mask".

  Args:
    batch: {"images": uint8 (B, H, W, C), "index": int (B,), "mask": (B,)} global
      arrays split over the mesh (`sharding.global_batch`).
    attention: the run's `make_attention(config)`; built from the config when None.
  """
  forward = make_forward(config, model,
                         make_attention(config) if attention is None else attention)
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=replicated)
  def encode(params, batch):
    return {**forward(params, batch["images"]),
            "index": batch["index"], "mask": batch["mask"]}

  return encode


def make_code_encoder(config: ml_collections.ConfigDict, model: models.PSCHNet
                      ) -> Callable[[Any, jax.Array], jax.Array]:
  """jit: (params, uint8 (n, H, W, C) images) -> int8 (n, L) hash codes (Eq. 12),
  through `make_forward` (the training pipeline's preprocessing and network)."""
  forward = make_forward(config, model, make_attention(config))

  @jax.jit
  def encode(params, images):
    return models.hash_codes(forward(params, images)["relaxed_codes"])

  return encode


def to_host(x: jax.Array) -> np.ndarray:
  """Host copy of a replicated global array (works on every process)."""
  return np.asarray(x.addressable_data(0))


def encode_images(encode, params, source, indices: np.ndarray, *, batch_size: int,
                  mesh: Mesh, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Runs `encode` (of `make_encoder`) over `source[indices]` in fixed-size padded
  batches (the last one masked, so one compiled program serves every batch).

  Args:
    keys: which of `OUTPUT_KEYS` to return.

  Returns:
    numpy arrays in the order of `indices`, one per requested key.
  """
  keys = tuple(keys)
  batch_sharding = sharding.batch_sharding(mesh)
  chunks = {k: [] for k in keys}
  for local in pipeline.eval_batches(source, indices, batch_size=batch_size,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count()):
    out = encode(params, sharding.global_batch(local, batch_sharding))
    mask = to_host(out["mask"]).astype(bool)
    for k in keys:
      chunks[k].append(to_host(out[k])[mask])
  return {k: np.concatenate(v) for k, v in chunks.items()}
