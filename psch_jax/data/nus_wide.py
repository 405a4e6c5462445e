"""tfds builder for NUS-WIDE restricted to its 21 most frequent concepts.

NUS-WIDE has no tfds builder and its images cannot be downloaded by script, so
this builder reads files the user has already downloaded (tfds manual_dir), in
the layouts that public hashing code uses. `<root>` is the manual_dir:

Layout "split lists" (the 21-concept release used by DPSH / ADSH / DSDH-style
code; the tfds "train" split is the database list, "test" the 2,100 query list):

    <root>/images/...                  the images (paths as in the lists)
    <root>/database_img.txt            one image path per line, relative to <root>
    <root>/database_label_onehot.txt   one row of 21 0/1 columns per line
    <root>/test_img.txt
    <root>/test_label_onehot.txt

Layout "one list" (a single list of all images; everything goes to "train"):

    <root>/images/...
    <root>/img_tc21.txt
    <root>/targets_onehot_tc21.txt

The first layout wins when both are present. A listed path that does not exist
relative to <root> is also looked up by its base name in <root>/images. Columns
follow `CONCEPTS` (the 21 concepts in alphabetical order, as in the 81-concept
NUS-WIDE ground truth). Images with no label among the 21 are dropped. Each
image is stored RGB, squashed to 256 x 256, JPEG-encoded
(`manual_files.STORED_IMAGE_SIZE`), in list order (shuffling disabled), so the
i-th example of a split is the i-th labelled line of its list.
"""
from __future__ import annotations

import os

import tensorflow_datasets as tfds
from etils import epath

from psch_jax.data import manual_builder
from psch_jax.data import manual_files
from psch_jax.errors import UserError

# The 21 most frequent of NUS-WIDE's 81 concepts, in label-column order.
CONCEPTS = (
    "animal", "beach", "buildings", "clouds", "flowers", "grass", "lake",
    "mountain", "ocean", "person", "plants", "reflection", "road", "rocks", "sky",
    "snow", "sunset", "tree", "vehicle", "water", "window",
)

# (split, image list, label matrix) per layout, in order of preference.
_SPLIT_LISTS_LAYOUT = (
    ("train", "database_img.txt", "database_label_onehot.txt"),
    ("test", "test_img.txt", "test_label_onehot.txt"),
)
_ONE_LIST_LAYOUT = (("train", "img_tc21.txt", "targets_onehot_tc21.txt"),)

_INSTRUCTIONS = """\
Put the NUS-WIDE files for the 21 most frequent concepts in the manual_dir, in
one of these layouts (paths in the lists are relative to the manual_dir):

  Layout "split lists" (DPSH / ADSH-style release):
    images/                      the image files
    database_img.txt             one image path per line (database images)
    database_label_onehot.txt    one row of 21 0/1 columns per line
    test_img.txt                 one image path per line (query images)
    test_label_onehot.txt        one row of 21 0/1 columns per line

  Layout "one list":
    images/
    img_tc21.txt                 one image path per line (all images)
    targets_onehot_tc21.txt      one row of 21 0/1 columns per line

Label columns, in order: {concepts}.
Images: https://lms.comp.nus.edu.sg/research/NUS-WIDE.htm
(the image list and label files come with public hashing code releases).
""".format(concepts=", ".join(CONCEPTS))


def read_manual_layout(root: str) -> dict[str, manual_files.ManualSplit]:
  """Reads and validates the NUS-WIDE files in `root`.

  Args:
    root: the manual_dir.

  Returns:
    {"train": ..., ["test": ...]}: per split, resolved image paths and a uint8
    (n, 21) label matrix, images without any of the 21 labels dropped.
  """
  fix = f"See the expected layout:\n{_INSTRUCTIONS}"
  if not os.path.isdir(root):
    raise UserError(f"NUS-WIDE manual_dir {root} is not a directory. {fix}")
  if os.path.exists(os.path.join(root, _SPLIT_LISTS_LAYOUT[0][1])):
    layout = _SPLIT_LISTS_LAYOUT
  elif os.path.exists(os.path.join(root, _ONE_LIST_LAYOUT[0][1])):
    layout = _ONE_LIST_LAYOUT
  else:
    raise UserError(
        f"Found neither {_SPLIT_LISTS_LAYOUT[0][1]} nor {_ONE_LIST_LAYOUT[0][1]} "
        f"in {root}. {fix}")
  splits = {}
  for split, list_name, labels_name in layout:
    list_file = os.path.join(root, list_name)
    labels_file = os.path.join(root, labels_name)
    relative = manual_files.read_path_list(list_file, fix=fix)
    labels = manual_files.read_label_matrix(
        labels_file, num_columns=len(CONCEPTS), fix=fix)
    manual_files.check_same_length(list_file, len(relative), labels_file,
                                   labels.shape[0])
    absolute = manual_files.resolve_images(
        root, relative, search_dirs=("images",), list_file=list_file, fix=fix)
    splits[split] = manual_files.ManualSplit(
        relative, absolute, labels, list_file).keep_labelled()
  return splits


class NusWide(manual_builder.ManualHashingBuilder):
  """NUS-WIDE, 21 most frequent concepts, from manually downloaded files."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "256 x 256 JPEG images, 21-concept multi-hot labels."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
  code_path = epath.Path(__file__)
  DISPLAY_NAME = "NUS-WIDE"
  LABEL_NAMES = CONCEPTS
  HOMEPAGE = "https://lms.comp.nus.edu.sg/research/NUS-WIDE.htm"
  read_manual_layout = staticmethod(read_manual_layout)
