"""Retrieval protocol splits: query, database, train and validation index sets.

Two named presets (docs/method.md, "Training and evaluation protocols"); all
counts are defaults that keyword arguments of `make_splits` override:

cifar10
  "ssdh":   query 100 per class from all 60,000; database the rest (59,000);
            train 500 per class from the database.
  "modern": query = the test split (10,000); database = train = the train split.
fashion_mnist
  "ssdh":   query 100 per class from the test split; database the rest (69,000);
            train 500 per class from the database.
  "modern": query = the test split (10,000); database = train = the train split.
nus_wide, both presets
            query 100 per concept (2,100); database the rest; train 500 per
            concept (10,500) from the database.
mirflickr25k, both presets
            query 2,000 uniformly; database the rest; train 5,000 uniformly from
            the database.

Sampling rules:
- "per class" (one-hot labels) or "per concept" (multi-hot): concepts are taken
  in column order; for each, the count is drawn uniformly without replacement
  among the images that carry the concept and are not drawn yet. With one-hot
  labels this is exactly per-class sampling; with multi-hot labels an image
  drawn for one concept also counts as a member of its other concepts, as in
  public hashing code.
- "uniformly": drawn among the images with at least one label.
- The query of "modern" CIFAR-10 / Fashion-MNIST is the whole official test split.
- validation (model selection, mirrors the test): `num_validation` queries
  (default: as many as the query), drawn from the database, never from the query,
  and ranked against the validation database = the database minus them
  (`validation_database`), so validation mAP@K measures the same top fraction of
  a database of (almost) the test's size and class balance as the test's mAP@K.
  They are drawn like the query: per class (per concept) when the query is drawn
  per class or is a class-balanced official test split, num_validation spread
  evenly over the label columns (the first num_validation % num_labels columns
  get one more); uniformly when the query is drawn uniformly. Their pool is the
  labelled images of the database minus the train set, as the query is never
  trained on; when the train set is the whole database ("modern" CIFAR-10 /
  Fashion-MNIST) it is the whole database, so the validation queries are then
  training images (optimistic by what the codes memorise). Fashion-MNIST "ssdh":
  1,000 queries (100 per class) from the 64,000 database images outside train,
  against the other 68,000 database images (6,800 per class; the test: 6,900).

Query, database and train are drawn by `np.random.default_rng(seed)` in a fixed
order; validation by its own generator `np.random.default_rng([seed,
VALIDATION_STREAM])`, so changing how validation is drawn never moves the test
splits. A (dataset, preset, seed, counts) tuple always gives the same splits. Every split
is a sorted int64 array of global indices (see `psch_jax.data.sources`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from psch_jax import io_utils
from psch_jax.errors import UserError

PRESETS = ("ssdh", "modern")
SPLIT_NAMES = ("query", "database", "train", "validation")
# Tags the validation draw's generator (the bytes of "validation" as one integer:
# no dataset size or seed collides with it), like a jax.random.fold_in purpose tag.
VALIDATION_STREAM = int.from_bytes(b"validation", "big")


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How one preset splits one dataset.

  Attributes:
    query: "per_class" (query_count per class or concept), "uniform"
      (query_count in all) or "official_test" (the whole test split).
    query_from_test: draw the query from the official test split only.
    query_count: see `query`.
    train: "per_class", "uniform" (from the database, train_count per class or
      in all) or "database" (the whole database).
    train_count: see `train`.
  """
  query: str
  query_from_test: bool
  query_count: int
  train: str
  train_count: int


_SSDH_SINGLE_LABEL = Protocol("per_class", False, 100, "per_class", 500)
_OFFICIAL = Protocol("official_test", True, 0, "database", 0)
_PER_CONCEPT = Protocol("per_class", False, 100, "per_class", 500)
_UNIFORM = Protocol("uniform", False, 2000, "uniform", 5000)

PROTOCOLS: dict[tuple[str, str], Protocol] = {
    ("cifar10", "ssdh"): _SSDH_SINGLE_LABEL,
    ("cifar10", "modern"): _OFFICIAL,
    ("fashion_mnist", "ssdh"): dataclasses.replace(_SSDH_SINGLE_LABEL,
                                                   query_from_test=True),
    ("fashion_mnist", "modern"): _OFFICIAL,
    ("nus_wide", "ssdh"): _PER_CONCEPT,
    ("nus_wide", "modern"): _PER_CONCEPT,
    ("mirflickr25k", "ssdh"): _UNIFORM,
    ("mirflickr25k", "modern"): _UNIFORM,
}


