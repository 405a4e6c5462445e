"""Tests for the NUS-WIDE and MIRFlickr-25K tfds builders on generated manual files.

Each test writes a tiny layout of the public hashing-code format (a dozen small
random JPEGs, an image list, a 0/1 label matrix), builds the tfds dataset from
it and reads it back through `load_source`.
"""
import os

import numpy as np
import pytest

from psch_jax.data import manual_files
from psch_jax.data import mirflickr25k
from psch_jax.data import nus_wide
from psch_jax.data import sources
from psch_jax.errors import UserError
from tests.helpers import (nus_labels, nus_split_lists, write_image, write_list,
                           write_matrix)

_SIZE = manual_files.STORED_IMAGE_SIZE


def _assert_images_close(read: np.ndarray, expected: np.ndarray):
  assert read.shape == expected.shape and read.dtype == np.uint8
  assert np.abs(read.astype(int) - expected.astype(int)).mean() < 4


def test_nus_wide_split_lists_build_and_read_back(tmp_path):
  root, data_dir = str(tmp_path / "raw"), str(tmp_path / "tfds")
  images, labels = nus_split_lists(root)
  source = sources.load_source("nus_wide", data_dir=data_dir, manual_dir=root)
  assert source.name == "nus_wide" and len(source) == 11
  assert source.image_shape == (_SIZE, _SIZE, 3)
  assert source.official_split.tolist() == ["train"] * 8 + ["test"] * 3
  assert np.array_equal(source.labels, labels) and source.labels.dtype == np.uint8
  order = np.array([10, 0, 5, 8, 0])
  _assert_images_close(source.read(order), images[order])
  # Once prepared, the tfds copy is read without the raw files.
  again = sources.load_source("nus_wide", data_dir=data_dir)
  assert np.array_equal(again.labels, labels)
  _assert_images_close(again.read(np.array([3])), images[[3]])
  # Labels come from the tfds metadata; without it, from the records themselves.
  os.remove(os.path.join(data_dir, "nus_wide", "1.0.0", "metadata.json"))
  from_records = sources.load_source("nus_wide", data_dir=data_dir)
  assert np.array_equal(from_records.labels, labels)


def test_label_packing_round_trips():
  labels = (np.random.default_rng(0).random((7, 21)) < 0.5).astype(np.uint8)
  text = manual_files.pack_labels(labels)
  assert isinstance(text, str)
  assert np.array_equal(
      manual_files.unpack_labels(text, num_rows=7, num_labels=21), labels)


def test_nus_wide_one_list_layout_goes_to_train(tmp_path):
  root = str(tmp_path / "raw")
  paths = [f"{i}.jpg" for i in range(5)]  # bare names, found in images/
  images = [write_image(os.path.join(root, "images", p), i)
            for i, p in enumerate(paths)]
  labels = nus_labels(5, seed=3)
  write_list(os.path.join(root, "img_tc21.txt"), paths)
  write_matrix(os.path.join(root, "targets_onehot_tc21.txt"), labels)
  source = sources.load_source("nus_wide", data_dir=str(tmp_path / "tfds"),
                               manual_dir=root)
  assert (source.official_split == "train").all()
  assert np.array_equal(source.labels, labels)
  _assert_images_close(source.read(np.arange(5)), np.stack(images))


def test_mirflickr_official_layout_keeps_labelled_images_in_number_order(tmp_path):
  root = str(tmp_path / "raw")
  numbers = [1, 2, 3, 10, 11, 12, 20, 21, 22, 23, 24, 25]
  images = {n: write_image(os.path.join(root, "mirflickr", f"im{n}.jpg"), n)
            for n in numbers}
  rng = np.random.default_rng(0)
  labels = (rng.random((len(numbers), 24)) < 0.3).astype(np.uint8)
  labels[[2, 7]] = 0  # im3 and im21 carry no label: dropped.
  labels[[0, 5], 6] = 1
  annotations = os.path.join(root, "mirflickr25k_annotations_v080")
  os.makedirs(annotations)
  for column, name in enumerate(mirflickr25k.LABELS):
    write_list(os.path.join(annotations, f"{name}.txt"),
                [str(numbers[i]) for i in np.flatnonzero(labels[:, column])])
  write_list(os.path.join(annotations, "female_r1.txt"), ["3"])  # ignored
  source = sources.load_source("mirflickr25k", data_dir=str(tmp_path / "tfds"),
                               manual_dir=root)
  kept = [i for i in range(len(numbers)) if i not in (2, 7)]
  assert len(source) == 10 and (source.official_split == "train").all()
  assert np.array_equal(source.labels, labels[kept])
  expected = np.stack([images[numbers[i]] for i in kept])
  _assert_images_close(source.read(np.arange(10)[::-1]), expected[::-1])


