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


def _save_one(workdir, config, *, signature=None, targets=None):
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7)}
  if targets is None:
    targets = {"pseudo_labels": jnp.array([0, -1, 2], jnp.int32)}
  if signature is None:
    signature = checkpointing.shape_signature(config)
  mngr = checkpointing.manager(str(workdir), keep=2)
  checkpointing.save(mngr, 7, state=state, targets=targets,
                     meta={"epoch": 1, "signature": signature})
  checkpointing.close(mngr)  # waits for the save and records its checksums
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


def test_a_checkpoint_from_before_the_method_field_restores_as_psch(tmp_path):
  """Checkpoints saved before method.name joined the signature were PSCH's."""
  config = psch_config.base_config()
  signature = checkpointing.shape_signature(config)
  del signature["method.name"]
  state, targets = _save_one(tmp_path, config, signature=signature)
  assert _restore(tmp_path, config, state, targets) is not None
  assert checkpointing.saved_signature(str(tmp_path))["method.name"] == "psch"
  other = psch_config.base_config()
  other.method.name = "greedyhash"
  with pytest.raises(UserError, match="method.name: checkpoint 'psch' vs config "
                                      "'greedyhash'"):
    _restore(tmp_path, other, state, targets)


def test_a_method_without_targets_round_trips(tmp_path):
  """CIBHash keeps no targets; Orbax cannot save an empty tree, so a stand-in is."""
  config = psch_config.base_config()
  config.method.name = "cibhash"
  state, targets = _save_one(tmp_path, config, targets={})
  restored_state, restored_targets, _ = _restore(tmp_path, config, state, targets)
  assert restored_targets == {} and int(restored_state["step"]) == 7


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
  with pytest.raises(UserError, match="checkpoints/7 is damaged.*differs? from the "
                     "checksums.*Delete .*checkpoints/7 to train from the start"):
    _restore(tmp_path, config, state, targets)


def _flip_bytes(step_dir, count=64):
  """Flips `count` bytes in the middle of the largest array-data file of a step."""
  files = [os.path.join(d, n) for d, _, names in os.walk(step_dir) for n in names
           if os.sep + "d" + os.sep in os.path.join(d, n)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  middle = len(data) // 2
  for i in range(middle, min(middle + count, len(data))):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)


def test_flipped_bytes_in_the_newest_checkpoint_name_it_and_the_older_step(tmp_path):
  config = psch_config.base_config()
  state, targets = _save_one(tmp_path, config)
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  checkpointing.save(mngr, 9, state=state, targets=targets,
                     meta={"epoch": 1, "signature": checkpointing.shape_signature(config)})
  checkpointing.close(mngr)
  _flip_bytes(tmp_path / "checkpoints" / "9" / "state")
  # Never a silent fallback to step 7, neither for training nor for search.
  with pytest.raises(UserError, match="checkpoints/9 is damaged.*resume from step 7"):
    _restore(tmp_path, config, state, targets)
  with pytest.raises(UserError, match="checkpoints/9 is damaged"):
    checkpointing.restore_params(str(tmp_path), jax.eval_shape(lambda: state["params"]))


def test_a_non_finite_checkpoint_is_named_as_damage(tmp_path):
  config = psch_config.base_config()
  state, targets = _save_one(tmp_path, config)
  bad = {**state, "params": {"w": state["params"]["w"].at[0, 0].set(jnp.nan)}}
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  checkpointing.save(mngr, 9, state=bad, targets=targets,
                     meta={"epoch": 1, "signature": checkpointing.shape_signature(config)})
  checkpointing.close(mngr)
  with pytest.raises(UserError, match="checkpoints/9 holds non-finite values.*damaged"):
    _restore(tmp_path, config, state, targets)


def test_a_checkpoint_without_its_checksums_is_refused_by_readers(tmp_path):
  config = psch_config.base_config()
  state, _ = _save_one(tmp_path, config)
  os.remove(tmp_path / "checksums" / "7.json")
  # A later start does not bless it: only a save it announced gets recorded late.
  checkpointing.close(checkpointing.manager(str(tmp_path), keep=2))
  with pytest.raises(UserError, match="checksums/7.json is missing.*cannot be proven"):
    checkpointing.restore_params(str(tmp_path), jax.eval_shape(lambda: state["params"]))


def test_a_save_killed_before_its_record_is_recorded_at_the_next_start(tmp_path):
  config = psch_config.base_config()
  state, targets = _save_one(tmp_path, config)
  # What a kill between Orbax's commit and the record leaves: the announcement.
  os.remove(tmp_path / "checksums" / "7.json")
  (tmp_path / "checksums" / "7.pending").write_bytes(b"")
  restored_state, _, _ = _restore(tmp_path, config, state, targets)
  np.testing.assert_array_equal(restored_state["params"]["w"], state["params"]["w"])
  assert sorted(os.listdir(tmp_path / "checksums")) == ["7.json"]


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


def test_a_signal_during_a_save_is_raised_after_it_completes(tmp_path, monkeypatch):
  # What a command sees on Ctrl-C while Orbax finalizes a save: the save completes
  # (checksums recorded, so it restores), then Stopped; never an error inside Orbax.
  import signal
  from psch_jax import interrupts
  config = psch_config.base_config()
  mngr = checkpointing.manager(str(tmp_path), keep=2)
  checkpointing.save(mngr, 7, state={"w": jnp.arange(6.0)}, targets={}, meta={
      "epoch": 1, "signature": checkpointing.shape_signature(config)})
  wait_until_finished = mngr.wait_until_finished

  def interrupted_wait():
    os.kill(os.getpid(), signal.SIGINT)  # handled in this thread, inside the wait
    wait_until_finished()

  monkeypatch.setattr(mngr, "wait_until_finished", interrupted_wait)
  previous = signal.getsignal(signal.SIGINT)
  interrupts.install()
  try:
    with pytest.raises(interrupts.Stopped):
      checkpointing.close(mngr)
  finally:
    signal.signal(signal.SIGINT, previous)
  assert checkpointing.check_newest(str(tmp_path)) == 7
