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
  c = psch_config.vgg16_config("cifar10")
  c.data.augment = "crop_flip"
  c.pseudo_labels.num_clusters = 10
  c.eval.topk = (1000,)                 # plus mAP@all, always reported
  if variant in ("cpu", "tiny"):
    psch_config.small_cnn_from_scratch(c)
    c.optim.learning_rate = 1e-3
    c.optim.backbone_lr_multiplier = 1.0
    c.train.global_batch_size = 128
  if variant == "tiny":
    c.data.augment = "flip"
    psch_config.make_tiny(c, query_per_class=2, train_per_class=4, num_validation=10,
                          num_bits=16, num_clusters=3, global_batch_size=16,
                          num_epochs=1, topk=10, eval_batch_size=32)
  elif variant not in ("", "cpu"):
    raise psch_config.unknown_variant("cifar10", variant, ("", "cpu", "tiny"))
  return c
