"""Checkpoints: a round trip restores what was saved, and a checkpoint written by
another config, or a damaged one, is refused with the fix instead of loading wrongly."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psch_jax import checkpointing
from psch_jax import config as psch_config
from psch_jax.errors import UserError


def _save_one(workdir, config):
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7)}
  targets = {"pseudo_labels": jnp.array([0, -1, 2], jnp.int32)}
  mngr = checkpointing.manager(str(workdir), keep=2)
  checkpointing.save(mngr, 7, state=state, targets=targets,
                     meta={"epoch": 1, "signature": checkpointing.shape_signature(config)})
  mngr.wait_until_finished()
  mngr.close()
  return state, targets


def _restore(workdir, config, state, targets):
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  mngr = checkpointing.manager(str(workdir), keep=2)
  try:
    return checkpointing.restore_latest(mngr, abstract_state=abstract(state),
                                        abstract_targets=abstract(targets), config=config)
  finally:
    mngr.close()


def test_round_trip(tmp_path):
  config = psch_config.base_config()
  state, targets = _save_one(tmp_path, config)
  restored_state, restored_targets, meta = _restore(tmp_path, config, state, targets)
  np.testing.assert_array_equal(restored_state["params"]["w"], state["params"]["w"])
  np.testing.assert_array_equal(restored_targets["pseudo_labels"], [0, -1, 2])
  assert int(restored_state["step"]) == 7 and meta["epoch"] == 1


def test_no_checkpoint_gives_none(tmp_path):
  config = psch_config.base_config()
  assert _restore(tmp_path, config, {"a": jnp.zeros(1)}, {"b": jnp.zeros(1)}) is None


@pytest.mark.parametrize("field,value", [("model", ("num_bits", 64)),
                                         ("model", ("backbone", "vgg16"))])
def test_checkpoint_of_another_config_is_refused(tmp_path, field, value):
  config = psch_config.base_config()
  state, targets = _save_one(tmp_path, config)
  other = psch_config.base_config()
  other[field][value[0]] = value[1]
  with pytest.raises(UserError, match=f"{field}.{value[0]}.*new --workdir"):
    _restore(tmp_path, other, state, targets)


def test_damaged_checkpoint_is_refused_with_the_fix(tmp_path):
  config = psch_config.base_config()
  state, targets = _save_one(tmp_path, config)
  step_dir = os.path.join(tmp_path, "checkpoints", "7", "state")
  for dirpath, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
  with pytest.raises(UserError, match="corrupt.*Delete that step directory"):
    _restore(tmp_path, config, state, targets)


def test_unfinished_save_is_removed_before_the_manager_returns(tmp_path):
  config = psch_config.base_config()
  _save_one(tmp_path, config)
  leftover = tmp_path / "checkpoints" / "9.orbax-checkpoint-tmp-1234"
  (leftover / "state").mkdir(parents=True)
  mngr = checkpointing.manager(str(tmp_path), keep=2)
  try:
    assert not leftover.exists()
    assert mngr.latest_step() == 7
  finally:
    checkpointing.close(mngr)


def test_restore_params_reads_only_the_params_as_numpy(tmp_path):
  config = psch_config.base_config()
  state, _ = _save_one(tmp_path, config)
  params = checkpointing.restore_params(
      str(tmp_path), jax.eval_shape(lambda: state["params"]))
  assert isinstance(params["w"], np.ndarray)
  np.testing.assert_array_equal(params["w"], state["params"]["w"])
  with pytest.raises(UserError, match="holds no checkpoint"):
    os.makedirs(tmp_path / "empty" / "checkpoints")
    checkpointing.restore_params(str(tmp_path / "empty"), {"w": params["w"]})
