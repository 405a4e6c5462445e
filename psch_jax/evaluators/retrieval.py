"""Retrieval evaluation of a PSCH model: encode, rank by Hamming distance, score.

The path of an image at evaluation: `source.read` -> the shared encoder
(`encoding.encode_images`, preprocessing and the network, batched and padded with a
mask) -> relaxed codes u -> hash codes b = sign(u) (Eq. 12, int8 +-1) ->
`ranking.retrieval_metrics` (packed codes, Hamming ranking, AP; conventions in
docs/evaluation.md) -> results.json.

  evaluators = retrieval.from_config(config, encode=..., source=..., index_sets=...,
                                     mesh=...)
  metrics, codes = evaluators["test"].run(params)        # query vs database
  metrics, _ = evaluators["validation"].run(params)      # validation vs the rest

`score_codes` scores codes computed elsewhere (the baselines of experiments.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from psch_jax import encoding
from psch_jax import generations
from psch_jax import io_utils
from psch_jax import models
from psch_jax import ranking
from psch_jax import reports
from psch_jax import workdir as workdir_lib
from psch_jax.data import splits as splits_lib

# Names of the evaluators `from_config` builds, with their (queries, database)
# index sets: the splits of `splits_lib.SPLIT_NAMES`, and "validation_database"
# (`splits_lib.validation_database`: the database minus the validation queries),
# so that validation mirrors the test (psch_jax/data/splits.py).
SPLITS = {"test": ("query", "database"),
          "validation": ("validation", "validation_database")}


def config_hash(config: ml_collections.ConfigDict) -> str:
  """12 hex digits identifying every field of the config (for results tables)."""
  text = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def hash_images(config: ml_collections.ConfigDict, encode, params, source,
                indices: np.ndarray, *, mesh) -> np.ndarray:
  """int8 (n, L) +-1 hash codes (Eq. 12) of `source[indices]`, encoded in batches of
  `config.eval.batch_size`."""
  relaxed = encoding.encode_images(encode, params, source, indices,
                                batch_size=config.eval.batch_size, mesh=mesh,
                                keys=["relaxed_codes"])["relaxed_codes"]
  return np.asarray(models.hash_codes(relaxed), np.int8)


def score_codes(config: ml_collections.ConfigDict, query_codes: np.ndarray,
                query_labels: np.ndarray, database_codes: np.ndarray,
                database_labels: np.ndarray, *, curves: bool,
                mesh: jax.sharding.Mesh | None = None) -> dict[str, Any]:
  """The metrics of codes already computed, at the config's cut-offs
  (`config.eval.topk`): `ranking.retrieval_metrics`'s dict, the queries shared by
  this process's devices of `mesh` (None: every local device)."""
  return ranking.retrieval_metrics(query_codes, query_labels, database_codes,
                                   database_labels, topk=tuple(config.eval.topk),
                                   curves=curves, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class RetrievalEvaluator:
  """Queries against a database, both encoded by the model being evaluated.

  Attributes:
    config: the run's config (eval.topk, eval.batch_size are read).
    encode: the jit-compiled encoder of `encoding.make_encoder`.
    source: the dataset's `ImageSource`.
    query_indices, database_indices: int (n,) global indices, sorted.
    mesh: the run's device mesh: it encodes the images and, this process's devices
      of it, ranks the queries.
    curves: also the PR curve and precision@N (the test protocol); without them
      only the mAP values are returned (model selection).
    prefix: put before every metric name, e.g. "validation/".
  """
  config: ml_collections.ConfigDict
  encode: Callable
  source: Any
  query_indices: np.ndarray
  database_indices: np.ndarray
  mesh: jax.sharding.Mesh
  curves: bool = True
  prefix: str = ""

  def run(self, params, *, codes_at_hand: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Encodes, ranks and scores.

    Args:
      params: the model parameters.
      codes_at_hand: optional (sorted int (m,) indices, int8 (m, L) codes) computed
        for these params, covering the queries and the database: looked up instead of
        encoded again (the validation after the final evaluation).

    Returns:
      metrics: {prefix + name: value} (docs/evaluation.md); empty without queries
        (tiny sets drawn with data.allow_fewer can leave no validation image).
      codes: {"query", "database"}: int8 (n, L) +-1 hash codes (Eq. 12).
    """
    if len(self.query_indices) == 0:
      return {}, {}

    def codes_of(indices):
      if codes_at_hand is None:
        return hash_images(self.config, self.encode, params, self.source, indices,
                           mesh=self.mesh)
      known_indices, known_codes = codes_at_hand
      return known_codes[np.searchsorted(known_indices, indices)]

    codes = {"query": codes_of(self.query_indices),
             "database": codes_of(self.database_indices)}
    labels = self.source.labels
    metrics = score_codes(self.config, codes["query"], labels[self.query_indices],
                          codes["database"], labels[self.database_indices],
                          curves=self.curves, mesh=self.mesh)
    if not self.curves:
      metrics = {k: v for k, v in metrics.items() if k.startswith("map")}
    return {self.prefix + k: v for k, v in metrics.items()}, codes


def from_config(config: ml_collections.ConfigDict, *, encode, source,
                index_sets: dict[str, np.ndarray], mesh) -> dict[str, RetrievalEvaluator]:
  """{"test": query vs database with every metric, "validation": the validation
  queries vs the database minus them, mAP only, names prefixed "validation/"}.

  Cost of a validation run: encoding its queries and its database (all of the
  database but the validation queries: 68,000 images for Fashion-MNIST "ssdh"),
  as much as a test evaluation. After training it encodes nothing (`run`'s
  codes_at_hand: the test's database codes cover both); a mid-training one
  (eval.validation_every_epochs) pays it at every call.
  """
  index_sets = {**index_sets,
                "validation_database": splits_lib.validation_database(index_sets)}
  return {name: RetrievalEvaluator(
      config=config, encode=encode, source=source, query_indices=index_sets[queries],
      database_indices=index_sets[database], mesh=mesh, curves=name == "test",
      prefix="" if name == "test" else f"{name}/")
          for name, (queries, database) in SPLITS.items()}


def results_record(config: ml_collections.ConfigDict, index_sets: dict[str, np.ndarray],
                   metrics: dict[str, Any]) -> dict[str, Any]:
  """results.json's fields: the protocol the test metrics were computed under, then
  the metrics."""
  return {"dataset": config.data.name, "protocol": config.data.preset,
          "num_bits": config.model.num_bits, "seed": config.seed,
          "num_query": int(len(index_sets["query"])),
          "num_database": int(len(index_sets["database"])),
          "config_hash": config_hash(config),
          "conventions": ranking.METRIC_CONVENTIONS, **metrics}


def write_results(workdir: str, results: dict, codes: dict[str, np.ndarray], source,
                  index_sets: dict, *, config: dict, step: Optional[int]) -> dict:
  """Writes one generation of results (`generations.commit`, process 0): the packed
  codes (codes/<split>.npy, uint32 words; Eq. 12), the reports (results.md, plots)
  and results.json stamped with `step` and the digest of `config`, all made visible
  at once. Returns the stamped results."""
  if jax.process_index() != 0:
    return results
  query, database = index_sets["query"], index_sets["database"]

  def write_files(directory: str) -> None:
    for name, value in codes.items():
      io_utils.save_npy(io_utils.join(directory, workdir_lib.CODES_DIR, f"{name}.npy"),
                        ranking.pack_codes(value))
    reports.write_reports(directory, results=results, codes=codes,
                          query_indices=query, database_indices=database,
                          query_labels=source.labels[query],
                          database_labels=source.labels[database], source=source)

  return generations.commit(workdir, results, config=config, step=step,
                            write_files=write_files)


def format_results(results: dict) -> str:
  """One human-readable block: the protocol first, then every scalar metric."""
  lines = [f"{results['dataset']}, protocol {results['protocol']!r}, "
           f"{results['num_bits']} bits, seed {results['seed']}: "
           f"{results['num_query']} queries x {results['num_database']} database "
           f"images ({results['selection']})"]
  for k, v in sorted(results.items()):
    if k.startswith(("map", "precision", "validation/")) and isinstance(v, float):
      lines.append(f"  {k:<30s} {v:.4f}")
  lines.append("  (ranking by Hamming distance, ties by database index; "
               "docs/evaluation.md)")
  return "\n".join(lines)
