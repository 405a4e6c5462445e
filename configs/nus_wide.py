r"""PSCH on NUS-WIDE (21 most frequent concepts): VGG-16 (ImageNet weights) at 224 x 224, mAP@5000.

  python main.py --config=configs/nus_wide.py --workdir=workdirs/nus_wide \
      --config.data.manual_dir=/path/to/raw/files

The raw files are downloaded by hand (README "Datasets" lists them); the first run
builds the tfds dataset from them.

Hardware / time / expected mAP: not measured yet (needs a GPU or TPU).

Variants: `:tiny` is the smoke run the tests use on generated files.
"""
from psch_jax import config as psch_config


def get_config(variant: str = ""):
  return psch_config.multi_label_config("nus_wide", variant)
