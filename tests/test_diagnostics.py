"""The target-quality diagnostic: its mAP@all against a brute force, and the command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from psch_jax import config as psch_config
from psch_jax import diagnostics
from psch_jax import reference
from psch_jax.errors import UserError
from tests.helpers import ROOT, needs_fashion_mnist

CONFIG = os.path.join(ROOT, "configs", "fashion_mnist.py")


def brute_force_average_precision(scores, query, labels):
  """AP@all of one query, straight from the definition: sort the others by
  (-score, index), walk down the list."""
  others = sorted((j for j in range(len(labels)) if j != query),
                  key=lambda j: (-scores[j], j))
  hits, precisions = 0, []
  for rank, j in enumerate(others, start=1):
    if np.any(labels[query] & labels[j]):
      hits += 1
      precisions.append(hits / rank)
  return sum(precisions) / hits if hits else 0.0


def reference_average_precisions(scores, queries, labels):
  """AP@all of each query against the rest of the set, as diagnostics.map_at_all
  ranks it: the NumPy reference on negated scores, the query's own column left out."""
  ranked = reference.ranked_relevance(
      -scores, reference.shares_a_label(labels[queries], labels), exclude=queries)
  return reference.average_precision(ranked)


def random_set(seed, num=37, num_labels=4):
  rng = np.random.default_rng(seed)
  # Few distinct scores: many ties, so the index order decides.
  scores = rng.integers(0, 4, size=(num, num)).astype(np.float32) / 3
  # Multi-hot, some images without any label (their queries have AP 0).
  labels = (rng.random((num, num_labels)) < 0.3).astype(np.uint8)
  labels[5] = 0
  return scores, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_average_precisions_match_the_brute_force(seed):
  scores, labels = random_set(seed)
  queries = np.array([0, 5, 11, 36, 20])
  got = reference_average_precisions(scores[queries], queries, labels)
  want = [brute_force_average_precision(scores[q], q, labels) for q in queries]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert got[1] == 0.0 and 0.0 < got.max() < 1.0


def test_map_at_all_over_chunks_is_the_mean_of_the_brute_force():
  scores, labels = random_set(3)
  queries = np.arange(0, len(labels), 2)
  got = diagnostics.map_at_all(lambda rows: scores[rows], labels, query_ids=queries,
                               chunk_size=4)
  want = np.mean([brute_force_average_precision(scores[q], q, labels) for q in queries])
  assert got == pytest.approx(want, rel=1e-12)


def test_a_perfect_ranking_scores_one_and_the_pseudo_label_ranking_ties():
  classes = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
  labels = np.eye(3, dtype=np.uint8)[classes]
  same_class = (classes[:, None] == classes[None, :]).astype(np.float32)
  queries = np.arange(len(classes))
  assert diagnostics.map_at_all(lambda rows: same_class[rows], labels,
                                query_ids=queries) == 1.0
  # Pseudo labels = true classes with image 9 unlabelled: image 9's query ties
  # everything (index order), and the others lose image 9 to the tied tail.
  pseudo = np.where(np.arange(10) == 9, -1, classes)
  score_rows = diagnostics.pseudo_label_scores(pseudo)
  np.testing.assert_array_equal(score_rows(np.array([9]))[0], np.zeros(10))
  got = reference_average_precisions(score_rows(queries), queries, labels)
  want = [brute_force_average_precision(score_rows(np.array([q]))[0], q, labels)
          for q in queries]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  assert got[0] < 1.0 and got[1] == 1.0


def test_pair_statistics_count_off_diagonal_pairs():
  labels = np.eye(2, dtype=np.uint8)[[0, 0, 1, 1]]
  # Image 1 is put with the 1s, image 3 is unlabelled.
  pairs = diagnostics.pair_statistics(np.array([0, 1, 1, -1]), labels)
  # Same pseudo label: (1, 2), (2, 1); none shares a true label. Relevant: 4 pairs.
  assert pairs == {"precision": 0.0, "recall": 0.0, "same_pseudo_label": 2,
                   "relevant": 4}
  assert diagnostics.chance_level(labels, np.arange(4)) == pytest.approx(1 / 3)


def test_non_finite_scores_are_refused():
  scores, labels = random_set(4)
  scores[0, 3] = np.nan
  with pytest.raises(UserError, match="non-finite"):
    diagnostics.map_at_all(lambda rows: scores[rows], labels, query_ids=np.array([0]))


def run_command(workdir, *extra):
  return subprocess.run(
      [sys.executable, "-m", "psch_jax.commands.diagnostics", f"--config={CONFIG}:tiny",
       f"--workdir={workdir}", *extra],
      cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@needs_fashion_mnist
def test_command_writes_target_quality_json(tmp_path):
  workdir = tmp_path / "diag"
  result = run_command(workdir, "--config.similarity.cross_cluster_ceiling=0.0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "target S" in result.stdout
  with open(workdir / "target_quality.json") as f:
    report = json.load(f)
  assert report["num_queries"] == report["num_train"] > 0
  assert report["similarity"]["cross_cluster_ceiling"] == 0.0
  assert set(report["map_at_all"]) == {"target", "soft_similarity", "pseudo_label",
                                       "chance"}
  values = [*report["map_at_all"].values(), report["pseudo_labels"]["purity"],
            report["pseudo_labels"]["kept_fraction"], report["pairs"]["precision"],
            report["pairs"]["recall"]]
  assert all(0.0 <= v <= 1.0 for v in values), report
  assert sum(report["pseudo_labels"]["cluster_sizes"]) == report["num_train"]


@pytest.mark.slow
def test_command_line_exits_2_on_bad_input_before_writing(tmp_path):
  workdir = tmp_path / "diag"
  for flag, message in (("--config.pseudo_labels.keep_quantile=1.5", "keep_quantile"),
                        ("--query_stride=0", "--query_stride"),
                        ("--config.pseudo_labels.no_such_field=1", "no_such_field")):
    result = run_command(workdir, flag)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert not workdir.exists()


@needs_fashion_mnist
def test_a_training_split_too_large_for_the_target_matrix_is_refused(tmp_path,
                                                                     monkeypatch):
  monkeypatch.setattr(diagnostics, "MAX_TRAIN_IMAGES", 10)
  with pytest.raises(UserError, match="train_per_class"):
    diagnostics.target_quality(psch_config.load_config(f"{CONFIG}:tiny"), str(tmp_path / "diag"))
