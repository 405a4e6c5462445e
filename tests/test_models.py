"""Tests of psch_jax/models.py: shapes, value ranges, torch-exact pooling, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from psch_jax import models
from psch_jax.errors import UserError


def _shapes(module, images_shape, **call_kwargs):
  """Params and output shapes of `module` without running it (eval_shape)."""
  images = jax.ShapeDtypeStruct(images_shape, jnp.float32)
  variables = jax.eval_shape(
      lambda x: module.init(jax.random.key(0), x, **call_kwargs), images)
  outputs = jax.eval_shape(
      lambda v, x: module.apply(v, x, **call_kwargs), variables, images)
  return variables, outputs


def test_vgg16_shapes_at_224_and_32():
  """VGG16: 224x224 -> conv5_3 (B, 14, 14, 512), fc7 (B, 4096); 32 -> (B, 2, 2, 512)."""
  variables, out = _shapes(models.VGG16(), (2, 224, 224, 3), train=False)
  assert out.feature_map.shape == (2, 14, 14, 512)
  assert out.global_feature.shape == (2, 4096)
  assert out.global_feature.dtype == jnp.float32
  params = variables["params"]
  assert list(params) == [*models.vgg16_conv_names(), "fc6", "fc7"]
  assert params["conv1_1"]["kernel"].shape == (3, 3, 3, 64)
  assert params["fc6"]["kernel"].shape == (512 * 7 * 7, 4096)
  # The adaptive pool makes fc6's input 512*7*7 at any input size.
  variables_32, out_32 = _shapes(models.VGG16(), (2, 32, 32, 3), train=False)
  assert out_32.feature_map.shape == (2, 2, 2, 512)
  assert out_32.global_feature.shape == (2, 4096)
  assert variables_32["params"]["fc6"]["kernel"].shape == (25088, 4096)


def test_vgg16_rejects_too_small_images():
  with pytest.raises(UserError, match="at least 32x32"):
    _shapes(models.VGG16(), (1, 28, 28, 3), train=False)


@pytest.mark.parametrize(
    "in_size,out_size",
    [((14, 14), (7, 7)), ((7, 7), (7, 7)), ((1, 1), (7, 7)), ((2, 2), (7, 7)),
     ((5, 9), (7, 7)), ((13, 3), (7, 2)), ((10, 10), (3, 4))])
def test_adaptive_avg_pool2d_matches_torch(in_size, out_size):
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, *in_size, 3), dtype=np.float32)
  ours = models.adaptive_avg_pool2d(jnp.asarray(x), out_size)
  reference = torch.nn.functional.adaptive_avg_pool2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), out_size).permute(0, 2, 3, 1)
  assert ours.shape == (2, *out_size, 3)
  np.testing.assert_allclose(np.asarray(ours), reference.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def tiny_net():
  """A tiny small_cnn PSCHNet (L = 12, K_c = 5, dropout 0.5), its params, images."""
  model = models.create_model("small_cnn", num_bits=12, num_classes=5,
                              widths=[8, 16], feature_dim=32, dropout_rate=0.5)
  images = jax.random.normal(jax.random.key(1), (6, 28, 28, 1))
  # One jitted init for the module's tests. The non-partitionable threefry
  # compiles about 4x faster on CPU (the values differ; no test depends on them).
  with jax.threefry_partitionable(False):
    variables = jax.jit(lambda key, x: model.init(key, x, train=False))(
        jax.random.key(0), images)
  return model, variables, images


@pytest.mark.parametrize(
    "images_shape,feature_map_shape",
    [((3, 28, 28, 1), (3, 7, 7, 128)), ((3, 32, 32, 3), (3, 8, 8, 128))])
def test_small_cnn_shapes(images_shape, feature_map_shape):
  """SmallCNN: 28x28x1 -> (B, 7, 7, 128), 32x32x3 -> (B, 8, 8, 128); global (B, 512)."""
  _, out = _shapes(models.SmallCNN(), images_shape, train=False)
  assert out.feature_map.shape == feature_map_shape
  assert out.global_feature.shape == (3, 512)
  assert out.global_feature.dtype == jnp.float32


def test_small_cnn_features_are_non_negative(tiny_net):
  model, variables, images = tiny_net
  out = model.apply(variables, images, train=False)
  # Both come after a ReLU: the attention (Eqs. 3-5) relies on non-negative maps.
  assert float(out["feature_map"].min()) >= 0.0
  assert float(out["global_feature"].min()) >= 0.0
  assert float(out["global_feature"].max()) > 0.0


def test_dropout_only_in_training(tiny_net):
  model, variables, images = tiny_net
  eval_a = model.apply(variables, images, train=False)["global_feature"]
  eval_b = model.apply(variables, images, train=False)["global_feature"]
  np.testing.assert_array_equal(eval_a, eval_b)
  trained = model.apply(variables, images, train=True,
                        rngs={"dropout": jax.random.key(2)})["global_feature"]
  dropped = (trained == 0) & (eval_a > 0)
  assert 0 < int(dropped.sum()) < int((eval_a > 0).sum())
  kept = trained != 0
  # Inverted dropout: kept units are scaled by 1 / (1 - rate) = 2.
  np.testing.assert_allclose(trained[kept], 2.0 * eval_a[kept], rtol=1e-5)


def test_small_cnn_rejects_bad_fields_and_tiny_images():
  with pytest.raises(UserError, match="widths"):
    models.SmallCNN(widths=())
  with pytest.raises(UserError, match="at least 8x8"):
    _shapes(models.SmallCNN(), (1, 4, 4, 1), train=False)


def test_hash_codes_sign_of_zero_is_plus_one():
  relaxed = jnp.array([[-0.7, 0.0, 0.2, -0.0, 1e-9, -1e-9]])
  codes = models.hash_codes(relaxed)
  assert codes.dtype == jnp.int8
  np.testing.assert_array_equal(codes, [[-1, 1, 1, 1, 1, -1]])


def test_psch_net_outputs_and_param_tree(tiny_net):
  """PSCHNet: relaxed codes (B, L) in (-1, 1), logits (B, K_c), codes +-1 (Eq. 12)."""
  model, variables, images = tiny_net
  params = variables["params"]
  assert sorted(params) == ["backbone", "classifier", "hash_head"]
  assert params["hash_head"]["dense"]["kernel"].shape == (32, 12)
  assert params["classifier"]["kernel"].shape == (12, 5)
  out = model.apply(variables, images, train=False)
  assert out["feature_map"].shape == (6, 14, 14, 16)
  assert out["global_feature"].shape == (6, 32)
  assert out["relaxed_codes"].shape == (6, 12)
  assert out["class_logits"].shape == (6, 5)
  relaxed = np.asarray(out["relaxed_codes"])
  assert np.all(np.abs(relaxed) < 1.0)
  np.testing.assert_allclose(
      relaxed, np.tanh(np.asarray(out["global_feature"])
                       @ params["hash_head"]["dense"]["kernel"]
                       + params["hash_head"]["dense"]["bias"]), atol=1e-5)
  np.testing.assert_allclose(
      out["class_logits"], relaxed @ params["classifier"]["kernel"]
      + params["classifier"]["bias"], atol=1e-5)
  codes = np.asarray(models.hash_codes(out["relaxed_codes"]))
  np.testing.assert_array_equal(codes, np.where(relaxed >= 0, 1, -1))
  # The peers' sign and bi-half layers read h itself; its sign is the code's.
  np.testing.assert_allclose(np.tanh(out["hash_logits"]), relaxed, rtol=1e-6)
  np.testing.assert_array_equal(codes, np.where(np.asarray(out["hash_logits"]) >= 0, 1, -1))


def test_psch_net_without_classifier_for_the_peers():
  """num_classes = 0 (the deep peers): no classifier params and no class logits."""
  model = models.create_model("small_cnn", num_bits=8, num_classes=0,
                              widths=(4,), feature_dim=16)
  images = jnp.zeros((2, 28, 28, 1))
  variables = model.init(jax.random.key(0), images, train=False)
  assert sorted(variables["params"]) == ["backbone", "hash_head"]
  out = model.apply(variables, images, train=False)
  assert "class_logits" not in out and out["hash_logits"].shape == (2, 8)


def test_backbone_gets_its_own_learning_rate_by_top_level_key(tiny_net):
  _, variables, _ = tiny_net
  params = variables["params"]
  labels = {key: "backbone" if key == "backbone" else "head" for key in params}
  optimizer = optax.multi_transform(
      {"backbone": optax.sgd(0.0), "head": optax.sgd(1.0)}, labels)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  assert all(float(jnp.abs(u).max()) == 0.0
             for u in jax.tree_util.tree_leaves(updates["backbone"]))
  assert float(updates["hash_head"]["dense"]["kernel"][0, 0]) == -1.0


def test_psch_net_accepts_a_backbone_module_and_is_hashable():
  model = models.PSCHNet(backbone=models.SmallCNN(widths=(8,), feature_dim=16),
                         num_bits=4, num_classes=2)
  variables, out = _shapes(model, (1, 32, 32, 3), train=False)
  assert variables["params"]["backbone"]["global_dense"]["kernel"].shape == (
      16 * 16 * 8, 16)
  assert out["feature_map"].shape == (1, 32, 32, 8)
  # List options are frozen to tuples so the model can be a jit static argument.
  hash(models.create_model("small_cnn", num_bits=16, num_classes=10,
                           widths=[8, 16]))


def test_create_model_vgg16_shapes():
  _, out = _shapes(models.create_model("vgg16", num_bits=64, num_classes=20),
                   (2, 224, 224, 3), train=False)
  assert out["feature_map"].shape == (2, 14, 14, 512)
  assert out["global_feature"].shape == (2, 4096)
  assert out["relaxed_codes"].shape == (2, 64)
  assert out["class_logits"].shape == (2, 20)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(name="small_cnn", num_bits=0, num_classes=3), "num_bits"),
     (dict(name="small_cnn", num_bits=16, num_classes=-1), "num_classes"),
     (dict(name="resnet", num_bits=16, num_classes=3), "small_cnn"),
     (dict(name="vgg16", num_bits=16, num_classes=3, widths=(8,)), "widths")])
def test_create_model_rejects_bad_input(kwargs, message):
  with pytest.raises(UserError, match=message):
    models.create_model(**kwargs)


def test_backbone_names_and_hash_head_validation():
  assert models.backbone_names() == ("small_cnn", "vgg16")
  with pytest.raises(UserError, match="num_bits"):
    models.HashHead(num_bits=0)