def _count(scheme: str, default: int, *, per_class: int | None,
           total: int | None, num_labels: int, what: str, context: str) -> int:
  """The number of `what` images to draw: the protocol's, or an override.

  A per-class scheme takes `per_class`; a uniform one takes `total`, or
  `per_class * num_labels` so that one tiny config fits every dataset.
  """
  per_class_name, total_name = f"{what}_per_class", f"num_{what}"
  if scheme not in ("per_class", "uniform"):
    if per_class is not None or total is not None:
      raise UserError(f"{context} fixes its {what} set ({scheme!r}); unset "
                      f"{per_class_name} / {total_name}.")
    return default
  if per_class is not None and total is not None:
    raise UserError(f"{context}: pass {per_class_name}= or {total_name}=, not both.")
  if scheme == "per_class" and total is not None:
    raise UserError(f"{context} draws the {what} set per class; pass "
                    f"{per_class_name}= instead of {total_name}=.")
  value = per_class if scheme == "per_class" else (
      total if per_class is None else per_class * num_labels)
  if value is None:
    return default
  if value < 0:
    raise UserError(f"{context}: the {what} count {value} must be >= 0.")
  return int(value)


def _sample_per_class(rng: np.random.Generator, labels: np.ndarray,
                      candidates: np.ndarray, per_class: int | np.ndarray, *,
                      allow_fewer: bool, what: str, fix: str) -> np.ndarray:
  """Draws `per_class` images per label column among `candidates`.

  Args:
    rng: the generator, advanced in a fixed order.
    labels: uint8 (N, num_labels).
    candidates: bool (N,), the images that may be drawn.
    per_class: images per column: one int for all, or int (num_labels,).
    allow_fewer: take all remaining members of a column that has fewer.
    what: the split being drawn, for the error message.
    fix: what the user should do when a column has too few images.

  Returns:
    bool (N,) mask of the drawn images.
  """
  remaining = candidates.copy()
  counts = np.broadcast_to(np.asarray(per_class, np.int64), labels.shape[1:])
  for column, count in enumerate(counts.tolist()):
    members = np.flatnonzero(remaining & (labels[:, column] > 0))
    if members.size < count and not allow_fewer:
      raise UserError(f"{what}: class {column} has {members.size} candidate images, "
                      f"{count} asked. {fix}")
    drawn = rng.choice(members, size=min(count, members.size), replace=False)
    remaining[drawn] = False
  return candidates & ~remaining


def _sample_uniform(rng: np.random.Generator, candidates: np.ndarray, count: int,
                    *, allow_fewer: bool, what: str, fix: str) -> np.ndarray:
  """Draws `count` of the `candidates` (bool (N,)); returns a bool (N,) mask."""
  members = np.flatnonzero(candidates)
  if members.size < count and not allow_fewer:
    raise UserError(f"{what}: {members.size} candidate images, {count} asked. {fix}")
  drawn = rng.choice(members, size=min(count, members.size), replace=False)
  mask = np.zeros_like(candidates)
  mask[drawn] = True
  return mask


