r"""PSCH on MIRFlickr-25K (24 concepts): VGG-16 (ImageNet weights) at 224 x 224, mAP@5000.

  python main.py --config=configs/mirflickr25k.py --workdir=workdirs/mirflickr25k \
      --config.data.manual_dir=/path/to/raw/files

The raw files are downloaded by hand (README "Datasets" lists them); the first run
builds the tfds dataset from them.

Hardware / time / expected mAP: not measured yet (needs a GPU or TPU).

Variants: `:tiny` is the smoke run the tests use on generated files.
"""
from psch_jax import config as psch_config


def get_config(variant: str = ""):
  c = psch_config.base_config()
  c.data.name = "mirflickr25k"
  c.data.preset = "ssdh"
  c.data.augment = "flip"
  c.data.mean = (0.485, 0.456, 0.406)
  c.data.std = (0.229, 0.224, 0.225)
  c.model.backbone = "vgg16"
  c.model.pretrained = "imagenet"        # downloaded once (README "Pretrained VGG-16")
  c.model.image_size = 224
  c.model.channels = 3
  c.model.num_bits = 32
  c.model.dropout_rate = 0.5
  c.pseudo_labels.features = "global"
  c.pseudo_labels.num_clusters = 20
  c.optim.learning_rate = 1e-4
  c.optim.backbone_lr_multiplier = 0.1
  c.train.global_batch_size = 64
  c.train.num_epochs = 50
  c.eval.topk = (5000,)
  if variant == "tiny":
    c.data.mean = (0.5, 0.5, 0.5)
    c.data.std = (0.25, 0.25, 0.25)
    c.data.query_per_class = 1
    c.data.train_per_class = 2
    c.data.allow_fewer = True
    c.data.num_validation = 4
    c.model.backbone = "small_cnn"
    c.model.pretrained = "none"
    c.model.image_size = 32
    c.model.dropout_rate = 0.0
    c.model.num_bits = 8
    c.pseudo_labels.features = "pixels"
    c.pseudo_labels.num_clusters = 3
    c.pseudo_labels.n_init = 1
    c.train.global_batch_size = 8
    c.train.num_epochs = 1
    c.eval.topk = (5,)
    c.eval.batch_size = 16
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  return c
