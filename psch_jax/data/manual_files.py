"""Readers for the manually downloaded files of NUS-WIDE and MIRFlickr-25K.

Public hashing code distributes both sets as an image directory plus a text list
of image paths (one per line, relative to the dataset root) and a text label
matrix (one row per image, one 0/1 column per concept, whitespace separated).
This module reads and validates such files and turns each image into the stored
form of our tfds builders: RGB, resized to `STORED_IMAGE_SIZE` x
`STORED_IMAGE_SIZE` and re-encoded as JPEG.

Every problem with a user's files raises `UserError` naming the file and the fix.
"""
from __future__ import annotations

import base64
import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from psch_jax.errors import UserError

# Images are stored squashed (aspect ratio not kept, as the torchvision
# `Resize((224, 224))` of public hashing code does) to 256 x 256: large enough
# for 224 x 224 random crops in on-device augmentation, small enough that the
# 195k NUS-WIDE images take about 3 GB.
STORED_IMAGE_SIZE = 256
_JPEG_QUALITY = 90


@dataclasses.dataclass(frozen=True)
class ManualSplit:
  """One split of a manually downloaded set.

  Attributes:
    relative_paths: image paths as written in the list file, one per image.
    absolute_paths: the same images resolved to existing files.
    labels: uint8 (n, num_labels) multi-hot matrix, rows in list order.
    list_file: the file that lists the images, for error messages.
  """
  relative_paths: list[str]
  absolute_paths: list[str]
  labels: np.ndarray
  list_file: str

  def __len__(self) -> int:
    return len(self.relative_paths)

  def keep_labelled(self) -> ManualSplit:
    """Drops the images without any label (they are never relevant to a query)."""
    keep = np.flatnonzero(self.labels.any(axis=1))
    return ManualSplit(
        relative_paths=[self.relative_paths[i] for i in keep],
        absolute_paths=[self.absolute_paths[i] for i in keep],
        labels=self.labels[keep],
        list_file=self.list_file)


def require_file(path: str, *, fix: str) -> None:
  """Raises UserError naming `path` and `fix` when it is not a readable file."""
  if not os.path.isfile(path):
    raise UserError(f"Missing file {path}. {fix}")


def read_path_list(path: str, *, fix: str) -> list[str]:
  """Reads a list of image paths, one per non-empty line.

  Args:
    path: the list file.
    fix: what the user should do when the file is wrong.

  Returns:
    The paths, stripped of surrounding whitespace, in file order.
  """
  require_file(path, fix=fix)
  with open(path, encoding="utf-8", errors="strict") as f:
    try:
      lines = f.read().splitlines()
    except UnicodeDecodeError as e:
      raise UserError(f"{path} is not a UTF-8 text file ({e}). {fix}") from e
  paths = [line.strip() for line in lines if line.strip()]
  if not paths:
    raise UserError(f"{path} lists no images. {fix}")
  return paths


def read_label_matrix(path: str, *, num_columns: int, fix: str) -> np.ndarray:
  """Reads a whitespace-separated 0/1 matrix with `num_columns` columns.

  Args:
    path: the label file, one row per image.
    num_columns: the number of concepts the dataset has.
    fix: what the user should do when the file is wrong.

  Returns:
    uint8 (n, num_columns) with values in {0, 1}.
  """
  require_file(path, fix=fix)
  with open(path, encoding="utf-8", errors="replace") as f:
    rows = [line.split() for line in f.read().splitlines() if line.strip()]
  if not rows:
    raise UserError(f"{path} has no rows. {fix}")
  for row_number, row in enumerate(rows, start=1):
    if len(row) != num_columns:
      raise UserError(
          f"{path}, row {row_number}: {len(row)} columns, expected {num_columns} "
          f"(one 0/1 column per concept). {fix}")
  try:
    values = np.asarray(rows, dtype=np.float64)
  except ValueError as e:
    raise UserError(f"{path} holds a value that is not a number ({e}). {fix}") from e
  bad = np.argwhere((values != 0) & (values != 1))
  if bad.size:
    row, column = bad[0]
    raise UserError(
        f"{path}, row {row + 1}, column {column + 1}: value {values[row, column]:g}; "
        f"a label matrix holds only 0 and 1. {fix}")
  return values.astype(np.uint8)


def resolve_images(root: str, relative_paths: Sequence[str], *,
                   search_dirs: Sequence[str], list_file: str,
                   fix: str) -> list[str]:
  """Finds the file of every listed image.

  A path is looked up relative to `root`, then, when missing, its base name in
  each of `search_dirs` (relative to `root`), because public releases differ in
  whether the list repeats the image directory.

  Args:
    root: the dataset root (the tfds manual_dir).
    relative_paths: the paths as listed.
    search_dirs: fallback directories, relative to `root`.
    list_file: the list the paths come from, for the error message.
    fix: what the user should do when images are missing.

  Returns:
    Existing absolute paths, one per listed image.
  """
  resolved, missing = [], []
  for relative in relative_paths:
    candidates = [os.path.join(root, relative)]
    candidates += [os.path.join(root, d, os.path.basename(relative))
                   for d in search_dirs]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
      missing.append(relative)
    else:
      resolved.append(found)
  if missing:
    shown = ", ".join(missing[:3])
    raise UserError(
        f"{len(missing)} image(s) listed in {list_file} are missing under {root} "
        f"(first: {shown}). {fix}")
  return resolved


def check_same_length(list_file: str, num_paths: int, label_file: str,
                      num_rows: int) -> None:
  """Raises UserError when an image list and its label matrix disagree in length."""
  if num_paths != num_rows:
    raise UserError(
        f"{list_file} lists {num_paths} images but {label_file} has {num_rows} "
        f"rows; the two files must come from the same release, row i of the "
        f"labels describing line i of the list.")


def encode_stored_image(path: str, *, list_file: str) -> bytes:
  """Reads an image file and returns it as the JPEG our builders store.

  Args:
    path: an image file in any format PIL reads.
    list_file: the list naming this image, for the error message.

  Returns:
    JPEG bytes of an RGB STORED_IMAGE_SIZE x STORED_IMAGE_SIZE image.
  """
  try:
    with Image.open(path) as image:
      image = image.convert("RGB").resize(
          (STORED_IMAGE_SIZE, STORED_IMAGE_SIZE), Image.BILINEAR)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise UserError(
        f"Cannot read image {path} ({e}). Download it again, or delete its line "
        f"from {list_file} and the same row from the label file.") from e
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return buffer.getvalue()


def pack_labels(labels: np.ndarray) -> str:
  """uint8 (n, num_labels) 0/1 -> a compact JSON-safe string (bit-packed, base64).

  The builders store each split's labels this way in the tfds metadata, so a
  source gets all labels without reading every record.
  """
  return base64.b64encode(np.packbits(labels, axis=1).tobytes()).decode("ascii")


def unpack_labels(text: str, *, num_rows: int, num_labels: int) -> np.ndarray:
  """Inverse of `pack_labels`: returns uint8 (num_rows, num_labels)."""
  packed = np.frombuffer(base64.b64decode(text), np.uint8)
  packed = packed.reshape(num_rows, -(-num_labels // 8))
  return np.unpackbits(packed, axis=1, count=num_labels)