def _draw_validation(rng: np.random.Generator, labels: np.ndarray,
                     protocol: Protocol, *, pool: np.ndarray, count: int,
                     allow_fewer: bool, what: str, fix: str) -> np.ndarray:
  """The validation queries: `count` of `pool` (bool (N,)), drawn like the query.

  Per class (per concept) unless the protocol draws its query uniformly: `count`
  spread evenly over the label columns, the first `count % num_labels` columns
  one more, so they hold the query's class balance. Returns a bool (N,) mask.
  """
  if protocol.query == "uniform":
    return _sample_uniform(rng, pool, count, allow_fewer=allow_fewer, what=what,
                           fix=fix)
  num_labels = labels.shape[1]
  per_class = np.full(num_labels, count // num_labels, np.int64)
  per_class[:count % num_labels] += 1
  return _sample_per_class(rng, labels, pool, per_class, allow_fewer=allow_fewer,
                           what=what, fix=fix)


def validation_database(splits: dict[str, np.ndarray]) -> np.ndarray:
  """The images validation ranks its queries against: the database minus the
  validation queries (sorted int64 global indices), the validation counterpart
  of the test's database. Its size is len(database) - len(validation).
  """
  return np.setdiff1d(splits["database"], splits["validation"]).astype(np.int64)


def make_splits(labels: np.ndarray, official_split: np.ndarray, *, dataset: str,
                preset: str, seed: int, num_validation: int | None = None,
                query_per_class: int | None = None,
                train_per_class: int | None = None, num_query: int | None = None,
                num_train: int | None = None,
                allow_fewer: bool = False) -> dict[str, np.ndarray]:
  """Draws the query / database / train / validation splits of a preset.

  Args:
    labels: uint8 (N, num_labels) multi-hot (one-hot for single-label sets).
    official_split: str (N,), "train" or "test" per image.
    dataset: a dataset of `PROTOCOLS` ("cifar10", "fashion_mnist", "nus_wide",
      "mirflickr25k").
    preset: one of `PRESETS`.
    seed: seeds `np.random.default_rng`; same arguments, same splits.
    num_validation: validation queries (default: the query size); see the
      module docstring for how they are drawn.
    query_per_class, train_per_class: override the per-class (per-concept)
      counts of presets that sample per class; for presets that sample
      uniformly they ask for `count * num_labels` images in all.
    num_query, num_train: override the totals of presets that sample uniformly.
    allow_fewer: when a class (or the candidate pool) has fewer images than
      asked, take what there is instead of raising (for tiny test datasets).

  Returns:
    {"query", "database", "train", "validation"}: sorted int64 global indices.
  """
  labels = np.asarray(labels)
  official_split = np.asarray(official_split)
  if labels.ndim != 2:
    raise UserError(f"labels must be (N, num_labels), got shape {labels.shape}.")
  if official_split.shape != labels.shape[:1] or not np.isin(
      official_split, ("train", "test")).all():
    raise UserError("official_split must hold 'train' or 'test' for each of the "
                    f"{labels.shape[0]} images (ImageSource.official_split).")
  if (dataset, preset) not in PROTOCOLS:
    raise UserError(f"No protocol for dataset={dataset!r}, preset={preset!r}; "
                    f"datasets {sorted({d for d, _ in PROTOCOLS})}, presets {PRESETS}.")
  protocol = PROTOCOLS[(dataset, preset)]
  context = f"{dataset} preset {preset!r}"
  num_labels = labels.shape[1]
  query_count = _count(protocol.query, protocol.query_count,
                       per_class=query_per_class, total=num_query,
                       num_labels=num_labels, what="query", context=context)
  train_count = _count(protocol.train, protocol.train_count,
                       per_class=train_per_class, total=num_train,
                       num_labels=num_labels, what="train", context=context)
  fix = ("Pass smaller counts (query_per_class=, train_per_class=, num_query=, "
         "num_train=, num_validation=) or allow_fewer=True for a tiny dataset.")
  rng = np.random.default_rng(seed)
  labelled = labels.any(axis=1)

  pool = labelled & (official_split == "test" if protocol.query_from_test else True)
  if protocol.query == "official_test":
    query = official_split == "test"
  elif protocol.query == "per_class":
    query = _sample_per_class(rng, labels, pool, query_count, allow_fewer=allow_fewer,
                              what=f"{context}, query", fix=fix)
  else:
    query = _sample_uniform(rng, pool, query_count, allow_fewer=allow_fewer,
                            what=f"{context}, query", fix=fix)
  database = ~query

  if protocol.train == "database":
    train = database.copy()
  elif protocol.train == "per_class":
    train = _sample_per_class(rng, labels, database & labelled, train_count,
                              allow_fewer=allow_fewer, what=f"{context}, train",
                              fix=fix)
  else:
    train = _sample_uniform(rng, database & labelled, train_count,
                            allow_fewer=allow_fewer, what=f"{context}, train", fix=fix)

  if num_validation is None:
    num_validation = int(query.sum())
  if num_validation < 0:
    raise UserError(f"{context}: num_validation={num_validation} must be >= 0.")
  validation = _draw_validation(
      np.random.default_rng([seed, VALIDATION_STREAM]), labels, protocol,
      pool=labelled & (database if protocol.train == "database"
                       else database & ~train),
      count=num_validation, allow_fewer=allow_fewer,
      what=f"{context}, validation", fix=fix)

  splits = {name: np.flatnonzero(mask).astype(np.int64) for name, mask in
            zip(SPLIT_NAMES, (query, database, train, validation))}
  check_splits(splits, num_examples=labels.shape[0])
  if protocol.train == "database" and not np.array_equal(splits["train"],
                                                         splits["database"]):
    raise AssertionError("a 'modern' protocol must train on the whole database")
  return splits


def check_splits(splits: dict[str, np.ndarray], *, num_examples: int | None = None
                 ) -> None:
  """Raises UserError unless `splits` is a consistent set of protocol splits.

  Consistent: exactly the keys of `SPLIT_NAMES`, each a 1-D strictly increasing
  integer array; query and database disjoint; train and validation inside the
  database; all indices in [0, num_examples) when num_examples is given.
  """
  if set(splits) != set(SPLIT_NAMES):
    raise UserError(f"splits have keys {sorted(splits)}, expected {list(SPLIT_NAMES)}.")
  for name in SPLIT_NAMES:
    indices = np.asarray(splits[name])
    if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
      raise UserError(f"split {name!r} must be a 1-D integer array, got "
                      f"{indices.dtype} {indices.shape}.")
    if indices.size and (np.any(np.diff(indices) <= 0) or indices[0] < 0):
      raise UserError(f"split {name!r} must be sorted, unique and non-negative.")
    if num_examples is not None and indices.size and indices[-1] >= num_examples:
      raise UserError(f"split {name!r} holds index {indices[-1]}, but the dataset "
                      f"has {num_examples} images: the splits belong to another "
                      f"dataset; draw them again.")
  overlap = np.intersect1d(splits["query"], splits["database"])
  if overlap.size:
    raise UserError(f"query and database share {overlap.size} images "
                    f"(e.g. {overlap[0]}); retrieval would find the query itself. "
                    f"Draw the splits again with make_splits.")
  for name in ("train", "validation"):
    outside = np.setdiff1d(splits[name], splits["database"])
    if outside.size:
      raise UserError(f"{outside.size} {name} images (e.g. {outside[0]}) are not "
                      f"in the database. Draw the splits again with make_splits.")


def save_splits(splits: dict[str, np.ndarray], directory: str) -> None:
  """Writes each split to `<directory>/<name>.npy` (local or gs://), each file
  atomically (`io_utils.save_npy`), so a crash never leaves a half-written split.
  """
  check_splits(splits)
  root = io_utils.workdir_path(directory)
  for name in SPLIT_NAMES:
    io_utils.save_npy(root / f"{name}.npy",
                      np.asarray(splits[name], np.int64))


def load_splits(directory: str, *, num_examples: int | None = None
                ) -> dict[str, np.ndarray]:
  """Reads the splits `save_splits` wrote and checks them (`check_splits`).

  Args:
    directory: where `save_splits` wrote them (local or gs://).
    num_examples: the dataset size, to check every index is in range.

  Returns:
    {"query", "database", "train", "validation"}: sorted int64 global indices.
  """
  root = io_utils.workdir_path(directory)
  splits = {name: load_split_file(root / f"{name}.npy", name=name)
            for name in SPLIT_NAMES}
  check_splits(splits, num_examples=num_examples)
  return splits


def load_split_file(path, *, name: str, num_examples: int | None = None
                    ) -> np.ndarray:
  """One split file: a 1-D, sorted, unique int64 array of indices in range.

  Raises:
    UserError: the file is missing, unreadable or not such an array.
  """
  if not io_utils.isfile(path):
    raise UserError(f"Missing split file {path}; draw the splits with "
                    f"make_splits and save_splits, or point to the directory "
                    f"that holds them.")
  try:
    indices = io_utils.load_npy(path)
  except (ValueError, EOFError) + io_utils.io_errors() as e:
    raise UserError(f"Cannot read split file {path} ({e}); delete it and draw "
                    f"the splits again.") from e
  if indices.ndim != 1 or not np.issubdtype(indices.dtype, np.integer):
    raise UserError(f"split file {path} must hold a 1-D integer array, not "
                    f"{indices.dtype} {indices.shape}; delete it and draw the splits "
                    "again.")
  indices = indices.astype(np.int64)
  if indices.size and (np.any(np.diff(indices) <= 0) or indices[0] < 0
                       or (num_examples is not None and indices[-1] >= num_examples)):
    raise UserError(f"split file {path} must hold sorted, unique indices in "
                    f"[0, {num_examples if num_examples is not None else 'N'}); "
                    "delete it and draw the splits again.")
  return indices
