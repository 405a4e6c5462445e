"""Tests of psch_jax/pretrained.py: torchvision VGG-16 weights load with forward parity.

The reference is a VGG-16 built layer by layer from torch.nn with torchvision's module
indices, fed the same randomly generated (He-scaled) weights; the weight files are
written straight from numpy, not by the code under test.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from psch_jax import models
from psch_jax import pretrained
from psch_jax.errors import UserError
from tests.helpers import save_vgg16_torchvision

# torchvision's vgg16 ("D") written out here, independent of models.VGG16_CONFIG_D.
_TORCHVISION_CFG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                      512, 512, 512, "M", 512, 512, 512, "M"]


def _torch_vgg16():
  """A module whose state-dict keys and forward equal torchvision's vgg16."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class TorchVGG16(nn.Module):

    def __init__(self):
      super().__init__()
      layers, in_channels = [], 3
      for entry in _TORCHVISION_CFG_D:
        if entry == "M":
          layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
          layers += [nn.Conv2d(in_channels, entry, kernel_size=3, padding=1),
                     nn.ReLU(inplace=True)]
          in_channels = entry
      self.features = nn.Sequential(*layers)
      self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
      self.classifier = nn.Sequential(
          nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
          nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
          nn.Linear(4096, 1000))

    def conv5_3_and_fc7(self, x):
      conv5_3 = self.features[:-1](x)  # Everything but the last max-pool.
      pooled = self.avgpool(self.features[-1](conv5_3))
      fc7 = self.classifier[:5](torch.flatten(pooled, 1))  # Up to fc7's ReLU.
      return conv5_3, fc7

  return TorchVGG16().eval()


