r"""The results table: PSCH, its ablations, the deep peers and the classical
baselines, over code lengths and seeds.

  python -m psch_jax.commands.experiments --config=configs/fashion_mnist.py \
      --bits=16,32,64 --seeds=0,1,2 --workdir=experiments/fashion_mnist \
      [--methods=psch,no_lq,itq] [--epochs_ablation=10] [--ablation_bits=32] \
      [--config.train.num_epochs=20]

For every bit length x seed it runs each method of `--methods` (default: all of
`METHODS`): PSCH as the config says, the ablations of docs/method.md (the config
with one override each: the paper's six, and the two tuned choices undone; plus
"psch_short", PSCH itself on the ablations' schedule, their reference;
`--epochs_ablation` gives them a shorter schedule and `--ablation_bits` fewer code
lengths, both stated in the table), the deep peers of `psch_jax.methods` (SSDH,
GreedyHash, BiHalf, CIBHash: the config with `method.name` set, so the same network,
data, splits, augmentation, schedule and evaluation as PSCH), and the
baselines of `psch_jax.baselines` on the raw pixels in [0, 1] of the same training
split (fitted on the train split, encoding query and database). The splits of a seed
come from `run_setup.load_data`, exactly as the PSCH runs of that seed draw them, and the
harness checks that they agree.

Work directory:
  <workdir>/kind.json  "experiments": main.py and the other commands refuse the
      directory, and this command takes its lock.
  <workdir>/runs/<method>/<bits>bits_seed<seed>/  one run each (a PSCH run is a
      `train.train_and_evaluate` work directory; a baseline run holds config.json and
      one generation of results.json and codes/). A run whose results.json is verified
      (`generations.read_verified`) is finished and skipped on a rerun; a killed PSCH
      run resumes from its checkpoint. A run made with another config is refused
      (UserError) rather than mixed into the table.
  <workdir>/seed<seed>/splits/  the index sets of each seed, checked against the
      config's draw on every rerun.
  <workdir>/results.md, results.json, results.png  the table (rows methods, columns
      bit lengths, "mAP@all mean ± std / mAP@K mean ± std" over seeds), every per-run
      number, and a grouped bar plot of mAP@all; a new generation after every run.
  <workdir>/jax_cache/  XLA's persistent compilation cache (the command line only,
      --compilation_cache_dir): runs that differ only in seed reuse the compiled
      programs, which on a CPU take longer than a tiny run's training.

One process: the harness is not written for multi-host runs.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from psch_jax import baselines
from psch_jax import config_schema
from psch_jax import generations
from psch_jax import io_utils
from psch_jax import ranking
from psch_jax import run_setup
from psch_jax import train
from psch_jax import workdir as workdir_lib
from psch_jax.data import splits as splits_lib
from psch_jax.evaluators import retrieval
from psch_jax.errors import UserError
from psch_jax.table_rows import ABLATIONS, METHODS


_ENCODE_CHUNK = 8192


# ------------------------------------------------------------------------ configs

def method_config(config: ml_collections.ConfigDict, method: str, *, num_bits: int,
                  seed: int, ablation_epochs: int | None = None
                  ) -> ml_collections.ConfigDict:
  """The config of one run: a copy of `config` with the bit length, the seed, the
  method's overrides and, for ablations, `ablation_epochs` (None keeps the config's)."""
  run_config = config.copy_and_resolve_references()
  run_config.model.num_bits = int(num_bits)
  run_config.seed = int(seed)
  run_config.update_from_flattened_dict(dict(METHODS[method].overrides))
  if method in ABLATIONS and ablation_epochs is not None:
    run_config.train.num_epochs = int(ablation_epochs)
  return run_config


def _baseline_record(config: ml_collections.ConfigDict, method: str) -> dict:
  """What a baseline run depends on: its config.json, compared on reruns."""
  return {"method": method, "num_bits": config.model.num_bits, "seed": config.seed,
          "data": config.data.to_dict(), "eval": config.eval.to_dict(),
          "features": "pixels in [0, 1]"}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(value, dict):
    flat = {}
    for k, v in value.items():
      flat.update(_flatten(v, f"{prefix}{k}."))
    return flat
  return {prefix[:-1]: value}


def _check_same_config(run_dir: str, expected: dict) -> None:
  """Refuses a run directory whose config.json differs from `expected`."""
  path = io_utils.join(run_dir, workdir_lib.CONFIG_FILE)
  if not io_utils.exists(path):
    return
  saved = _flatten(_read_json(path))
  wanted = _flatten(json.loads(json.dumps(expected)))
  unread = config_schema.other_methods_fields(wanted.get("method.name", "psch"))
  changed = sorted(k for k in saved.keys() | wanted.keys()
                   if saved.get(k, "<absent>") != wanted.get(k, "<absent>")
                   and not k.startswith(unread))
  if changed:
    details = ", ".join(f"{k}: {saved.get(k, '<absent>')!r} there, "
                        f"{wanted.get(k, '<absent>')!r} now" for k in changed[:5])
    data = any(k.startswith("data.") or k == "seed" for k in changed)
    raise UserError(f"{run_dir} was made with a different config ({details}); rerun "
                    "with the options it was made with, pass a new --workdir, or "
                    "delete that run directory to redo it"
                    + (" and, as a data field changed, the seed<seed>/ directories "
                       "of the splits drawn with the old value." if data else "."))


# --------------------------------------------------------------------------- runs

def _run_name(method: str, num_bits: int, seed: int) -> str:
  """The run directory of one method x bits x seed, relative to the workdir."""
  return io_utils.join("runs", method, f"{num_bits}bits_seed{seed}")


def _run_dir(workdir: str, method: str, num_bits: int, seed: int) -> str:
  return io_utils.join(workdir, _run_name(method, num_bits, seed))


def _read_json(path: str) -> dict:
  """The JSON object a run directory's config.json or results.json holds.

  Raises:
    UserError: the file is truncated, not JSON or not an object (a run killed while
      an older version wrote it, or an edit), naming it and the fix.
  """
  fix = (f"delete its run directory {os.path.dirname(path)} to redo that run (the "
         "other runs are kept).")
  value = io_utils.read_json(path, missing_fix=fix, corrupt_fix=fix)
  if not isinstance(value, dict):
    raise UserError(f"{path} holds a {type(value).__name__}, not a JSON object; {fix}")
  return value


def _finished_results(run_dir: str) -> dict:
  """The results of a finished run, verified to belong to its config, splits and
  checkpoint (`generations.read_verified`).

  Raises:
    UserError: they do not, naming the run directory to delete to redo it.
  """
  return generations.read_verified(
      run_dir, fix=f"delete its run directory {run_dir} to redo that run (the other "
      "runs are kept).")


def _encode_source(params: baselines.HashParams, source, indices: np.ndarray
                   ) -> np.ndarray:
  """int8 (n, L) codes of `source[indices]`, read and encoded a chunk at a time."""
  return np.concatenate([
      baselines.encode(params, baselines.pixel_features(
          source.read(indices[start:start + _ENCODE_CHUNK])))
      for start in range(0, len(indices), _ENCODE_CHUNK)])


def run_baseline(config: ml_collections.ConfigDict, method: str, source,
                 index_sets: dict[str, np.ndarray], run_dir: str) -> dict:
  """Fits one baseline on the train split's pixels and scores query vs database
  (and the validation split, "validation/" metrics).

  Args:
    config: the run's config (model.num_bits, seed, data, eval.topk are read).
    method: a baseline of `METHODS`.
    source: the dataset's `ImageSource`.
    index_sets: {"query", "database", "train", ...} global indices.
    run_dir: where config.json, results.json and codes/ go.

  Returns:
    The results (the keys of a PSCH run's results.json, plus "method", "fit_seconds", "num_train").
  """
  num_bits, seed = config.model.num_bits, config.seed
  # One key stream per (seed, method), independent of the order runs are made in.
  key = jax.random.fold_in(jax.random.key(seed),
                          zlib.crc32(method.encode()) & 0x7FFFFFFF)
  start = time.perf_counter()
  train_features = baselines.pixel_features(source.read(index_sets["train"]))
  params = baselines.FIT[method](key, train_features, num_bits)
  codes = {name: _encode_source(params, source, index_sets[name])
           for name in ("query", "database")}
  fit_seconds = time.perf_counter() - start
  query, database = index_sets["query"], index_sets["database"]
  metrics = retrieval.score_codes(
      config, codes["query"], source.labels[query], codes["database"],
      source.labels[database], curves=False)
  # The validation split PSCH is tuned on, from the database codes (it lies inside
  # the database), so baselines can be compared there too.
  metrics.update(retrieval.from_config(
      config, encode=None, source=source, index_sets=index_sets, mesh=None
  )["validation"].run(None, codes_at_hand=(database, codes["database"]))[0])
  results = {"dataset": config.data.name, "protocol": config.data.preset,
             "num_bits": num_bits, "seed": seed, "method": method,
             "num_query": int(len(query)), "num_database": int(len(database)),
             "num_train": int(len(index_sets["train"])), "epochs": 0,
             "selection": "closed form (no epochs)",
             "fit_seconds": round(fit_seconds, 3), **metrics}
  record = _baseline_record(config, method)
  workdir_lib.write_kind(run_dir, workdir_lib.BASELINE)
  io_utils.write_json(io_utils.join(run_dir, workdir_lib.CONFIG_FILE), record)

  def write_files(directory: str) -> None:
    for name, value in codes.items():
      io_utils.save_npy(io_utils.join(directory, workdir_lib.CODES_DIR, f"{name}.npy"),
                        ranking.pack_codes(value))

  return generations.commit(run_dir, results, config=record, step=None,
                            write_files=write_files, splits=False)


def _same_splits(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  return all(np.array_equal(a[name], b[name]) for name in splits_lib.SPLIT_NAMES)


def run_experiments(config: ml_collections.ConfigDict, *, workdir: str,
                    bits: Sequence[int], seeds: Sequence[int],
                    methods: Sequence[str] = tuple(METHODS),
                    ablation_epochs: int | None = None,
                    ablation_bits: Sequence[int] | None = None,
                    command: str = "") -> dict:
  """Runs (or reuses) every method x bits x seed and writes the table.

  Args:
    config: the PSCH config; runs override model.num_bits, seed and each method's
      fields on copies of it.
    workdir: the experiment directory (layout in the module docstring).
    bits: code lengths, positive ints.
    seeds: seeds, ints >= 0; each draws its own splits.
    methods: names from `METHODS`, in row order.
    ablation_epochs: train.num_epochs of the ablations (None: the config's).
    ablation_bits: the code lengths, among `bits`, the ablations run at (None: all).
    command: the command line, quoted in results.md.

  Returns:
    The content of results.json: {"runs": [per-run results], "summary": ...}.
  """
  bits, seeds, methods = _check_arguments(bits, seeds, methods, ablation_epochs)
  ablation_bits = _check_ablation_bits(ablation_bits, bits)
  workdir = os.fspath(io_utils.workdir_path(workdir))  # absolute; gs:// kept
  baseline_methods = [m for m in methods if METHODS[m].baseline]
  trained_methods = [m for m in methods if not METHODS[m].baseline]
  # Baselines first: seconds each, so the table has its reference rows early.
  plan = ([(m, b, s) for s in seeds for b in bits for m in baseline_methods]
          + [(m, b, s) for m in trained_methods for b in bits for s in seeds
             if m not in ABLATIONS or b in ablation_bits])
  seed_data: dict[int, tuple[Any, dict]] = {}

  def data_of(seed: int):
    """(source, index sets) of a seed, drawn as train.train_and_evaluate draws them;
    the seed's saved splits must be that draw (`run_setup.load_data`)."""
    if seed not in seed_data:
      seed_config = method_config(config, "psch", num_bits=bits[0], seed=seed)
      source, index_sets, saved = run_setup.load_data(
          seed_config, io_utils.join(workdir, f"seed{seed}"))
      seed_data[seed] = source, index_sets, saved
    return seed_data[seed][:2]

  # Refuse a bad config, another kind of directory or a mismatched run before
  # anything is trained or written.
  workdir_lib.check_unclaimed(workdir, None, kinds=(workdir_lib.EXPERIMENTS,),
                              command="experiments")
  run_configs = {}
  for method, num_bits, seed in plan:
    run_config = method_config(config, method, num_bits=num_bits, seed=seed,
                               ablation_epochs=ablation_epochs)
    if not METHODS[method].baseline:
      config_schema.check_config(run_config, num_devices=len(jax.devices()))
    _check_same_config(_run_dir(workdir, method, num_bits, seed),
                       _baseline_record(run_config, method)
                       if METHODS[method].baseline else run_config.to_dict())
    run_configs[method, num_bits, seed] = run_config
  for seed in seeds:
    data_of(seed)  # the saved splits of each seed checked before anything is written

  with workdir_lib.claim(workdir, None, kinds=(workdir_lib.EXPERIMENTS,),
                         command="experiments"):
    workdir_lib.write_kind(workdir, workdir_lib.EXPERIMENTS)
    for seed in seeds:
      _, index_sets, saved = seed_data[seed]
      if not saved:
        run_setup.save_splits(io_utils.join(workdir, f"seed{seed}"), index_sets)
    return _run_plan(config, plan, run_configs, data_of, workdir=workdir, bits=bits,
                     seeds=seeds, methods=methods, ablation_epochs=ablation_epochs,
                     ablation_bits=ablation_bits, command=command)


def _run_plan(config, plan, run_configs, data_of, *, workdir: str, bits, seeds,
              methods, ablation_epochs, ablation_bits, command: str) -> dict:
  """Runs (or reuses) each run of `plan` in order, rewriting the table after each."""
  runs = []
  for number, (method, num_bits, seed) in enumerate(plan, 1):
    run_config = run_configs[method, num_bits, seed]
    run_dir = _run_dir(workdir, method, num_bits, seed)
    results_path = io_utils.join(run_dir, workdir_lib.RESULTS_FILE)
    start = time.perf_counter()
    finished = io_utils.exists(results_path)
    if finished:
      results = _finished_results(run_dir)
      if not isinstance(results.get("map@all"), (int, float)):
        raise UserError(f"{results_path} holds no number map@all; delete its run "
                        f"directory {run_dir} to redo that run (the other runs are "
                        "kept).")
    elif METHODS[method].baseline:
      source, index_sets = data_of(seed)
      results = run_baseline(run_config, method, source, index_sets, run_dir)
    else:
      results = train.train_and_evaluate(run_config, run_dir)
    if not METHODS[method].baseline:
      run_splits = splits_lib.load_splits(
          io_utils.join(run_dir, workdir_lib.SPLITS_DIR))
      if not _same_splits(run_splits, data_of(seed)[1]):
        raise UserError(f"{run_dir}/splits differ from {workdir}/seed{seed}/splits: "
                        "the run was made with other data options; use a new "
                        "--workdir.")
      results = {**results, "method": method,
                 "num_train": int(len(run_splits["train"]))}
    runs.append({**results, "run_dir": _run_name(method, num_bits, seed)})
    status = "done earlier" if finished else f"{time.perf_counter() - start:.0f} s"
    print(f"[{number}/{len(plan)}] {method} {num_bits} bits seed {seed}: "
          f"mAP@all {results['map@all']:.4f} ({status})", flush=True)
    report = write_report(config, runs, workdir=workdir, bits=bits, seeds=seeds,
                          methods=methods, ablation_epochs=ablation_epochs,
                          ablation_bits=ablation_bits, command=command)
  return report


def _check_arguments(bits, seeds, methods, ablation_epochs
                     ) -> tuple[list[int], list[int], list[str]]:
  def ints(values, name: str, minimum: int) -> list[int]:
    try:
      parsed = [int(v) for v in values]
    except (TypeError, ValueError):
      parsed = []
    if not parsed or any(v < minimum for v in parsed) or len(set(parsed)) != len(parsed):
      raise UserError(f"--{name}={','.join(map(str, values))} must be distinct ints >= "
                      f"{minimum}, comma-separated, e.g. --{name}=16,32,64.")
    return parsed

  unknown = [m for m in methods if m not in METHODS]
  if not methods or unknown or len(set(methods)) != len(methods):
    raise UserError(f"--methods must name distinct methods of {list(METHODS)}; got "
                    f"{list(methods)}.")
  if ablation_epochs is not None and (isinstance(ablation_epochs, bool)
                                      or int(ablation_epochs) < 1):
    raise UserError(f"--epochs_ablation={ablation_epochs} must be >= 1 (or left out "
                    "to train ablations as long as PSCH).")
  return ints(bits, "bits", 1), ints(seeds, "seeds", 0), list(methods)


def _check_ablation_bits(ablation_bits, bits: list[int]) -> list[int]:
  if ablation_bits is None:
    return list(bits)
  try:
    parsed = [int(v) for v in ablation_bits]
  except (TypeError, ValueError):
    parsed = []
  if not parsed or any(b not in bits for b in parsed) or len(set(parsed)) != len(parsed):
    raise UserError(f"--ablation_bits={','.join(map(str, ablation_bits))} must be "
                    f"distinct code lengths among --bits={','.join(map(str, bits))}, "
                    "e.g. --ablation_bits=32.")
  return [b for b in bits if b in parsed]


# ------------------------------------------------------------------------ report

def _statistics(values: Sequence[float]) -> dict:
  """mean and sample standard deviation (n - 1; None for one value)."""
  values = np.asarray(values, np.float64)
  std = float(np.std(values, ddof=1)) if len(values) > 1 else None
  return {"mean": float(np.mean(values)), "std": std, "n": int(len(values)),
          "values": values.tolist()}


def summarise(runs: Sequence[dict], *, metrics: Sequence[str]) -> dict:
  """{method: {str(bits): {metric: {"mean", "std", "n", "values", "seeds"}}}} over seeds."""
  summary: dict = {}
  for run in runs:
    cell = summary.setdefault(run["method"], {}).setdefault(str(run["num_bits"]), {})
    cell.setdefault("seeds", []).append(run["seed"])
    for metric in metrics:
      cell.setdefault(metric, []).append(run[metric])
  for per_bits in summary.values():
    for cell in per_bits.values():
      for metric in metrics:
        cell[metric] = _statistics(cell[metric])
  return summary


def format_statistic(statistic: dict) -> str:
  """"0.455 ± 0.003", or "0.455" for a single seed."""
  if statistic["std"] is None:
    return f"{statistic['mean']:.3f}"
  return f"{statistic['mean']:.3f} ± {statistic['std']:.3f}"


def _epochs_line(config, methods: Sequence[str], ablation_epochs: int | None,
                 ablation_bits: Sequence[int], bits: Sequence[int]) -> str:
  parts = []
  if "psch" in methods:
    parts.append(f"PSCH trains {config.train.num_epochs} epochs and is scored at the "
                 "last epoch (no model selection on the queries)")
  ablations = [m for m in methods if m in ABLATIONS]
  if ablations:
    epochs = config.train.num_epochs if ablation_epochs is None else ablation_epochs
    line = f"the ablations train {epochs} epoch{'' if epochs == 1 else 's'}"
    if list(ablation_bits) != list(bits):
      line += f" at {', '.join(map(str, ablation_bits))} bits only (--ablation_bits)"
    if epochs < config.train.num_epochs:
      line += (f", a shorter schedule than PSCH's {config.train.num_epochs}: compare the "
               "ablations with one another and with the reference row (PSCH on their "
               "schedule), not with the PSCH row")
    parts.append(line)
  peers = [m for m in methods if METHODS[m].peer]
  if peers:
    parts.append(
        f"the deep peers ({', '.join(METHODS[m].label for m in peers)}) train "
        f"{config.train.num_epochs} epochs with PSCH's network, optimizer, schedule and "
        "augmentation and are scored at the last epoch; their own settings: "
        + "; ".join(f"{METHODS[m].label} " + ", ".join(
            f"{k}={v}" for k, v in sorted(config.method[m].to_dict().items()))
                    for m in peers))
  if any(METHODS[m].baseline for m in methods):
    parts.append("the baselines are fitted in closed form (ITQ: "
                 f"{baselines.DEFAULT_ITQ_ITERATIONS} iterations) on the raw pixels in "
                 "[0, 1] of each seed's training split")
  return "Training: " + "; ".join(parts) + "."


def results_markdown(config, summary: dict, runs: Sequence[dict], *,
                     bits: Sequence[int], seeds: Sequence[int], methods: Sequence[str],
                     ablation_epochs: int | None, ablation_bits: Sequence[int],
                     command: str) -> str:
  """The results.md text: protocol, the table, schedules and conventions."""
  k = config.eval.topk[0]
  sizes = runs[0] if runs else {}
  lines = [f"# Retrieval results: {config.data.name}, protocol \"{config.data.preset}\"",
           ""]
  if sizes:
    lines.append(f"{sizes['num_query']:,} queries, {sizes['num_database']:,} database "
                 f"images, {sizes['num_train']:,} training images per seed.")
  lines += [
      f"Each cell: mAP@all mean ± std / mAP@{k} mean ± std over {len(seeds)} seed(s) "
      f"({', '.join(map(str, seeds))}); std is the sample standard deviation (n - 1), "
      "left out for one seed; \"—\" marks a run not made yet, \"·\" one not asked "
      "for (--ablation_bits). Each seed draws its own "
      "query / database / train splits, initialisation and batch order, and all "
      "methods of a seed share its splits.", "",
      "| method | " + " | ".join(f"{b} bits" for b in bits) + " |",
      "|---|" + "---|" * len(bits)]
  for method in methods:
    cells = []
    for b in bits:
      cell = summary.get(method, {}).get(str(b))
      if cell is None and method in ABLATIONS and b not in ablation_bits:
        cells.append("·")
        continue
      cells.append("—" if cell is None else
                   f"{format_statistic(cell['map@all'])} / "
                   f"{format_statistic(cell[f'map@{k}'])}"
                   + ("" if cell["map@all"]["n"] == len(seeds)
                      else f" (n = {cell['map@all']['n']})"))
    lines.append(f"| {METHODS[method].label} | " + " | ".join(cells) + " |")
  lines += [
      "", _epochs_line(config, methods, ablation_epochs, ablation_bits, bits), "",
      "Evaluation (docs/evaluation.md): the database is ranked by Hamming distance to "
      "each query, ties broken by database index; an item is relevant when it shares a "
      f"label with the query. AP@K (K = {k} or the whole database) is the mean of "
      "precision@k over the ranks k <= K of the relevant items in the top K; a query "
      "without a relevant item there counts as 0, and mAP is the mean over all queries.",
      "", "Ablations (docs/method.md): " + "; ".join(
          f"{METHODS[m].label}: " + ", ".join(f"{f}={v}" for f, v in METHODS[m].overrides)
          for m in ABLATIONS if METHODS[m].overrides) + ".",
      "", "Every per-run number is in results.json; each run's directory is "
      "runs/<method>/<bits>bits_seed<seed>/."]
  if command:
    lines += ["", f"Command: `{command}`"]
  return "\n".join(lines) + "\n"


def _plot(summary: dict, path: str, *, bits: Sequence[int], methods: Sequence[str],
          title: str) -> None:
  """Grouped bars of mean mAP@all per bit length (one bar per method), std whiskers."""
  import matplotlib
  from matplotlib.figure import Figure  # no pyplot: no global backend state

  figure = Figure(figsize=(max(6.0, 3.0 + 0.3 * len(bits) * len(methods)), 4.0))
  axes = figure.subplots()
  width = 0.8 / max(len(methods), 1)
  positions = np.arange(len(bits))
  # tab10 repeats after ten colours; all eleven methods need tab20.
  palette = matplotlib.colormaps["tab10" if len(methods) <= 10 else "tab20"]
  for i, method in enumerate(methods):
    cells = [summary.get(method, {}).get(str(b)) for b in bits]
    means = [np.nan if c is None else c["map@all"]["mean"] for c in cells]
    errors = [0.0 if c is None or c["map@all"]["std"] is None else c["map@all"]["std"]
              for c in cells]
    axes.bar(positions + (i - (len(methods) - 1) / 2) * width, means, width,
             yerr=errors, capsize=2, color=palette(i), label=METHODS[method].label)
  axes.set_xticks(positions, [f"{b} bits" for b in bits])
  axes.set_ylabel("mAP@all")
  axes.set_ylim(0, 1)
  axes.set_title(title)
  # Outside the axes: inside, it would hide the tallest bars.
  axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  figure.tight_layout()
  with io_utils.atomic_open(path, "wb") as f:
    figure.savefig(f, format="png", dpi=120)


def write_report(config, runs: Sequence[dict], *, workdir: str, bits: Sequence[int],
                 seeds: Sequence[int], methods: Sequence[str],
                 ablation_epochs: int | None, ablation_bits: Sequence[int] | None = None,
                 command: str = "") -> dict:
  """Writes results.md, results.json and results.png into `workdir`; returns the JSON."""
  k = config.eval.topk[0]
  ablation_bits = list(bits) if ablation_bits is None else list(ablation_bits)
  summary = summarise(runs, metrics=("map@all", f"map@{k}", "map@all_tie_aware"))
  report = {"dataset": config.data.name, "protocol": config.data.preset,
            "bits": list(bits), "seeds": list(seeds), "methods": list(methods),
            "epochs": {"psch": config.train.num_epochs,
                       "ablations": (config.train.num_epochs if ablation_epochs is None
                                     else ablation_epochs)},
            "ablation_bits": ablation_bits,
            "std": "sample (n - 1)", "command": command,
            "runs": list(runs), "summary": summary}
  markdown = results_markdown(
      config, summary, runs, bits=bits, seeds=seeds, methods=methods,
      ablation_epochs=ablation_epochs, ablation_bits=ablation_bits, command=command)

  def write_files(directory: str) -> None:
    io_utils.write_text(io_utils.join(directory, workdir_lib.RESULTS_REPORT), markdown)
    _plot(summary, io_utils.join(directory, workdir_lib.TABLE_PLOT), bits=bits,
          methods=methods, title=f"{config.data.name}, protocol "
          f"{config.data.preset!r}, {len(seeds)} seed(s)")

  # The table, its report and its plot switch together (`generations.commit`).
  return generations.commit(workdir, report, config=config.to_dict(), step=None,
                            write_files=write_files, splits=False)


if __name__ == "__main__":
  # `python -m psch_jax.experiments` is the command line of
  # `psch_jax.commands.experiments`: run by name, so importing this library module
  # never loads the command line.
  import runpy
  runpy.run_module("psch_jax.commands.experiments", run_name="__main__",
                   alter_sys=True)
