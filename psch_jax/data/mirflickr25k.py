"""tfds builder for MIRFlickr-25K with its 24 "potential labels".

MIRFlickr-25K has no tfds builder, so this builder reads files the user has
already downloaded (tfds manual_dir). `<root>` is the manual_dir; two layouts:

Layout "list" (the image list + label matrix of public hashing code, e.g. the
`img.txt` / `targets.txt` pair of ADSH / DSDH-style PyTorch code):

    <root>/mirflickr/im1.jpg ... im25000.jpg
    <root>/img.txt        one image path per line, relative to <root>
    <root>/targets.txt    one row of 24 0/1 columns per line

Layout "official" (the two archives from the dataset's site, unzipped):

    <root>/mirflickr/im1.jpg ... im25000.jpg           from mirflickr25k.zip
    <root>/mirflickr25k_annotations_v080/<label>.txt   from the annotations zip

where each of the 24 `<label>.txt` files (see `LABELS`; the `*_r1.txt`
"relevant" subsets and README.txt are ignored) lists the 1-based numbers of the
images that carry the label. Images are ordered by number.

"list" wins when both are present. A listed path that does not exist relative to
<root> is also looked up by its base name in <root>/mirflickr. Only images with
at least one of the 24 labels are kept (20,015 of the 25,000 in the official
annotations). Everything goes to the tfds "train" split: the protocols sample
query and database from it. Each image is stored RGB, squashed to 256 x 256,
JPEG-encoded (`manual_files.STORED_IMAGE_SIZE`), in list order (shuffling
disabled).
"""
from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from psch_jax.data import manual_builder
from psch_jax.data import manual_files
from psch_jax.errors import UserError

# The 24 potential labels of the v080 annotations, in label-column order.
LABELS = (
    "animals", "baby", "bird", "car", "clouds", "dog", "female", "flower", "food",
    "indoor", "lake", "male", "night", "people", "plant_life", "portrait",
    "river", "sea", "sky", "structures", "sunset", "transport", "tree", "water",
)

_IMAGE_DIR = "mirflickr"
_ANNOTATION_DIR = "mirflickr25k_annotations_v080"
_LIST_FILE = "img.txt"
_LABELS_FILE = "targets.txt"
_IMAGE_NAME = re.compile(r"im(\d+)\.jpg")

_INSTRUCTIONS = """\
Put the MIRFlickr-25K files in the manual_dir, in one of these layouts:

  Layout "list":
    mirflickr/im1.jpg ... im25000.jpg
    img.txt        one image path per line, relative to the manual_dir
    targets.txt    one row of 24 0/1 columns per line

  Layout "official" (unzip both archives from
  https://press.liacs.nl/mirflickr/mirdownload.html into the manual_dir):
    mirflickr/im1.jpg ... im25000.jpg            (mirflickr25k.zip)
    mirflickr25k_annotations_v080/<label>.txt    (mirflickr25k_annotations_v080.zip)

Label columns, in order: {labels}.
""".format(labels=", ".join(LABELS))


def _read_list_layout(root: str, fix: str) -> manual_files.ManualSplit:
  list_file = os.path.join(root, _LIST_FILE)
  labels_file = os.path.join(root, _LABELS_FILE)
  relative = manual_files.read_path_list(list_file, fix=fix)
  labels = manual_files.read_label_matrix(
      labels_file, num_columns=len(LABELS), fix=fix)
  manual_files.check_same_length(list_file, len(relative), labels_file,
                                 labels.shape[0])
  absolute = manual_files.resolve_images(
      root, relative, search_dirs=(_IMAGE_DIR,), list_file=list_file, fix=fix)
  return manual_files.ManualSplit(relative, absolute, labels, list_file)


def _read_official_layout(root: str, fix: str) -> manual_files.ManualSplit:
  image_dir = os.path.join(root, _IMAGE_DIR)
  if not os.path.isdir(image_dir):
    raise UserError(f"Missing image directory {image_dir}. {fix}")
  numbers = sorted(int(m.group(1)) for m in map(_IMAGE_NAME.fullmatch,
                                                os.listdir(image_dir)) if m)
  if not numbers:
    raise UserError(f"{image_dir} holds no im<number>.jpg files. {fix}")
  row_of_number = {n: row for row, n in enumerate(numbers)}
  labels = np.zeros((len(numbers), len(LABELS)), np.uint8)
  for column, label in enumerate(LABELS):
    annotation_file = os.path.join(root, _ANNOTATION_DIR, f"{label}.txt")
    manual_files.require_file(annotation_file, fix=fix)
    with open(annotation_file, encoding="utf-8", errors="replace") as f:
      for line_number, line in enumerate(f, start=1):
        if not line.strip():
          continue
        if not line.strip().isdigit():
          raise UserError(
              f"{annotation_file}, line {line_number}: {line.strip()!r} is not an "
              f"image number. {fix}")
        number = int(line)
        if number not in row_of_number:
          raise UserError(
              f"{annotation_file}, line {line_number}: image im{number}.jpg is not "
              f"in {image_dir}. {fix}")
        labels[row_of_number[number], column] = 1
  relative = [os.path.join(_IMAGE_DIR, f"im{n}.jpg") for n in numbers]
  absolute = [os.path.join(root, r) for r in relative]
  return manual_files.ManualSplit(relative, absolute, labels,
                                  os.path.join(root, _ANNOTATION_DIR))


def read_manual_layout(root: str) -> dict[str, manual_files.ManualSplit]:
  """Reads and validates the MIRFlickr-25K files in `root`.

  Args:
    root: the manual_dir.

  Returns:
    {"train": ...}: resolved image paths and a uint8 (n, 24) label matrix of the
    images with at least one label.
  """
  fix = f"See the expected layout:\n{_INSTRUCTIONS}"
  if not os.path.isdir(root):
    raise UserError(f"MIRFlickr-25K manual_dir {root} is not a directory. {fix}")
  if os.path.exists(os.path.join(root, _LIST_FILE)):
    data = _read_list_layout(root, fix)
  elif os.path.isdir(os.path.join(root, _ANNOTATION_DIR)):
    data = _read_official_layout(root, fix)
  else:
    raise UserError(
        f"Found neither {_LIST_FILE} nor {_ANNOTATION_DIR}/ in {root}. {fix}")
  data = data.keep_labelled()
  if not len(data):
    raise UserError(f"No image in {root} carries any of the 24 labels. {fix}")
  return {"train": data}


class Mirflickr25k(manual_builder.ManualHashingBuilder):
  """MIRFlickr-25K, 24 labels, from manually downloaded files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "256 x 256 JPEG images, 24-label multi-hot labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  code_path = epath.Path(__file__)
  DISPLAY_NAME = "MIRFlickr-25K"
  LABEL_NAMES = LABELS
  HOMEPAGE = "https://press.liacs.nl/mirflickr/"
  read_manual_layout = staticmethod(read_manual_layout)
