"""The results-table harness: run configs, the table's numbers, reruns that skip work."""
import ast
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from psch_jax import baselines, experiments, train
from psch_jax import config as psch_config
from psch_jax.data import sources, splits
from psch_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist.py")
needs_fashion_mnist = pytest.mark.skipif(
    not os.path.isdir(sources.DEFAULT_FASHION_MNIST_DIR),
    reason="apt-get install dataset-fashion-mnist")

BITS, SEEDS = (8, 16), (0, 1)
# One PSCH-type row (an ablation, so --epochs_ablation and --ablation_bits are
# exercised too): the harness runs every PSCH variant through the same path, and each
# (variant, bits) compiles its own programs, the bulk of a tiny run's time on a CPU.
METHODS = ("no_lq", "itq", "lsh")
ABLATION_BITS = (8,)


def test_ablation_configs_are_the_overrides_of_method_md():
  with open(os.path.join(ROOT, "docs", "method.md")) as f:
    section = f.read().split("## Ablations, from config alone")[1].split("\n## ")[0]
  documented = {field: ast.literal_eval(value) for field, value in
                re.findall(r"`--config\.([\w.]+)=([^`]+)`", section)}
  overridden = [m for m in experiments.ABLATIONS if experiments.METHODS[m].overrides]
  assert len(documented) == len(overridden) == 10
  config = psch_config.load_config(f"{CONFIG}:tiny")
  before = config.to_dict()
  reference = experiments.method_config(config, "psch_short", num_bits=8, seed=3,
                                        ablation_epochs=1)
  assert reference.train.num_epochs == 1
  reference.train.num_epochs = config.train.num_epochs
  assert reference.to_dict() == experiments.method_config(
      config, "psch", num_bits=8, seed=3).to_dict()
  applied = {}
  for method in overridden:
    run = experiments.method_config(config, method, num_bits=8, seed=3, ablation_epochs=1)
    (field, _), = experiments.METHODS[method].overrides
    section_name, leaf = field.split(".")
    applied[field] = run[section_name][leaf]
    assert (run.model.num_bits, run.seed, run.train.num_epochs) == (8, 3, 1)
  assert applied == documented
  psch = experiments.method_config(config, "psch", num_bits=8, seed=3, ablation_epochs=1)
  assert psch.train.num_epochs == config.train.num_epochs  # only ablations shorten
  assert config.to_dict() == before  # copies, never the caller's config


def fake_runs():
  runs = []
  for method, base in (("psch", 0.5), ("itq", 0.4)):
    for seed, shift in zip((0, 1, 2), (0.0, 0.1, 0.05)):
      runs.append({"method": method, "num_bits": 16, "seed": seed,
                   "map@all": base + shift, "map@10": base + 2 * shift,
                   "map@all_tie_aware": base, "num_query": 40, "num_database": 200,
                   "num_train": 80})
  runs.append({**runs[0], "num_bits": 32, "seed": 0})  # one seed only
  return runs


def test_table_cells_are_mean_and_sample_std_over_seeds():
  config = psch_config.load_config(f"{CONFIG}:tiny")
  runs = fake_runs()
  summary = experiments.summarise(runs, metrics=("map@all", "map@10"))
  cell = summary["psch"]["16"]["map@all"]
  assert cell["mean"] == pytest.approx(0.55)
  assert cell["std"] == pytest.approx(np.std([0.5, 0.6, 0.55], ddof=1))
  assert summary["psch"]["16"]["seeds"] == [0, 1, 2]
  assert summary["psch"]["32"]["map@all"]["std"] is None
  text = experiments.results_markdown(config, summary, runs, bits=(16, 32),
                                      seeds=(0, 1, 2), methods=("psch", "itq"),
                                      ablation_epochs=None, ablation_bits=(16, 32),
                                      command="")
  assert "| PSCH | 0.550 ± 0.050 / 0.600 ± 0.100 | 0.500 / 0.500 (n = 1) |" in text
  assert "| ITQ | 0.450 ± 0.050 / 0.500 ± 0.100 | — |" in text
  assert "mAP@10" in text and "3 seed(s)" in text and "fashion_mnist" in text


