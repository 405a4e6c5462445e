"""The whole pipeline on tiny configs: train, checkpoint, resume, evaluate.

These are the tests that the product holds together: a config file goes in, codes and
metrics come out, the same seed gives the same bits, a killed run resumes to the same
codes, and the data-parallel step is the single-device step.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from psch_jax import io_utils
from psch_jax import targets as targets_lib
from psch_jax import train
from psch_jax.data import sources
from psch_jax.evaluators import retrieval

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION_MNIST = os.path.isdir(sources.DEFAULT_FASHION_MNIST_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST, reason="apt-get install dataset-fashion-mnist")


def load_config(name: str, variant: str = "tiny"):
  """configs/<name>.py:<variant>, through the public loader."""
  from psch_jax import cli  # pylint: disable=import-outside-toplevel
  return cli.load_config(os.path.join(ROOT, "configs", f"{name}.py:{variant}"))


def read_outputs(workdir: str) -> tuple[dict, dict]:
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  codes = {name: np.load(os.path.join(workdir, "codes", f"{name}.npy"))
           for name in ("query", "database")}
  return results, codes


def assert_same_run(workdir_a: str, workdir_b: str, compare=None) -> None:
  """Bitwise-equal packed codes, and equal results (all keys, or those in `compare`)."""
  results_a, codes_a = read_outputs(workdir_a)
  results_b, codes_b = read_outputs(workdir_b)
  for name in codes_a:
    np.testing.assert_array_equal(codes_a[name], codes_b[name])
  if compare is not None:
    results_a = {k: results_a[k] for k in compare}
    results_b = {k: results_b[k] for k in compare}
  assert results_a == results_b


def run_main(workdir, *extra, env=None, **kwargs) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, "main.py", "--config=configs/fashion_mnist.py:tiny",
       f"--workdir={workdir}", *extra],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      **kwargs)


def test_cifar10_tiny_trains_and_evaluates_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  config = load_config("cifar10")
  with tfds.testing.mock_data(num_examples=60):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results["dataset"] == "cifar10" and results["protocol"] == "ssdh"
  for key in ("map@10", "map@all", "map@all_tie_aware", "precision@radius2"):
    assert 0.0 <= results[key] <= 1.0
  saved, codes = read_outputs(str(tmp_path))
  assert saved == json.loads(json.dumps(results))
  assert codes["query"].shape == (results["num_query"], 1)  # 16 bits -> one word
  assert os.listdir(tmp_path / "checkpoints")
  records = io_utils.read_jsonl(tmp_path / "metrics.jsonl")
  epochs = [r for r in records if "epoch" in r and "loss" in r]
  assert epochs and all(np.isfinite(r["loss"]) for r in epochs)
  assert 0.0 <= epochs[-1]["data_wait_fraction"] <= 1.0


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """One uninterrupted Fashion-MNIST tiny run, the reference the others match."""
  if not FASHION_MNIST:
    pytest.skip("apt-get install dataset-fashion-mnist")
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(load_config("fashion_mnist"), workdir)
  return workdir


@needs_fashion_mnist
def test_same_seed_gives_bitwise_identical_codes_and_metrics(reference_run, tmp_path):
  train.train_and_evaluate(load_config("fashion_mnist"), str(tmp_path))
  assert_same_run(reference_run, str(tmp_path))


@needs_fashion_mnist
def test_eval_mode_reproduces_the_final_metrics(reference_run, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(reference_run, workdir)
  os.remove(os.path.join(workdir, "results.json"))
  with open(os.path.join(reference_run, "results.json")) as f:
    results = json.load(f)
  again = train.evaluate_checkpoint(load_config("fashion_mnist"), workdir)
  assert again["selection"] == "latest checkpoint"
  metrics = [k for k, v in results.items()
             if k.startswith(("map", "precision")) and isinstance(v, float)]
  assert metrics and all(again[k] == results[k] for k in metrics)
  assert_same_run(reference_run, workdir, compare=metrics)


@needs_fashion_mnist
def test_sigkill_mid_training_then_rerun_resumes_to_the_same_codes(reference_run,
                                                                   tmp_path):
  workdir = str(tmp_path)
  proc = run_main(workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 300
  # Kill once the first checkpoint is complete (Orbax renames it from *-tmp-*).
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(checkpoints) and any(
        name.isdigit() for name in os.listdir(checkpoints)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed:\n" + \
      proc.stdout.read()
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  rerun = run_main(workdir)
  output, _ = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, output
  assert "resumed from step" in output
  assert_same_run(reference_run, workdir)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@needs_fashion_mnist
def test_two_processes_train_together_and_report_the_same_metrics(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  address = f"127.0.0.1:{_free_port()}"
  procs = [run_main(str(tmp_path), f"--coordinator_address={address}",
                    "--num_processes=2", f"--process_id={i}", env=env)
           for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  reports = [out[out.index("[process"):].split("\n", 1)[1] for out in outputs]
  assert "map@all" in reports[0] and reports[0] == reports[1]


def test_eight_devices_and_one_device_give_the_same_loss_after_20_steps():
  config = load_config("cifar10")
  config.unlock()
  config.train.global_batch_size = 32
  config.train.num_epochs = 20
  model = train.build_model(config)
  num_train = 64
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8)
  fmap_parts = config.attention.num_parts
  targets = {"pseudo_labels": rng.integers(-1, 3, num_train).astype(np.int32),
             "part_descriptors": rng.random((num_train, fmap_parts, 32), np.float32),
             "part_weights": np.full((num_train, fmap_parts), 1 / fmap_parts, np.float32),
             "cluster_affinity": np.eye(config.pseudo_labels.num_clusters,
                                        dtype=np.float32)}
  abstract = targets_lib.abstract_targets(config, num_train, model, None)
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(np.shape, targets)

  def losses(devices):
    mesh = train.make_mesh(devices)
    tx = train.build_optimizer(config, steps_per_epoch=1)
    step_fn = train.make_train_step(config, model, tx, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(train.fresh_state(config, model, tx), replicated)
    t = jax.device_put(targets, replicated)
    out = []
    for step in range(20):
      pos = np.random.default_rng(step).choice(num_train, 32, replace=False)
      batch = jax.device_put({"images": images[pos], "position": pos.astype(np.int32)},
                             sharded)
      state, metrics = step_fn(state, batch, t)
      out.append(float(metrics["loss"]))
    return np.array(out)

  one, eight = losses(jax.devices()[:1]), losses(jax.devices()[:8])
  assert len(jax.devices()) == 8
  assert abs(one[-1] - eight[-1]) <= 1e-4, (one, eight)


@pytest.mark.parametrize("name,list_file,label_file,image_dir,num_labels", [
    ("nus_wide", "img_tc21.txt", "targets_onehot_tc21.txt", "images", 21),
    ("mirflickr25k", "img.txt", "targets.txt", "mirflickr", 24),
])
def test_manual_datasets_build_from_generated_files_and_train(
    tmp_path, name, list_file, label_file, image_dir, num_labels):
  from tests.test_data_builders import _write_image, _write_list, _write_matrix
  root = tmp_path / "raw"
  num_images = 48
  paths = [f"{image_dir}/im{i + 1}.jpg" for i in range(num_images)]
  for i, path in enumerate(paths):
    _write_image(str(root / path), i)
  labels = (np.random.default_rng(0).random((num_images, num_labels)) < 0.2)
  labels[np.arange(num_images), np.arange(num_images) % 3] = True
  _write_list(str(root / list_file), paths)
  _write_matrix(str(root / label_file), labels.astype(np.uint8))
  config = load_config(name)
  config.unlock()
  config.data.manual_dir = str(root)
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.num_validation = 4
  config.data.query_per_class = 1
  config.data.train_per_class = 1
  results = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert results["dataset"] == name and results["steps"] >= 1
  assert 0.0 <= results["map@5"] <= 1.0
  losses = [r["loss"] for r in io_utils.read_jsonl(tmp_path / "work" / "metrics.jsonl")
            if "loss" in r]
  assert losses and all(np.isfinite(losses))


def test_metrics_log_writes_jsonl_and_tensorboard_on_request(tmp_path):
  log = train.MetricsLog(str(tmp_path), tensorboard=True)
  log.write(3, {"loss": 0.5, "pseudo_labels": {"kept_fraction": 0.7}})
  assert io_utils.read_jsonl(tmp_path / "metrics.jsonl") == [
      {"step": 3, "loss": 0.5, "pseudo_labels": {"kept_fraction": 0.7}}]
  events = os.listdir(tmp_path / "tensorboard")
  assert events and events[0].startswith("events.out.tfevents")
  import tensorflow as tf
  values = [v.tensor for e in tf.compat.v1.train.summary_iterator(
      str(tmp_path / "tensorboard" / events[0])) for v in e.summary.value]
  assert len(values) == 1 and tf.make_ndarray(values[0]) == np.float32(0.5)


@needs_fashion_mnist
def test_final_validation_from_database_codes_equals_encoding_again(reference_run):
  config = load_config("fashion_mnist")
  run = train.setup_run(config, reference_run)
  try:
    state, _, _ = train.restore_checkpoint(config, run)
    evaluators = retrieval.from_config(config, encode=run.encode, source=run.source,
                                       index_sets=run.index_sets, mesh=run.mesh)
    _, codes = evaluators["test"].run(state["params"])
    looked_up, _ = evaluators["validation"].run(
        state["params"], codes_at_hand=(run.index_sets["database"], codes["database"]))
    encoded, _ = evaluators["validation"].run(state["params"])
  finally:
    train.close_run(run)
  assert looked_up and looked_up == encoded


class _Stream:
  """A text stream that says whether it is a terminal."""

  def __init__(self, tty: bool):
    self.tty, self.text = tty, ""

  def isatty(self) -> bool:
    return self.tty

  def write(self, text: str) -> int:
    self.text += text
    return len(text)

  def flush(self) -> None:
    pass


_STEP_METRICS = {"loss": 0.5, "loss_sim": 0.25, "loss_cls": 0.125, "loss_quant": 0.0625}


def test_progress_into_a_log_writes_one_line_per_epoch_not_every_redraw():
  stream = _Stream(tty=False)
  progress = train.Progress(total=200, initial=0, epoch=1, num_epochs=3, stream=stream)
  for _ in range(200):
    progress.update(_STEP_METRICS, images_per_s=1000.0)
  progress.close()
  lines = stream.text.splitlines()
  assert lines == ["epoch 2/3: step 200/200, loss=0.5000, sim=0.2500, cls=0.125, "
                   "q=0.062, img_s=1000"], lines


def test_progress_into_a_log_adds_a_line_at_most_every_line_every_s():
  stream = _Stream(tty=False)
  progress = train.Progress(total=3, initial=0, epoch=0, num_epochs=1, stream=stream,
                            line_every_s=0.0)
  for _ in range(3):
    progress.update(_STEP_METRICS, images_per_s=10.0)
  progress.close()
  steps = [line.split(",")[0] for line in stream.text.splitlines()]
  assert steps == ["epoch 1/1: step 1/3", "epoch 1/1: step 2/3", "epoch 1/1: step 3/3"]


def test_progress_on_a_terminal_draws_a_live_bar():
  stream = _Stream(tty=True)
  progress = train.Progress(total=4, initial=1, epoch=0, num_epochs=2, stream=stream)
  for _ in range(3):
    progress.update(_STEP_METRICS, images_per_s=10.0)
  progress.close()
  assert "\r" in stream.text and "4/4" in stream.text and "loss=0.5000" in stream.text
