"""Random-access image sources for Fashion-MNIST, CIFAR-10, NUS-WIDE, MIRFlickr-25K.

An `ImageSource` holds the labels of all images of a dataset in memory and reads
images by global index. The global index space is the tfds "train" split first,
then "test" (`official_split` says which split each image comes from).

- CIFAR-10 and Fashion-MNIST (small) come from tfds, decoded once into memory
  (`ArraySource`). When tfds has not prepared Fashion-MNIST, its IDX files are
  read directly (Debian package `dataset-fashion-mnist`, or `manual_dir`).
- NUS-WIDE and MIRFlickr-25K come from this project's tfds builders
  (`psch_jax/data/nus_wide.py`, `mirflickr25k.py`), stored as 256 x 256 JPEG in
  array_record files and decoded on read (`EncodedSource`), so the whole set is
  never decoded into memory. The first `load_source` with `manual_dir` prepares
  them from the user's files; nothing is ever downloaded.

Missing or broken data raises `UserError` saying how to get it.
"""
from __future__ import annotations

import abc
import concurrent.futures
import glob
import io
import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from psch_jax.data import idx_files
from psch_jax.data import manual_files
from psch_jax.errors import UserError

# tensorflow_datasets (and the builders, which need it) are imported inside the
# loaders: it imports TensorFlow, which takes seconds, and ImageSource users such
# as the batching pipeline do not need it.

DATASETS = ("fashion_mnist", "cifar10", "nus_wide", "mirflickr25k")
SPLITS = ("train", "test")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_MANUAL_DATASETS = ("nus_wide", "mirflickr25k")
_TFDS_BATCH = 4096
_LABEL_READ_CHUNK = 4096


class ImageSource(abc.ABC):
  """A dataset's labels in memory and its images by global index.

  Attributes:
    name: the dataset name (one of `DATASETS` for sources from `load_source`).
    labels: uint8 (N, num_labels) multi-hot; one-hot for single-label sets.
    official_split: str (N,), "train" or "test": the tfds split of each image.
    image_shape: (H, W, C) of every image `read` returns.
  """

  def __init__(self, *, name: str, labels: np.ndarray, official_split: np.ndarray,
               image_shape: tuple[int, int, int]):
    labels = np.asarray(labels)
    official_split = np.asarray(official_split)
    if labels.ndim != 2 or labels.dtype != np.uint8:
      raise ValueError(f"labels must be uint8 (N, num_labels), got "
                       f"{labels.dtype} {labels.shape}")
    if official_split.shape != labels.shape[:1]:
      raise ValueError(f"official_split has shape {official_split.shape}, "
                       f"expected ({labels.shape[0]},)")
    if not np.isin(official_split, SPLITS).all():
      raise ValueError(f"official_split holds values other than {SPLITS}")
    self.name = name
    self.labels = labels
    self.official_split = official_split
    self.image_shape = tuple(int(d) for d in image_shape)

  @property
  def num_labels(self) -> int:
    return self.labels.shape[1]

  def __len__(self) -> int:
    return self.labels.shape[0]

  def read(self, indices: np.ndarray) -> np.ndarray:
    """Reads images by global index.

    Args:
      indices: int (n,) global indices in [0, len(self)), any order, repeats allowed.

    Returns:
      uint8 (n, H, W, C), row i the image of indices[i].
    """
    indices = np.asarray(indices)
    if indices.ndim != 1 or not (np.issubdtype(indices.dtype, np.integer)
                                 or indices.size == 0):
      raise IndexError(f"indices must be a 1-D integer array, got "
                       f"{indices.dtype} {indices.shape}")
    indices = indices.astype(np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
      raise IndexError(f"indices must lie in [0, {len(self)}), got "
                       f"[{indices.min()}, {indices.max()}]")
    if not indices.size:
      return np.zeros((0, *self.image_shape), np.uint8)
    return self._read(indices)

  @abc.abstractmethod
  def _read(self, indices: np.ndarray) -> np.ndarray:
    """Reads valid, non-empty int64 (n,) indices; returns uint8 (n, H, W, C)."""


class ArraySource(ImageSource):
  """A source whose decoded images all sit in memory."""

  def __init__(self, *, name: str, images: np.ndarray, labels: np.ndarray,
               official_split: np.ndarray):
    """Args: images uint8 (N, H, W, C); the rest as in `ImageSource`."""
    if images.ndim != 4 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 (N, H, W, C), got "
                       f"{images.dtype} {images.shape}")
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    super().__init__(name=name, labels=labels, official_split=official_split,
                     image_shape=images.shape[1:])
    self._images = images

  def _read(self, indices: np.ndarray) -> np.ndarray:
    return self._images[indices]


