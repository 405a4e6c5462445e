"""Networks: the VGG-16 and small-CNN backbones, the hash head and the PSCH network.

All modules are Flax Linen, take NHWC float32 images and have no BatchNorm, so the
params are the only variable collection; `train=True` only switches dropout on (it
then needs a `'dropout'` PRNG key in `apply(..., rngs={'dropout': key})`).

A backbone maps images `(B, H, W, C)` to a `BackboneOutput`: the last convolutional
feature map `M_i` (used by the grouped attention, Eqs. 3-5) and the global feature
`g_i` (input of the hash head, Eq. 12). `PSCHNet` puts a backbone, the hash head and a
linear pseudo-label classifier (for L_cls, Eq. 9) under the top-level param keys
`'backbone'`, `'hash_head'` and `'classifier'`, so an optimizer can give the backbone
its own learning rate by top-level key (`optax.multi_transform`).

Mixed precision: every module has a `dtype` field, the dtype its convolutions and
matmuls compute in (`jnp.float32` by default, `jnp.bfloat16` for `model.compute_dtype
= "bfloat16"`). Parameters are always created and stored in float32 (Flax's
`param_dtype`), so the optimizer state and the checkpoints stay float32 and the
gradients come back float32; only the layer inputs and a copy of the weights are cast
for the matmul. `PSCHNet` casts every output to float32 and computes tanh (Eq. 12)
and the classifier (Eq. 9) in float32, so the loss, the similarity kernel, the part
attention's softmax, k-means and the evaluation all see float32. With the float32
default every cast is an identity: the float32 program is unchanged.

Param names (stable; `psch_jax/pretrained.py` relies on the VGG-16 ones):
- `VGG16`: `conv1_1, conv1_2, conv2_1, conv2_2, conv3_1 .. conv3_3, conv4_1 .. conv4_3,
  conv5_1 .. conv5_3` (each `{'kernel': (3, 3, I, O), 'bias': (O,)}`), then `fc6`
  (`kernel (25088, 4096)`, rows in torch's (C, H, W) flatten order) and `fc7`
  (`kernel (4096, 4096)`).
- `SmallCNN`: `block{b}_conv{c}` (1-based block and conv index), then `global_dense`.
- `HashHead`: `dense` (`kernel (D, L)`).
- `PSCHNet`: `backbone/...`, `hash_head/dense`, `classifier` (`kernel (L, K_c)`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

from flax.core import FrozenDict
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from psch_jax.errors import UserError

# torchvision's VGG configuration "D" (VGG-16): output channels of each 3x3 conv,
# "M" = 2x2 max-pool with stride 2.
VGG16_CONFIG_D: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
    512, 512, 512, "M", 512, 512, 512, "M")
VGG16_POOLED_SIZE = 7  # torchvision's AdaptiveAvgPool2d((7, 7)) before fc6.
VGG16_FC_DIM = 4096
VGG16_MIN_INPUT_SIZE = 32  # Five 2x2 max-pools need at least 32 pixels per side.


def vgg16_conv_names() -> tuple[str, ...]:
  """Names of the 13 conv layers of `VGG16`, in order: `conv1_1` ... `conv5_3`."""
  names = []
  block, index = 1, 1
  for entry in VGG16_CONFIG_D:
    if entry == "M":
      block, index = block + 1, 1
    else:
      names.append(f"conv{block}_{index}")
      index += 1
  return tuple(names)


class BackboneOutput(NamedTuple):
  """What a backbone returns.

  Attributes:
    feature_map: float32 `(B, h, w, C)`, the last conv feature map `M_i` after ReLU
      (non-negative), input of the grouped attention (Eqs. 3-5).
    global_feature: float32 `(B, D)`, the global feature `g_i` after ReLU, input of
      the hash head (Eq. 12).
  """
  feature_map: jax.Array
  global_feature: jax.Array


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Averaging matrix `(out_size, in_size)` of torch's adaptive average pooling.

  Output cell i averages input cells `[floor(i * in / out), ceil((i + 1) * in / out))`,
  exactly torch's `adaptive_avg_pool2d` index rule (windows may overlap, and when
  `in < out` cells repeat).
  """
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # Integer ceil, no float rounding.
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


