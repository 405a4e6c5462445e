"""Reader for the IDX files of (Fashion-)MNIST, so Fashion-MNIST works offline.

The Debian package `dataset-fashion-mnist` installs the four gzip IDX files in
/usr/share/datasets/fashion-mnist. They are recompressed, so tfds rejects them as
a manual_dir (checksum mismatch); this module parses them directly.

IDX format: two zero bytes, a type code (0x08 = unsigned byte), the number of
dimensions d, then d big-endian uint32 sizes, then the data in C order.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from psch_jax.errors import UserError

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_UNSIGNED_BYTE = 0x08


def read_idx(path: str, *, ndim: int, fix: str) -> np.ndarray:
  """Reads an unsigned-byte IDX file, gzip-compressed when its name ends in .gz.

  Args:
    path: the file.
    ndim: the number of dimensions the file must have (3 for images, 1 for labels).
    fix: what the user should do when the file is wrong.

  Returns:
    uint8 array with the file's `ndim` dimensions.
  """
  try:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      content = f.read()
  except FileNotFoundError as e:
    raise UserError(f"Missing file {path}. {fix}") from e
  except (OSError, EOFError, zlib.error) as e:
    # gzip.BadGzipFile (a bad header or CRC) is an OSError, a stream cut short an
    # EOFError, a damaged deflate stream a zlib.error.
    raise UserError(f"Cannot read {path}: {e} (truncated or corrupt). {fix}") from e
  expected_magic = bytes([0, 0, _UNSIGNED_BYTE, ndim])
  if content[:4] != expected_magic:
    raise UserError(
        f"{path} has magic number {content[:4].hex()}, expected "
        f"{expected_magic.hex()} (unsigned-byte IDX with {ndim} dimension(s)). {fix}")
  header_size = 4 + 4 * ndim
  if len(content) < header_size:
    raise UserError(f"{path} is too short for an IDX header (truncated). {fix}")
  shape = tuple(int(s) for s in np.frombuffer(content, ">u4", ndim, offset=4))
  expected_size = header_size + int(np.prod(shape))
  if len(content) != expected_size:
    raise UserError(
        f"{path} holds {len(content)} bytes, but its header {shape} needs "
        f"{expected_size} (truncated or corrupt). {fix}")
  return np.frombuffer(content, np.uint8, offset=header_size).reshape(shape)


def read_fashion_mnist(directory: str, *, fix: str
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Reads the Fashion-MNIST IDX files in `directory`.

  Args:
    directory: holds the four files of `FASHION_MNIST_FILES`.
    fix: what the user should do when a file is missing or wrong.

  Returns:
    {"train": (images, labels), "test": (images, labels)}: images uint8
    (n, 28, 28, 1), labels int64 (n,) class ids in [0, 10).
  """
  splits = {}
  for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
    images_path = os.path.join(directory, images_name)
    labels_path = os.path.join(directory, labels_name)
    images = read_idx(images_path, ndim=3, fix=fix)
    labels = read_idx(labels_path, ndim=1, fix=fix)
    if images.shape[0] != labels.shape[0]:
      raise UserError(
          f"{images_path} holds {images.shape[0]} images but {labels_path} "
          f"{labels.shape[0]} labels. {fix}")
    if labels.size and labels.max() >= 10:
      raise UserError(f"{labels_path} holds class {labels.max()}; Fashion-MNIST "
                      f"has classes 0-9. {fix}")
    splits[split] = (images[..., None], labels.astype(np.int64))
  return splits
