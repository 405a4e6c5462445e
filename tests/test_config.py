"""Every shipped config loads, validates, has a tiny variant, and bad values are
named with their fix."""
import ast
import os

import pytest

from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
CONFIGS = ("fashion_mnist", "cifar10", "nus_wide", "mirflickr25k")


def load(name, variant=""):
  return psch_config.load_config(os.path.join(CONFIG_DIR, f"{name}.py:{variant}"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_docstring_states_its_command(name):
  with open(os.path.join(CONFIG_DIR, name + ".py")) as f:
    docstring = ast.get_docstring(ast.parse(f.read()))
  assert "python main.py --config=configs/" + name + ".py" in docstring


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_configs_validate(name, variant):
  c = load(name, variant)
  assert c.data.name == name
  config_schema.check_config(c, num_devices=8)


def test_fashion_mnist_paper_variant_undoes_only_the_tuned_choices():
  tuned, paper = load("fashion_mnist").to_dict(), load("fashion_mnist", "paper").to_dict()
  assert {k: v for k, v in tuned.items() if not isinstance(v, dict)} == {
      k: v for k, v in paper.items() if not isinstance(v, dict)}
  changed = {(section, field) for section, fields in tuned.items()
             if isinstance(fields, dict) for field in fields
             if fields[field] != paper[section][field]}
  assert changed == {("pseudo_labels", "features"), ("pseudo_labels", "fine_clusters"),
                     ("loss", "fine_alpha"), ("method", "greedyhash"),
                     ("method", "bihalf"), ("method", "ssdh"),
                     ("similarity", "cross_cluster_ceiling"), ("train", "num_epochs")}
  # The peers get their authors' values back.
  assert paper["method"] == psch_config.base_config().method.to_dict()
  assert paper["pseudo_labels"]["fine_clusters"] is None
  assert paper["pseudo_labels"]["features"] == "pixels"
  assert paper["similarity"]["cross_cluster_ceiling"] is None
  config_schema.check_config(load("fashion_mnist", "paper"), num_devices=8)


@pytest.mark.parametrize("variant", ["", "tiny"])
def test_nus_wide_and_mirflickr_differ_only_in_the_dataset(variant):
  nus, mir = load("nus_wide", variant).to_dict(), load("mirflickr25k", variant).to_dict()
  assert (nus["data"].pop("name"), mir["data"].pop("name")) == ("nus_wide",
                                                                "mirflickr25k")
  assert nus == mir


def test_the_vgg16_configs_share_the_pretrained_setting():
  for name in ("cifar10", "nus_wide", "mirflickr25k"):
    c = load(name)
    assert (c.model.backbone, c.model.image_size, c.model.dropout_rate) == (
        "vgg16", 224, 0.5)
    assert c.data.mean == psch_config.IMAGENET_MEAN
    assert (c.optim.learning_rate, c.optim.backbone_lr_multiplier) == (1e-4, 0.1)


def test_load_config_without_a_variant_is_get_config():
  assert (psch_config.load_config(os.path.join(CONFIG_DIR, "cifar10.py")).to_dict()
          == load("cifar10", "").to_dict())
  assert load("cifar10", "cpu").model.backbone == "small_cnn"


def test_unknown_variant_is_an_error():
  with pytest.raises(UserError, match="unknown variant"):
    load("fashion_mnist", "huge")
  with pytest.raises(UserError, match="unknown variant"):
    load("nus_wide", "cpu")


def test_missing_config_file_is_an_error():
  with pytest.raises(UserError, match="does not exist"):
    psch_config.load_config(os.path.join(CONFIG_DIR, "no_such_config.py:tiny"))


@pytest.mark.parametrize("field,value,message", [
    ("model.num_bits", 0, "num_bits"),
    ("train.global_batch_size", 12, "divisible by the 8 devices"),
    ("pseudo_labels.keep_quantile", 1.5, r"keep_quantile"),
    ("data.preset", "paper", "data.preset"),
    ("model.backbone", "resnet", "model.backbone"),
    ("similarity.source", "ema", "similarity.source"),
    ("similarity.cross_cluster_ceiling", 0.5, "cross_cluster_ceiling"),
])
def test_bad_values_name_the_field(field, value, message):
  c = load("fashion_mnist")
  section, name = field.split(".")
  c[section][name] = value
  with pytest.raises(UserError, match=message):
    config_schema.check_config(c, num_devices=8)
