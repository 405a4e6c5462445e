"""On-device image preprocessing: dtype, channels, size, normalisation, augmentation.

Runs inside the jit-compiled train and encode steps, so the host only ships uint8
pixels (4x less to transfer than float32) and the work is spread over the devices
along with the batch.
"""
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from psch_jax.config import AUGMENTATIONS


# CIBHash's views (its authors' utils/data.py): a random resized crop of 50-100 % of
# the area at aspect 3/4-4/3, a flip, colour jitter of strength 0.4 with probability
# 0.7, greyscale with probability 0.2.
_CROP_AREA = (0.5, 1.0)
_CROP_LOG_ASPECT = (math.log(3 / 4), math.log(4 / 3))
_JITTER_STRENGTH = 0.4
_JITTER_PROBABILITY = 0.7
_GREY_PROBABILITY = 0.2
# ITU-R 601 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


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


def augment(key: jax.Array, images: jax.Array, *, kind: str, pad: int = 4,
            mean: Optional[Sequence[float]] = None,
            std: Optional[Sequence[float]] = None) -> jax.Array:
  """Random horizontal flip, and for "crop_flip" a random crop after zero padding;
  "contrastive" is `contrastive_view`.

  Args:
    key: PRNG key, used once.
    images: float32 (B, H, W, C), already normalised.
    kind: one of AUGMENTATIONS.
    pad: pixels of padding before the random crop (the CIFAR-10 standard is 4).
    mean, std: the normalisation of `images` ("contrastive" only: its colour jitter
      works on pixels in [0, 1]).

  Returns:
    float32 (B, H, W, C).
  """
  if kind == "none":
    return images
  if kind not in AUGMENTATIONS:
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
  if kind == "contrastive":
    if mean is None or std is None:
      raise ValueError("the 'contrastive' augmentation needs the normalisation's "
                       "mean and std")
    return contrastive_view(key, images, mean=mean, std=std)
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


def contrastive_view(key: jax.Array, images: jax.Array, *, mean: Sequence[float],
                     std: Sequence[float]) -> jax.Array:
  """One random view of each image for contrastive learning (CIBHash's views).

  A random resized crop (area fraction in [0.5, 1], aspect in [3/4, 4/3], bilinear
  back to H x W), a horizontal flip with probability 0.5, then with probability 0.7
  brightness, contrast and (RGB) saturation jitter, each by a factor in [0.6, 1.4],
  and (RGB) greyscale with probability 0.2; pixels are clipped to [0, 1] after each
  jitter, as torchvision does. Where it differs from the authors' torchvision
  pipeline (docs/method.md, "CIBHash"): the crop box is continuous rather than
  whole pixels, the jitters come in a fixed order, and there is no hue jitter and no
  Gaussian blur.

  Args:
    key: PRNG key, used once.
    images: float32 (B, H, W, C), normalised by `mean` and `std`.
    mean, std: per-channel statistics in [0, 1] pixel units (length 1 or C).

  Returns:
    float32 (B, H, W, C), normalised the same way.
  """
  b, h, w, c = images.shape
  keys = jax.random.split(key, 10)
  area = jax.random.uniform(keys[0], (b,), minval=_CROP_AREA[0], maxval=_CROP_AREA[1])
  aspect = jnp.exp(jax.random.uniform(keys[1], (b,), minval=_CROP_LOG_ASPECT[0],
                                      maxval=_CROP_LOG_ASPECT[1]))
  crop_h = jnp.clip(jnp.sqrt(area / aspect) * h, 1.0, h)
  crop_w = jnp.clip(jnp.sqrt(area * aspect) * w, 1.0, w)
  top = jax.random.uniform(keys[2], (b,)) * (h - crop_h)
  left = jax.random.uniform(keys[3], (b,)) * (w - crop_w)
  scale = jnp.stack([h / crop_h, w / crop_w], axis=-1)
  translation = -jnp.stack([top, left], axis=-1) * scale

  def crop(image, image_scale, image_translation):
    return jax.image.scale_and_translate(image, (h, w, c), (0, 1), image_scale,
                                         image_translation, method="linear")

  x = jax.vmap(crop)(images, scale, translation)
  flip = jax.random.bernoulli(keys[4], 0.5, (b,))
  x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)

  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  pixels = x * std + mean

  def factor(k):
    return jax.random.uniform(k, (b, 1, 1, 1), minval=1 - _JITTER_STRENGTH,
                              maxval=1 + _JITTER_STRENGTH)

  def grey(p):
    if c == 1:
      return p
    return jnp.sum(p * jnp.asarray(_LUMA, jnp.float32), axis=-1, keepdims=True)

  jittered = jnp.clip(pixels * factor(keys[5]), 0.0, 1.0)
  grey_mean = jnp.mean(grey(jittered), axis=(1, 2, 3), keepdims=True)
  jittered = jnp.clip(grey_mean + (jittered - grey_mean) * factor(keys[6]), 0.0, 1.0)
  if c > 1:
    jittered = jnp.clip(grey(jittered) + (jittered - grey(jittered)) * factor(keys[7]),
                        0.0, 1.0)
  apply_jitter = jax.random.bernoulli(keys[8], _JITTER_PROBABILITY, (b, 1, 1, 1))
  pixels = jnp.where(apply_jitter, jittered, pixels)
  if c > 1:
    to_grey = jax.random.bernoulli(keys[9], _GREY_PROBABILITY, (b, 1, 1, 1))
    pixels = jnp.where(to_grey, jnp.broadcast_to(grey(pixels), pixels.shape), pixels)
  return (pixels - mean) / std
