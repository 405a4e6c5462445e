"""The base configuration every config file in `configs/` starts from, and its checks.

Every method choice of docs/method.md is a field here, with the default the method
states; `configs/<dataset>.py` changes what differs per dataset, from the pieces here:
`base_config` (the small CNN from scratch), `vgg16_config` (the paper's pretrained
VGG-16 setting), `multi_label_config` (NUS-WIDE and MIRFlickr-25K, which differ only
in their name), `small_cnn_from_scratch` and `make_tiny` (the `:cpu` and `:tiny`
variants). The pieces live in the package rather than in `configs/` because
`config_flags` loads a config file by path, where a sibling module is not importable.
`load_config` reads a config file as `--config` does, for tests, benchmarks and
notebooks. The rules every config must follow are `config_schema`'s.
"""
import importlib.util
import os

import ml_collections
from ml_collections import config_dict

from psch_jax.errors import UserError

PRESETS = ("ssdh", "modern")
BACKBONES = ("small_cnn", "vgg16")
FEATURE_SOURCES = ("global", "pooled", "pixels", "spectral")
SIMILARITY_SOURCES = ("initial", "online", "pixels")
OPTIMIZERS = ("adam", "sgd")
PRETRAINED = ("imagenet", "none")  # psch_jax/pretrained.py resolve_vgg16_weights
COMPUTE_DTYPES = ("float32", "bfloat16")
# psch_jax/methods: PSCH and the deep peers it is compared with (docs/method.md).
METHODS = ("psch", "ssdh", "greedyhash", "bihalf", "cibhash")
# What SSDH, GreedyHash and BiHalf compare training images by: their unit pixels, the
# spectral embedding of the pixels' k-NN graph (Eq. 1a), or the global feature
# (VGG-16's fc7) of the network before training.
PEER_FEATURES = ("pixels", "spectral", "global")
# psch_jax/preprocess.py augment: the random views a training batch may get.
AUGMENTATIONS = ("none", "flip", "crop_flip", "contrastive")