def _random_torchvision_state(shapes: dict[str, tuple[int, ...]],
                              seed: int) -> dict[str, np.ndarray]:
  """He-scaled uniform random weights (torchvision layout): activations stay O(1)."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in shapes.items():
    # Uniform in [-b, b] is twice as fast to draw as a normal; b sets the variance.
    value = rng.random(shape, dtype=np.float32)
    value -= np.float32(0.5)
    if key.endswith("weight"):
      value *= np.float32(2 * np.sqrt(6.0 / np.prod(shape[1:])))
    else:
      value *= np.float32(0.2)
    state[key] = value
  return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """Random weights (incl. classifier.6), their files, the torch reference, our loads.

  Returns (state, files, reference, loaded): `state` maps torchvision keys to numpy
  arrays, `files` and `loaded` map "safetensors" / "npz" to the file path and to what
  `load_vgg16_torchvision` made of it.
  """
  torch = pytest.importorskip("torch")
  with torch.device("meta"):  # Shapes only: skips torch's 138M-parameter init.
    reference = _torch_vgg16()
  state = _random_torchvision_state(
      {key: tuple(value.shape) for key, value in reference.state_dict().items()},
      seed=0)
  directory = tmp_path_factory.mktemp("vgg16")
  files = {"safetensors": str(directory / "vgg16.safetensors"),
           "npz": str(directory / "vgg16.npz")}
  safetensors.numpy.save_file(state, files["safetensors"])
  np.savez(files["npz"], **state)
  # strict (the default) also checks our generated keys are torchvision's.
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                            assign=True)
  loaded = {name: pretrained.load_vgg16_torchvision(path)
            for name, path in files.items()}
  return state, files, reference, loaded


def _trees_equal(a, b) -> bool:
  return (jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
          and all(np.array_equal(x, y) for x, y in zip(
              jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))))


@pytest.mark.slow
def test_loaded_params_are_transposed_torchvision_weights(weights):
  state, _, _, loaded = weights
  params = loaded["safetensors"]
  expected = jax.eval_shape(
      lambda x: models.VGG16().init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))["params"]
  assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(
      lambda s: s.shape, expected)
  np.testing.assert_array_equal(
      params["conv1_1"]["kernel"], state["features.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["conv5_3"]["bias"], state["features.28.bias"])
  assert np.array_equal(params["fc6"]["kernel"], state["classifier.0.weight"].T)
  np.testing.assert_array_equal(params["fc7"]["bias"], state["classifier.3.bias"])
  assert _trees_equal(loaded["npz"], params)


@pytest.mark.slow
def test_forward_matches_torch_reference(weights):
  """conv5_3 (B, h, w, 512) and fc7 (B, 4096) agree with torch to 1e-4.

  A 32x64 input covers both adaptive-pool cases before fc6: a 1-pixel side
  broadcast to 7 and a 2-pixel side split into overlapping windows.
  """
  torch = pytest.importorskip("torch")
  _, _, reference, loaded = weights
  images = np.random.default_rng(1).standard_normal((2, 32, 64, 3),
                                                    dtype=np.float32)
  ours = jax.jit(lambda p, x: models.VGG16().apply({"params": p}, x, train=False))(
      loaded["npz"], jnp.asarray(images))
  with torch.no_grad():
    conv5_3, fc7 = reference.conv5_3_and_fc7(
        torch.from_numpy(images).permute(0, 3, 1, 2))
  conv5_3 = conv5_3.permute(0, 2, 3, 1).numpy()
  fc7 = fc7.numpy()
  assert ours.feature_map.shape == (2, 2, 4, 512)
  assert ours.global_feature.shape == (2, 4096)
  # He scaling keeps fc7 O(1) and alive, so the 1e-4 bound is a real test.
  assert 0.1 < float(np.mean(fc7 > 0)) < 0.9 and 0.1 < float(np.abs(fc7).max()) < 100
  np.testing.assert_allclose(np.asarray(ours.feature_map), conv5_3, atol=1e-4, rtol=0)
  assert float(np.abs(np.asarray(ours.global_feature) - fc7).max()) <= 1e-4


@pytest.mark.slow
def test_loaded_weights_go_into_a_vgg16_psch_net(weights):
  _, _, _, loaded = weights
  model = models.create_model("vgg16", num_bits=16, num_classes=4)
  shapes = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  replaced = pretrained.replace_backbone_params(shapes, loaded["safetensors"])
  assert _trees_equal(replaced["params"]["backbone"], loaded["safetensors"])
  assert replaced["params"]["hash_head"] is shapes["params"]["hash_head"]


@pytest.mark.slow
def test_timm_layout_loads_as_the_torchvision_weights_it_was_made_from(weights,
                                                                        tmp_path):
  """timm's vgg16 (the `model.pretrained = "imagenet"` download) stores fc6 / fc7 as
  the 7x7 and 1x1 convs of its ConvMlp head; run as convs on the pooled map they give
  torchvision's Linear fc6 / fc7, and our loader reads them as the same params."""
  torch = pytest.importorskip("torch")
  state, _, _, loaded = weights
  timm_state = {key: value for key, value in state.items()
                if key.startswith("features.")}
  timm_state["pre_logits.fc1.weight"] = state["classifier.0.weight"].reshape(
      4096, 512, 7, 7)  # timm's _filter_fn
  timm_state["pre_logits.fc1.bias"] = state["classifier.0.bias"]
  timm_state["pre_logits.fc2.weight"] = state["classifier.3.weight"][:, :, None, None]
  timm_state["pre_logits.fc2.bias"] = state["classifier.3.bias"]
  timm_state["head.fc.weight"] = state["classifier.6.weight"]
  timm_state["head.fc.bias"] = state["classifier.6.bias"]
  path = tmp_path / "timm.safetensors"
  safetensors.numpy.save_file(timm_state, str(path))
  assert _trees_equal(pretrained.load_vgg16_torchvision(path), loaded["safetensors"])

  pooled = torch.from_numpy(
      np.random.default_rng(2).standard_normal((2, 512, 7, 7), dtype=np.float32))
  t = {key: torch.from_numpy(value) for key, value in timm_state.items()}
  with torch.no_grad():
    conv = torch.nn.functional.conv2d(torch.relu(torch.nn.functional.conv2d(
        pooled, t["pre_logits.fc1.weight"], t["pre_logits.fc1.bias"])),
        t["pre_logits.fc2.weight"], t["pre_logits.fc2.bias"])[:, :, 0, 0]
    linear = torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(
        torch.flatten(pooled, 1), torch.from_numpy(state["classifier.0.weight"]),
        torch.from_numpy(state["classifier.0.bias"]))),
        torch.from_numpy(state["classifier.3.weight"]),
        torch.from_numpy(state["classifier.3.bias"]))
  assert float(linear.abs().max()) > 0.1
  np.testing.assert_allclose(conv.numpy(), linear.numpy(), atol=1e-4, rtol=0)


def test_timm_file_with_a_wrong_head_says_which_layout_it_read(tmp_path):
  path = _write_npz(tmp_path / "timm.npz",
                    pre_logits__fc1__weight=np.zeros((4096, 512, 6, 6), np.float32))
  with pytest.raises(UserError) as error:
    pretrained.load_vgg16_torchvision(path)
  assert ("wrong shape classifier.0.weight: got (4096, 18432), expected (4096, 25088)"
          in str(error.value))
  assert "timm's layout" in str(error.value) and "pre_logits.fc1" in str(error.value)


@pytest.mark.slow
def test_save_is_the_inverse_of_load(weights, tmp_path):
  state, _, _, loaded = weights
  path = tmp_path / "saved.safetensors"
  save_vgg16_torchvision({"params": loaded["npz"]}, path)
  saved = safetensors.numpy.load_file(str(path))
  assert sorted(saved) == sorted(k for k in state if not k.startswith("classifier.6"))
  for key, value in saved.items():
    assert value.dtype == np.float32 and np.array_equal(value, state[key]), key


def _write_npz(path, **arrays):
  np.savez(path, **{k.replace("__", "."): v for k, v in arrays.items()})
  return path


