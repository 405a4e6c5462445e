"""Tests for psch_jax/data/splits.py: protocol presets, determinism, saved splits."""
import os

import numpy as np
import pytest

from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError

_FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _single_label(num_classes=5, per_class_train=40, per_class_test=12, seed=0):
  """One-hot labels, train split first then test, classes shuffled."""
  rng = np.random.default_rng(seed)
  train = rng.permutation(np.repeat(np.arange(num_classes), per_class_train))
  test = rng.permutation(np.repeat(np.arange(num_classes), per_class_test))
  labels = np.eye(num_classes, dtype=np.uint8)[np.concatenate([train, test])]
  official = np.array(["train"] * train.size + ["test"] * test.size)
  return labels, official


def _assert_consistent(s, num_examples):
  assert set(s) == set(splits_lib.SPLIT_NAMES)
  for indices in s.values():
    assert indices.dtype == np.int64 and np.all(np.diff(indices) > 0)
  assert not np.intersect1d(s["query"], s["database"]).size
  assert np.union1d(s["query"], s["database"]).size == num_examples
  assert np.isin(s["train"], s["database"]).all()
  assert np.isin(s["validation"], s["database"]).all()
  # Validation mirrors the test: its queries are never test queries, and its
  # database is the test's less exactly its queries.
  validation_database = splits_lib.validation_database(s)
  assert not np.intersect1d(s["validation"], s["query"]).size
  assert not np.intersect1d(s["validation"], validation_database).size
  assert validation_database.dtype == np.int64
  assert validation_database.size == s["database"].size - s["validation"].size
  assert np.isin(validation_database, s["database"]).all()


def test_ssdh_single_label_draws_per_class_query_from_test_for_fashion_mnist():
  labels, official = _single_label()
  s = splits_lib.make_splits(labels, official, dataset="fashion_mnist",
                             preset="ssdh", seed=0, query_per_class=3,
                             train_per_class=10, num_validation=7)
  _assert_consistent(s, labels.shape[0])
  assert np.array_equal(labels[s["query"]].sum(0), [3] * 5)
  assert (official[s["query"]] == "test").all()
  assert np.array_equal(labels[s["train"]].sum(0), [10] * 5)
  assert s["validation"].size == 7
  # 7 over 5 classes: per class like the query, the first 7 % 5 classes one more.
  assert np.array_equal(labels[s["validation"]].sum(0), [2, 2, 1, 1, 1])
  assert not np.intersect1d(s["validation"], s["train"]).size  # never trained on


def test_the_validation_draw_never_moves_the_test_splits():
  labels, official = _single_label()
  kwargs = dict(dataset="fashion_mnist", preset="ssdh", seed=3, query_per_class=3,
                train_per_class=10)
  a = splits_lib.make_splits(labels, official, num_validation=5, **kwargs)
  b = splits_lib.make_splits(labels, official, num_validation=20, **kwargs)
  assert all(np.array_equal(a[k], b[k]) for k in ("query", "database", "train"))
  assert np.array_equal(labels[b["validation"]].sum(0), [4] * 5)


def test_ssdh_cifar10_draws_query_from_both_official_splits():
  labels, official = _single_label(per_class_train=30, per_class_test=30)
  s = splits_lib.make_splits(labels, official, dataset="cifar10", preset="ssdh",
                             seed=1, query_per_class=20, train_per_class=5)
  assert set(official[s["query"]]) == {"train", "test"}
  assert s["validation"].size == s["query"].size == 100  # default: query size


def test_splits_are_deterministic_in_the_seed():
  labels, official = _single_label()
  kwargs = dict(dataset="cifar10", preset="ssdh", query_per_class=4,
                train_per_class=6)
  a = splits_lib.make_splits(labels, official, seed=5, **kwargs)
  b = splits_lib.make_splits(labels, official, seed=5, **kwargs)
  c = splits_lib.make_splits(labels, official, seed=6, **kwargs)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["query"], c["query"])


def test_modern_uses_the_official_split_and_trains_on_the_database():
  labels, official = _single_label()
  s = splits_lib.make_splits(labels, official, dataset="fashion_mnist",
                             preset="modern", seed=0, num_validation=9)
  _assert_consistent(s, labels.shape[0])
  assert np.array_equal(s["query"], np.flatnonzero(official == "test"))
  assert np.array_equal(s["database"], np.flatnonzero(official == "train"))
  assert np.array_equal(s["train"], s["database"])
  assert s["validation"].size == 9  # drawn from the database, so inside train.
  assert np.isin(s["validation"], s["train"]).all()
  assert np.array_equal(labels[s["validation"]].sum(0), [2, 2, 2, 2, 1])
  with pytest.raises(UserError, match="fixes its query set"):
    splits_lib.make_splits(labels, official, dataset="cifar10", preset="modern",
                           seed=0, query_per_class=2)


def test_nus_wide_draws_per_concept_among_multi_label_images():
  rng = np.random.default_rng(0)
  labels = (rng.random((600, 21)) < 0.15).astype(np.uint8)
  official = np.array(["train"] * 600)
  s = splits_lib.make_splits(labels, official, dataset="nus_wide", preset="ssdh",
                             seed=0, query_per_class=3, train_per_class=5)
  _assert_consistent(s, 600)
  assert s["query"].size == 21 * 3 and s["train"].size == 21 * 5
  assert (labels[s["query"]].sum(0) >= 3).all()
  assert (labels[s["train"]].sum(0) >= 5).all()
  assert labels[s["query"]].any(1).all()
  # Validation is drawn per concept like the query: as many, each concept held.
  assert s["validation"].size == s["query"].size
  assert (labels[s["validation"]].sum(0) >= 3).all()