def base_config() -> ml_collections.ConfigDict:
  """PSCH defaults (docs/method.md); dataset configs override what differs."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # The method trained (METHODS). PSCH's own fields are the sections pseudo_labels
  # to loss below; each peer has its section under `method` (docs/method.md, "Deep
  # peers"), with its paper's and its authors' code's values.
  c.method = ml_collections.ConfigDict()
  c.method.name = "psch"
  c.method.ssdh = ml_collections.ConfigDict()
  c.method.ssdh.features = "pixels"                  # PEER_FEATURES
  c.method.ssdh.left_stds = 2.0                      # S = +1 below mode - 2 sigma_l
  c.method.ssdh.right_stds = 2.0                     # S = -1 above mode + 2 sigma_r
  c.method.ssdh.fit_rows = 5000                      # images the two half-Gaussians see
  c.method.greedyhash = ml_collections.ConfigDict()
  c.method.greedyhash.features = "pixels"            # PEER_FEATURES
  c.method.greedyhash.cubic_weight = 0.1             # weight of mean | |h| - 1 |^3
  c.method.bihalf = ml_collections.ConfigDict()
  c.method.bihalf.features = "pixels"                # PEER_FEATURES
  c.method.bihalf.gamma = 6.0                        # the bi-half layer's gamma
  c.method.cibhash = ml_collections.ConfigDict()
  c.method.cibhash.temperature = 0.3                 # tau of NT-Xent
  c.method.cibhash.kl_weight = 0.001                 # beta of the KL term
  c.method.cibhash.stochastic = True                 # b = sign(p - u), u ~ U(0, 1)
  c.method.cibhash.augment = "contrastive"           # AUGMENTATIONS

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.data_dir = config_dict.placeholder(str)     # tfds data_dir
  c.data.manual_dir = config_dict.placeholder(str)   # raw files (IDX, NUS-WIDE, ...)
  c.data.preset = "ssdh"
  # Per-class / total split sizes; None takes the preset's numbers (method.md table).
  c.data.query_per_class = config_dict.placeholder(int)
  c.data.train_per_class = config_dict.placeholder(int)
  c.data.num_validation = config_dict.placeholder(int)
  # A seeded random subset of the preset's database, for smoke runs only.
  c.data.num_database = config_dict.placeholder(int)
  # Take fewer images than asked where a class is too small (tiny and mock sets)
  # instead of stopping with an error.
  c.data.allow_fewer = False
  c.data.augment = "none"                            # AUGMENTATIONS
  c.data.mean = (0.5,)
  c.data.std = (0.5,)

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "small_cnn"
  c.model.num_bits = 32
  c.model.image_size = 28
  c.model.channels = 1
  # VGG-16 only, and said explicitly: "imagenet" (downloaded once) or "none" (random).
  c.model.pretrained = config_dict.placeholder(str)       # PRETRAINED
  c.model.pretrained_path = config_dict.placeholder(str)  # local file; wins when set
  c.model.dropout_rate = 0.0
  # What the backbone's and the hash head's convolutions and matmuls compute in;
  # params, optimizer state, loss, k-means and evaluation stay float32.
  c.model.compute_dtype = "float32"                  # COMPUTE_DTYPES

  c.pseudo_labels = ml_collections.ConfigDict()
  c.pseudo_labels.num_clusters = 10
  c.pseudo_labels.keep_quantile = 0.7                # Eq. 2; 1.0 = no threshold
  c.pseudo_labels.absolute_threshold = config_dict.placeholder(float)
  c.pseudo_labels.features = "global"                # FEATURE_SOURCES
  c.pseudo_labels.refresh_every_epochs = 0           # 0 = once, before training
  # features = "spectral" (Eq. 1a): k of the pixels' k-NN graph, and the embedding
  # size d (None = num_clusters).
  c.pseudo_labels.spectral_neighbors = 10
  c.pseudo_labels.spectral_components = config_dict.placeholder(int)
  # K_f of Eq. 2b: a second, finer k-means of the same features (None = one level).
  c.pseudo_labels.fine_clusters = config_dict.placeholder(int)
  c.pseudo_labels.n_init = 3
  c.pseudo_labels.max_iter = 100
  c.pseudo_labels.tol = 1e-4

  c.attention = ml_collections.ConfigDict()
  c.attention.num_parts = 4                          # P; 1 = single-part ablation
  c.attention.temperature = 1.0                      # T of Eq. 3
  c.attention.uniform = False                        # True = no-attention ablation

  c.similarity = ml_collections.ConfigDict()
  c.similarity.source = "initial"                    # SIMILARITY_SOURCES
  c.similarity.hard = False                          # True = SSDH-like ablation
  c.similarity.same_class_floor = 0.5                # lambda of Eq. 7
  c.similarity.unlabelled_weight = 0.1               # mu of Eq. 7; 0 masks
  # c of Eq. 7b: pairs of different pseudo classes get -1 + (1 + c) r_kl by how
  # close their clusters are; None keeps the paper's -1 (Eq. 7).
  c.similarity.cross_cluster_ceiling = config_dict.placeholder(float)
  # t of Eq. 7c: with fine clusters, pairs of one (coarse) pseudo class in two
  # different fine clusters.
  c.similarity.sibling_target = 0.2

  c.loss = ml_collections.ConfigDict()
  c.loss.alpha = 0.1                                 # L_cls weight; 0 = ablation
  c.loss.beta = 0.01                                 # L_q weight; 0 = ablation
  c.loss.fine_alpha = 0.1                            # L_cls^f weight (fine clusters)

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adam"
  c.optim.learning_rate = 1e-3                       # new layers (hash head, classifier)
  c.optim.backbone_lr_multiplier = 1.0               # 0.1 for a pretrained backbone
  c.optim.momentum = 0.9                             # sgd only
  c.optim.weight_decay = 1e-5
  c.optim.warmup_epochs = 1
  c.optim.grad_clip_norm = 5.0

  c.train = ml_collections.ConfigDict()
  c.train.global_batch_size = 128
  c.train.num_epochs = 30
  c.train.checkpoint_every_steps = 200               # and at every epoch end
  c.train.log_every_steps = 50                       # metrics fetched; and at epoch end
  c.train.keep_checkpoints = 2
  c.train.tensorboard = False
  # On a GPU: XLA's deterministic ops (xla_settings), so one seed gives bitwise the
  # same run; off trades that for speed. CPUs and TPUs are deterministic either way.
  c.train.deterministic = True

  c.eval = ml_collections.ConfigDict()
  c.eval.topk = (1000,)
  c.eval.batch_size = 512
  c.eval.validation_every_epochs = 0                 # 0 = only after training
  return c


# What torchvision's ImageNet weights were trained on: the VGG-16 configs normalise
# with these, as the weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_config(name: str) -> ml_collections.ConfigDict:
  """The paper's setting for an RGB dataset `name`: VGG-16 with ImageNet weights at
  224 x 224, k-means on its L2-normalised fc7 features (method.md 1.1), new layers at
  learning rate 1e-4 and the pretrained backbone at a tenth of it, 50 epochs of 64."""
  c = base_config()
  c.data.name = name
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.model.backbone = "vgg16"
  c.model.pretrained = "imagenet"        # downloaded once (README "Pretrained VGG-16")
  c.model.image_size = 224
  c.model.channels = 3
  c.model.dropout_rate = 0.5
  c.model.compute_dtype = "bfloat16"    # params stay float32 (psch_jax/models.py)
  c.pseudo_labels.features = "global"
  # The peers compare images by the pretrained network's fc7, as their authors do.
  for peer in ("ssdh", "greedyhash", "bihalf"):
    c.method[peer].features = "global"
  c.optim.learning_rate = 1e-4
  c.optim.backbone_lr_multiplier = 0.1
  c.train.global_batch_size = 64
  c.train.num_epochs = 50
  return c


def multi_label_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
  """NUS-WIDE (`name="nus_wide"`) or MIRFlickr-25K (`"mirflickr25k"`): the VGG-16
  setting with flips, 20 clusters and mAP@5000; `variant="tiny"` is the smoke run the
  tests use on generated files."""
  c = vgg16_config(name)
  c.data.augment = "flip"
  c.pseudo_labels.num_clusters = 20
  c.eval.topk = (5000,)
  if variant == "tiny":
    small_cnn_from_scratch(c)
    make_tiny(c, query_per_class=1, train_per_class=2, num_validation=4, num_bits=8,
              num_clusters=3, global_batch_size=8, num_epochs=1, topk=5,
              eval_batch_size=16)
  elif variant:
    raise unknown_variant(name, variant, ("", "tiny"))
  return c


def small_cnn_from_scratch(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Replaces a VGG-16 config's network by the small CNN at 32 x 32 from random
  initialisation, clustering the pixels (a random network's features carry little
  class structure; method.md section 1). Changes `c` in place and returns it."""
  c.data.mean = (0.5, 0.5, 0.5)
  c.data.std = (0.25, 0.25, 0.25)
  c.model.backbone = "small_cnn"
  c.model.pretrained = "none"
  c.model.image_size = 32
  c.model.dropout_rate = 0.0
  # XLA:CPU's bfloat16 convolutions are slower than float32 (docs/benchmarks.md).
  c.model.compute_dtype = "float32"
  c.pseudo_labels.features = "pixels"
  for peer in ("ssdh", "greedyhash", "bihalf"):
    c.method[peer].features = "pixels"
  return c


