"""Tests for psch_jax/evaluators/retrieval.py: which images each evaluator ranks."""
import dataclasses

import numpy as np

from psch_jax import config as psch_config
from psch_jax import ranking
from psch_jax.data import splits as splits_lib
from psch_jax.evaluators import retrieval


@dataclasses.dataclass
class _LabelsOnly:
  """The part of an ImageSource a run with codes_at_hand reads."""
  labels: np.ndarray


def _splits_and_labels(num_classes=4, per_class_train=60, per_class_test=15):
  rng = np.random.default_rng(7)
  classes = np.concatenate([
      rng.permutation(np.repeat(np.arange(num_classes), per_class_train)),
      rng.permutation(np.repeat(np.arange(num_classes), per_class_test))])
  labels = np.eye(num_classes, dtype=np.uint8)[classes]
  official = np.array(["train"] * (num_classes * per_class_train)
                      + ["test"] * (num_classes * per_class_test))
  s = splits_lib.make_splits(labels, official, dataset="fashion_mnist",
                             preset="ssdh", seed=0, query_per_class=5,
                             train_per_class=10)
  return s, labels


def _config():
  c = psch_config.base_config()
  c.eval.topk = (10,)
  return c


def test_validation_ranks_its_queries_against_the_rest_of_the_database():
  s, _ = _splits_and_labels()
  evaluators = retrieval.from_config(_config(), encode=None, source=None,
                                     index_sets=s, mesh=None)
  test, validation = evaluators["test"], evaluators["validation"]
  assert np.array_equal(test.query_indices, s["query"])
  assert np.array_equal(test.database_indices, s["database"])
  assert np.array_equal(validation.query_indices, s["validation"])
  # The validation database: the test's, less exactly the validation queries.
  assert np.array_equal(validation.database_indices,
                        np.setdiff1d(s["database"], s["validation"]))
  assert not np.intersect1d(validation.query_indices, s["query"]).size
  assert not np.intersect1d(validation.query_indices,
                            validation.database_indices).size
  assert (len(validation.database_indices)
          == len(s["database"]) - len(s["validation"]))
  assert validation.prefix == "validation/" and not validation.curves


def test_validation_from_the_database_codes_scores_validation_vs_the_rest():
  s, labels = _splits_and_labels()
  rng = np.random.default_rng(1)
  codes = rng.choice(np.array([-1, 1], np.int8), (labels.shape[0], 12))
  config = _config()
  validation = retrieval.from_config(config, encode=None, source=_LabelsOnly(labels),
                                     index_sets=s, mesh=None)["validation"]
  metrics, looked_up = validation.run(
      None, codes_at_hand=(s["database"], codes[s["database"]]))
  rest = np.setdiff1d(s["database"], s["validation"])
  expected = ranking.retrieval_metrics(codes[s["validation"]], labels[s["validation"]],
                                       codes[rest], labels[rest], topk=(10,),
                                       curves=False)
  assert metrics == {f"validation/{k}": v for k, v in expected.items()
                     if k.startswith("map")}
  assert {"validation/map@all", "validation/map@10"} <= set(metrics)
  assert np.array_equal(looked_up["query"], codes[s["validation"]])
  assert np.array_equal(looked_up["database"], codes[rest])
