"""The tfds builder shared by the datasets read from manually downloaded files.

NUS-WIDE and MIRFlickr-25K differ only in their label names, their instructions and
how their file layout is read; `ManualHashingBuilder` holds everything else: the
feature spec (a 256 x 256 JPEG, a multi-hot label vector, the image's path), labels
kept in the dataset metadata so `load_source` never decodes a record to get them, and
examples in list order.
"""
from __future__ import annotations

import abc
import os
import sys
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds

from psch_jax.data import manual_files
from psch_jax.errors import UserError


class ManualHashingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of a builder over `<manual_dir>` in a public hashing-code layout.

  Subclasses set VERSION, RELEASE_NOTES, MANUAL_DOWNLOAD_INSTRUCTIONS, `code_path`
  (their own file: tfds locates a builder's source through the optional
  `importlib_resources` package otherwise), DISPLAY_NAME, LABEL_NAMES, HOMEPAGE, and
  implement `read_manual_layout`.
  """

  DISPLAY_NAME: str
  LABEL_NAMES: Sequence[str]
  HOMEPAGE: str

  @staticmethod
  @abc.abstractmethod
  def read_manual_layout(root: str) -> dict[str, manual_files.ManualSplit]:
    """{tfds split: its images and labels} read from the manual files in `root`."""

  def _info(self) -> tfds.core.DatasetInfo:
    size = manual_files.STORED_IMAGE_SIZE
    return tfds.core.DatasetInfo(
        builder=self,
        description=sys.modules[type(self).__module__].__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
            "labels": tfds.features.Tensor(shape=(len(self.LABEL_NAMES),),
                                           dtype=np.uint8),
            "image_path": tfds.features.Text(),
        }),
        homepage=self.HOMEPAGE,
        disable_shuffling=True,
        # {"labels": {split: manual_files.pack_labels(labels)}}, filled in
        # _split_generators: load_source reads labels from here, not records.
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds asserts the manual_dir exists.
      raise UserError(f"{self.DISPLAY_NAME} needs a manual_dir ({e}).\n"
                      f"{self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
    layout = self.read_manual_layout(root)
    self.info.metadata["labels"] = {
        split: manual_files.pack_labels(data.labels) for split, data in layout.items()}
    return {split: self._generate_examples(data) for split, data in layout.items()}

  def _generate_examples(self, data: manual_files.ManualSplit):
    for i, (relative, absolute) in enumerate(
        zip(data.relative_paths, data.absolute_paths)):
      yield i, {
          "image": manual_files.encode_stored_image(absolute, list_file=data.list_file),
          "labels": data.labels[i],
          "image_path": relative,
      }
