r"""How good are the training targets? Measured before any training step.

  python -m psch_jax.commands.diagnostics --config=configs/fashion_mnist.py --workdir=/tmp/diag \
      [--query_stride=1] [--config.<section>.<field>=<value> ...]

PSCH regresses code inner products onto a target matrix S (docs/method.md, Eqs. 7
and 7b) built from pseudo labels (Eqs. 1, 1a, 2) and the soft multi-part similarity s
(Eq. 6). Codes that reproduced S perfectly would rank the database as S does, so the
quality of S bounds what training can reach. This command builds exactly what
`train.train_and_evaluate` builds at step 0 (the same splits, the same fresh
network, the same `train.epoch_targets` call) and scores it against the true
labels of the training split, which training never sees:

- pseudo labels: kept fraction, purity (the fraction of kept images carrying their
  cluster's majority true label), cluster sizes, as `targets.compute_targets` reports
  them. The accuracy of the k-means assignment before the threshold is not known to
  it, so it is not reported.
- pairs: over the off-diagonal pairs of the N training images, "precision" is the
  fraction of same-pseudo-label pairs (both labelled) that share a true label and
  "recall" the fraction of the pairs sharing a true label that have the same pseudo
  label.
- mAP@all over the training set of three rankings: each training image in turn (every
  `--query_stride`-th, default every one) is a query against the other N - 1,
  relevant = shares a true label, ranked by decreasing score with ties by index (a
  stable sort), AP as docs/evaluation.md defines it (0 for a query without a relevant
  image, kept in the mean). The scores are (a) the target S of Eq. 7 / 7b, computed
  on the whole training set at once with the config's `similarity.*` fields by
  `targets.batch_targets`, exactly as the train step does for a batch (pair weights m
  play no part in a ranking); (b) the soft similarity s of Eq. 6 alone; (c) the pseudo label alone
  (1 for the same pseudo label, both labelled, else 0: the same-label images first,
  everything else tied). "chance" is the mean fraction of relevant images among the
  N - 1, about the mAP@all of a random ranking.
  With `similarity.source = "online"` the step-0 s is that of the fresh network's
  part features without augmentation (training computes it on augmented batches).

Writes `<workdir>/target_quality.json` (atomically) and prints a table. The work
directory holds the run's splits (splits/, drawn as training draws them, or read
when there): point --workdir at a training run's directory to diagnose its targets.
S is held whole (N x N float32, with a few temporaries of that size), so N is
limited to `MAX_TRAIN_IMAGES`; bad input exits with code 2 and a message, before
anything is written when it is the config.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from psch_jax import io_utils
from psch_jax import reference
from psch_jax.errors import UserError

MAX_TRAIN_IMAGES = 20_000
# Queries ranked at once: the sort holds a few (chunk x N) arrays (int64 order).
QUERY_CHUNK = 256


# ------------------------------------------------------------------------ rankings

def map_at_all(score_rows: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, *,
               query_ids: np.ndarray, chunk_size: int = QUERY_CHUNK) -> float:
  """mAP@all of queries drawn from a set, each ranked against the rest of the set.

  Query q ranks the images j != q by decreasing score_rows(q)[j], ties by smaller j
  first; j is relevant when it shares a label with q. The AP is the NumPy
  reference's (`reference.average_precision`: 0 without a relevant image).

  Args:
    score_rows: maps (c,) query indices to their (c, N) finite float score rows, so at
      most (chunk_size x N) scores exist at once when the rows are made on demand.
    labels: (N, num_labels) multi-hot true labels of the set.
    query_ids: (Q,) int indices of the queries in the set.
    chunk_size: queries ranked at once.

  Returns:
    The mAP@all, a float in [0, 1].
  """
  query_ids = np.asarray(query_ids)
  if query_ids.size == 0:
    raise UserError("map_at_all needs at least one query.")
  truth = np.asarray(labels)
  total = 0.0
  for start in range(0, len(query_ids), chunk_size):
    rows = query_ids[start:start + chunk_size]
    # Negated scores: the reference ranks by increasing key (negation is exact).
    ranked = reference.ranked_relevance(
        -np.asarray(score_rows(rows)), reference.shares_a_label(truth[rows], truth),
        exclude=rows)
    total += float(reference.average_precision(ranked).sum())
  return total / len(query_ids)


def pseudo_label_scores(pseudo_labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
  """score_rows of the pseudo label alone: float32 1 where both images carry the same
  pseudo label (>= 0), else 0."""
  pseudo_labels = np.asarray(pseudo_labels)

  def score_rows(rows: np.ndarray) -> np.ndarray:
    query = pseudo_labels[rows][:, None]
    return ((query == pseudo_labels[None, :]) & (query >= 0)).astype(np.float32)

  return score_rows


def pair_statistics(pseudo_labels: np.ndarray, labels: np.ndarray, *,
                    chunk_size: int = QUERY_CHUNK) -> dict:
  """How the same-pseudo-label pairs (Eq. 7, first row) match true relevance.

  Over the ordered off-diagonal pairs (i, j): precision = P(share a true label | same
  pseudo label, both labelled), recall = P(same pseudo label | share a true label).

  Args:
    pseudo_labels: (N,) int, -1 = unlabelled.
    labels: (N, num_labels) multi-hot true labels.

  Returns:
    {"precision", "recall"} floats in [0, 1] (NaN without any such pair), and the
    pair counts "same_pseudo_label" and "relevant".
  """
  truth = np.asarray(labels).astype(bool)
  same_pseudo = pseudo_label_scores(pseudo_labels)
  num = len(truth)
  both = relevant_total = same_total = 0
  for start in range(0, num, chunk_size):
    rows = np.arange(start, min(start + chunk_size, num))
    off_diagonal = rows[:, None] != np.arange(num)[None, :]
    same = same_pseudo(rows).astype(bool) & off_diagonal
    relevant = (truth[rows] @ truth.T) & off_diagonal
    both += int(np.count_nonzero(same & relevant))
    same_total += int(np.count_nonzero(same))
    relevant_total += int(np.count_nonzero(relevant))
  return {"precision": both / same_total if same_total else float("nan"),
          "recall": both / relevant_total if relevant_total else float("nan"),
          "same_pseudo_label": same_total, "relevant": relevant_total}


def chance_level(labels: np.ndarray, query_ids: np.ndarray, *,
                 chunk_size: int = QUERY_CHUNK) -> float:
  """Mean over `query_ids` of the fraction of the other N - 1 images relevant to it."""
  truth = np.asarray(labels).astype(bool)
  num = len(truth)
  total = 0.0
  for start in range(0, len(query_ids), chunk_size):
    rows = np.asarray(query_ids[start:start + chunk_size])
    relevant = (truth[rows] @ truth.T).sum(axis=1) - truth[rows].any(axis=1)
    total += float((relevant / max(num - 1, 1)).sum())
  return total / len(query_ids)


# ------------------------------------------------------------------------- targets

REPORT_FILE = "target_quality.json"


def target_quality(config, workdir: str, *, query_stride: int = 1) -> dict:
  """The step-0 targets of `config` (built as training builds them) against the true
  labels of the training split; the report, also written to workdir/`REPORT_FILE`."""
  import jax
  import jax.numpy as jnp

  from psch_jax import targets as targets_lib
  from psch_jax import run_setup
  from psch_jax import sharding
  from psch_jax import train

  if not (isinstance(query_stride, int) and query_stride >= 1):
    raise UserError(f"--query_stride={query_stride} must be an int >= 1 (1 = every "
                    "training image is a query).")
  if config.method.name != "psch":
    raise UserError(f"the diagnostics score PSCH's pseudo labels and targets; "
                    f"config.method.name={config.method.name!r} has none. Run them "
                    "with --config.method.name=psch.")
  seconds = {}
  tick = time.perf_counter()

  def check_size(index_sets: dict) -> None:
    num_train = len(index_sets["train"])
    if num_train > MAX_TRAIN_IMAGES:
      raise UserError(
          f"{num_train} training images: the diagnostic holds the N x N target "
          f"matrix (float32, {4 * num_train**2 / 2**30:.1f} GiB, and temporaries of "
          f"that size), so it takes at most {MAX_TRAIN_IMAGES}. Draw a smaller "
          "training split, e.g. --config.data.train_per_class=500 (with a new "
          "--workdir: the splits are saved there).")

  run = run_setup.setup_run(config, workdir, mode=run_setup.DIAGNOSE, check=check_size)
  try:
    train_indices = run.index_sets["train"]
    replicated = sharding.replicated(run.mesh)
    state = jax.device_put(
        run_setup.fresh_state(config, run.model, run.tx, run.pretrained_backbone),
        replicated)
    targets, stats = train.epoch_targets(config, run, state["params"], epoch=0)
    targets = jax.tree.map(jnp.asarray, targets)
    # similarity.source = "online" only (encoded when called): training takes the
    # parts from the network's current feature maps; at step 0 that is the fresh
    # network, here on unaugmented images.
    online_parts = targets_lib.online_parts_of(
        config, run.encode, state["params"], run.source, train_indices, mesh=run.mesh)
  except BaseException:
    run_setup.close_run(run)
    raise
  seconds["targets"] = time.perf_counter() - tick
  try:
    report = _score_targets(config, run, targets, stats, online_parts,
                            query_stride=query_stride, seconds=seconds)
    # Written under the work directory's lock, like every file a command writes.
    if jax.process_index() == 0:
      io_utils.write_json(io_utils.join(run.workdir, REPORT_FILE), report)
  finally:
    run_setup.close_run(run)
  return report


def _score_targets(config, run, targets, stats, online_parts, *, query_stride: int,
                   seconds: dict) -> dict:
  from psch_jax import targets as targets_lib
  from psch_jax.evaluators import retrieval

  train_indices = run.index_sets["train"]
  num_train = len(train_indices)

  tick = time.perf_counter()
  pseudo_labels = np.asarray(targets["pseudo_labels"])
  sim = config.similarity
  # S of Eq. 7 / 7b over the whole training set, as the train step builds it for a
  # batch (`targets.batch_targets`).
  whole_set = targets_lib.batch_targets(config, targets, online_parts=online_parts)
  soft, target = whole_set.similarity, whole_set.target
  soft, target = np.asarray(soft), np.asarray(target)
  seconds["similarity"] = time.perf_counter() - tick

  tick = time.perf_counter()
  labels = run.source.labels[train_indices]
  query_ids = np.arange(0, num_train, query_stride)
  rankings = {"target": lambda rows: target[rows],
              "soft_similarity": lambda rows: soft[rows],
              "pseudo_label": pseudo_label_scores(pseudo_labels)}
  maps = {name: map_at_all(rows_of, labels, query_ids=query_ids)
          for name, rows_of in rankings.items()}
  maps["chance"] = chance_level(labels, query_ids)
  pairs = pair_statistics(pseudo_labels, labels)
  seconds["ranking"] = time.perf_counter() - tick

  return {
      "dataset": config.data.name, "protocol": config.data.preset,
      "seed": config.seed, "config_hash": retrieval.config_hash(config),
      "num_train": int(num_train), "num_queries": int(len(query_ids)),
      "query_stride": query_stride,
      "pseudo_labels": stats,
      "similarity": {k: sim[k] for k in ("source", "hard", "same_class_floor",
                                         "unlabelled_weight", "cross_cluster_ceiling")},
      "pairs": pairs,
      "map_at_all": maps,
      "conventions": ("queries: training images (every query_stride-th) against the "
                      "other N - 1; relevant = shares a true label; rank by decreasing "
                      "score, ties by index; AP = 0 without a relevant image"),
      "seconds": {k: round(v, 2) for k, v in seconds.items()},
  }


def format_report(report: dict) -> str:
  """The printed table of a `target_quality` report."""
  stats, maps, pairs = report["pseudo_labels"], report["map_at_all"], report["pairs"]
  queries = ("every training image" if report["query_stride"] == 1 else
             f"every {report['query_stride']}th training image")
  lines = [
      f"{report['dataset']}, protocol {report['protocol']!r}, seed {report['seed']}: "
      f"{report['num_train']} training images, step-0 targets "
      f"(features {stats['features']!r}, config {report['config_hash']})",
      f"  pseudo labels: kept {stats['kept_fraction']:.4f}, purity "
      f"{stats['purity']:.4f}, cluster sizes {stats['cluster_sizes']}",
      f"  same-pseudo-label pairs: precision {pairs['precision']:.4f}, recall "
      f"{pairs['recall']:.4f} (vs sharing a true label)",
      f"  mAP@all over the training set ({report['num_queries']} queries, "
      f"{queries}, vs the other {report['num_train'] - 1}):",
      f"    {'target S (Eq. 7/7b)':<28s} {maps['target']:.4f}",
      f"    {'soft similarity s (Eq. 6/6b)':<28s} {maps['soft_similarity']:.4f}",
      f"    {'pseudo label alone':<28s} {maps['pseudo_label']:.4f}",
      f"    {'chance (relevant fraction)':<28s} {maps['chance']:.4f}",
      "  seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in report["seconds"].items()),
  ]
  return "\n".join(lines)