def test_mirflickr_list_layout(tmp_path):
  root = str(tmp_path / "raw")
  paths = [f"mirflickr/im{n}.jpg" for n in range(1, 7)]
  images = [write_image(os.path.join(root, p), i) for i, p in enumerate(paths)]
  labels = np.eye(24, dtype=np.uint8)[[0, 5, 23, 1, 2, 3]]
  labels[3] = 0
  write_list(os.path.join(root, "img.txt"), paths)
  write_matrix(os.path.join(root, "targets.txt"), labels)
  source = sources.load_source("mirflickr25k", data_dir=str(tmp_path / "tfds"),
                               manual_dir=root)
  assert np.array_equal(source.labels, labels[[0, 1, 2, 4, 5]])
  _assert_images_close(source.read(np.array([3])), images[4][None])


def test_unprepared_dataset_without_manual_dir_explains_the_files(tmp_path):
  with pytest.raises(UserError) as error:
    sources.load_source("mirflickr25k", data_dir=str(tmp_path))
  assert "manual_dir" in str(error.value)
  assert "mirflickr25k_annotations_v080" in str(error.value)
  with pytest.raises(UserError, match="database_label_onehot.txt"):
    sources.load_source("nus_wide", data_dir=str(tmp_path))


@pytest.mark.parametrize("breakage, message", [
    ("missing_labels", r"Missing file .*database_label_onehot.txt"),
    ("wrong_columns", r"database_label_onehot.txt, row 2: 20 columns, expected 21"),
    ("row_mismatch", r"test_img.txt lists 3 images but .*test_label_onehot.txt has 2"),
    ("not_binary", r"test_label_onehot.txt, row 1, column 3: value 2"),
    ("missing_image", r"1 image\(s\) listed in .*database_img.txt are missing"),
])
def test_malformed_nus_wide_files_name_the_file(tmp_path, breakage, message):
  root = str(tmp_path)
  nus_split_lists(root)
  database_labels = os.path.join(root, "database_label_onehot.txt")
  test_labels = os.path.join(root, "test_label_onehot.txt")
  if breakage == "missing_labels":
    os.remove(database_labels)
  elif breakage == "wrong_columns":
    rows = open(database_labels).read().splitlines()
    rows[1] = " ".join(rows[1].split()[:20])
    write_list(database_labels, rows)
  elif breakage == "row_mismatch":
    write_list(test_labels, open(test_labels).read().splitlines()[:2])
  elif breakage == "not_binary":
    rows = [r.split() for r in open(test_labels).read().splitlines()]
    rows[0][2] = "2"
    write_list(test_labels, [" ".join(r) for r in rows])
  elif breakage == "missing_image":
    os.remove(os.path.join(root, "images", "0002_1002.jpg"))
  with pytest.raises(UserError, match=message):
    nus_wide.read_manual_layout(root)


def test_unreadable_image_fails_preparation_naming_the_file(tmp_path):
  root = str(tmp_path / "raw")
  nus_split_lists(root)
  with open(os.path.join(root, "images", "0010_1010.jpg"), "wb") as f:
    f.write(b"not a jpeg")
  with pytest.raises(UserError,
                     match=r"Cannot read image .*0010_1010.jpg.*test_img.txt"):
    sources.load_source("nus_wide", data_dir=str(tmp_path / "tfds"), manual_dir=root)


def test_malformed_mirflickr_annotations_name_the_file(tmp_path):
  root = str(tmp_path)
  write_image(os.path.join(root, "mirflickr", "im1.jpg"), 0)
  annotations = os.path.join(root, "mirflickr25k_annotations_v080")
  os.makedirs(annotations)
  for name in mirflickr25k.LABELS[:-1]:
    write_list(os.path.join(annotations, f"{name}.txt"), ["1"])
  with pytest.raises(UserError, match=r"Missing file .*water.txt"):
    mirflickr25k.read_manual_layout(root)
  write_list(os.path.join(annotations, "water.txt"), ["7"])
  with pytest.raises(UserError, match=r"water.txt, line 1: image im7.jpg is not in"):
    mirflickr25k.read_manual_layout(root)