class EncodedSource(ImageSource):
  """A source of JPEG-encoded images in random-access sequences, decoded on read.

  Each split is a sequence (e.g. a tfds `ArrayRecordDataSource` opened with
  `SkipDecoding` on "image") whose items are dicts with the encoded "image"
  bytes; split k covers the global indices after those of splits 0..k-1.
  """

  def __init__(self, *, name: str, split_records: Sequence[Sequence[dict[str, Any]]],
               labels: np.ndarray, official_split: np.ndarray,
               image_shape: tuple[int, int, int], num_threads: int | None = None):
    """Args: split_records, one sequence per split in global order; num_threads
    decode in parallel (default: the CPU count, at most 8); the rest as in
    `ImageSource`."""
    super().__init__(name=name, labels=labels, official_split=official_split,
                     image_shape=image_shape)
    sizes = [len(records) for records in split_records]
    if sum(sizes) != len(self):
      raise ValueError(f"the splits hold {sum(sizes)} images, labels {len(self)}")
    self._split_records = list(split_records)
    self._split_starts = np.cumsum([0] + sizes)
    self._num_threads = num_threads or min(8, os.cpu_count() or 1)
    self._pool: concurrent.futures.ThreadPoolExecutor | None = None

  def _decode(self, encoded: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(encoded)) as image:
      array = np.asarray(image.convert("RGB"))
    if array.shape != self.image_shape:
      raise ValueError(f"{self.name}: stored image has shape {array.shape}, "
                       f"expected {self.image_shape}; prepare the dataset again")
    return array

  def _read(self, indices: np.ndarray) -> np.ndarray:
    split_of = np.searchsorted(self._split_starts, indices, side="right") - 1
    encoded: list[bytes] = [b""] * indices.size
    for split, records in enumerate(self._split_records):
      rows = np.flatnonzero(split_of == split)
      if rows.size:
        local = (indices[rows] - self._split_starts[split]).tolist()
        for row, example in zip(rows, records.__getitems__(local)):
          encoded[row] = example["image"]
    if self._pool is None:
      # PIL releases the GIL while decoding, so threads decode in parallel.
      self._pool = concurrent.futures.ThreadPoolExecutor(self._num_threads)
    return np.stack(list(self._pool.map(self._decode, encoded)))


