"""model.compute_dtype = "bfloat16": params stay float32, outputs are float32, the
codes agree with float32's for the same params, and training follows float32's loss.

The bounds below were measured on this CPU (XLA's bfloat16 convolutions and matmuls
accumulate in float32 on CPU as on GPUs and TPUs) and given a margin; the measured
figures are in the comments beside each bound.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax import lax

from psch_jax import config_schema
from psch_jax import models
from psch_jax import run_setup
from psch_jax import sharding
from psch_jax import train
from psch_jax.errors import UserError
from psch_jax.pseudo_labels import cluster_affinity
from tests.helpers import repo_config


def test_vgg16_configs_use_bfloat16_and_cpu_configs_float32():
  for name in ("cifar10", "nus_wide", "mirflickr25k"):
    assert repo_config(name).model.compute_dtype == "bfloat16"
    assert repo_config(name, "tiny").model.compute_dtype == "float32"
  assert repo_config("cifar10", "cpu").model.compute_dtype == "float32"
  assert repo_config("fashion_mnist").model.compute_dtype == "float32"


def test_bad_compute_dtype_is_a_user_error_naming_the_field():
  config = repo_config("cifar10", "tiny")
  config.model.compute_dtype = "float16"
  with pytest.raises(UserError, match="model.compute_dtype"):
    config_schema.check_config(config, num_devices=1)
  with pytest.raises(UserError, match="model.compute_dtype"):
    run_setup.build_model(config)
  with pytest.raises(UserError, match="dtype"):
    models.PSCHNet(backbone="small_cnn", num_bits=8, num_classes=3,
                   backbone_kwargs={"dtype": jnp.bfloat16})


def test_bfloat16_conv_relu_conv_relu_max_pool_is_finite():
  """The XLA CPU bug that keeps Python 3.12's jax at 0.11.1 (requirements.txt): with
  jaxlib 0.11.2 to 0.12.0.1 this returns NaNs (thousands of 131,072, a varying number),
  so every VGG-16 block in bfloat16 does. The same ops in float32 are the reference."""
  def block(x, w1, w2):
    conv = lambda a, w: lax.conv_general_dilated(
        a, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    y = jax.nn.relu(conv(jax.nn.relu(conv(x, w1)), w2))
    return lax.reduce_window(y, jnp.array(-jnp.inf, y.dtype), lax.max, (1, 2, 2, 1),
                             (1, 2, 2, 1), "VALID")
  x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
  w1 = jax.random.normal(jax.random.key(2), (3, 3, 3, 64)) * 0.1
  w2 = jax.random.normal(jax.random.key(3), (3, 3, 64, 64)) * 0.05
  as_bf16 = lambda *arrays: [a.astype(jnp.bfloat16) for a in arrays]
  pooled = np.asarray(jax.jit(block)(*as_bf16(x, w1, w2)), np.float32)
  reference = np.asarray(jax.jit(block)(x, w1, w2))
  assert np.isfinite(pooled).all()
  np.testing.assert_allclose(pooled, reference, atol=0.05 * np.abs(reference).max())


# Backbone, its options and the input each test uses: VGG-16 at 32x32 (its smallest
# input) keeps the compiles and steps short on a CPU; the layers are the 224x224 ones.
_NETS = {
    "small_cnn": (dict(widths=(32, 64, 128)), (16, 28, 28, 1)),
    "vgg16": (dict(dropout_rate=0.0), (8, 32, 32, 3)),
}


@pytest.mark.parametrize("backbone", sorted(_NETS))
def test_bfloat16_keeps_float32_params_and_outputs(backbone):
  kwargs, shape = _NETS[backbone]
  images = jax.ShapeDtypeStruct(shape, jnp.float32)
  trees = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = models.create_model(backbone, num_bits=16, num_classes=5, dtype=dtype,
                                **kwargs)
    params = jax.eval_shape(
        lambda x, m=model: m.init(jax.random.key(0), x, train=False)["params"], images)
    out = jax.eval_shape(
        lambda p, x, m=model: m.apply({"params": p}, x, train=False), params, images)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    assert {k: v.dtype for k, v in out.items()} == {k: jnp.float32 for k in out}
    trees[dtype] = jax.tree.map(lambda leaf: leaf.shape, params)
  # Same param tree: checkpoints and pretrained weights load into either.
  assert trees[jnp.float32] == trees[jnp.bfloat16]


def _relaxed_codes(backbone: str, dtype, params, images) -> np.ndarray:
  kwargs, _ = _NETS[backbone]
  model = models.create_model(backbone, num_bits=32, num_classes=5, dtype=dtype,
                              **kwargs)
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False))
  out = apply(params, images)
  return np.asarray(out["relaxed_codes"])


# Measured on this CPU for the seeds below (small_cnn / vgg16): sign agreement
# 0.9980 / 0.9961 (1 of 512 and 1 of 256 code bits flip), and max
# |u_bf16 - u_f32| / max |u_f32| 0.0079 / 0.0079.
_MIN_SIGN_AGREEMENT = 0.98
_MAX_ABS_DIFF = 0.05


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(_NETS))
def test_bfloat16_codes_agree_with_float32_for_the_same_params(backbone):
  kwargs, shape = _NETS[backbone]
  model = models.create_model(backbone, num_bits=32, num_classes=5, **kwargs)
  images = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  params = jax.jit(lambda k, x: model.init(k, x, train=False)["params"])(
      jax.random.key(0), images)
  u32 = _relaxed_codes(backbone, jnp.float32, params, images)
  u16 = _relaxed_codes(backbone, jnp.bfloat16, params, images)
  agreement = float(np.mean(np.sign(u32) == np.sign(u16)))
  # Relative to the codes' scale: a random VGG-16's codes are small (|u| ~ 0.01).
  max_diff = float(np.max(np.abs(u32 - u16)) / np.max(np.abs(u32)))
  print(f"{backbone}: sign agreement {agreement:.4f}, max |u_bf16 - u_f32| / max "
        f"|u_f32| {max_diff:.4f}, mean |u| {np.mean(np.abs(u32)):.3f}")
  assert u32.dtype == u16.dtype == np.float32
  assert not np.array_equal(u32, u16)  # bfloat16 really ran.
  assert agreement >= _MIN_SIGN_AGREEMENT
  assert max_diff <= _MAX_ABS_DIFF


def _train_config(backbone: str, dtype: str) -> ml_collections.ConfigDict:
  if backbone == "small_cnn":
    config = repo_config("cifar10", "tiny")   # its own schedule: lr 1e-3, warmup
  else:
    config = repo_config("cifar10")       # VGG-16, bfloat16, dropout 0.5
    config.model.image_size = 32
    config.train.global_batch_size = 4
    config.pseudo_labels.num_clusters = 3
    # From random weights (no pretrained file in tests): the whole network at 1e-4
    # without warmup moves the loss in 20 steps; 1e-3 diverges in float32 too.
    config.optim.backbone_lr_multiplier = 1.0
    config.optim.warmup_epochs = 0
  config.model.compute_dtype = dtype
  config.similarity.source = "online"      # the attention runs inside the step
  config.train.num_epochs = 1
  config_schema.check_config(config, num_devices=1)
  return config


# Steps per run. VGG-16 from random weights with dropout 0.5 does not learn in 20 steps
# (its loss wanders: 1.119, 1.112 after 10 steps, 1.117 after 20), so its steps 11-20
# added no trend to compare, only a minute of the bfloat16 arithmetic this CPU
# emulates; the small CNN's run must also learn.
_NUM_STEPS = {"small_cnn": 20, "vgg16": 10}
# Measured on this CPU: the largest |loss_bf16 - loss_f32| / loss_f32 over the run is
# 0.0028 (small_cnn, loss 1.264 -> 1.085) and 0.0120 (vgg16).
_LOSS_RTOL = 0.05


def _fresh_state(backbone: str) -> dict:
  """The train state both dtypes start from (params are float32 in either; drawing
  VGG-16's 138M of them once saves seconds)."""
  config = _train_config(backbone, "float32")
  tx = run_setup.build_optimizer(config, steps_per_epoch=_NUM_STEPS[backbone])
  return run_setup.fresh_state(config, run_setup.build_model(config), tx)


def _losses(backbone: str, dtype: str, fresh_state: dict) -> np.ndarray:
  config = _train_config(backbone, dtype)
  mesh = sharding.make_mesh(jax.devices()[:1])
  model = run_setup.build_model(config)
  tx = run_setup.build_optimizer(config, steps_per_epoch=_NUM_STEPS[backbone])
  # A copy, since the step donates its state; placed as the training loop places it,
  # so the first step's compile serves all.
  state = jax.device_put(jax.tree.map(jnp.copy, fresh_state), sharding.replicated(mesh))
  step_fn = train.make_train_step(config, model, tx, mesh)
  batch_size = config.train.global_batch_size
  rng = np.random.default_rng(0)
  num_train = 4 * batch_size
  size, channels = config.model.image_size, config.model.channels
  images = rng.integers(0, 256, (num_train, size, size, channels), dtype=np.uint8)
  num_clusters = config.pseudo_labels.num_clusters
  centroids = rng.standard_normal((num_clusters, 8)).astype(np.float32)
  targets = {"pseudo_labels": rng.integers(-1, num_clusters, num_train).astype(np.int32),
             "cluster_affinity": np.asarray(cluster_affinity(jnp.asarray(centroids)))}
  targets = jax.device_put(targets, sharding.replicated(mesh))
  losses = []
  for step in range(_NUM_STEPS[backbone]):
    position = ((step * batch_size + np.arange(batch_size)) % num_train).astype(np.int32)
    batch = {"images": images[position], "position": position}
    state, metrics = step_fn(state, batch, targets)
    losses.append(float(metrics["loss"]))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state["params"]))
  return np.asarray(losses)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(_NETS))
def test_bfloat16_training_follows_float32_loss(backbone):
  fresh_state = _fresh_state(backbone)
  loss32 = _losses(backbone, "float32", fresh_state)
  loss16 = _losses(backbone, "bfloat16", fresh_state)
  relative = np.abs(loss16 - loss32) / np.abs(loss32)
  print(f"{backbone}: float32 loss {loss32[0]:.4f} -> {loss32[-1]:.4f}, bfloat16 "
        f"{loss16[0]:.4f} -> {loss16[-1]:.4f}, max relative diff {relative.max():.4f}")
  assert np.all(np.isfinite(loss16))
  if backbone == "small_cnn":
    assert loss32[-1] < loss32[0] - 0.1  # the comparison is over a run that learns.
  assert relative.max() <= _LOSS_RTOL
