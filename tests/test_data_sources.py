"""Tests for psch_jax/data/sources.py and idx_files.py: tfds, IDX files, JPEG reads."""
import gzip
import io
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from psch_jax.data import idx_files
from psch_jax.data import sources
from psch_jax.errors import UserError

_FASHION_DIR = sources.DEFAULT_FASHION_MNIST_DIR


def _write_idx(path: str, array: np.ndarray) -> None:
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
      array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def _fake_fashion_dir(directory, num_train=6, num_test=4):
  """Writes the four Fashion-MNIST IDX files; image i is filled with i."""
  os.makedirs(directory, exist_ok=True)
  counts = {"train": num_train, "test": num_test}
  offset = 0
  for split, (images_name, labels_name) in idx_files.FASHION_MNIST_FILES.items():
    n = counts[split]
    values = np.arange(offset, offset + n)
    _write_idx(os.path.join(directory, images_name),
               np.broadcast_to(values[:, None, None], (n, 28, 28)))
    _write_idx(os.path.join(directory, labels_name), values % 10)
    offset += n
  return str(directory)


def test_fashion_mnist_reads_idx_files_when_tfds_is_not_prepared(tmp_path):
  manual = _fake_fashion_dir(tmp_path / "idx")
  source = sources.load_source("fashion_mnist", data_dir=str(tmp_path / "tfds"),
                               manual_dir=manual)
  assert len(source) == 10 and source.image_shape == (28, 28, 1)
  assert source.official_split.tolist() == ["train"] * 6 + ["test"] * 4
  assert source.labels.dtype == np.uint8 and source.labels.shape == (10, 10)
  assert np.array_equal(source.labels.argmax(1), np.arange(10) % 10)
  assert (source.labels.sum(1) == 1).all()
  images = source.read(np.array([7, 0, 7, 3]))
  assert images.shape == (4, 28, 28, 1) and images.dtype == np.uint8
  assert images[:, 0, 0, 0].tolist() == [7, 0, 7, 3]
  assert source.read(np.zeros(0, np.int64)).shape == (0, 28, 28, 1)
  with pytest.raises(IndexError):
    source.read(np.array([10]))


def test_truncated_or_foreign_idx_files_raise_user_errors(tmp_path):
  manual = _fake_fashion_dir(tmp_path / "idx")
  images_path = os.path.join(manual, "train-images-idx3-ubyte.gz")
  full = open(images_path, "rb").read()
  with open(images_path, "wb") as f:  # a gzip stream cut in the middle
    f.write(full[:len(full) // 2])
  with pytest.raises(UserError, match="train-images-idx3-ubyte.gz.*truncated"):
    sources.load_source("fashion_mnist", data_dir=str(tmp_path), manual_dir=manual)
  with gzip.open(images_path, "wb") as f:  # complete gzip, short IDX payload
    f.write(bytes([0, 0, 8, 3]) + np.asarray([6, 28, 28], ">u4").tobytes() + b"x")
  with pytest.raises(UserError, match="holds 17 bytes"):
    sources.load_source("fashion_mnist", data_dir=str(tmp_path), manual_dir=manual)
  with gzip.open(images_path, "wb") as f:  # an idx1 file where idx3 belongs
    f.write(bytes([0, 0, 8, 1]) + np.asarray([6], ">u4").tobytes() + bytes(6))
  with pytest.raises(UserError, match="magic number 00000801"):
    sources.load_source("fashion_mnist", data_dir=str(tmp_path), manual_dir=manual)


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
  with pytest.raises(UserError) as error:
    sources.load_source("fashion_mnist", data_dir=str(tmp_path),
                        manual_dir=str(tmp_path / "absent"))
  message = str(error.value)
  assert "apt-get install dataset-fashion-mnist" in message
  assert "manual_dir" in message and "internet" in message


def test_missing_cifar10_says_how_to_get_it_without_downloading(tmp_path):
  with pytest.raises(UserError) as error:
    sources.load_source("cifar10", data_dir=str(tmp_path))
  message = str(error.value)
  assert "tfds.builder('cifar10').download_and_prepare()" in message
  assert "data_dir" in message
  assert os.listdir(tmp_path) == []  # nothing was downloaded or created.


def test_unknown_dataset_is_a_user_error():
  with pytest.raises(UserError, match="Unknown dataset 'mnist'"):
    sources.load_source("mnist")


@pytest.mark.parametrize("name, shape", [("cifar10", (32, 32, 3)),
                                         ("fashion_mnist", (28, 28, 1))])
def test_tfds_datasets_load_under_mock_data(tmp_path, name, shape):
  with tfds.testing.mock_data(num_examples=6):
    source = sources.load_source(name, data_dir=str(tmp_path))
    expected = next(iter(tfds.as_numpy(tfds.load(name, split="test",
                                                 data_dir=str(tmp_path)))))
  assert source.name == name and len(source) == 12
  assert source.image_shape == shape
  assert source.official_split.tolist() == ["train"] * 6 + ["test"] * 6
  assert source.labels.shape == (12, 10) and (source.labels.sum(1) == 1).all()
  assert source.labels[6].argmax() == expected["label"]
  assert np.array_equal(source.read(np.array([6]))[0], expected["image"])


def _png(value: int, shape=(4, 5, 3)) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full(shape, value, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def test_encoded_source_decodes_across_splits_in_the_requested_order():

  class Records(list):

    def __getitems__(self, keys):
      return [self[k] for k in keys]

  train = Records({"image": _png(10 + i)} for i in range(3))
  test = Records({"image": _png(50 + i)} for i in range(2))
  source = sources.EncodedSource(
      name="fake", split_records=[train, test],
      labels=np.eye(5, dtype=np.uint8), image_shape=(4, 5, 3),
      official_split=np.array(["train"] * 3 + ["test"] * 2))
  images = source.read(np.array([4, 0, 3, 2, 0]))
  assert images.shape == (5, 4, 5, 3) and images.dtype == np.uint8
  assert images[:, 0, 0, 0].tolist() == [51, 10, 50, 12, 10]
  wrong = sources.EncodedSource(
      name="fake", split_records=[Records([{"image": _png(1, (3, 3, 3))}])],
      labels=np.eye(1, dtype=np.uint8), image_shape=(4, 5, 3),
      official_split=np.array(["train"]))
  with pytest.raises(ValueError, match="prepare the dataset again"):
    wrong.read(np.array([0]))


@pytest.mark.skipif(not os.path.isdir(_FASHION_DIR),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_real_offline_fashion_mnist(tmp_path):
  source = sources.load_source("fashion_mnist", data_dir=str(tmp_path))
  assert len(source) == 70_000 and source.image_shape == (28, 28, 1)
  assert source.labels.shape == (70_000, 10) and source.labels.dtype == np.uint8
  assert (source.labels.sum(1) == 1).all()
  assert np.array_equal(source.labels.sum(0), [7_000] * 10)
  assert (source.official_split[:60_000] == "train").all()
  assert (source.official_split[60_000:] == "test").all()
  images = source.read(np.array([0, 69_999]))
  assert images.shape == (2, 28, 28, 1) and images.dtype == np.uint8
  assert images.max() > 0