def make_tiny(c: ml_collections.ConfigDict, *, query_per_class: int,
              train_per_class: int, num_validation: int, num_bits: int,
              num_clusters: int, global_batch_size: int, num_epochs: int, topk: int,
              eval_batch_size: int) -> ml_collections.ConfigDict:
  """Shrinks `c` (in place; returned) to a `:tiny` smoke run of seconds: a few images
  per class, taking fewer where a class is short (tiny and mock sets), short codes,
  one k-means start, mAP@`topk`."""
  c.data.query_per_class = query_per_class
  c.data.train_per_class = train_per_class
  c.data.allow_fewer = True
  c.data.num_validation = num_validation
  c.model.num_bits = num_bits
  c.pseudo_labels.num_clusters = num_clusters
  c.pseudo_labels.n_init = 1
  c.train.global_batch_size = global_batch_size
  c.train.num_epochs = num_epochs
  c.eval.topk = (topk,)
  c.eval.batch_size = eval_batch_size
  return c


def unknown_variant(name: str, variant: str, variants) -> UserError:
  """The error of `configs/<name>.py:<variant>` for a variant the file does not have."""
  return UserError(f"unknown variant {variant!r} of configs/{name}.py; use one of "
                   f"{list(variants)}, e.g. --config=configs/{name}.py:tiny.")


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of "path/to/config.py" or "path/to/config.py:variant".

  What --config=`spec` gives before any --config.* override, unlocked: the file's
  `get_config(variant)` (`get_config()` without a variant).

  Raises:
    UserError: the file does not exist, or (from the config file) the variant is
      unknown.
  """
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    problem = "is not a file" if os.path.exists(path) else "does not exist"
    raise UserError(f"config file {path!r} {problem}; pass e.g. "
                    "--config=configs/fashion_mnist.py (a path from the current "
                    "directory, :tiny for the smoke variant).")
  module_spec = importlib.util.spec_from_file_location("psch_config_file", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f"config file {path!r} is not valid Python: {e.msg} at line "
                    f"{e.lineno}; fix that line.") from None
  except Exception as e:  # pylint: disable=broad-except  (the user's code)
    raise UserError(f"config file {path!r} raised {type(e).__name__} when imported "
                    f"({e}); fix the file.") from None
  if not callable(getattr(module, "get_config", None)):
    raise UserError(f"config file {path!r} defines no get_config(); a config file "
                    "defines get_config() or get_config(variant).")
  try:
    config = module.get_config(variant) if variant else module.get_config()
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the user's code)
    raise UserError(f"get_config({variant!r}) of config file {path!r} raised "
                    f"{type(e).__name__} ({e}); fix the file, or pass a variant it "
                    "knows.") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f"get_config of config file {path!r} returned a "
                    f"{type(config).__name__}, not an ml_collections.ConfigDict.")
  return config