def test_mirflickr_draws_uniformly_among_labelled_images():
  rng = np.random.default_rng(1)
  labels = (rng.random((300, 24)) < 0.1).astype(np.uint8)
  official = np.array(["train"] * 300)
  s = splits_lib.make_splits(labels, official, dataset="mirflickr25k",
                             preset="modern", seed=0, num_query=30, num_train=50)
  _assert_consistent(s, 300)
  assert s["query"].size == 30 and s["train"].size == 50
  assert labels[s["query"]].any(1).all() and labels[s["train"]].any(1).all()
  # A per-class count scales a uniform protocol to count * num_labels images.
  t = splits_lib.make_splits(labels, official, dataset="mirflickr25k",
                             preset="ssdh", seed=0, query_per_class=1,
                             train_per_class=2)
  assert t["query"].size == 24 and t["train"].size == 48
  assert t["validation"].size == 24 and labels[t["validation"]].any(1).all()
  assert not np.intersect1d(t["validation"], t["train"]).size


def test_too_few_images_raise_unless_allowed():
  labels, official = _single_label(per_class_test=2)
  with pytest.raises(UserError, match="class 0 has 2 candidate images, 3 asked"):
    splits_lib.make_splits(labels, official, dataset="fashion_mnist",
                           preset="ssdh", seed=0, query_per_class=3,
                           train_per_class=1)
  with pytest.raises(UserError, match="100 asked"):  # the real preset on tiny data
    splits_lib.make_splits(labels, official, dataset="fashion_mnist",
                           preset="ssdh", seed=0)
  s = splits_lib.make_splits(labels, official, dataset="fashion_mnist",
                             preset="ssdh", seed=0, query_per_class=3,
                             train_per_class=1, allow_fewer=True)
  assert s["query"].size == 10  # every test image of the 5 classes.


def test_bad_arguments_raise_user_errors():
  labels, official = _single_label()
  with pytest.raises(UserError, match="No protocol"):
    splits_lib.make_splits(labels, official, dataset="mnist", preset="ssdh", seed=0)
  with pytest.raises(UserError, match="No protocol"):
    splits_lib.make_splits(labels, official, dataset="cifar10", preset="dpsh", seed=0)
  with pytest.raises(UserError, match="pass query_per_class= instead"):
    splits_lib.make_splits(labels, official, dataset="cifar10", preset="ssdh",
                           seed=0, num_query=10)
  with pytest.raises(UserError, match="official_split"):
    splits_lib.make_splits(labels, official[:-1], dataset="cifar10", preset="ssdh",
                           seed=0)


def test_save_and_load_round_trip_atomically(tmp_path):
  labels, official = _single_label()
  s = splits_lib.make_splits(labels, official, dataset="cifar10", preset="ssdh",
                             seed=0, query_per_class=2, train_per_class=4)
  directory = str(tmp_path / "splits")
  splits_lib.save_splits(s, directory)
  assert sorted(os.listdir(directory)) == sorted(
      f"{name}.npy" for name in splits_lib.SPLIT_NAMES)  # no temp files left
  loaded = splits_lib.load_splits(directory, num_examples=labels.shape[0])
  assert all(np.array_equal(s[k], loaded[k]) and loaded[k].dtype == np.int64
             for k in s)
  with pytest.raises(UserError, match="belong to another dataset"):
    splits_lib.load_splits(directory, num_examples=10)


def test_load_rejects_overlapping_or_missing_splits(tmp_path):
  labels, official = _single_label()
  s = splits_lib.make_splits(labels, official, dataset="cifar10", preset="ssdh",
                             seed=0, query_per_class=2, train_per_class=4)
  directory = str(tmp_path)
  splits_lib.save_splits(s, directory)
  np.save(os.path.join(directory, "query.npy"), s["database"][:5])
  with pytest.raises(UserError, match="query and database share 5 images"):
    splits_lib.load_splits(directory)
  os.remove(os.path.join(directory, "train.npy"))
  with pytest.raises(UserError, match="Missing split file"):
    splits_lib.load_splits(directory)
  with pytest.raises(UserError, match="not in the database"):
    splits_lib.save_splits(dict(s, train=s["query"]), str(tmp_path / "other"))


@pytest.mark.skipif(not os.path.isdir(_FASHION_DIR),
                    reason="needs the Debian package dataset-fashion-mnist")
def test_ssdh_sizes_on_real_fashion_mnist(tmp_path):
  from psch_jax.data import sources  # pylint: disable=g-import-not-at-top
  source = sources.load_source("fashion_mnist", data_dir=str(tmp_path))
  s = splits_lib.make_splits(source.labels, source.official_split,
                             dataset="fashion_mnist", preset="ssdh", seed=0)
  _assert_consistent(s, 70_000)
  assert (s["query"].size, s["database"].size, s["train"].size,
          s["validation"].size) == (1_000, 69_000, 5_000, 1_000)
  assert np.array_equal(source.labels[s["query"]].sum(0), [100] * 10)
  assert np.array_equal(source.labels[s["train"]].sum(0), [500] * 10)
  assert (source.official_split[s["query"]] == "test").all()
  assert not np.intersect1d(s["validation"], s["train"]).size
  # The validation split mirrors the test: 1,000 queries, 100 per class, against
  # the other 68,000 database images, 6,800 per class (the test: 6,900).
  validation_database = splits_lib.validation_database(s)
  assert np.array_equal(source.labels[s["validation"]].sum(0), [100] * 10)
  assert validation_database.size == 68_000
  assert np.array_equal(source.labels[validation_database].sum(0), [6_800] * 10)
  assert np.array_equal(source.labels[s["database"]].sum(0), [6_900] * 10)