def test_missing_file_and_unknown_extension(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    pretrained.load_vgg16_torchvision(tmp_path / "nope.safetensors")
  weird = tmp_path / "vgg16.h5"
  weird.write_bytes(b"\0")
  with pytest.raises(UserError, match=r"'\.h5'.*\.safetensors"):
    pretrained.load_vgg16_torchvision(weird)
  corrupt = tmp_path / "corrupt.safetensors"
  corrupt.write_bytes(b"not a safetensors file")
  with pytest.raises(UserError, match="cannot read"):
    pretrained.load_vgg16_torchvision(corrupt)


def test_missing_keys_and_wrong_shapes_are_listed(tmp_path):
  path = _write_npz(tmp_path / "gray.npz",
                    features__0__weight=np.zeros((64, 1, 3, 3), np.float32),
                    features__0__bias=np.zeros((64,), np.float32))
  with pytest.raises(UserError) as error:
    pretrained.load_vgg16_torchvision(path)
  message = str(error.value)
  assert ("wrong shape features.0.weight: got (64, 1, 3, 3), expected (64, 3, 3, 3)"
          in message)
  assert "features.0.bias" not in message
  assert "missing features.28.weight: expected shape (512, 512, 3, 3)" in message
  assert "missing classifier.0.weight: expected shape (4096, 25088)" in message
  assert "missing classifier.3.bias: expected shape (4096,)" in message
  assert "classifier.6" not in message
  assert "save_file" in message  # The fix: how to export a valid file.


def test_vgg16_bn_and_data_parallel_files(tmp_path):
  bn_path = _write_npz(tmp_path / "bn.npz",
                       features__1__running_mean=np.zeros((64,), np.float32))
  with pytest.raises(UserError, match="vgg16_bn"):
    pretrained.load_vgg16_torchvision(bn_path)
  # A DataParallel "module." prefix is stripped before keys are matched.
  prefixed = _write_npz(tmp_path / "dp.npz",
                        module__features__0__weight=np.zeros((1,), np.float32))
  with pytest.raises(UserError, match=r"wrong shape features\.0\.weight: got \(1,\)"):
    pretrained.load_vgg16_torchvision(prefixed)


def test_torch_files(tmp_path):
  torch = pytest.importorskip("torch")
  # A float16 DataParallel checkpoint under "state_dict" reaches the key check.
  gray = tmp_path / "gray.pth"
  torch.save({"state_dict": {"module.features.0.weight":
                             torch.zeros(64, 1, 3, 3, dtype=torch.float16)}}, gray)
  with pytest.raises(UserError, match=r"wrong shape features\.0\.weight: got "
                     r"\(64, 1, 3, 3\), expected \(64, 3, 3, 3\)"):
    pretrained.load_vgg16_torchvision(gray)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"not a checkpoint")
  with pytest.raises(UserError, match="weights_only"):
    pretrained.load_vgg16_torchvision(garbage)
  tensor_only = tmp_path / "tensor.pt"
  torch.save(torch.zeros(3), tensor_only)
  with pytest.raises(UserError, match="not a state dict"):
    pretrained.load_vgg16_torchvision(tensor_only)


def _psch_params_shapes(backbone: str, channels: int, **kwargs):
  model = models.create_model(backbone, num_bits=8, num_classes=3, **kwargs)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct((1, 32, 32, channels), jnp.float32))["params"]


def test_replace_backbone_params_checks_every_shape():
  rgb_backbone = _psch_params_shapes("vgg16", 3)["backbone"]
  gray = _psch_params_shapes("vgg16", 1)
  with pytest.raises(UserError) as error:
    pretrained.replace_backbone_params(gray, rgb_backbone)
  assert ("wrong shape ['conv1_1']['kernel']: got (3, 3, 3, 64), expected "
          "(3, 3, 1, 64)") in str(error.value)
  assert "conv1_2" not in str(error.value)
  small = _psch_params_shapes("small_cnn", 3, widths=(8,), feature_dim=16)
  with pytest.raises(UserError) as error:
    pretrained.replace_backbone_params({"params": small}, rgb_backbone)
  assert "missing ['global_dense']['kernel']: expected shape (2048, 16)" in str(
      error.value)
  assert "unexpected ['fc6']['kernel'] (shape (25088, 4096))" in str(error.value)
  with pytest.raises(UserError, match="no 'backbone'"):
    pretrained.replace_backbone_params({"hash_head": {}}, rgb_backbone)


def test_replace_backbone_params_keeps_heads_and_casts():
  small = _psch_params_shapes("small_cnn", 1, widths=(8,), feature_dim=16)
  new_backbone = jax.tree_util.tree_map(
      lambda s: np.ones(s.shape, np.float64), small["backbone"])
  replaced = pretrained.replace_backbone_params({"params": small}, new_backbone)
  assert set(replaced) == {"params"}
  assert replaced["params"]["hash_head"] is small["hash_head"]
  assert replaced["params"]["classifier"] is small["classifier"]
  for leaf in jax.tree_util.tree_leaves(replaced["params"]["backbone"]):
    assert leaf.dtype == np.float32 and np.all(leaf == 1)


def test_save_rejects_bad_path_and_params(tmp_path):
  with pytest.raises(UserError, match="safetensors or .npz"):
    save_vgg16_torchvision({}, tmp_path / "x.pth")
  with pytest.raises(UserError, match="conv1_1"):
    save_vgg16_torchvision({"fc6": {}}, tmp_path / "x.npz")