def test_ablations_left_out_by_ablation_bits_are_marked_and_stated():
  config = psch_config.load_config(f"{CONFIG}:tiny")
  runs = [{**run, "method": "no_lq"} for run in fake_runs() if run["method"] == "psch"
          and run["num_bits"] == 16]
  summary = experiments.summarise(runs, metrics=("map@all", "map@10"))
  text = experiments.results_markdown(config, summary, runs, bits=(16, 32, 64),
                                      seeds=(0, 1, 2), methods=("psch", "no_lq"),
                                      ablation_epochs=1, ablation_bits=(16,), command="")
  assert "| PSCH, no L_q (beta = 0) | 0.550 ± 0.050 / 0.600 ± 0.100 | · | · |" in text
  assert "| PSCH | — | — | — |" in text
  assert "the ablations train 1 epoch at 16 bits only (--ablation_bits)" in text


def test_bad_arguments_raise_user_errors(tmp_path):
  config = psch_config.load_config(f"{CONFIG}:tiny")
  for kwargs, message in (({"methods": ["psch", "itqq"]}, "--methods"),
                          ({"bits": [0]}, "--bits"), ({"seeds": ["a"]}, "--seeds"),
                          ({"ablation_epochs": 0}, "--epochs_ablation"),
                          ({"ablation_bits": [64]}, "--ablation_bits")):
    arguments = {"bits": [8], "seeds": [0], "methods": ["lsh"], **kwargs}
    with pytest.raises(UserError, match=message):
      experiments.run_experiments(config, workdir=str(tmp_path), **arguments)
  with pytest.raises(UserError, match="does not exist"):
    psch_config.load_config("configs/no_such_config.py")


