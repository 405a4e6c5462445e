"""Damaged dataset files become the dataset's "how to get it" message, naming the file.

Generated files only: Fashion-MNIST IDX gzips damaged three ways, and prepared tfds
copies whose dataset_info.json is not JSON or not tfds's JSON.
"""
import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from psch_jax.data import idx_files
from psch_jax.data import nus_wide
from psch_jax.data import sources
from psch_jax.errors import UserError


def write_fashion_idx(directory) -> str:
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for (images_name, labels_name), n in zip(idx_files.FASHION_MNIST_FILES.values(),
                                           (6, 4)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    for name, array in ((images_name, images), (labels_name, np.arange(n) % 10)):
      header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
      with gzip.open(os.path.join(directory, name), "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())
  return str(directory)


def damage_deflate_stream(data: bytes) -> bytes:
  """Flips the bits of the compressed body: header and trailer stay intact."""
  body = bytes(b ^ 0x55 for b in data[20:-8])
  return data[:20] + body + data[-8:]


def damage_crc(data: bytes) -> bytes:
  return data[:-8] + bytes(b ^ 0xFF for b in data[-8:-4]) + data[-4:]


def damage_header(data: bytes) -> bytes:
  return b"PK" + data[2:]


@pytest.mark.parametrize("damage,reason", [
    (damage_deflate_stream, "while decompressing data"),  # zlib.error
    (damage_crc, "CRC check failed"),                      # gzip.BadGzipFile
    (damage_header, "Not a gzipped file"),                 # gzip.BadGzipFile
])
def test_a_damaged_fashion_mnist_gzip_names_the_file_and_how_to_get_it(
    tmp_path, damage, reason):
  manual = write_fashion_idx(tmp_path / "idx")
  path = os.path.join(manual, "train-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(damage(data))
  with pytest.raises(UserError) as raised:
    sources.load_source("fashion_mnist", data_dir=str(tmp_path / "tfds"),
                        manual_dir=manual)
  message = str(raised.value)
  assert f"Cannot read {path}" in message and reason in message
  assert "truncated or corrupt" in message
  assert "apt-get install dataset-fashion-mnist" in message


def _write_info(data_dir, name: str, version: str, content: str) -> str:
  directory = os.path.join(data_dir, name, version)
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, "dataset_info.json")
  with open(path, "w") as f:
    f.write(content)
  return path


@pytest.mark.parametrize("name,how_to_get_it", [
    ("fashion_mnist", "apt-get install dataset-fashion-mnist"),
    ("cifar10", "tfds.builder('cifar10').download_and_prepare()"),
])
@pytest.mark.parametrize("content,reason", [
    ("{not json", "Failed to load JSON"),              # protobuf ParseError
    ('{"no_such_field": 1}', 'no field named "no_such_field"'),
])
def test_a_tfds_dataset_info_that_is_not_json_names_the_file(tmp_path, name,
                                                             how_to_get_it, content,
                                                             reason):
  version = str(tfds.builder_cls(name).VERSION)
  path = _write_info(tmp_path, name, version, content)
  with pytest.raises(UserError) as raised:
    sources.load_source(name, data_dir=str(tmp_path),
                        manual_dir=str(tmp_path / "absent"))
  message = str(raised.value)
  assert f"The prepared tfds copy of {name} is damaged: {path} cannot be parsed" \
      in message
  assert reason in message and "Available Fields" not in message
  assert f"Delete {os.path.dirname(path)} and prepare it again" in message
  assert how_to_get_it in message


def test_a_damaged_manual_builder_copy_names_the_file(tmp_path):
  path = _write_info(tmp_path, "nus_wide", str(nus_wide.NusWide.VERSION), "{not json")
  with pytest.raises(UserError) as raised:
    sources.load_source("nus_wide", data_dir=str(tmp_path))
  message = str(raised.value)
  assert f"The prepared tfds copy of nus_wide is damaged: {path}" in message
  assert "manual_dir=" in message and nus_wide.NusWide.MANUAL_DOWNLOAD_INSTRUCTIONS \
      in message
