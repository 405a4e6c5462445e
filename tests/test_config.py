"""Every shipped config loads, validates, has a tiny variant, and bad values are
named with their fix."""
import importlib.util
import os

import pytest

from psch_jax import config as psch_config
from psch_jax.errors import UserError

CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "configs")
CONFIGS = ("fashion_mnist", "cifar10", "nus_wide", "mirflickr25k")


def load(name, variant=""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(CONFIG_DIR, name + ".py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "python main.py --config=configs/" + name + ".py" in module.__doc__
  return module.get_config(variant)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variant", ["", "tiny"])
def test_configs_validate(name, variant):
  c = load(name, variant)
  assert c.data.name == name
  psch_config.validate(c, num_devices=8)


def test_fashion_mnist_paper_variant_undoes_only_the_tuned_choices():
  tuned, paper = load("fashion_mnist").to_dict(), load("fashion_mnist", "paper").to_dict()
  assert {k: v for k, v in tuned.items() if not isinstance(v, dict)} == {
      k: v for k, v in paper.items() if not isinstance(v, dict)}
  changed = {(section, field) for section, fields in tuned.items()
             if isinstance(fields, dict) for field in fields
             if fields[field] != paper[section][field]}
  assert changed == {("pseudo_labels", "features"),
                     ("similarity", "cross_cluster_ceiling"), ("train", "num_epochs")}
  assert paper["pseudo_labels"]["features"] == "pixels"
  assert paper["similarity"]["cross_cluster_ceiling"] is None
  psch_config.validate(load("fashion_mnist", "paper"), num_devices=8)


def test_unknown_variant_is_an_error():
  with pytest.raises(ValueError, match="unknown variant"):
    load("fashion_mnist", "huge")


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
    psch_config.validate(c, num_devices=8)