def adaptive_avg_pool2d(
    x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """Torch-exact adaptive average pooling of an NHWC map.

  Args:
    x: `(B, H, W, C)` feature map.
    output_size: `(out_h, out_w)`.

  Returns:
    `(B, out_h, out_w, C)` with the same dtype as `x`; equals
    `torch.nn.functional.adaptive_avg_pool2d` for any `H, W >= 1` (e.g. a 1x1 map is
    broadcast to every output cell, a 7x7 map to 7x7 is the identity).
  """
  out_h, out_w = output_size
  pool_h = jnp.asarray(_adaptive_pool_matrix(x.shape[1], out_h), x.dtype)
  pool_w = jnp.asarray(_adaptive_pool_matrix(x.shape[2], out_w), x.dtype)
  # HIGHEST precision so accelerators do not round the averages to bfloat16.
  return jnp.einsum("ih,bhwc,jw->bijc", pool_h, x, pool_w,
                    precision=jax.lax.Precision.HIGHEST)


def _max_pool_2x2(x: jax.Array) -> jax.Array:
  # VALID padding floors odd sizes, as torch's MaxPool2d(2, 2) does.
  return nn.max_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")


COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """The jnp dtype of a `model.compute_dtype` name ("float32" | "bfloat16").

  Raises:
    UserError: any other name.
  """
  if name not in COMPUTE_DTYPES:
    raise UserError(
        f"config.model.compute_dtype={name!r} is not one of {list(COMPUTE_DTYPES)}; "
        "set --config.model.compute_dtype=bfloat16 on GPUs and TPUs, float32 on CPUs.")
  return COMPUTE_DTYPES[name]


def _conv3x3(features: int, name: str, dtype: Any) -> nn.Conv:
  # Explicit 1-pixel padding on each side is torch's Conv2d(padding=1). Weights are
  # float32 (param_dtype); `dtype` is what the convolution computes in.
  return nn.Conv(features, kernel_size=(3, 3), padding=((1, 1), (1, 1)),
                 dtype=dtype, param_dtype=jnp.float32, name=name)


class VGG16(nn.Module):
  """VGG-16 (torchvision configuration "D", no BatchNorm) without the 1000-way layer.

  13 conv3x3 + ReLU layers with five 2x2 max-pools, torchvision's adaptive average
  pool to 7x7, flatten in torch's (C, H, W) order (so torchvision's fc6 weights load
  unchanged, see `psch_jax/pretrained.py`), fc6 4096 + ReLU + dropout, fc7 4096 + ReLU
  + dropout.

  Attributes:
    dropout_rate: dropout after fc6 and fc7 when `train=True` (torchvision: 0.5).
    dtype: compute dtype of the convolutions and fc6 / fc7 (params stay float32).
  """
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> BackboneOutput:
    """Runs the backbone.

    Args:
      images: float32 `(B, H, W, C)`, `H, W >= 32` (ImageNet weights expect C = 3,
        normalised as torchvision does).
      train: enables dropout (needs the `'dropout'` PRNG stream).

    Returns:
      `BackboneOutput` with `feature_map` = conv5_3 after ReLU, before the last
      max-pool, `(B, H // 16, W // 16, 512)` (224x224 -> 14x14, 32x32 -> 2x2; odd
      sizes floor at each pool), and `global_feature` = fc7 after ReLU (and dropout),
      `(B, 4096)`; both in `dtype`.
    """
    height, width = images.shape[1], images.shape[2]
    if min(height, width) < VGG16_MIN_INPUT_SIZE:
      raise UserError(
          f"VGG16 needs images of at least {VGG16_MIN_INPUT_SIZE}x"
          f"{VGG16_MIN_INPUT_SIZE} pixels (five 2x2 max-pools), got {height}x{width}; "
          "resize the images (preprocess image_size) or use backbone 'small_cnn'.")
    x = images
    conv_names = iter(vgg16_conv_names())
    feature_map = x
    for entry in VGG16_CONFIG_D:
      if entry == "M":
        feature_map = x
        x = _max_pool_2x2(x)
      else:
        x = nn.relu(_conv3x3(int(entry), next(conv_names), self.dtype)(x))
    x = adaptive_avg_pool2d(x, (VGG16_POOLED_SIZE, VGG16_POOLED_SIZE))
    # torch flattens NCHW; transposing first keeps fc6's rows in torchvision's order.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    for name in ("fc6", "fc7"):
      x = nn.relu(nn.Dense(VGG16_FC_DIM, dtype=self.dtype, param_dtype=jnp.float32,
                           name=name)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return BackboneOutput(feature_map=feature_map, global_feature=x)


class SmallCNN(nn.Module):
  """A small CNN trained from scratch on 28x28 grayscale or 32x32 RGB images.

  `len(widths)` blocks of `convs_per_block` x [conv3x3 + ReLU] then a 2x2 max-pool;
  the feature map is the last block's output before its pool. The pooled map is
  flattened and a Dense + ReLU layer gives the global feature.

  Attributes:
    widths: output channels of each block.
    convs_per_block: conv layers per block. The default 1 (3 convs in all) trains
      30 epochs of 5,000 images in minutes on 2 CPU cores; 2 is about twice as slow.
    feature_dim: size D of the global feature.
    dropout_rate: dropout on the global feature when `train=True` (0 = none, then no
      `'dropout'` PRNG stream is needed).
    dtype: compute dtype of the convolutions and the dense layer (params float32).
  """
  widths: Sequence[int] = (32, 64, 128)
  convs_per_block: int = 1
  feature_dim: int = 512
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    if (not self.widths or any(int(w) < 1 for w in self.widths)
        or self.convs_per_block < 1 or self.feature_dim < 1):
      raise UserError(
          f"SmallCNN got widths={tuple(self.widths)}, convs_per_block="
          f"{self.convs_per_block}, feature_dim={self.feature_dim}; all must be "
          "positive and widths non-empty, e.g. widths=(32, 64, 128).")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> BackboneOutput:
    """Runs the backbone.

    Args:
      images: float32 `(B, H, W, C)`, any C; H and W at least `2 ** len(widths)`.
      train: enables dropout (only if `dropout_rate > 0`).

    Returns:
      `BackboneOutput`: `feature_map` float32 `(B, H', W', widths[-1])` with
      `H' = H // 2 ** (len(widths) - 1)` (28x28x1 -> 7x7x128, 32x32x3 -> 8x8x128 with
      the defaults), and `global_feature` `(B, feature_dim)`; both in `dtype`.
    """
    min_size = 2 ** len(self.widths)
    if min(images.shape[1], images.shape[2]) < min_size:
      raise UserError(
          f"SmallCNN with {len(self.widths)} blocks needs images of at least "
          f"{min_size}x{min_size} pixels, got {images.shape[1]}x{images.shape[2]}; "
          "use fewer widths or larger images.")
    x = images
    feature_map = x
    for block, width in enumerate(self.widths, start=1):
      for index in range(1, self.convs_per_block + 1):
        x = nn.relu(_conv3x3(int(width), f"block{block}_conv{index}", self.dtype)(x))
      feature_map = x
      x = _max_pool_2x2(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.feature_dim, dtype=self.dtype, param_dtype=jnp.float32,
                         name="global_dense")(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return BackboneOutput(feature_map=feature_map, global_feature=x)


def _check_num_bits(num_bits: int) -> None:
  if not isinstance(num_bits, (int, np.integer)) or num_bits < 1:
    raise UserError(
        f"num_bits must be a positive integer code length, got {num_bits!r}; "
        "use e.g. 16, 32, 64 or 128.")


class HashHead(nn.Module):
  """Hash layer pre-activation `h = W g + b`; `PSCHNet` takes `u = tanh(h)` (Eq. 12).

  Attributes:
    num_bits: code length L.
    dtype: compute dtype of the matmul; the output is float32.
  """
  num_bits: int
  dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    _check_num_bits(self.num_bits)
    super().__post_init__()

  @nn.compact
  def __call__(self, global_feature: jax.Array) -> jax.Array:
    """Hash logits `h`, float32 `(B, L)`, of `(B, D)` features."""
    pre_activation = nn.Dense(self.num_bits, dtype=self.dtype, param_dtype=jnp.float32,
                              name="dense")(global_feature)
    return pre_activation.astype(jnp.float32)


def hash_codes(relaxed_codes: jax.Array) -> jax.Array:
  """Binary codes `b = sign(u)` with `sign(0) = +1` (Eq. 12).

  Args:
    relaxed_codes: float `(..., L)`.

  Returns:
    int8 `(..., L)` with entries in {-1, +1}.
  """
  return jnp.where(relaxed_codes >= 0, 1, -1).astype(jnp.int8)


_BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
    "vgg16": VGG16,
}


def backbone_names() -> tuple[str, ...]:
  """Names accepted by `PSCHNet.backbone` and `create_model`, sorted."""
  return tuple(sorted(_BACKBONES))


def _backbone_class(name: str, backbone_kwargs: Mapping[str, Any]) -> type[nn.Module]:
  """The backbone class for `name`, after checking `backbone_kwargs` are its fields."""
  if name not in _BACKBONES:
    raise UserError(
        f"unknown backbone {name!r}; choose one of {list(backbone_names())}.")
  cls = _BACKBONES[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(backbone_kwargs) - fields)
  if unknown:
    raise UserError(
        f"backbone {name!r} has no option(s) {unknown}; its options are "
        f"{sorted(fields)}.")
  return cls


class PSCHNet(nn.Module):
  """Backbone + hash head (Eq. 12) + linear pseudo-label classifier on u (Eq. 9).

  Params: `{'backbone': ..., 'hash_head': {'dense': ...}, 'classifier': {'kernel'
  (L, K_c), 'bias' (K_c,)}}`; without 'classifier' for `num_classes = 0` (the deep
  peers of `psch_jax.methods`, which have no classifier).

  Attributes:
    backbone: a name from `backbone_names()` or a Linen module with the backbone
      call signature `(images, *, train) -> BackboneOutput`.
    num_bits: code length L >= 1.
    num_classes: number of pseudo classes K_c (k-means clusters); 0 = no
      classifier.
    backbone_kwargs: fields of the named backbone (ignored for a module), e.g.
      `{'widths': (32, 64, 128)}` or `{'dropout_rate': 0.5}`.
    dtype: compute dtype of the named backbone and the hash head's matmul (a module
      backbone keeps its own); params, outputs and the classifier stay float32.
  """
  backbone: str | nn.Module
  num_bits: int
  num_classes: int
  backbone_kwargs: Mapping[str, Any] = FrozenDict()
  dtype: Any = jnp.float32

  def __post_init__(self) -> None:
    _check_num_bits(self.num_bits)
    if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 0:
      raise UserError(
          f"num_classes (pseudo classes K_c) must be an integer >= 0, got "
          f"{self.num_classes!r}; set it to the number of k-means clusters (0: no "
          "classifier).")
    if "dtype" in self.backbone_kwargs:
      raise UserError("PSCHNet takes the compute dtype as its own `dtype` field "
                      "(create_model(..., dtype=...)), not in backbone_kwargs.")
    if isinstance(self.backbone, str):
      _backbone_class(self.backbone, self.backbone_kwargs)  # Fails at construction.
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool) -> dict[str, jax.Array]:
    """Runs the network.

    Args:
      images: float32 `(B, H, W, C)`.
      train: enables dropout in the backbone (needs the `'dropout'` PRNG stream
        when the backbone has a non-zero dropout rate).

    Returns:
      dict with `feature_map` float32 `(B, h, w, C')`, `global_feature` float32
      `(B, D)`, `hash_logits` float32 `(B, L)` (h of Eq. 12), `relaxed_codes`
      float32 `(B, L)` in (-1, 1) (u = tanh(h), Eq. 12) and, with a classifier,
      `class_logits` float32 `(B, K_c)` (Eq. 9).
    """
    if isinstance(self.backbone, str):
      backbone_cls = _backbone_class(self.backbone, self.backbone_kwargs)
      backbone = backbone_cls(name="backbone", dtype=self.dtype,
                              **dict(self.backbone_kwargs))
    else:
      backbone = self.backbone  # Linen adopts a module field under its field name.
    features = backbone(images, train=train)
    hash_logits = HashHead(self.num_bits, dtype=self.dtype, name="hash_head")(
        features.global_feature)
    # float32 tanh: bfloat16's 8 mantissa bits would round codes near +-1 together.
    relaxed_codes = jnp.tanh(hash_logits)
    # float32 at the boundary: the attention softmax, the similarity kernel, the
    # loss, k-means and the evaluation never see bfloat16.
    out = {
        "feature_map": features.feature_map.astype(jnp.float32),
        "global_feature": features.global_feature.astype(jnp.float32),
        "hash_logits": hash_logits,
        "relaxed_codes": relaxed_codes,
    }
    if self.num_classes:
      out["class_logits"] = nn.Dense(self.num_classes, name="classifier")(relaxed_codes)
    return out


def create_model(name: str, *, num_bits: int, num_classes: int,
                 dtype: Any = jnp.float32, **backbone_kwargs: Any) -> PSCHNet:
  """Builds a `PSCHNet` with backbone `name` ('small_cnn' | 'vgg16').

  Args:
    name: backbone name, one of `backbone_names()`.
    num_bits: code length L.
    num_classes: pseudo classes K_c (0: no classifier).
    dtype: compute dtype of backbone and hash head (`compute_dtype(name)`); params
      and outputs are float32 whatever it is.
    **backbone_kwargs: fields of the backbone module (e.g. `widths`, `feature_dim`,
      `dropout_rate`).

  Raises:
    UserError: unknown backbone or option, `num_bits < 1` or `num_classes < 0`.
  """
  # Lists become tuples so the module stays hashable (usable as a jit static arg).
  frozen_kwargs = FrozenDict({
      key: tuple(value) if isinstance(value, list) else value
      for key, value in backbone_kwargs.items()})
  return PSCHNet(backbone=name, num_bits=num_bits, num_classes=num_classes,
                 backbone_kwargs=frozen_kwargs, dtype=dtype)
