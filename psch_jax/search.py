r"""Search a trained run's database with your own images.

  python -m psch_jax.commands.search --workdir=workdirs/fmnist --images=a.png,b.jpg --topk=10

Each image is encoded by the run's latest checkpoint exactly as the training images
were (decoded with PIL, converted to the dataset's stored channels and size, then the
same on-device `preprocess` and network, inside one jit), binarised (Eq. 12), and
compared with the database codes the evaluation saved (workdir/codes/database.npy);
the database is never encoded again. Results are ranked as in the evaluation: by
Hamming distance, ties by database index.

Needs from the work directory: config.json, checkpoints/, splits/database.npy and
codes/database.npy (all written by `main.py`), and the dataset itself for the labels
it prints. Bad input (a work directory without them, an image that is missing or not
decodable, topk < 1) prints what is wrong and how to fix it, and exits with code 2.
"""
from __future__ import annotations

import io
import os
import stat
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from psch_jax import checkpointing
from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax import encoding
from psch_jax import generations
from psch_jax import io_utils
from psch_jax import ranking
from psch_jax import reports
from psch_jax import run_setup
from psch_jax import workdir as workdir_lib
from psch_jax.errors import UserError



class SearchIndex(NamedTuple):
  """What a search needs from a trained run, loaded once.

  Attributes:
    config: the run's config (from workdir/config.json).
    params: the network params of the latest checkpoint (numpy arrays).
    encode: jit-compiled (params, uint8 (n, H, W, C)) -> int8 (n, L) codes.
    image_shape: (H, W, C) the dataset stores its images at.
    database_indices: int64 (ndb,) global index of each database row.
    database_packed: uint32 (ndb, W) packed database codes.
    database_labels: uint8 (ndb, num_labels) multi-hot labels of the database rows.
  """
  config: ml_collections.ConfigDict
  params: Any
  encode: Callable[[Any, jax.Array], jax.Array]
  image_shape: tuple[int, int, int]
  database_indices: np.ndarray
  database_packed: np.ndarray
  database_labels: np.ndarray


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config in workdir/config.json, checked as a config given to main.py is.

  Raises:
    UserError: config.json is missing, not JSON, not a whole config (a section or
      field removed by an edit) or holds a value no run can have.
  """
  path = io_utils.join(workdir, workdir_lib.CONFIG_FILE)
  saved = io_utils.read_json(
      path, missing_fix=("the run's config; pass the --workdir of a run that main.py "
                         "trained and evaluated, or finish that run first."),
      corrupt_fix="train again in a new --workdir.")
  if not isinstance(saved, dict):
    raise UserError(f"{path} holds a {type(saved).__name__}, not a config; restore "
                    "the config.json that main.py wrote, or train again in a new "
                    "--workdir.")
  base = psch_config.base_config()
  if "method" not in saved:
    # Written by PSCH before the deep peers came: its method fields are the defaults.
    saved = {**saved, "method": base.method.to_dict()}
  sections = [name for name, value in base.items()
              if isinstance(value, ml_collections.ConfigDict)]
  missing = [name for name in sections if not isinstance(saved.get(name), dict)]
  if missing:
    raise UserError(f"{path} has no {', '.join(missing)} section"
                    f"{'s' if len(missing) > 1 else ''} (edited?); restore the "
                    "config.json that main.py wrote for this run, or train again in a "
                    "new --workdir.")
  config = ml_collections.ConfigDict(saved)
  try:
    config_schema.check_config(config, num_devices=None)
  except UserError as e:
    raise UserError(f"{path} is not the config of a run (edited?): {e}\nRestore the "
                    "config.json that main.py wrote for this run, or train again in a "
                    "new --workdir.") from None
  return config


def check_config_fits_checkpoint(workdir: str, config: ml_collections.ConfigDict
                                 ) -> None:
  """Refuses a config.json whose model fields differ from the latest checkpoint's
  (`checkpointing.SHAPE_FIELDS`): the params would not fit the network it builds.

  Raises:
    UserError: naming config.json, each such field, the checkpoint's value and the
      fix.
  """
  saved = checkpointing.saved_signature(workdir)
  if saved is None:
    return
  now = checkpointing.shape_signature(config)
  changed = [(name, saved[name], now[name]) for name in now
             if name in saved and saved[name] != now[name]]
  if changed:
    listing = ", ".join(f"config.{name}={after!r} but the checkpoint was trained with "
                        f"{before!r}" for name, before, after in changed)
    raise UserError(f"{workdir}/config.json does not match the run's checkpoint: "
                    f"{listing}. config.json was edited after training: set "
                    + ", ".join(f"{name} back to {before!r}"
                                for name, before, _ in changed)
                    + " in it, or train that config in a new --workdir.")


def load_index(workdir: str) -> SearchIndex:
  """Loads config, checkpoint params, database codes and labels of a trained run."""
  if not io_utils.isdir(workdir):
    raise UserError(f"work directory {workdir} does not exist; pass the --workdir of "
                    "a trained run.")
  workdir_lib.check_kind(workdir, (workdir_lib.RUN,), command="search", reads=True)
  config = read_run_config(workdir)
  check_config_fits_checkpoint(workdir, config)
  # The codes, config.json, splits and checkpoint must be one evaluation's: a
  # config.json edited since (another data.mean) would encode queries differently
  # from the database.
  codes_name = f"{workdir_lib.CODES_DIR}/database.npy"
  results = generations.read_verified(workdir, names=(codes_name,))
  database_packed = reports.load_npy(generations.path(workdir, results, codes_name),
                                     "the database codes written by the evaluation")
  database_indices = reports.load_npy(
      io_utils.join(workdir, workdir_lib.SPLITS_DIR, "database.npy"),
      "the database split")
  num_words = -(-config.model.num_bits // 32)
  if (database_packed.dtype != np.uint32 or database_packed.ndim != 2
      or database_packed.shape != (len(database_indices), num_words)):
    raise UserError(f"{workdir}/codes/database.npy is {database_packed.dtype}"
                    f"{database_packed.shape}, expected uint32 ({len(database_indices)}, "
                    f"{num_words}) for the run's database and {config.model.num_bits} "
                    "bits; evaluate again with main.py --mode=eval.")
  model = run_setup.build_model(config)
  abstract_params = jax.eval_shape(lambda: run_setup.init_params(config, model))
  params = checkpointing.restore_params(workdir, abstract_params)
  restored_shapes = jax.tree.map(np.shape, params)
  if restored_shapes != jax.tree.map(lambda x: x.shape, abstract_params):
    raise UserError(f"the params of {workdir}/checkpoints do not fit the network "
                    f"{workdir}/config.json describes (config.json edited after "
                    "training?); restore the config.json that main.py wrote, or train "
                    "again in a new --workdir.")
  source = reports.load_run_source(workdir)
  if database_indices.size and database_indices.max() >= len(source):
    raise UserError(f"{workdir}/splits/database.npy indexes past the {len(source)} "
                    f"images of {config.data.name}; the work directory belongs to "
                    "another dataset copy.")
  return SearchIndex(config=config, params=params, encode=encoding.make_code_encoder(config, model),
                     image_shape=tuple(source.image_shape),
                     database_indices=database_indices.astype(np.int64),
                     database_packed=database_packed,
                     database_labels=source.labels[database_indices])


# Pillow modes whose `convert` to "L" or "RGB" keeps the 8-bit scale of the values:
# 1-bit, 8-bit grey, palette (looked up), colour, CMYK and YCbCr (colour-converted);
# an alpha channel is dropped (the datasets have none).
_EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX",
                    "CMYK", "YCbCr", "LAB", "HSV")


def _eight_bit(image: "Image.Image", path: str) -> "Image.Image":
  """`image` as an 8-bit Pillow image, its values scaled from the depth they have.

  Pillow's own `convert("L")` clips 16-bit and float values to 255 (a 16-bit grey
  PNG becomes nearly all white, a float TIFF in [0, 1] all black); here 16-bit values
  are scaled by 255 / 65535, and float values in [0, 1] by 255.

  Raises:
    UserError: a mode whose scale is not known (32-bit integers, floats outside
      [0, 1]), naming it.
  """
  mode = image.mode
  if mode in _EIGHT_BIT_MODES:
    return image
  pixels = np.asarray(image)
  if mode.startswith("I;16"):
    return Image.fromarray(np.rint(pixels.astype(np.float64) * (255 / 65535))
                           .astype(np.uint8), mode="L")
  if mode == "F":
    finite = np.isfinite(pixels).all()
    if finite and pixels.size and pixels.min() >= 0.0 and pixels.max() <= 1.0:
      return Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8), mode="L")
    raise UserError(
        f"image {path} holds floating-point pixels (Pillow mode 'F') "
        + (f"in [{pixels.min():.4g}, {pixels.max():.4g}]" if finite else
           "that are not all finite")
        + ", and only floats in [0, 1] have a known 8-bit scale; save it as an 8-bit "
        "or 16-bit PNG, or with values in [0, 1].")
  raise UserError(f"image {path} has Pillow mode {mode!r}, whose 8-bit scale is not "
                  "known (e.g. 32-bit integers); save it as an 8-bit or 16-bit PNG or "
                  "a JPEG.")


def read_image(path: str, image_shape: Sequence[int]) -> np.ndarray:
  """Decodes an image file as the dataset stores its images.

  Args:
    path: any format PIL reads: 8-bit and 16-bit grey, float in [0, 1], palette,
      colour, CMYK, with or without alpha (`_eight_bit`).
    image_shape: (H, W, C) of the dataset's stored images; C = 1 reads grey ("L"),
      C = 3 colour ("RGB"); other sizes are resized bilinearly, as the NUS-WIDE and
      MIRFlickr builders resize.

  Returns:
    uint8 (H, W, C).

  Raises:
    UserError: the path is missing or not a regular file (a FIFO or device would
      block or never end), or the image cannot be decoded or scaled.
  """
  height, width, channels = image_shape
  if not io_utils.is_object_store(path):
    try:
      mode = os.stat(path).st_mode
    except FileNotFoundError:
      mode = None
    except OSError as e:
      raise UserError(f"cannot read image {path} ({e.strerror}); check the path "
                      "given to --images.") from e
    if mode is not None and not stat.S_ISREG(mode):
      raise UserError(f"image {path} is not a regular file (a directory, FIFO or "
                      "device); pass image files to --images.")
  if not io_utils.isfile(path):
    raise UserError(f"image {path} does not exist; check the path given to --images.")
  try:
    with Image.open(io.BytesIO(io_utils.read_bytes(path))) as image:
      image = _eight_bit(image, path).convert("L" if channels == 1 else "RGB")
      if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
      pixels = np.asarray(image, np.uint8)
  except (ValueError, Image.DecompressionBombError) + io_utils.io_errors() as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"cannot decode {path} as an image ({e}); pass a PNG, JPEG or "
                    "another format Pillow reads.") from e
  return pixels.reshape(height, width, channels)


def encode_files(index: SearchIndex, image_paths: Sequence[str]) -> np.ndarray:
  """int8 (n, L) hash codes of the image files, in order."""
  if not image_paths:
    raise UserError("no images given; pass --images=a.png,b.jpg.")
  images = np.stack([read_image(p, index.image_shape) for p in image_paths])
  return np.asarray(index.encode(index.params, jnp.asarray(images)))


def search_index(index: SearchIndex, image_paths: Sequence[str], *, topk: int
                 ) -> list[list[dict]]:
  """`search` with an index already loaded (for repeated searches)."""
  if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
    raise UserError(f"topk must be a positive int, got {topk!r}; e.g. --topk=10.")
  codes = encode_files(index, image_paths)
  rows, distances = reports.top_matches(ranking.pack_codes(codes),
                                        index.database_packed, topk=int(topk))
  return [[{"rank": rank + 1, "database_row": int(row),
            "index": int(index.database_indices[row]), "distance": int(distance),
            "labels": np.flatnonzero(index.database_labels[row]).tolist()}
           for rank, (row, distance) in enumerate(zip(image_rows, image_distances))]
          for image_rows, image_distances in zip(rows, distances)]


def search(workdir: str, image_paths: Sequence[str], *, topk: int) -> list[list[dict]]:
  """The top-k database items for each image, by the run's latest checkpoint.

  Args:
    workdir: a run trained and evaluated by main.py.
    image_paths: image files (any format PIL reads).
    topk: items per image (at most the database size).

  Returns:
    Per image, best first, dicts {"rank": 1-based, "database_row": row in
    codes/database.npy, "index": global dataset index, "distance": Hamming distance,
    "labels": the item's label ids}.
  """
  if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
    raise UserError(f"topk must be a positive int, got {topk!r}; e.g. --topk=10.")
  return search_index(load_index(workdir), image_paths, topk=topk)


def format_matches(image_path: str, matches: list[dict]) -> str:
  lines = [f"{image_path}:", f"  {'rank':>4}  {'row':>7}  {'index':>8}  "
           f"{'distance':>8}  labels"]
  for m in matches:
    lines.append(f"  {m['rank']:>4}  {m['database_row']:>7}  {m['index']:>8}  "
                 f"{m['distance']:>8}  {m['labels']}")
  return "\n".join(lines)
