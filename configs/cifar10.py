r"""PSCH on CIFAR-10, the paper's setting: VGG-16 (ImageNet weights) at 224 x 224.

  python main.py --config=configs/cifar10.py --workdir=workdirs/cifar10

Needs the tfds `cifar10` dataset prepared (see README "Datasets"); the ImageNet VGG-16
weights are downloaded once (README "Pretrained VGG-16": offline machines, a local file
with `--config.model.pretrained_path`, `--config.model.pretrained=none` for random).

Hardware / time / expected mAP: not measured yet (needs a GPU or TPU).

Variants: `:cpu` trains the small CNN at 32 x 32 from scratch (CPU-sized);
`:tiny` is the smoke run the tests use on `tfds.testing.mock_data`.
"""
from psch_jax import config as psch_config


def get_config(variant: str = ""):
  c = psch_config.base_config()
  c.data.name = "cifar10"
  c.data.preset = "ssdh"
  c.data.augment = "crop_flip"
  c.data.mean = (0.485, 0.456, 0.406)   # ImageNet statistics, as the weights expect
  c.data.std = (0.229, 0.224, 0.225)
  c.model.backbone = "vgg16"
  c.model.pretrained = "imagenet"        # downloaded once (README "Pretrained VGG-16")
  c.model.image_size = 224
  c.model.channels = 3
  c.model.num_bits = 32
  c.model.dropout_rate = 0.5
  c.pseudo_labels.features = "global"   # L2-normalised pretrained fc7 (method.md 1.1)
  c.pseudo_labels.num_clusters = 10
  c.optim.learning_rate = 1e-4
  c.optim.backbone_lr_multiplier = 0.1
  c.train.global_batch_size = 64
  c.train.num_epochs = 50
  c.eval.topk = (1000,)                 # plus mAP@all, always reported
  if variant in ("cpu", "tiny"):
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.25, 0.25, 0.25)
    c.model.backbone = "small_cnn"
    c.model.pretrained = "none"
    c.model.image_size = 32
    c.model.dropout_rate = 0.0
    c.pseudo_labels.features = "pixels"
    c.optim.learning_rate = 1e-3
    c.optim.backbone_lr_multiplier = 1.0
    c.train.global_batch_size = 128
  if variant == "tiny":
    c.data.augment = "flip"
    c.data.query_per_class = 2
    c.data.train_per_class = 4
    c.data.allow_fewer = True
    c.data.num_validation = 10
    c.model.num_bits = 16
    c.pseudo_labels.num_clusters = 3
    c.pseudo_labels.n_init = 1
    c.train.global_batch_size = 16
    c.train.num_epochs = 1
    c.eval.topk = (10,)
    c.eval.batch_size = 32
  elif variant not in ("", "cpu"):
    raise ValueError(f"unknown variant {variant!r}; use '', 'cpu' or 'tiny'")
  return c
