"""Tests for psch_jax.reports: the report files, the ranking of the grid, and the
independent recomputation that checks results.json.

A tiny synthetic run: a fake dataset of random images, random codes with many ties
(few bits), and results from `ranking.retrieval_metrics(..., curves=True)` saved
as `train.py` saves them (packed codes, sorted splits, results.json).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from psch_jax import generations
from psch_jax import io_utils
from psch_jax import ranking
from psch_jax import reference
from psch_jax import reports
from psch_jax.data import sources
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NUM_IMAGES, NUM_QUERY, NUM_BITS, NUM_LABELS = 90, 12, 10, 4
TOPK = (5, 1000)  # 1000 > database: the whole database
TOPN = (3, 20, 500)


def fake_source(channels: int, seed: int = 0) -> sources.ArraySource:
  rng = np.random.default_rng(seed)
  labels = (rng.random((NUM_IMAGES, NUM_LABELS)) < 0.35).astype(np.uint8)
  labels[np.arange(NUM_IMAGES), rng.integers(0, NUM_LABELS, NUM_IMAGES)] = 1
  return sources.ArraySource(
      name="fake", images=rng.integers(0, 256, (NUM_IMAGES, 12, 12, channels), np.uint8),
      labels=labels, official_split=np.full(NUM_IMAGES, "train"))


def fake_run(workdir, source, seed: int = 0) -> dict:
  """Writes splits, packed codes and results.json as train.py does; returns what
  write_reports takes."""
  rng = np.random.default_rng(seed + 1)
  query = np.sort(rng.choice(NUM_IMAGES, NUM_QUERY, replace=False))
  database = np.setdiff1d(np.arange(NUM_IMAGES), query)
  codes = {name: rng.choice(np.array([-1, 1], np.int8), (len(indices), NUM_BITS))
           for name, indices in (("query", query), ("database", database))}
  metrics = ranking.retrieval_metrics(
      codes["query"], source.labels[query], codes["database"], source.labels[database],
      topk=TOPK, topn=TOPN, curves=True)
  results = {"dataset": "fake", "protocol": "ssdh", "num_bits": NUM_BITS, "seed": seed,
             "num_query": len(query), "num_database": len(database),
             "selection": "last epoch", "config_hash": "0123456789ab",
             "conventions": ranking.METRIC_CONVENTIONS,
             "validation/map@5": 0.25, **metrics}
  splits_lib.save_splits({"query": query, "database": database, "train": database[:20],
                          "validation": database[20:30]}, os.path.join(workdir, "splits"))
  config = {"data": {"name": "fake"}, "model": {"num_bits": NUM_BITS}}
  io_utils.write_json(os.path.join(workdir, "config.json"), config)

  def write_codes(directory):
    for name, value in codes.items():
      io_utils.save_npy(os.path.join(directory, "codes", f"{name}.npy"),
                        np.asarray(ranking.pack_codes(value)))

  generations.commit(str(workdir), results, config=config, step=None,
                     write_files=write_codes)
  return {"results": results, "codes": codes, "query_indices": query,
          "database_indices": database, "query_labels": source.labels[query],
          "database_labels": source.labels[database], "source": source}


@pytest.mark.slow
@pytest.mark.parametrize("channels", [1, 3])
def test_write_reports_writes_every_file(tmp_path, channels):
  run = fake_run(str(tmp_path), fake_source(channels))
  paths = reports.write_reports(str(tmp_path), **run)
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ["pr_curve.png", "precision_at_topn.png", "results.md",
                   "retrieval_grid.png"]
  for path in paths:
    assert os.path.getsize(path) > 0
    if path.endswith(".png"):
      with Image.open(path) as image:
        image.verify()
        assert image.format == "PNG"
  # No temporary files left behind by the atomic writes.
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]
  with Image.open(tmp_path / "retrieval_grid.png") as grid:
    pixels = np.asarray(grid.convert("RGB")).reshape(-1, 3)
  colours = {tuple(int(c[i:i + 2], 16) for i in (1, 3, 5))
             for c in ("#1f77b4", "#2ca02c", "#d62728")}  # query, relevant, not
  assert colours <= set(map(tuple, np.unique(pixels, axis=0)))


def test_results_md_has_protocol_every_metric_and_conventions(tmp_path):
  run = fake_run(str(tmp_path), fake_source(1))
  reports.write_reports(str(tmp_path), **run)
  text = (tmp_path / "results.md").read_text()
  results = run["results"]
  scalar = [k for k, v in results.items() if isinstance(v, float)]
  assert {"map@5", "map@1000", "map@all", "map@all_tie_aware", "precision@radius2",
          "validation/map@5"} <= set(scalar)
  for name in scalar:
    assert f"| {name} | {results[name]:.4f} |" in text
  for n in TOPN:
    assert f" {n} |" in text
  assert "| config_hash | 0123456789ab |" in text
  assert "| num_bits | 10 |" in text and "| protocol | ssdh |" in text
  assert ranking.METRIC_CONVENTIONS in text


def test_write_reports_needs_curves(tmp_path):
  run = fake_run(str(tmp_path), fake_source(1))
  run["results"] = {k: v for k, v in run["results"].items() if k != "pr_curve"}
  with pytest.raises(UserError, match="curves=True"):
    reports.write_reports(str(tmp_path), **run)


def test_top_matches_ranks_by_distance_then_database_index():
  database = np.array([[1, 1, 1, 1], [-1, -1, 1, 1], [1, 1, 1, -1], [-1, 1, 1, 1],
                       [1, 1, 1, 1]], np.int8)
  query = np.array([[1, 1, 1, 1], [-1, -1, -1, -1]], np.int8)
  rows, distances = reports.top_matches(ranking.pack_codes(query),
                                        ranking.pack_codes(database), topk=4)
  np.testing.assert_array_equal(rows, [[0, 4, 2, 3], [1, 2, 3, 0]])
  np.testing.assert_array_equal(distances, [[0, 0, 1, 1], [2, 3, 3, 4]])
  rows, _ = reports.top_matches(ranking.pack_codes(query),
                                ranking.pack_codes(database), topk=100)
  assert rows.shape == (2, 5)
  with pytest.raises(UserError, match="topk"):
    reports.top_matches(ranking.pack_codes(query), ranking.pack_codes(database),
                        topk=0)


def test_unpack_codes_inverts_pack_codes():
  codes = np.random.default_rng(3).choice(np.array([-1, 1], np.int8), (7, 45))
  packed = np.asarray(ranking.pack_codes(codes))
  np.testing.assert_array_equal(reports.unpack_codes(packed, 45), codes)
  with pytest.raises(UserError, match="uint32"):
    reports.unpack_codes(packed, 70)  # 3 words expected, 2 given


def test_reference_by_hand():
  """One query, database of 4: ranking [rel d0, irrel d0, rel d1, irrel d2]."""
  query = np.array([[1, 1]], np.int8)
  database = np.array([[1, 1], [1, 1], [1, -1], [-1, -1]], np.int8)
  query_labels = np.array([[1, 0]], np.uint8)
  database_labels = np.array([[1, 0], [0, 1], [1, 1], [0, 1]], np.uint8)
  metrics = reference.retrieval_metrics(query, query_labels, database, database_labels,
                                        topk=(1, 2), topn=(2, 8), radius=0)
  assert metrics["map@1"] == pytest.approx(1.0)
  assert metrics["map@2"] == pytest.approx(1.0)
  assert metrics["map@all"] == pytest.approx((1 + 2 / 3) / 2)
  # Tie at distance 0 (one relevant of two): E[P] = (1 + 1/2) / 2; then P = 2/3.
  assert metrics["map@all_tie_aware"] == pytest.approx((0.75 + 2 / 3) / 2)
  assert metrics["precision@radius0"] == pytest.approx(0.5)
  assert metrics["precision@top2"] == pytest.approx(0.5)
  assert metrics["precision@top8"] == pytest.approx(0.5)  # whole database
  assert metrics["pr_recall@radius1"] == pytest.approx(1.0)
  assert metrics["pr_precision@radius2"] == pytest.approx(0.5)


def test_verify_results_agrees_on_a_consistent_run(tmp_path):
  source = fake_source(1)
  fake_run(str(tmp_path), source)
  checks = reports.verify_results(str(tmp_path), source)
  names = {c.name for c in checks}
  assert {"map@5", "map@1000", "map@all", "map@all_tie_aware", "precision@radius2",
          "precision@top3", "precision@top500", f"pr_recall@radius{NUM_BITS}",
          "pr_precision@radius0"} <= names
  assert "validation/map@5" not in names  # not determined by query/database codes
  assert all(c.agrees for c in checks)


@pytest.mark.parametrize("tamper", [
    lambda r: r.update({"map@all": r["map@all"] + 1e-4}),
    lambda r: r["pr_curve"]["precision"].__setitem__(3, 0.123),
    lambda r: r["precision@topn"].update({"20": 0.0}),
])
def test_verify_results_fails_on_tampered_results(tmp_path, tamper):
  source = fake_source(1)
  fake_run(str(tmp_path), source)
  path = tmp_path / "results.json"
  results = json.loads(path.read_text())
  tamper(results)
  path.write_text(json.dumps(results))
  with pytest.raises(reports.ResultsMismatchError, match="disagrees"):
    reports.verify_results(str(tmp_path), source)


def test_verify_results_fails_on_codes_of_another_run(tmp_path):
  source = fake_source(1)
  fake_run(str(tmp_path), source, seed=0)
  other = tmp_path / "other"
  fake_run(str(other), source, seed=5)
  os.replace(other / "codes" / "database.npy", tmp_path / "codes" / "database.npy")
  with pytest.raises((reports.ResultsMismatchError, UserError)):
    reports.verify_results(str(tmp_path), source)


def test_command_line_exit_codes(tmp_path, monkeypatch, capsys):
  source = fake_source(1)
  fake_run(str(tmp_path), source)
  monkeypatch.setattr(reports, "load_run_source", lambda workdir: source)
  assert reports.print_comparison(str(tmp_path)) == 0
  out = capsys.readouterr().out
  assert "map@all_tie_aware" in out and "MISMATCH" not in out

  results = json.loads((tmp_path / "results.json").read_text())
  results["map@5"] += 0.01
  (tmp_path / "results.json").write_text(json.dumps(results))
  assert reports.print_comparison(str(tmp_path)) == reports.EXIT_MISMATCH == 1
  assert "MISMATCH" in capsys.readouterr().out

  os.remove(tmp_path / "codes" / "query.npy")
  with pytest.raises(UserError, match="query.npy is missing"):
    reports.print_comparison(str(tmp_path))


def test_command_line_without_config_exits_2(tmp_path):
  result = subprocess.run([sys.executable, "-m", "psch_jax.commands.reports",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "config.json is missing" in result.stderr
