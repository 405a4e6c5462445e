"""The config schema: every field declared, every bad value named with its fix, the
data-dependent combinations blamed on the field the user set.

Configs are generated (base_config and the shipped configs with one field changed);
the overrides that a user types go through the real flag parser
(`config_flags.DEFINE_config_file`, as main.py uses it).
"""
import importlib.util
import os

import pytest
from absl import flags
from ml_collections import config_flags

from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax.errors import UserError

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
CONFIGS = ("fashion_mnist", "cifar10", "nus_wide", "mirflickr25k")


def load(name="fashion_mnist", variant=""):
  path = os.path.join(REPO, "configs", name + ".py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def parse(*overrides, config="fashion_mnist"):
  """The config that `python main.py --config=configs/<config>.py <overrides>` gets."""
  argv = ["main.py", f"--config={os.path.join(REPO, 'configs', config)}.py",
          *overrides]
  flag_values = flags.FlagValues()
  # config_flags defines the --config.<field> flags from the command line it is
  # given (sys.argv by default, as in main.py).
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def with_field(config, name, value):
  *sections, field = name.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[field] = value
  return config


def test_the_schema_declares_exactly_the_fields_of_base_config():
  assert set(config_schema.flatten(psch_config.base_config())) == set(
      config_schema.FIELDS)


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass(name):
  variants = ["", "tiny"] + (["paper"] if name == "fashion_mnist" else [])
  for variant in variants:
    config_schema.check_config(load(name, variant), num_devices=8)
    config_schema.check_config(load(name, variant), num_devices=1)


# The examples of issue 15, typed as a user would, through the flag parser.
@pytest.mark.parametrize("override,message", [
    ("--config.train.checkpoint_every_steps=0",
     r"config.train.checkpoint_every_steps=0 must be >= 1; it is the steps between "
     r"checkpoints \(every epoch end saves one too\). "
     r"Set --config.train.checkpoint_every_steps to a value >= 1"),
    ("--config.data.augment=foo",
     r"config.data.augment='foo' is not one of \['none', 'flip', 'crop_flip', 'contrastive'\]; "
     r"set --config.data.augment to one of them"),
    ("--config.seed=-1", r"config.seed=-1 must be in \[0, 4294967295\]"),
    ("--config.data.query_per_class=0",
     r"config.data.query_per_class=0 must be >= 1; it is the query images per class"),
    ("--config.eval.topk=abc",
     r"config.eval.topk=\('abc',\) holds 'abc', which is not an integer.*"
     r"Set --config.eval.topk='\(1000,\)'"),
    ("--config.eval.topk=(1,abc)", r"config.eval.topk=.* which is not an integer"),
    ("--config.eval.topk=(1.5,)", r"config.eval.topk=\(1.5,\) holds 1.5, which is not "
                                  r"an integer"),
    ("--config.eval.topk=()", r"config.eval.topk=\(\) is empty"),
    ("--config.eval.topk=(0,)", r"config.eval.topk=\(0,\) holds 0, but every entry "
                                r"must be >= 1"),
    ("--config.data.mean=abc",
     r"config.data.mean=\('abc',\) holds 'abc', which is not a number.*"
     r"Set --config.data.mean='\(0.5,\)'"),
    ("--config.data.std=(0.0,)",
     r"config.data.std=\(0.0,\) holds 0.0, but every entry must be > 0"),
    ("--config.train.keep_checkpoints=0",
     r"config.train.keep_checkpoints=0 must be >= 1; it is the number of checkpoints "
     r"kept: with none, a killed run cannot resume"),
    ("--config.optim.grad_clip_norm=-1", r"config.optim.grad_clip_norm=-1.0 must be > 0"),
    ("--config.optim.weight_decay=-1", r"config.optim.weight_decay=-1.0 must be >= 0"),
    ("--config.optim.warmup_epochs=-5", r"config.optim.warmup_epochs=-5 must be >= 0"),
    ("--config.model.dropout_rate=2.0",
     r"config.model.dropout_rate=2.0 must be in \[0, 1\)"),
    ("--config.eval.batch_size=0", r"config.eval.batch_size=0 must be >= 1"),
    ("--config.optim.learning_rate=nan",
     r"config.optim.learning_rate=nan must be a finite number"),
    ("--config.optim.learning_rate=inf",
     r"config.optim.learning_rate=inf must be a finite number"),
    ("--config.model.channels=2", r"config.model.channels=2 must be 1 or 3"),
    ("--config.data.name=mnist", r"config.data.name='mnist' is not one of"),
    ("--config.pseudo_labels.num_clusters=1", r"num_clusters=1 must be >= 2"),
    ("--config.optim.momentum=1.0", r"config.optim.momentum=1.0 must be in \[0, 1\)"),
    ("--config.pseudo_labels.tol=-1", r"config.pseudo_labels.tol=-1.0 must be >= 0"),
])
def test_bad_values_typed_on_the_command_line_name_the_field_and_the_fix(override,
                                                                         message):
  config = parse(override)
  with pytest.raises(UserError, match=message):
    config_schema.check_config(config, num_devices=8)


@pytest.mark.parametrize("name,value,message", [
    # The checks and messages config.validate had (tests/test_config.py,
    # docs/reliability.md quote them).
    ("model.num_bits", 0, r"^config.model.num_bits=0 must be a positive code length "
                          r"\(the paper uses 16, 32, 64 or 128\).$"),
    ("train.global_batch_size", 12,
     r"^config.train.global_batch_size=12 must be >= 2 and divisible by the 8 devices "
     r"of this run; use a multiple of 8.$"),
    ("eval.batch_size", 12, r"config.eval.batch_size=12 must be divisible by the 8 "
                            r"devices"),
    ("pseudo_labels.keep_quantile", 1.5, r"keep_quantile=1.5 must be in \(0, 1\]"),
    ("data.preset", "paper", r"^config.data.preset='paper' is not one of \['ssdh', "
                             r"'modern'\]; set --config.data.preset to one of them.$"),
    ("model.backbone", "resnet", "model.backbone"),
    ("similarity.source", "ema", "similarity.source"),
    ("pseudo_labels.features", "hog", "pseudo_labels.features"),
    ("optim.name", "lamb", "optim.name"),
    ("similarity.cross_cluster_ceiling", 0.5,
     r"cross_cluster_ceiling=0.5 must lie in \[-1, same_class_floor=0.5\)"),
    ("similarity.cross_cluster_ceiling", -2.0, r"cross_cluster_ceiling=-2.0 must be >= -1"),
    ("similarity.same_class_floor", 1.5, "same_class_floor=1.5 must be in"),
    ("similarity.unlabelled_weight", -0.1, "unlabelled_weight=-0.1 must be >= 0"),
    ("attention.num_parts", 0, "num_parts=0 must be >= 1"),
    ("attention.temperature", 0.0, r"temperature=0.0 must be > 0"),
    ("loss.alpha", -1.0, "alpha=-1.0 must be >= 0"),
    ("loss.beta", -1.0, "beta=-1.0 must be >= 0"),
    ("optim.learning_rate", 0.0, "learning_rate=0.0 must be > 0"),
    ("train.num_epochs", 0, "num_epochs=0 must be >= 1"),
    ("train.global_batch_size", 1, "global_batch_size=1 must be >= 2"),
    ("data.mean", (0.5, 0.5), r"data.mean and config.data.std must have 1 or "
                              r"model.channels=1 entries each"),
    ("eval.topk", (0,), r"every entry must be >= 1"),
    ("data.std", (float("nan"),), r"config.data.std=\(nan,\) holds nan, which is not "
                                  r"finite"),
])
def test_the_checks_of_config_validate_are_kept(name, value, message):
  config = with_field(load(), name, value)
  with pytest.raises(UserError, match=message):
    config_schema.check_config(config, num_devices=8)


@pytest.mark.parametrize("changes,message", [
    ({"optim.warmup_epochs": 11}, r"warmup_epochs=11 is longer than "
                                  r"train.num_epochs=10.*at most 10"),
    ({"pseudo_labels.refresh_every_epochs": 20},
     r"refresh_every_epochs=20 is more than train.num_epochs=10"),
    ({"eval.validation_every_epochs": 20},
     r"validation_every_epochs=20 is more than train.num_epochs=10"),
    ({"model.pretrained_path": "vgg16.npz"},
     r"backbone is 'small_cnn'; pretrained weights exist for 'vgg16' only"),
    ({"pseudo_labels.features": "pixels", "pseudo_labels.spectral_components": 8},
     r"spectral_components=8 is set but pseudo_labels.features='pixels'"),
    ({"pseudo_labels.fine_clusters": 10},
     r"fine_clusters=10 must be more than pseudo_labels.num_clusters=10"),
    ({"pseudo_labels.fine_clusters": 50, "similarity.sibling_target": 0.5},
     r"sibling_target=0.5 must lie between the cross-cluster targets \(at most 0.0\) "
     r"and same_class_floor=0.5"),
    ({"pseudo_labels.fine_clusters": 50, "similarity.sibling_target": -0.5},
     r"sibling_target=-0.5 must lie between"),
    ({"data.preset": "modern", "data.query_per_class": 5},
     r"config.data.query_per_class=5 cannot be used with data.preset='modern'"),
    ({"data.preset": "modern", "data.train_per_class": 5},
     r"config.data.train_per_class=5 cannot be used with data.preset='modern'"),
])
def test_combinations_that_cannot_work_are_refused(changes, message):
  config = load()
  for name, value in changes.items():
    with_field(config, name, value)
  with pytest.raises(UserError, match=message):
    config_schema.check_config(config, num_devices=8)


def test_every_problem_is_reported_at_once():
  config = parse("--config.train.checkpoint_every_steps=0", "--config.seed=-1",
                 "--config.eval.batch_size=0")
  with pytest.raises(UserError, match="the config has 3 problems") as raised:
    config_schema.check_config(config, num_devices=8)
  lines = str(raised.value).splitlines()[1:]
  assert [line.split("=")[0].strip() for line in lines] == [
      "config.seed", "config.train.checkpoint_every_steps", "config.eval.batch_size"]


def test_a_field_a_config_file_invented_or_removed_is_named():
  config = load()
  config.train.num_epoch = 3  # a config file's typo creates a new field
  with pytest.raises(UserError, match=r"config.train.num_epoch is not a field of the "
                                      r"config. Did you mean config.train.num_epochs\?"):
    config_schema.check_config(config, num_devices=8)
  config = load()
  del config.eval["topk"]
  with pytest.raises(UserError, match=r"config.eval.topk is missing"):
    config_schema.check_config(config, num_devices=8)


def test_a_bool_is_not_an_integer():
  config = with_field(load(), "model.num_bits", True)
  with pytest.raises(UserError, match=r"config.model.num_bits=True must be an integer"):
    config_schema.check_config(config, num_devices=8)


# ------------------------------------------------------------- against the data

def sizes(**changes):
  values = {"num_train": 5000, "num_database": 69000, "num_query": 1000,
            "num_validation": 1000, "image_channels": 1}
  values.update(changes)
  return values


def test_shipped_configs_pass_against_their_split_sizes():
  # (query, database, train, validation) as the shipped configs draw them: the
  # fashion_mnist and tiny rows read from the splits/ of runs of each config, the
  # other rows the preset sizes of psch_jax/data/splits.py's docstring (MIRFlickr's
  # database "the rest" of 25,000 less the query, at most).
  drawn = {("fashion_mnist", ""): (1000, 69000, 5000, 1000),
           ("fashion_mnist", "tiny"): (40, 200, 80, 20),
           ("cifar10", "tiny"): (20, 100, 40, 10),
           ("nus_wide", "tiny"): (21, 59, 42, 4),
           ("mirflickr25k", "tiny"): (24, 56, 48, 4),
           ("cifar10", ""): (1000, 59000, 5000, 1000),
           ("mirflickr25k", ""): (2000, 23000, 5000, 2000)}
  for (name, variant), (query, database, train, validation) in drawn.items():
    config = load(name, variant)
    config_schema.check_against_data(
        config, num_train=train, num_database=database, num_query=query,
        num_validation=validation, image_channels=3 if name != "fashion_mnist" else 1)


@pytest.mark.parametrize("changes,data,message", [
    ({"train.global_batch_size": 160, "eval.topk": (10,), "pseudo_labels.fine_clusters": None},
     {"num_train": 80, "num_database": 200, "num_validation": 20},
     r"^config.train.global_batch_size=160 is larger than the 80 training images; "
     r"lower it.$"),
    # Issue 15: blamed on num_clusters, which the user set, not on the unset
    # spectral_components that defaults to it.
    ({"pseudo_labels.num_clusters": 1000, "pseudo_labels.fine_clusters": None}, {},
     r"config.pseudo_labels.num_clusters=1000 also sets the spectral embedding size "
     r"\(pseudo_labels.spectral_components is unset\).*5000 training images; lower "
     r"num_clusters to at most 999"),
    ({"pseudo_labels.num_clusters": 6000, "pseudo_labels.features": "pixels",
      "pseudo_labels.fine_clusters": None}, {},
     r"config.pseudo_labels.num_clusters=6000 is more than the 5000 training images"),
    ({"pseudo_labels.spectral_components": 1000}, {},
     r"config.pseudo_labels.spectral_components=1000 must be >= 1 and 5 x components "
     r"below the 5000 training images"),
    ({"pseudo_labels.spectral_neighbors": 80}, {"num_train": 80, "num_database": 200},
     r"config.pseudo_labels.spectral_neighbors=80 must lie in \[1, 79\] for 80 "
     r"training images"),
    ({"pseudo_labels.fine_clusters": 1000}, {},
     r"^config.pseudo_labels.fine_clusters=1000 also sets the size of the fine "
     r"clustering's spectral embedding, and 5 x it must be below the 5000 training "
     r"images; use at most 999.$"),
    ({"pseudo_labels.fine_clusters": 6000, "pseudo_labels.features": "pixels"}, {},
     r"^config.pseudo_labels.fine_clusters=6000 is more than the 5000 training images"),
    ({"eval.topk": (1000, 70000)}, {},
     r"config.eval.topk holds 70000, more than the 69000 database images"),
    ({"eval.topk": (68500,)}, {},
     r"config.eval.topk holds 68500, more than the 68000 database images validation "
     r"ranks against \(the 69000 less the 1000 validation queries\)"),
    ({"data.allow_fewer": True}, {"num_query": 0}, r"the query split is empty"),
    ({"data.num_database": 50}, {"num_database": 100, "num_train": 80},
     r"config.data.num_database=50 is below the 100 training and validation images"),
    ({"model.channels": 3, "data.mean": (0.5,) * 3, "data.std": (0.5,) * 3},
     {"image_channels": 4}, r"fashion_mnist images have 4 channels but "
                            r"config.model.channels=3"),
])
def test_combinations_with_the_data_name_the_field(changes, data, message):
  config = load()
  for name, value in changes.items():
    with_field(config, name, value)
  config_schema.check_config(config, num_devices=8)  # knowable only with the data
  with pytest.raises(UserError, match=message):
    config_schema.check_against_data(config, **sizes(**data))


def test_topk_beyond_the_validation_database_is_fine_without_validation():
  config = with_field(load(), "eval.topk", (68500,))
  config_schema.check_against_data(config, **sizes(num_validation=0))
