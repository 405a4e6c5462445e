"""Tests of psch_jax.targets: the training set's pseudo labels at two levels."""
import numpy as np

from psch_jax import targets as targets_lib
from psch_jax import train
from tests.helpers import needs_fashion_mnist, repo_config


def test_fine_parents_are_the_majority_pseudo_class_of_each_fine_cluster():
  fine = np.array([0, 0, 0, 1, 1, 2, -1, 2, 3], np.int32)
  coarse = np.array([1, 1, 0, 0, -1, 1, 0, 1, -1], np.int32)
  parents = targets_lib.fine_parents(fine, coarse, num_fine=5, num_coarse=2)
  # Cluster 1's one image labelled at both levels is in class 0; clusters 3 and 4 have
  # none and get 0.
  assert parents.dtype == np.int32 and parents.tolist() == [1, 0, 1, 0, 0]


@needs_fashion_mnist
def test_fine_clusters_leave_the_pseudo_classes_of_a_one_level_run(tmp_path):
  labels = {}
  for fine in (None, 12):
    config = repo_config("fashion_mnist", "tiny")
    config.pseudo_labels.fine_clusters = fine
    run = train.setup_run(config, str(tmp_path / str(fine)))
    try:
      state = train.fresh_state(config, run.model, run.tx)
      labels[fine], stats = train.epoch_targets(config, run, state["params"], epoch=0)
    finally:
      train.close_run(run)
  one_level, two_levels = labels[None], labels[12]
  np.testing.assert_array_equal(one_level["pseudo_labels"], two_levels["pseudo_labels"])
  assert "fine_labels" not in one_level
  fine_labels = two_levels["fine_labels"]
  assert fine_labels.shape == one_level["pseudo_labels"].shape
  assert set(np.unique(fine_labels)) <= set(range(-1, 12))
  assert len(np.unique(fine_labels[fine_labels >= 0])) == 12
  assert stats["fine"]["num_clusters"] == 12 and 0 < stats["fine"]["purity"] <= 1
  assert stats["fine"]["spectral"]["max_eigen_residual"] < 1e-4
  np.testing.assert_array_equal(
      two_levels["fine_parents"],
      targets_lib.fine_parents(fine_labels, two_levels["pseudo_labels"], num_fine=12,
                               num_coarse=config.pseudo_labels.num_clusters))
