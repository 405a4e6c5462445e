r"""Result reports of a trained run, and an independent check of its numbers.

`write_reports` turns the evaluation of a run into files a person reads:
- `results.md`: the protocol (dataset, preset, code length, seed, sizes, selection,
  config hash), a Markdown table of every scalar metric, precision@N, and the metric
  conventions (docs/evaluation.md);
- `pr_curve.png`: mean precision against mean recall over Hamming radii 0..L;
- `precision_at_topn.png`: precision@N against N;
- `retrieval_grid.png`: a few queries, each followed by its top database images
  under the evaluation's ranking (Hamming distance, ties by database index), framed
  green when relevant (a shared label) and red when not.

`verify_results` recomputes every metric of `results.json` that the query and
database codes determine from the saved files alone (codes/*.npy, splits/*.npy, the
dataset labels) with `psch_jax.reference`, the NumPy implementation that shares no
code with `psch_jax.ranking`: a stable `np.argsort` per query and the metric
definitions as written. From the command line it prints each metric beside its recomputed value:

  python -m psch_jax.commands.reports --workdir=workdirs/fmnist

Exit codes: 0 all metrics agree to 1e-6; 1 some do not; 2 bad input (a work directory
without results, codes, splits or config, or a dataset that cannot be opened).
"""
from __future__ import annotations

import re
from typing import Any, NamedTuple

import numpy as np

from psch_jax import io_utils
from psch_jax import ranking
from psch_jax import reference
from psch_jax import generations
from psch_jax import workdir as workdir_lib
from psch_jax.errors import UserError

# results.json fields that describe the run rather than measure it.
PROTOCOL_FIELDS = ("dataset", "protocol", "num_bits", "seed", "num_query",
                   "num_database", "selection", "epochs", "steps", "config_hash",
                   "conventions")
TOLERANCE = 1e-6
EXIT_MISMATCH = 1

_WORD_BITS = 32
_RELEVANT_COLOUR = "#2ca02c"
_IRRELEVANT_COLOUR = "#d62728"
_QUERY_COLOUR = "#1f77b4"


# --------------------------------------------------------------------- ranking

