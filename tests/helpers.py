"""What several test modules share: the repository's configs and generated manual files.

- `ROOT`, `repo_config`, `needs_fashion_mnist`: the repository, its config files, and
  the mark for tests that read the installed Fashion-MNIST; `copy_run`, a private
  copy of the shared trained run (fixture `tiny_run` in conftest.py).
- `write_image`, `write_list`, `write_matrix`, `nus_split_lists`: the public
  hashing-code format of NUS-WIDE and MIRFlickr-25K (small random JPEGs, image lists,
  0/1 label matrices), for the tfds builders in psch_jax/data.
"""
import os
import shutil
import socket
from typing import Any, Mapping

import ml_collections
import numpy as np
import pytest
import safetensors.numpy
from packaging.requirements import Requirement
from PIL import Image

from psch_jax import config as psch_config
from psch_jax import pretrained
from psch_jax.data import manual_files
from psch_jax.errors import UserError
from psch_jax.data import sources

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requirement_pins(python_version: str) -> dict[str, str]:
  """{package: version} that requirements.txt installs on `python_version` ("3.12"),
  its environment markers evaluated; every line must be one exact `==` pin."""
  pins = {}
  with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line or line.startswith("#"):
        continue
      requirement = Requirement(line)
      if requirement.marker is None or requirement.marker.evaluate(
          {"python_version": python_version}):
        assert requirement.name not in pins, f"{requirement.name} pinned twice"
        (specifier,) = requirement.specifier
        assert specifier.operator == "==", line
        pins[requirement.name] = specifier.version
  return pins
FASHION_MNIST = os.path.isdir(sources.DEFAULT_FASHION_MNIST_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST, reason="apt-get install dataset-fashion-mnist")


def copy_run(workdir: str, destination) -> str:
  """A private copy of the shared `tiny_run` work directory (conftest.py), for a test
  that runs a command on it or changes it; returns its path."""
  destination = os.fspath(destination)
  # The links into the current generation of results stay links (they are relative).
  shutil.copytree(workdir, destination, symlinks=True)
  return destination


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now (for a jax.distributed coordinator)."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# ------------------------------------------------------------------------ configs

def repo_config(name: str, variant: str = "") -> ml_collections.ConfigDict:
  """configs/<name>.py, its `variant` (e.g. "tiny"; "" is `get_config()`), read by
  `config.load_config` as --config reads it."""
  spec = os.path.join(ROOT, "configs", f"{name}.py")
  return psch_config.load_config(f"{spec}:{variant}" if variant else spec)


# ------------------------------------------------------------ manual files on disk

def write_image(path: str, seed: int) -> np.ndarray:
  """Writes a smooth random-colour JPEG (so JPEG loss stays small) at `path`.

  Returns:
    uint8 (S, S, 3), the image as the builders store it (S =
    `manual_files.STORED_IMAGE_SIZE`), for comparison.
  """
  rng = np.random.default_rng(seed)
  height, width = rng.integers(20, 60, size=2)
  ramp = np.linspace(0, 1, width)[None, :, None]
  colour = rng.integers(0, 256, 3)[None, None, :]
  image = (ramp * colour + (1 - ramp) * (255 - colour)) * np.ones((height, 1, 1))
  image = Image.fromarray(image.astype(np.uint8))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, quality=95)
  size = manual_files.STORED_IMAGE_SIZE
  with Image.open(path) as saved:
    return np.asarray(saved.convert("RGB").resize((size, size), Image.BILINEAR))


def write_list(path: str, lines: list[str]) -> None:
  """Writes `lines`, one a line (an image list)."""
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def write_matrix(path: str, labels: np.ndarray) -> None:
  """Writes the 0/1 (n, num_labels) `labels` as whitespace-separated integers."""
  np.savetxt(path, labels, fmt="%d")


def nus_labels(num_images: int, seed: int = 0) -> np.ndarray:
  """uint8 (num_images, 21) random multi-hot NUS-WIDE labels, column seed % 21 set
  on every row."""
  labels = (np.random.default_rng(seed).random((num_images, 21)) < 0.3).astype(np.uint8)
  labels[:, seed % 21] = 1
  return labels


def nus_split_lists(root: str, num_database: int = 9, num_test: int = 3
                    ) -> tuple[np.ndarray, np.ndarray]:
  """Writes the DPSH-style NUS-WIDE layout under `root`; database row 4 has no label
  (the builder drops it).

  Returns:
    (uint8 (n, S, S, 3) stored images, uint8 (n, 21) labels) of the n kept images,
    database first, as the builder should read them back.
  """
  paths = [f"images/{i:04d}_{1000 + i}.jpg" for i in range(num_database + num_test)]
  images = [write_image(os.path.join(root, p), i) for i, p in enumerate(paths)]
  labels = nus_labels(len(paths))
  labels[4] = 0
  write_list(os.path.join(root, "database_img.txt"), paths[:num_database])
  write_matrix(os.path.join(root, "database_label_onehot.txt"), labels[:num_database])
  write_list(os.path.join(root, "test_img.txt"), paths[num_database:])
  write_matrix(os.path.join(root, "test_label_onehot.txt"), labels[num_database:])
  keep = [i for i in range(len(paths)) if i != 4]
  return np.stack(images)[keep], labels[keep]


# ------------------------------------------------------------- VGG-16 weight files

def save_vgg16_torchvision(params: Mapping[str, Any],
                           path: str | os.PathLike[str]) -> None:
  """Writes `models.VGG16` params as a torchvision-layout `.safetensors` or `.npz`.

  The inverse of `load_vgg16_torchvision` (no `classifier.6`, which `VGG16` lacks).

  Args:
    params: the VGG16 `'params'` collection (`{'conv1_1': ..., 'fc7': ...}`); a
      `{'params': ...}` variables dict is accepted too.
    path: output file ending in `.safetensors` or `.npz`.

  Raises:
    UserError: unsupported extension or params that are not VGG16's.
  """
  path = os.fspath(path)
  if "params" in params and "conv1_1" not in params:
    params = params["params"]
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in (".safetensors", ".npz"):
    raise UserError(
        f"cannot save VGG-16 weights to {path!r}: use a .safetensors or .npz path.")
  state = {}
  for key, (name, kind) in pretrained.torchvision_key_map().items():
    if name not in params or kind not in params[name]:
      raise UserError(
          f"params have no {name}/{kind}; pass the params of models.VGG16 "
          "(or params['backbone'] of a vgg16 PSCHNet).")
    value = np.asarray(params[name][kind], np.float32)
    if kind == "kernel":
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
    state[key] = np.ascontiguousarray(value)
  if suffix == ".safetensors":
    safetensors.numpy.save_file(state, path)
  else:
    np.savez(path, **state)
