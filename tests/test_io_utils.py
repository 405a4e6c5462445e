"""io_utils on a local disk and on gs:// (a real Cloud Storage emulator on 127.0.0.1,
reached through tf.io.gfile and TensorStore as in a run): round trips, writes that
leave no half file and no temporary objects, torn metrics records, Orbax checkpoints
and protocol splits in a gs:// work directory."""
import json
import os
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psch_jax import checkpointing
from psch_jax import config as psch_config
from psch_jax import io_utils
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
  """A fresh directory: a local one, or a fresh prefix in the emulated bucket."""
  if request.param == "local":
    return str(tmp_path / "run")
  return f"{request.getfixturevalue('gcs_bucket').url}/{uuid.uuid4().hex}/run"


def _gcs_names(gcs_bucket, directory: str) -> list:
  """Object names under gs:// `directory`, relative to it, asked of the emulator."""
  prefix = directory.removeprefix(gcs_bucket.url + "/") + "/"
  return [name.removeprefix(prefix) for name in gcs_bucket.objects(prefix)]


def test_workdir_path_keeps_gs_and_makes_local_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert os.fspath(io_utils.workdir_path("runs/a")) == str(tmp_path / "runs" / "a")
  gcs = io_utils.workdir_path("gs://bucket/runs/a")
  assert os.fspath(gcs) == "gs://bucket/runs/a"
  assert os.fspath(gcs / "results.json") == "gs://bucket/runs/a/results.json"
  assert io_utils.is_object_store(gcs) and not io_utils.is_object_store(tmp_path)


@pytest.mark.slow
def test_round_trips(root):
  io_utils.write_json(f"{root}/results.json", {"map@all": 0.5, "bits": [16, 32]})
  io_utils.write_text(f"{root}/results.md", "| a |\n| ü |\n")
  codes = np.array([[1, -1, 1], [-1, -1, 1]], np.int8)
  io_utils.save_npy(f"{root}/codes/query.npy", codes)
  io_utils.write_bytes(f"{root}/blob", bytes(range(256)))
  with io_utils.atomic_open(f"{root}/figure.txt") as f:
    f.write("line one\n")
    f.write("line two\n")

  assert io_utils.read_json(f"{root}/results.json", missing_fix="m", corrupt_fix="c") == {
      "map@all": 0.5, "bits": [16, 32]}
  assert io_utils.read_text(f"{root}/results.md") == "| a |\n| ü |\n"
  loaded = io_utils.load_npy(f"{root}/codes/query.npy")
  assert loaded.dtype == np.int8 and np.array_equal(loaded, codes)
  assert io_utils.read_bytes(f"{root}/blob") == bytes(range(256))
  assert io_utils.read_text(f"{root}/figure.txt") == "line one\nline two\n"
  assert io_utils.listdir(root) == ["blob", "codes", "figure.txt", "results.json",
                                    "results.md"]
  assert io_utils.isdir(f"{root}/codes") and io_utils.isfile(f"{root}/blob")
  assert not io_utils.isdir(f"{root}/blob")
  io_utils.remove(f"{root}/blob")
  assert not io_utils.exists(f"{root}/blob")
  io_utils.remove(f"{root}/blob")  # missing_ok by default
  with pytest.raises(FileNotFoundError):
    io_utils.remove(f"{root}/blob", missing_ok=False)


def test_writes_on_gcs_are_single_objects(gcs_bucket):
  """Each write is one object, under its final name: no temporary objects, no local
  folder named 'gs:' (the failure of os.path on a gs:// path)."""
  root = f"{gcs_bucket.url}/{uuid.uuid4().hex}/run"
  io_utils.write_json(f"{root}/results.json", {"a": 1})
  io_utils.write_json(f"{root}/results.json", {"a": 2})
  io_utils.save_npy(f"{root}/codes/query.npy", np.zeros(3, np.int8))
  with io_utils.atomic_open(f"{root}/figure.png", "wb") as f:
    f.write(b"\x89PNG")
  assert _gcs_names(gcs_bucket, root) == ["codes/query.npy", "figure.png",
                                          "results.json"]
  assert json.loads(io_utils.read_text(f"{root}/results.json")) == {"a": 2}
  assert not os.path.exists("gs:")


def test_failed_write_keeps_the_previous_file(root):
  io_utils.write_json(f"{root}/results.json", {"map@all": 0.5})
  with pytest.raises(RuntimeError):
    with io_utils.atomic_open(f"{root}/results.json") as f:
      f.write('{"map@all": ')
      raise RuntimeError("killed mid-write")
  assert io_utils.read_json(f"{root}/results.json", missing_fix="", corrupt_fix="") == {
      "map@all": 0.5}
  assert io_utils.listdir(root) == ["results.json"]