def _tfds_fix(name: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
  return (
      f"Prepare it on a machine with internet: python -c \"import "
      f"tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare()\", "
      f"then copy its ~/tensorflow_datasets/{name} directory into {where} on "
      f"this machine, or pass data_dir= naming a directory that holds {name}/.")


def _fashion_mnist_fix() -> str:
  return ("Get Fashion-MNIST with `apt-get install dataset-fashion-mnist` (IDX "
          f"files in {DEFAULT_FASHION_MNIST_DIR}), or prepare the tfds dataset "
          "fashion_mnist on a machine with internet and pass its data_dir, or pass "
          "manual_dir= pointing at a directory with the four IDX files "
          f"({', '.join(sum(idx_files.FASHION_MNIST_FILES.values(), ()))}).")


class _NotPrepared(Exception):
  """tfds has no prepared copy of a dataset in the data_dir."""


def _damaged_metadata(name: str, data_dir: str | None) -> list[str]:
  """The JSON metadata files of `name`'s prepared tfds copies that are not JSON, or
  when all are, its dataset_info.json files (which then hold the wrong JSON)."""
  if data_dir:
    roots = [data_dir]
  else:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    roots = [os.environ.get("TFDS_DATA_DIR", tfds.core.constants.DATA_DIR)]
  paths = [path for root in roots for path in sorted(glob.glob(
      os.path.join(os.path.expanduser(root), name, "**", "*.json"), recursive=True))]
  not_json = []
  for path in paths:
    try:
      with open(path) as f:
        json.load(f)
    except (OSError, ValueError):
      not_json.append(path)
  return not_json or [p for p in paths if os.path.basename(p) == "dataset_info.json"]


def _open_tfds_builder(make_builder, name: str, data_dir: str | None, *, fix: str):
  """`make_builder()` (a tfds builder of `name` in `data_dir`), with damaged metadata
  turned into a UserError.

  tfds reads a prepared copy's dataset_info.json (and features.json) when it builds
  the builder; a file that is not JSON, or not the JSON tfds wrote, raises protobuf's
  ParseError or a JSONDecodeError from deep inside tfds.

  Raises:
    UserError: naming the damaged files and the dataset directory to delete, then
      `fix` (how to get the dataset).
  """
  from google.protobuf import json_format  # pylint: disable=g-import-not-at-top
  try:
    return make_builder()
  except (json_format.ParseError, json.JSONDecodeError) as e:
    damaged = _damaged_metadata(name, data_dir)
    where = ", ".join(damaged) if damaged else f"the metadata of {name} in {data_dir}"
    directory = (os.path.dirname(damaged[0]) if damaged
                 else os.path.join(data_dir or "<tfds data_dir>", name))
    reason = str(e).splitlines()[0][:300]  # protobuf goes on to list every field
    raise UserError(
        f"The prepared tfds copy of {name} is damaged: {where} cannot be parsed "
        f"({reason}). Delete {directory} and prepare it again. {fix}") from e


def _read_tfds_into_memory(name: str, data_dir: str | None, *, fix: str
                           ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
  """Returns ({split: (images uint8 (n,H,W,C), class ids int64 (n,))}, num_classes)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _open_tfds_builder(lambda: tfds.builder(name, data_dir=data_dir), name,
                              data_dir, fix=fix)
  splits = {}
  for split in SPLITS:
    try:
      dataset = builder.as_dataset(split=split)
    except AssertionError as e:  # tfds asserts the prepared files exist.
      raise _NotPrepared(str(e)) from e
    images, label_ids = [], []
    for batch in tfds.as_numpy(dataset.batch(_TFDS_BATCH)):
      images.append(batch["image"])
      label_ids.append(batch["label"])
    splits[split] = (np.concatenate(images).astype(np.uint8),
                     np.concatenate(label_ids).astype(np.int64))
  return splits, builder.info.features["label"].num_classes


def _array_source(name: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                  num_classes: int) -> ArraySource:
  images = np.concatenate([splits[s][0] for s in SPLITS])
  label_ids = np.concatenate([splits[s][1] for s in SPLITS])
  official_split = np.concatenate(
      [np.full(len(splits[s][1]), s) for s in SPLITS]).astype("<U5")
  labels = np.eye(num_classes, dtype=np.uint8)[label_ids]
  return ArraySource(name=name, images=images, labels=labels,
                     official_split=official_split)


def _load_fashion_mnist(data_dir: str | None, manual_dir: str | None) -> ArraySource:
  fix = _fashion_mnist_fix()
  try:
    splits, num_classes = _read_tfds_into_memory("fashion_mnist", data_dir, fix=fix)
    return _array_source("fashion_mnist", splits, num_classes)
  except _NotPrepared:
    pass
  directory = manual_dir or DEFAULT_FASHION_MNIST_DIR
  if not os.path.isdir(directory):
    raise UserError(f"Fashion-MNIST is not prepared in tfds "
                    f"(data_dir={data_dir}) and {directory} does not exist. {fix}")
  splits = idx_files.read_fashion_mnist(directory, fix=fix)
  return _array_source("fashion_mnist", splits, num_classes=10)


def _load_cifar10(data_dir: str | None) -> ArraySource:
  try:
    splits, num_classes = _read_tfds_into_memory(
        "cifar10", data_dir, fix=_tfds_fix("cifar10", data_dir))
  except _NotPrepared as e:
    raise UserError(f"CIFAR-10 is not prepared for tfds ({e}); this machine cannot "
                    f"download it. {_tfds_fix('cifar10', data_dir)}") from e
  return _array_source("cifar10", splits, num_classes)


def _manual_builder(name: str, data_dir: str | None):
  """Returns the tfds builder of NUS-WIDE or MIRFlickr-25K."""
  # pylint: disable=g-import-not-at-top
  from psch_jax.data import mirflickr25k
  from psch_jax.data import nus_wide
  # pylint: enable=g-import-not-at-top
  if name not in _MANUAL_DATASETS:
    raise UserError(f"{name!r} has no manual builder; use one of {_MANUAL_DATASETS}.")
  builder_class = {"nus_wide": nus_wide.NusWide,
                   "mirflickr25k": mirflickr25k.Mirflickr25k}[name]
  fix = ("Prepare it from its files with manual_dir= (load_source does it once).\n"
         f"{builder_class.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return _open_tfds_builder(lambda: builder_class(data_dir=data_dir),
                           name, data_dir, fix=fix)


def prepare_manual_dataset(name: str, *, manual_dir: str,
                           data_dir: str | None = None) -> None:
  """Builds the tfds copy of NUS-WIDE or MIRFlickr-25K from the user's files.

  Args:
    name: "nus_wide" or "mirflickr25k".
    manual_dir: the downloaded files, in a layout of the builder's module docstring.
    data_dir: the tfds data directory to write to (default: tfds's).
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _manual_builder(name, data_dir)
  if not os.path.isdir(manual_dir):
    raise UserError(f"manual_dir {manual_dir} is not a directory.\n"
                    f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
      file_format="array_record")


def _load_manual(name: str, data_dir: str | None, manual_dir: str | None
                 ) -> EncodedSource:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = _manual_builder(name, data_dir)
  if not builder.is_prepared():
    if manual_dir is None:
      raise UserError(
          f"{name} is not prepared in {builder.data_dir}. Download its files and "
          f"pass manual_dir= (load_source prepares it once, then reads the tfds "
          f"copy), or pass the data_dir of an earlier preparation.\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}")
    prepare_manual_dataset(name, manual_dir=manual_dir, data_dir=data_dir)
    builder = _manual_builder(name, data_dir)
  split_names = [s for s in SPLITS if s in builder.info.splits]
  split_records = [
      builder.as_data_source(split=s,
                             decoders={"image": tfds.decode.SkipDecoding()})
      for s in split_names]
  num_labels = builder.info.features["labels"].shape[0]
  packed = (builder.info.metadata or {}).get("labels", {})
  labels, official_split = [], []
  for split, records in zip(split_names, split_records):
    if split in packed:
      labels.append(manual_files.unpack_labels(
          packed[split], num_rows=len(records), num_labels=num_labels))
    else:  # Prepared without label metadata: read every record once.
      labels.append(np.stack([
          example["labels"] for start in range(0, len(records), _LABEL_READ_CHUNK)
          for example in records.__getitems__(
              range(start, min(start + _LABEL_READ_CHUNK, len(records))))]))
    official_split.append(np.full(len(records), split))
  return EncodedSource(
      name=name, split_records=split_records,
      labels=np.concatenate(labels).astype(np.uint8),
      official_split=np.concatenate(official_split).astype("<U5"),
      image_shape=builder.info.features["image"].shape)


def load_source(name: str, *, data_dir: str | None = None,
                manual_dir: str | None = None) -> ImageSource:
  """Opens a dataset for random access.

  Args:
    name: one of `DATASETS`.
    data_dir: the tfds data directory (default: tfds's, ~/tensorflow_datasets).
    manual_dir: Fashion-MNIST: directory with its IDX files, used when tfds has
      not prepared it (default `DEFAULT_FASHION_MNIST_DIR`). NUS-WIDE /
      MIRFlickr-25K: the downloaded files, used to prepare the tfds copy once.

  Returns:
    The dataset's `ImageSource`; global indices: tfds "train" split, then "test".
  """
  if name == "fashion_mnist":
    return _load_fashion_mnist(data_dir, manual_dir)
  if name == "cifar10":
    return _load_cifar10(data_dir)
  if name in _MANUAL_DATASETS:
    return _load_manual(name, data_dir, manual_dir)
  raise UserError(f"Unknown dataset {name!r}; use one of {DATASETS}.")