@pytest.mark.slow
def test_command_line_exits_2_on_bad_input_before_writing(tmp_path):
  workdir = tmp_path / "experiment"
  for flag, message in (("--methods=psch,itqq", "--methods"),
                        ("--config.pseudo_labels.keep_quantile=1.5", "keep_quantile")):
    result = subprocess.run(
        [sys.executable, "-m", "psch_jax.commands.experiments", f"--config={CONFIG}:tiny",
         f"--workdir={workdir}", "--bits=8", "--seeds=0", flag],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert not workdir.exists()


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
  """The CLI run the table tests read: real PSCH runs on the tiny config."""
  workdir = str(tmp_path_factory.mktemp("experiment"))
  result = subprocess.run(
      [sys.executable, "-m", "psch_jax.commands.experiments", f"--config={CONFIG}:tiny",
       f"--workdir={workdir}", "--bits=" + ",".join(map(str, BITS)),
       "--seeds=" + ",".join(map(str, SEEDS)), "--methods=" + ",".join(METHODS),
       "--epochs_ablation=1", "--ablation_bits=8"],
      cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def run_results(workdir, method, bits, seed):
  with open(os.path.join(workdir, "runs", method, f"{bits}bits_seed{seed}",
                         "results.json")) as f:
    return json.load(f)


@pytest.mark.slow
@needs_fashion_mnist
def test_table_has_every_row_and_column_with_the_per_run_statistics(experiment):
  with open(os.path.join(experiment, "results.md")) as f:
    table = f.read()
  with open(os.path.join(experiment, "results.json")) as f:
    report = json.load(f)
  rows = [line for line in table.splitlines() if line.startswith("| ")]
  assert rows[0] == "| method | 8 bits | 16 bits |"
  assert len(rows) == 1 + len(METHODS) and not any("—" in row for row in rows)
  runs_per_seed = sum(len(ABLATION_BITS if m in experiments.ABLATIONS else BITS)
                      for m in METHODS)
  assert len(report["runs"]) == runs_per_seed * len(SEEDS)
  for method in METHODS:
    cells = []
    for bits in BITS:
      if method in experiments.ABLATIONS and bits not in ABLATION_BITS:
        assert str(bits) not in report["summary"][method]
        assert not os.path.exists(os.path.join(experiment, "runs", method,
                                               f"{bits}bits_seed0"))
        cells.append("·")
        continue
      per_run = [run_results(experiment, method, bits, seed) for seed in SEEDS]
      cell = report["summary"][method][str(bits)]
      for metric in ("map@all", "map@10"):
        values = [r[metric] for r in per_run]
        assert cell[metric]["mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert cell[metric]["std"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
      cells.append(f"{experiments.format_statistic(cell['map@all'])} / "
                   f"{experiments.format_statistic(cell['map@10'])}")
    assert f"| {experiments.METHODS[method].label} | {' | '.join(cells)} |" in table
  assert ("ablations train 1 epoch at 8 bits only (--ablation_bits), a shorter "
          "schedule than PSCH's 2") in table
  with open(os.path.join(experiment, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@needs_fashion_mnist
def test_runs_use_their_method_config_and_the_seed_splits(experiment):
  with open(os.path.join(experiment, "runs", "no_lq", "8bits_seed1",
                         "config.json")) as f:
    config = json.load(f)
  assert (config["loss"]["beta"], config["train"]["num_epochs"]) == (0.0, 1)
  assert config["model"]["num_bits"] == 8 and config["seed"] == 1
  assert run_results(experiment, "no_lq", 8, 1)["epochs"] == 1
  seed_splits = splits.load_splits(os.path.join(experiment, "seed1", "splits"))
  psch_splits = splits.load_splits(os.path.join(experiment, "runs", "no_lq",
                                                "8bits_seed1", "splits"))
  for name in splits.SPLIT_NAMES:
    np.testing.assert_array_equal(seed_splits[name], psch_splits[name])
  itq = run_results(experiment, "itq", 8, 1)
  assert (itq["num_query"], itq["num_database"], itq["num_train"]) == (
      len(seed_splits["query"]), len(seed_splits["database"]),
      len(seed_splits["train"]))


@pytest.mark.slow
@needs_fashion_mnist
def test_rerun_skips_finished_runs_and_refuses_a_changed_config(experiment,
                                                                monkeypatch):
  def must_not_run(*args, **kwargs):
    raise AssertionError("a finished run was redone")

  monkeypatch.setattr(train, "train_and_evaluate", must_not_run)
  for method in baselines.FIT:
    monkeypatch.setitem(baselines.FIT, method, must_not_run)
  results = [os.path.join(root, name) for root, _, names in os.walk(experiment)
             for name in names if name == "results.json"]
  mtimes = {path: os.stat(path).st_mtime_ns for path in results}
  with open(os.path.join(experiment, "results.json")) as f:
    before = json.load(f)["summary"]
  config = psch_config.load_config(f"{CONFIG}:tiny")
  report = experiments.run_experiments(config, workdir=experiment, bits=BITS,
                                       seeds=SEEDS, methods=METHODS, ablation_epochs=1,
                                       ablation_bits=ABLATION_BITS)
  assert report["summary"] == before
  for path, mtime in mtimes.items():
    # The table itself is rewritten (a new generation of it replaces the old).
    if not path.startswith((os.path.join(experiment, "generations") + os.sep,
                            os.path.join(experiment, "results.json"))):
      assert os.stat(path).st_mtime_ns == mtime, path
  with open(os.path.join(experiment, "results.md")) as f:
    table = f.read()
  with pytest.raises(UserError, match="train.num_epochs"):
    experiments.run_experiments(config, workdir=experiment, bits=BITS, seeds=SEEDS,
                                methods=METHODS, ablation_epochs=2,
                                ablation_bits=ABLATION_BITS)
  with open(os.path.join(experiment, "results.md")) as f:
    assert f.read() == table  # refused before anything was written