def test_metrics_records_survive_a_torn_last_record(root):
  path = f"{root}/metrics.jsonl"
  assert io_utils.read_jsonl(path) == []
  io_utils.append_jsonl(path, {"step": 1, "loss": 0.5})
  io_utils.append_jsonl(path, {"step": 2, "loss": 0.25})
  assert io_utils.read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
  # A kill in the middle of a record leaves a line without its newline.
  torn = io_utils.read_bytes(path) + b'{"loss": 0.1, "st'
  io_utils.write_bytes(path, torn)
  assert io_utils.read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.25}]
  # The resumed run's next record starts on a line of its own: the torn one is cut.
  io_utils.append_jsonl(path, {"step": 3, "loss": 0.125})
  assert io_utils.read_text(path).splitlines() == [
      '{"loss": 0.5, "step": 1}', '{"loss": 0.25, "step": 2}',
      '{"loss": 0.125, "step": 3}']


def test_corrupt_complete_metrics_line_is_an_error(root):
  io_utils.write_bytes(f"{root}/metrics.jsonl", b'{"step": 1}\nnot json\n')
  with pytest.raises(UserError, match="metrics.jsonl line 2 is not JSON"):
    io_utils.read_jsonl(f"{root}/metrics.jsonl")


def test_read_json_names_a_missing_or_corrupt_file(root):
  with pytest.raises(UserError, match="results.json is missing; run training"):
    io_utils.read_json(f"{root}/results.json", missing_fix="run training",
                       corrupt_fix="rerun")
  io_utils.write_text(f"{root}/results.json", '{"map@all": 0.')
  with pytest.raises(UserError, match="cannot read .*results.json.*rerun"):
    io_utils.read_json(f"{root}/results.json", missing_fix="", corrupt_fix="rerun")


def test_check_writable(root):
  io_utils.check_writable(root)
  assert io_utils.isdir(root) and io_utils.listdir(root) == []


def test_figure_written_through_a_buffer(root):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(1, 1))
  axes.plot([0, 1], [1, 0])
  io_utils.save_figure(f"{root}/curve.png", figure, dpi=20)
  plt.close(figure)
  assert io_utils.read_bytes(f"{root}/curve.png").startswith(b"\x89PNG\r\n")


@pytest.mark.slow
def test_orbax_checkpoint_round_trip_on_gcs(gcs_bucket):
  """checkpointing.py saves into gs://.../run/checkpoints and restores: TensorStore
  writes the arrays, tf.io.gfile the directories and metadata."""
  workdir = f"{gcs_bucket.url}/{uuid.uuid4().hex}/run"
  config = psch_config.base_config()
  state = {"params": {"w": jnp.arange(6.0).reshape(2, 3)}, "step": jnp.int32(7)}
  targets = {"pseudo_labels": jnp.array([0, -1, 2], jnp.int32)}
  mngr = checkpointing.manager(workdir, keep=2)
  assert os.fspath(mngr.directory) == f"{workdir}/checkpoints"
  checkpointing.save(mngr, 7, state=state, targets=targets,
                     meta={"epoch": 1, "signature": checkpointing.shape_signature(config)})
  mngr.wait_until_finished()
  checkpointing.close(mngr)
  names = _gcs_names(gcs_bucket, f"{workdir}/checkpoints")
  assert any(n.startswith("7/state/") for n in names), names
  assert "7/commit_success.txt" in names, names  # GCS: committed by a marker object
  assert not os.path.exists("gs:")

  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  mngr = checkpointing.manager(workdir, keep=2)
  try:
    restored_state, restored_targets, meta = checkpointing.restore_latest(
        mngr, abstract_state=abstract(state), abstract_targets=abstract(targets),
        config=config)
  finally:
    checkpointing.close(mngr)
  np.testing.assert_array_equal(restored_state["params"]["w"], state["params"]["w"])
  np.testing.assert_array_equal(restored_targets["pseudo_labels"], [0, -1, 2])
  assert int(restored_state["step"]) == 7 and meta["epoch"] == 1


def test_splits_saved_and_loaded_on_gcs(gcs_bucket):
  directory = f"{gcs_bucket.url}/{uuid.uuid4().hex}/run/splits"
  splits = {"query": np.array([0, 3]), "database": np.array([1, 2, 4, 5]),
            "train": np.array([1, 4]), "validation": np.array([2])}
  splits_lib.save_splits(splits, directory)
  assert _gcs_names(gcs_bucket, directory) == [
      "database.npy", "query.npy", "train.npy", "validation.npy"]
  loaded = splits_lib.load_splits(directory, num_examples=6)
  for name, indices in splits.items():
    assert loaded[name].dtype == np.int64 and np.array_equal(loaded[name], indices)
  io_utils.remove(f"{directory}/train.npy")
  with pytest.raises(UserError, match=f"Missing split file {directory}/train.npy"):
    splits_lib.load_splits(directory)
  io_utils.write_bytes(f"{directory}/train.npy", b"\x93NUMPY torn")
  with pytest.raises(UserError, match="Cannot read split file .*train.npy"):
    splits_lib.load_splits(directory)
