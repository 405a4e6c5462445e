"""Tests of psch_jax.targets: the training set's pseudo labels at two levels."""
import numpy as np
import pytest

from psch_jax import run_setup
from psch_jax import train
from tests.helpers import needs_fashion_mnist, repo_config


@pytest.mark.slow
@needs_fashion_mnist
def test_fine_clusters_leave_the_pseudo_classes_of_a_one_level_run(tmp_path):
  labels = {}
  for fine in (None, 12):
    config = repo_config("fashion_mnist", "tiny")
    config.pseudo_labels.fine_clusters = fine
    run = run_setup.setup_run(config, str(tmp_path / str(fine)))
    try:
      state = run_setup.fresh_state(config, run.model, run.tx)
      labels[fine], stats = train.epoch_targets(config, run, state["params"], epoch=0)
    finally:
      run_setup.close_run(run)
  one_level, two_levels = labels[None], labels[12]
  np.testing.assert_array_equal(one_level["pseudo_labels"], two_levels["pseudo_labels"])
  assert "fine_labels" not in one_level
  fine_labels = two_levels["fine_labels"]
  assert fine_labels.shape == one_level["pseudo_labels"].shape
  assert set(np.unique(fine_labels)) <= set(range(-1, 12))
  assert len(np.unique(fine_labels[fine_labels >= 0])) == 12
  assert stats["fine"]["num_clusters"] == 12 and 0 < stats["fine"]["purity"] <= 1
  assert stats["fine"]["spectral"]["max_eigen_residual"] < 1e-4
