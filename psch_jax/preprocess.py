"""On-device image preprocessing: dtype, channels, size, normalisation, augmentation.

Runs inside the jit-compiled train and encode steps, so the host only ships uint8
pixels (4x less to transfer than float32) and the work is spread over the devices
along with the batch.
"""
from typing import Sequence

import jax
import jax.numpy as jnp

AUGMENTATIONS = ("none", "flip", "crop_flip")


def preprocess(images: jax.Array, *, image_size: int, channels: int,
               mean: Sequence[float], std: Sequence[float]) -> jax.Array:
  """uint8 pixels to the network's normalised float input.

  Args:
    images: uint8 (B, H, W, C) with C = 1 or 3.
    image_size: side of the square network input; resized bilinearly if different.
    channels: channels the network expects; a grey image is repeated to 3.
    mean, std: per-channel statistics in [0, 1] units (length `channels`).

  Returns:
    float32 (B, image_size, image_size, channels).
  """
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] != channels:
    if x.shape[-1] == 1:
      x = jnp.repeat(x, channels, axis=-1)
    else:
      raise ValueError(f"cannot turn {x.shape[-1]} image channels into {channels}")
  if x.shape[1:3] != (image_size, image_size):
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, channels),
                         method="bilinear", antialias=True)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (x - mean) / std


def augment(key: jax.Array, images: jax.Array, *, kind: str,
            pad: int = 4) -> jax.Array:
  """Random horizontal flip, and for "crop_flip" a random crop after zero padding.

  Args:
    key: PRNG key, used once.
    images: float32 (B, H, W, C), already normalised.
    kind: one of AUGMENTATIONS.
    pad: pixels of padding before the random crop (the CIFAR-10 standard is 4).

  Returns:
    float32 (B, H, W, C).
  """
  if kind == "none":
    return images
  if kind not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
  flip_key, crop_key = jax.random.split(key)
  b, h, w, _ = images.shape
  flip = jax.random.bernoulli(flip_key, 0.5, (b,))
  images = jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
  if kind == "crop_flip":
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(crop_key, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(
        img, (off[0], off[1], 0), (h, w, img.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  return images