def top_matches(query_packed: Any, database_packed: Any, *, topk: int
                ) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation's ranking for a few queries: Hamming distance, ties by row
  (`ranking.top_k`, the evaluation's ranking pass).

  Args:
    query_packed: uint32 (nq, W) codes from `ranking.pack_codes`.
    database_packed: uint32 (ndb, W) codes from `ranking.pack_codes`.
    topk: how many database rows to return per query (clipped to ndb).

  Returns:
    rows: int64 (nq, min(topk, ndb)) database rows, best first.
    distances: int32 (nq, min(topk, ndb)) their Hamming distances.
  """
  if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
    raise UserError(f"topk must be a positive int, got {topk!r}; e.g. topk=10.")
  # Database rows are in increasing global index (splits are sorted), so ties by row
  # are ties by database index, as the evaluation breaks them.
  return ranking.top_k(query_packed, database_packed, k=int(topk))


def unpack_codes(packed: np.ndarray, num_bits: int) -> np.ndarray:
  """Inverse of `ranking.pack_codes`, written out independently with NumPy.

  Args:
    packed: uint32 (n, ceil(num_bits / 32)); bit i of word w is code bit 32 w + i.
    num_bits: L.

  Returns:
    int8 (n, L) with entries in {-1, +1}.
  """
  packed = np.asarray(packed)
  num_words = -(-num_bits // _WORD_BITS)
  if packed.ndim != 2 or packed.dtype != np.uint32 or packed.shape[1] != num_words:
    raise UserError(f"packed codes must be uint32 (n, {num_words}) for {num_bits} bits, "
                    f"got {packed.dtype}{packed.shape}; the codes belong to another run "
                    "or are damaged: evaluate again with main.py --mode=eval.")
  shifts = np.arange(_WORD_BITS, dtype=np.uint32)
  bits = (packed[:, :, None] >> shifts) & np.uint32(1)
  bits = bits.reshape(packed.shape[0], num_words * _WORD_BITS)[:, :num_bits]
  return np.where(bits == 1, 1, -1).astype(np.int8)


# --------------------------------------------------------------------- figures

def _save_figure(figure: Any, path: str) -> None:
  """Renders a matplotlib Figure to PNG and writes it atomically (local or gs://)."""
  io_utils.save_figure(path, figure, format="png", dpi=100)


def _new_figure(width: float, height: float) -> Any:
  # Imported here: search and verification never draw. An explicit Agg canvas and
  # no pyplot: no global backend switch, no GUI, no figure registry to leak into.
  # pylint: disable=g-import-not-at-top
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  # pylint: enable=g-import-not-at-top
  figure = Figure(figsize=(width, height))
  FigureCanvasAgg(figure)
  return figure


def _describe(results: dict) -> str:
  return (f"{results.get('dataset', '?')}, {results.get('protocol', '?')}, "
          f"{results.get('num_bits', '?')} bits")


def plot_pr_curve(results: dict, path: str) -> None:
  """Mean precision vs mean recall over Hamming radii 0..L (results["pr_curve"])."""
  curve = results["pr_curve"]
  precision = np.asarray(curve["precision"], np.float64)
  recall = np.asarray(curve["recall"], np.float64)
  figure = _new_figure(5.0, 4.2)
  axes = figure.add_subplot()
  axes.plot(recall, precision, marker="o", markersize=3)
  for radius in sorted({0, 2, len(precision) // 2, len(precision) - 1}):
    if radius < len(precision):
      axes.annotate(f"r={radius}", (recall[radius], precision[radius]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
  axes.set(xlabel="recall", ylabel="precision", xlim=(0.0, 1.02), ylim=(0.0, 1.02),
           title=f"Precision-recall, Hamming radius 0..{len(precision) - 1}\n"
                 f"{_describe(results)}")
  axes.title.set_fontsize(9)
  axes.grid(alpha=0.3)
  figure.tight_layout()
  _save_figure(figure, path)


def _topn_items(results: dict) -> list[tuple[int, float]]:
  # JSON turns the int keys of precision@topn into strings.
  return sorted((int(n), _metric(f"precision@topn[{n}]", v))
                for n, v in results["precision@topn"].items())


def _metric(name: str, value: Any) -> float:
  """`value` as a float; UserError unless it is a number (not a string, not a bool)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise UserError(f"{name} is {value!r}, not a number")
  return float(value)


def plot_precision_at_topn(results: dict, path: str) -> None:
  """precision@N against N (results["precision@topn"])."""
  items = _topn_items(results)
  figure = _new_figure(5.0, 4.2)
  axes = figure.add_subplot()
  axes.plot([n for n, _ in items], [v for _, v in items], marker="o", markersize=3)
  axes.set(xlabel="N (top retrieved items)", ylabel="precision@N", ylim=(0.0, 1.02),
           title=f"Precision of the top N\n{_describe(results)}")
  axes.title.set_fontsize(9)
  axes.grid(alpha=0.3)
  figure.tight_layout()
  _save_figure(figure, path)


def _hex_to_rgb(colour: str) -> np.ndarray:
  return np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)], np.uint8)


def plot_retrieval_grid(path: str, *, query_packed: np.ndarray,
                        database_packed: np.ndarray, query_indices: np.ndarray,
                        database_indices: np.ndarray, query_labels: np.ndarray,
                        database_labels: np.ndarray, source: Any,
                        num_queries: int = 8, topk: int = 10) -> None:
  """Queries, each followed by its top `topk` database images.

  The queries are `num_queries` rows spread evenly over the query set; each is
  framed blue, its matches green when they share a label with it and red otherwise,
  with rank and Hamming distance above. Grey datasets are drawn in grey.

  Args:
    path: the PNG to write.
    query_packed, database_packed: uint32 (n, W) packed codes, rows aligned with the
      index and label arrays.
    query_indices, database_indices: int (n,) global indices for `source.read`.
    query_labels, database_labels: uint8 (n, num_labels) multi-hot.
    source: an `ImageSource` (`read(indices)` -> uint8 (n, H, W, C)).
    num_queries: rows of the grid.
    topk: database images per row.
  """
  num_queries = min(num_queries, len(query_indices))
  chosen = np.unique(np.linspace(0, len(query_indices) - 1, num_queries).round()
                     ).astype(np.int64)
  rows, distances = top_matches(query_packed[chosen], database_packed, topk=topk)
  images = np.concatenate([
      source.read(np.asarray(query_indices)[chosen])[:, None],
      source.read(np.asarray(database_indices)[rows.reshape(-1)]).reshape(
          rows.shape + tuple(source.image_shape))], axis=1)  # (q, 1 + k, H, W, C)
  if images.shape[-1] == 1:
    images = np.repeat(images, 3, axis=-1)  # grey stays grey beside coloured frames
  relevant = np.any((query_labels[chosen][:, None, :] != 0)
                    & (database_labels[rows] != 0), axis=-1)
  frames = np.where(relevant[..., None], _hex_to_rgb(_RELEVANT_COLOUR),
                    _hex_to_rgb(_IRRELEVANT_COLOUR))
  frames = np.concatenate([np.broadcast_to(_hex_to_rgb(_QUERY_COLOUR),
                                           (len(chosen), 1, 3)), frames], axis=1)
  # One mosaic image and one imshow: a subplot per thumbnail takes seconds to lay
  # out, this takes milliseconds. Each cell: a caption strip, then the framed image.
  height, width = images.shape[2:4]
  border = max(2, height // 12)
  gap = max(2, height // 8)
  caption = max(8, height // 3)
  cell_h, cell_w = caption + height + 2 * border + gap, width + 2 * border + gap
  num_rows, num_columns = images.shape[:2]
  mosaic = np.full((num_rows * cell_h, num_columns * cell_w, 3), 255, np.uint8)
  captions = []
  for line in range(num_rows):
    for column in range(num_columns):
      top, left = line * cell_h + caption, column * cell_w
      mosaic[top:top + height + 2 * border, left:left + width + 2 * border] = (
          frames[line, column])
      mosaic[top + border:top + border + height,
             left + border:left + border + width] = images[line, column]
      text = (f"query {int(query_indices[chosen[line]])}" if column == 0 else
              f"#{column} d={int(distances[line, column - 1])}")
      captions.append((left + border + width / 2, top - caption / 2, text))
  inches_per_cell = 1.0
  title_inches = 0.35
  figure = _new_figure(num_columns * inches_per_cell,
                       num_rows * inches_per_cell * cell_h / cell_w + title_inches)
  top_fraction = 1 - title_inches / figure.get_figheight()
  axes = figure.add_axes((0.0, 0.0, 1.0, top_fraction))
  axes.imshow(mosaic, interpolation="nearest", aspect="auto")
  axes.set_axis_off()
  for x, y, text in captions:
    axes.text(x, y, text, ha="center", va="center", fontsize=7)
  figure.suptitle("Top matches by Hamming distance (ties by database index); "
                  "green: shares a label, red: does not", fontsize=8,
                  y=1 - 0.5 * title_inches / figure.get_figheight(), va="center")
  _save_figure(figure, path)


# --------------------------------------------------------------------- markdown

def _format_value(value: Any) -> str:
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def _natural_key(name: str) -> list:
  """Sort key that puts map@5 before map@1000."""
  return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _scalar_metrics(results: dict) -> dict[str, float]:
  return {k: results[k] for k in sorted(results, key=_natural_key)
          if k not in PROTOCOL_FIELDS and isinstance(results[k], (int, float))
          and not isinstance(results[k], bool)}


def _conventions(results: dict) -> str:
  return str(results.get("conventions", ranking.METRIC_CONVENTIONS))


def results_markdown(results: dict) -> str:
  """The text of results.md: protocol, every scalar metric, precision@N, conventions."""
  lines = [f"# Retrieval results: {_describe(results)}", "",
           "| field | value |", "|---|---|"]
  for field in PROTOCOL_FIELDS:
    if field in results and field != "conventions":
      lines.append(f"| {field} | {_format_value(results[field])} |")
  lines += ["", "| metric | value |", "|---|---|"]
  for name, value in _scalar_metrics(results).items():
    lines.append(f"| {name} | {_format_value(value)} |")
  if "precision@topn" in results:
    items = _topn_items(results)
    lines += ["", "| N | " + " | ".join(str(n) for n, _ in items) + " |",
              "|---|" + "---|" * len(items),
              "| precision@N | " + " | ".join(f"{v:.4f}" for _, v in items) + " |"]
  lines += ["", f"Conventions: {_conventions(results)}", "",
            "![precision-recall](pr_curve.png) "
            "![precision@N](precision_at_topn.png)", "",
            "![top matches](retrieval_grid.png)", ""]
  return "\n".join(lines)


def write_reports(workdir: str, *, results: dict, codes: dict[str, np.ndarray],
                  query_indices: np.ndarray, database_indices: np.ndarray,
                  query_labels: np.ndarray, database_labels: np.ndarray, source: Any,
                  grid_queries: int = 8, grid_topk: int = 10) -> list[str]:
  """Writes results.md and the three figures into `workdir`, each atomically.

  Args:
    workdir: the run's work directory.
    results: `ranking.retrieval_metrics(..., curves=True)` plus the protocol
      fields (dataset, protocol, num_bits, seed, num_query, num_database, selection;
      optionally config_hash, conventions, epochs, steps).
    codes: {"query": int8 (nq, L), "database": int8 (ndb, L)} +-1 codes (Eq. 12).
    query_indices, database_indices: int (nq,), (ndb,) global indices, aligned with
      the code rows.
    query_labels, database_labels: uint8 multi-hot rows aligned with the codes.
    source: the dataset's `ImageSource`, for the grid's images.
    grid_queries, grid_topk: size of the retrieval grid.

  Returns:
    The paths written.
  """
  for key in ("pr_curve", "precision@topn"):
    if key not in results:
      raise UserError(f"results has no {key!r}: compute them with "
                      "ranking.retrieval_metrics(..., curves=True).")
  query_packed = np.asarray(ranking.pack_codes(codes["query"]))
  database_packed = np.asarray(ranking.pack_codes(codes["database"]))
  if (len(query_indices) != len(query_packed)
      or len(database_indices) != len(database_packed)):
    raise UserError(f"{len(query_packed)} query / {len(database_packed)} database codes "
                    f"but {len(query_indices)} / {len(database_indices)} indices; pass "
                    "the index sets the codes were computed from.")
  paths = {name: io_utils.join(workdir, name) for name in
           (workdir_lib.RESULTS_REPORT, workdir_lib.PR_PLOT, workdir_lib.TOPN_PLOT,
            workdir_lib.GRID_PLOT)}
  io_utils.write_text(paths[workdir_lib.RESULTS_REPORT], results_markdown(results))
  plot_pr_curve(results, paths[workdir_lib.PR_PLOT])
  plot_precision_at_topn(results, paths[workdir_lib.TOPN_PLOT])
  plot_retrieval_grid(
      paths[workdir_lib.GRID_PLOT], query_packed=query_packed,
      database_packed=database_packed, query_indices=np.asarray(query_indices),
      database_indices=np.asarray(database_indices),
      query_labels=np.asarray(query_labels), database_labels=np.asarray(database_labels),
      source=source, num_queries=grid_queries, topk=grid_topk)
  return list(paths.values())


# ------------------------------------------------------- independent check

def flatten_results(results: dict) -> dict[str, float]:
  """The metrics of results.json that the query and database codes determine, in the
  flat names of `reference.retrieval_metrics` (validation metrics and run fields are
  left out)."""
  flat = {}
  for name, value in results.items():
    if re.fullmatch(r"map@(\d+|all|all_tie_aware)|precision@radius\d+", name):
      flat[name] = _metric(name, value)
  if "precision@topn" in results:
    for n, value in _topn_items(results):
      flat[f"precision@top{n}"] = value
  if "pr_curve" in results:
    curve = results["pr_curve"]
    for r, p, rec in zip(curve["radius"], curve["precision"], curve["recall"]):
      r = int(_metric("pr_curve radius", r))
      flat[f"pr_precision@radius{r}"] = _metric(f"pr_curve precision@radius{r}", p)
      flat[f"pr_recall@radius{r}"] = _metric(f"pr_curve recall@radius{r}", rec)
  return flat


class MetricCheck(NamedTuple):
  """One metric of results.json beside its recomputed value."""
  name: str
  saved: float
  recomputed: float

  @property
  def agrees(self) -> bool:
    return abs(self.saved - self.recomputed) <= TOLERANCE


class ResultsMismatchError(RuntimeError):
  """results.json disagrees with the metrics recomputed from the saved codes."""


def load_npy(path: str, what: str) -> np.ndarray:
  if not io_utils.isfile(path):
    raise UserError(f"{path} is missing: {what}. Point --workdir at a finished run, or "
                    "run main.py --mode=eval on it to write the codes and results.")
  try:
    return io_utils.load_npy(path)
  except (ValueError, EOFError) + io_utils.io_errors() as e:
    raise UserError(f"cannot read {path} ({e}); run main.py --mode=eval on the work "
                    "directory to write it again.") from e


def compare_results(workdir: str, source: Any) -> list[MetricCheck]:
  """Each recomputable metric of workdir/results.json beside its NumPy recomputation.

  The generation is verified first (`generations.read_verified`): results.json, the
  codes, config.json, the splits and the newest checkpoint must belong together.

  Args:
    workdir: a finished run: results.json and the codes of its generation,
      splits/{query,database}.npy (global indices).
    source: the dataset's `ImageSource` (only its labels are read).

  Returns:
    One `MetricCheck` per metric, in name order.
  """
  workdir_lib.check_kind(workdir, (workdir_lib.RUN,), command="reports", reads=True)
  results = generations.read_verified(workdir)
  path = io_utils.join(workdir, workdir_lib.RESULTS_FILE)
  fix = "evaluate again with main.py --mode=eval to rewrite it."
  try:
    saved = flatten_results(results)
  except UserError as e:
    raise UserError(f"{path}: {e}; {fix}") from None
  except (TypeError, ValueError, AttributeError, KeyError) as e:
    # pr_curve or precision@topn of another shape than the evaluation writes.
    raise UserError(f"{path} holds curves of an unexpected form ({type(e).__name__}: "
                    f"{e}); {fix}") from e
  num_bits = results.get("num_bits")
  if not saved or isinstance(num_bits, bool) or not isinstance(num_bits, int):
    raise UserError(f"{workdir}/results.json holds no retrieval metrics or no "
                    "num_bits; evaluate again with main.py --mode=eval.")
  codes, labels = {}, {}
  for split in ("query", "database"):
    indices = load_npy(io_utils.join(workdir, workdir_lib.SPLITS_DIR, f"{split}.npy"),
                        f"the {split} split")
    packed = load_npy(generations.path(workdir, results,
                                       f"{workdir_lib.CODES_DIR}/{split}.npy"),
                      f"the packed {split} codes")
    if len(packed) != len(indices) or (indices.size and indices.max() >= len(source)):
      raise UserError(f"{workdir}: {len(packed)} {split} codes for {len(indices)} "
                      f"{split} indices (dataset size {len(source)}); the codes, splits "
                      "or dataset belong to different runs. Evaluate again with "
                      "main.py --mode=eval.")
    codes[split] = unpack_codes(packed, int(results["num_bits"]))
    labels[split] = source.labels[indices]
  topk = sorted(int(m.group(1)) for m in
                (re.fullmatch(r"map@(\d+)", name) for name in saved) if m)
  topn = sorted(int(name[len("precision@top"):]) for name in saved
                if name.startswith("precision@top"))
  radii = [int(name[len("precision@radius"):]) for name in saved
           if name.startswith("precision@radius")]
  recomputed = reference.retrieval_metrics(
      codes["query"], labels["query"], codes["database"], labels["database"],
      topk=topk, topn=topn, radius=radii[0] if radii else None)
  return [MetricCheck(name, saved[name], recomputed[name])
          for name in sorted(saved, key=_natural_key)]


def verify_results(workdir: str, source: Any) -> list[MetricCheck]:
  """`compare_results`, raising `ResultsMismatchError` unless all agree to 1e-6."""
  checks = compare_results(workdir, source)
  bad = [c for c in checks if not c.agrees]
  if bad:
    listing = ", ".join(f"{c.name}: saved {c.saved:.6f} vs recomputed "
                        f"{c.recomputed:.6f}" for c in bad)
    raise ResultsMismatchError(
        f"{workdir}/results.json disagrees with the saved codes on {len(bad)} "
        f"metric(s) ({listing}). The file was edited or comes from another "
        "evaluation: run main.py --mode=eval on the work directory to rewrite it.")
  return checks


# --------------------------------------------------------------- reading a run

def load_run_source(workdir: str) -> Any:
  """The dataset of a run, opened as its workdir/config.json says."""
  from psch_jax.data import sources  # pylint: disable=g-import-not-at-top
  path = io_utils.join(workdir, workdir_lib.CONFIG_FILE)
  config = io_utils.read_json(
      path, missing_fix=("it is written by training (main.py). Point --workdir at a "
                         "run trained with this version."),
      corrupt_fix="train again in a new --workdir.")
  data = config.get("data") if isinstance(config, dict) else None
  if not isinstance(data, dict) or "name" not in data:
    raise UserError(f"{path} has no data section with a dataset name; train again in "
                    "a new --workdir.")
  return sources.load_source(data["name"], data_dir=data.get("data_dir"),
                             manual_dir=data.get("manual_dir"))


def print_comparison(workdir: str) -> int:
  """Prints each metric of workdir/results.json beside its recomputation (the
  command line); returns the exit code: 0 if all agree, `EXIT_MISMATCH` if not.

  Raises:
    UserError: the work directory lacks results, codes, splits or config, or its
      dataset cannot be opened.
  """
  workdir_lib.check_kind(workdir, (workdir_lib.RUN,), command="reports", reads=True)
  checks = compare_results(workdir, load_run_source(workdir))
  width = max(len(c.name) for c in checks)
  print(f"{'metric':<{width}}  {'results.json':>12}  {'recomputed':>12}  "
        f"{'difference':>10}")
  for c in checks:
    print(f"{c.name:<{width}}  {c.saved:12.6f}  {c.recomputed:12.6f}  "
          f"{abs(c.saved - c.recomputed):10.2e}{'' if c.agrees else '  MISMATCH'}")
  mismatches = sum(not c.agrees for c in checks)
  if mismatches:
    print(f"{mismatches} of {len(checks)} metrics differ by more than {TOLERANCE}.")
    return EXIT_MISMATCH
  print(f"all {len(checks)} metrics agree to {TOLERANCE}.")
  return 0
