"""The whole pipeline on tiny configs: train, checkpoint, resume, evaluate.

These are the tests that the product holds together: a config file goes in, codes and
metrics come out, the same seed gives the same bits, a killed run resumes to the same
codes, and the data-parallel step is the single-device step.
"""
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from psch_jax import generations
from psch_jax import io_utils
from psch_jax import monitoring
from psch_jax import run_setup
from psch_jax import sharding
from psch_jax import targets as targets_lib
from psch_jax import train
from psch_jax.evaluators import retrieval
from tests.helpers import (copy_run, ROOT, needs_fashion_mnist, repo_config, write_image,
                           write_list, write_matrix)



def read_outputs(workdir: str) -> tuple[dict, dict]:
  """results.json without its generation's random id, and the packed codes of its
  generation (local or gs://)."""
  results = generations.read(workdir)
  codes = {name: io_utils.load_npy(generations.path(workdir, results,
                                                    f"codes/{name}.npy"))
           for name in ("query", "database")}
  results["generation"] = {k: v for k, v in results["generation"].items() if k != "id"}
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


@pytest.mark.slow
def test_cifar10_tiny_trains_and_evaluates_on_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  config = repo_config("cifar10", "tiny")
  with tfds.testing.mock_data(num_examples=60):
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results["dataset"] == "cifar10" and results["protocol"] == "ssdh"
  for key in ("map@10", "map@all", "map@all_tie_aware", "precision@radius2"):
    assert 0.0 <= results[key] <= 1.0
  saved, codes = read_outputs(str(tmp_path))
  results["generation"] = {k: v for k, v in results["generation"].items() if k != "id"}
  assert saved == json.loads(json.dumps(results))
  assert codes["query"].shape == (results["num_query"], 1)  # 16 bits -> one word
  assert os.listdir(tmp_path / "checkpoints")
  records = io_utils.read_jsonl(tmp_path / "metrics.jsonl")
  epochs = [r for r in records if "epoch" in r and "loss" in r]
  assert epochs and all(np.isfinite(r["loss"]) for r in epochs)
  assert 0.0 <= epochs[-1]["data_wait_fraction"] <= 1.0


@needs_fashion_mnist
def test_eval_mode_reproduces_the_final_metrics(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "copy")
  os.remove(os.path.join(workdir, "results.json"))
  with open(os.path.join(tiny_run, "results.json")) as f:
    results = json.load(f)
  again = train.evaluate_checkpoint(repo_config("fashion_mnist", "tiny"), workdir)
  assert again["selection"] == "last epoch"  # the checkpoint of the finished run
  metrics = [k for k, v in results.items()
             if k.startswith(("map", "precision", "validation/")) and isinstance(v, float)]
  assert metrics and all(again[k] == results[k] for k in metrics)
  assert_same_run(tiny_run, workdir, compare=metrics)


@pytest.mark.slow
def test_four_devices_and_one_device_give_the_same_loss_after_20_steps():
  config = repo_config("cifar10", "tiny")
  config.unlock()
  config.train.global_batch_size = 32
  config.train.num_epochs = 20
  model = run_setup.build_model(config)
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
    mesh = sharding.make_mesh(devices)
    tx = run_setup.build_optimizer(config, steps_per_epoch=1)
    step_fn = train.make_train_step(config, model, tx, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    state = jax.device_put(run_setup.fresh_state(config, model, tx), replicated)
    t = jax.device_put(targets, replicated)
    out = []
    for step in range(20):
      pos = np.random.default_rng(step).choice(num_train, 32, replace=False)
      batch = jax.device_put({"images": images[pos], "position": pos.astype(np.int32)},
                             sharded)
      state, metrics = step_fn(state, batch, t)
      out.append(float(metrics["loss"]))
    return np.array(out)

  one, four = losses(jax.devices()[:1]), losses(jax.devices())
  assert len(jax.devices()) == 4
  assert abs(one[-1] - four[-1]) <= 1e-4, (one, four)


@pytest.mark.parametrize("name,list_file,label_file,image_dir,num_labels", [
    ("nus_wide", "img_tc21.txt", "targets_onehot_tc21.txt", "images", 21),
    ("mirflickr25k", "img.txt", "targets.txt", "mirflickr", 24),
])
@pytest.mark.slow
def test_manual_datasets_build_from_generated_files_and_train(
    tmp_path, name, list_file, label_file, image_dir, num_labels):
  root = tmp_path / "raw"
  num_images = 48
  paths = [f"{image_dir}/im{i + 1}.jpg" for i in range(num_images)]
  for i, path in enumerate(paths):
    write_image(str(root / path), i)
  labels = (np.random.default_rng(0).random((num_images, num_labels)) < 0.2)
  labels[np.arange(num_images), np.arange(num_images) % 3] = True
  write_list(str(root / list_file), paths)
  write_matrix(str(root / label_file), labels.astype(np.uint8))
  config = repo_config(name, "tiny")
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
  log = monitoring.MetricsLog(str(tmp_path), tensorboard=True)
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
def test_final_validation_from_database_codes_equals_encoding_again(tiny_run,
                                                                    tmp_path):
  config = repo_config("fashion_mnist", "tiny")
  run = run_setup.setup_run(config, copy_run(tiny_run, tmp_path / "copy"))
  try:
    state, _, _ = train.restore_checkpoint(config, run)
    evaluators = retrieval.from_config(config, encode=run.encode, source=run.source,
                                       index_sets=run.index_sets, mesh=run.mesh)
    _, codes = evaluators["test"].run(state["params"])
    looked_up, _ = evaluators["validation"].run(
        state["params"], codes_at_hand=(run.index_sets["database"], codes["database"]))
    encoded, _ = evaluators["validation"].run(state["params"])
  finally:
    run_setup.close_run(run)
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
  progress = monitoring.Progress(total=200, initial=0, epoch=1, num_epochs=3, stream=stream)
  for _ in range(200):
    progress.update(_STEP_METRICS, images_per_s=1000.0)
  progress.close()
  lines = stream.text.splitlines()
  assert lines == ["epoch 2/3: step 200/200, loss=0.5000, sim=0.2500, cls=0.125, "
                   "q=0.062, img_s=1000"], lines


def test_progress_into_a_log_adds_a_line_at_most_every_line_every_s():
  stream = _Stream(tty=False)
  progress = monitoring.Progress(total=3, initial=0, epoch=0, num_epochs=1, stream=stream,
                            line_every_s=0.0)
  for _ in range(3):
    progress.update(_STEP_METRICS, images_per_s=10.0)
  progress.close()
  steps = [line.split(",")[0] for line in stream.text.splitlines()]
  assert steps == ["epoch 1/1: step 1/3", "epoch 1/1: step 2/3", "epoch 1/1: step 3/3"]


def test_progress_on_a_terminal_draws_a_live_bar():
  stream = _Stream(tty=True)
  progress = monitoring.Progress(total=4, initial=1, epoch=0, num_epochs=2, stream=stream)
  for _ in range(3):
    progress.update(_STEP_METRICS, images_per_s=10.0)
  progress.close()
  assert "\r" in stream.text and "4/4" in stream.text and "loss=0.5000" in stream.text


# ------------------------------------------------- the loop does not wait for the device

_TIMING_FIELDS = ("data_wait_fraction", "images_per_s")


class _Loop:
  """`train.run_epoch` on synthetic data: Fashion-MNIST tiny's network and loss on the
  8-device mesh, `steps_per_epoch` steps of random images and random targets."""

  def __init__(self, steps_per_epoch: int = 10, **train_fields):
    config = repo_config("fashion_mnist", "tiny")
    config.unlock()
    config.train.update(train_fields)
    self.config = config
    self.model = run_setup.build_model(config)
    self.mesh = sharding.make_mesh()
    self.steps_per_epoch = steps_per_epoch
    batch = config.train.global_batch_size
    self.num_train = steps_per_epoch * batch
    rng = np.random.default_rng(0)
    self.images = rng.integers(0, 256, (self.num_train, 28, 28, 1), dtype=np.uint8)
    num_clusters = config.pseudo_labels.num_clusters
    self.targets = jax.tree.map(
        lambda a: (rng.integers(-1, num_clusters, a.shape).astype(a.dtype)
                   if a.dtype == jnp.int32 else rng.random(a.shape, np.float32)),
        targets_lib.abstract_targets(config, self.num_train, self.model, None,
                                     pixel_dim=28 * 28))
    self.order = [rng.permutation(self.num_train)[:batch] for _ in range(steps_per_epoch)]

  def batches(self, before_each=None):
    """The epoch's batches; `before_each(n)` runs when the loop asks for batch n
    (after it dispatched steps 1..n) and once more after the last."""
    for n, index in enumerate(self.order):
      if before_each is not None and n:
        before_each(n)
      yield {"images": self.images[index], "index": index}
    if before_each is not None:
      before_each(len(self.order))

  def run(self, workdir, *, wrap_step=None, before_each=None, save=None) -> dict:
    """One epoch from a fresh state; returns its metrics.jsonl record."""
    tx = run_setup.build_optimizer(self.config, self.steps_per_epoch)
    step_fn = train.make_train_step(self.config, self.model, tx, self.mesh)
    if wrap_step is not None:
      step_fn = wrap_step(step_fn)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    state = jax.device_put(run_setup.fresh_state(self.config, self.model, tx), replicated)
    targets = jax.device_put(self.targets, replicated)
    os.makedirs(workdir, exist_ok=True)
    log = monitoring.MetricsLog(str(workdir), tensorboard=False)
    loop = train.EpochLoop(train_step=step_fn, mesh=self.mesh,
                           train_indices=np.arange(self.num_train),
                           steps_per_epoch=self.steps_per_epoch, log=log,
                           save=save or (lambda step, state: None))
    train.run_epoch(self.config, loop, state, targets, self.batches(before_each), step=0)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      (record,) = [json.loads(line) for line in f]
    return record


def _slowed(step_fn, mesh):
  """(`step_fn` whose metrics are ready only after more device work, so a loop that
  waited for a step's metrics would find them ready; the shortest time that work
  takes alone, in seconds)."""
  replicated = sharding.replicated(mesh)
  work = jax.device_put(jnp.full((256, 256), 1 / 256, jnp.float32), replicated)

  @jax.jit
  def slow(metrics, work):
    busy = jax.lax.fori_loop(0, 30, lambda _, a: jnp.tanh(a @ a), work).sum()
    return jax.tree.map(lambda m: m + 0.0 * busy, metrics)  # the same values

  def step(state, batch, targets):
    state, metrics = step_fn(state, batch, targets)
    return state, slow(metrics, work)

  probe = {"loss": jnp.zeros(())}
  jax.block_until_ready(slow(probe, work))  # compiled before it is timed
  times = []
  for _ in range(3):
    start = time.perf_counter()
    slow(probe, work)["loss"].addressable_data(0).block_until_ready()
    times.append(time.perf_counter() - start)
  return step, min(times)


@pytest.mark.slow
def test_the_loop_reads_the_device_only_at_log_points_and_saves(tmp_path):
  # 10 steps; reads at the log points 4 and 8, before the saves at 7 and 10 (the
  # epoch end). On the host CPU the transfer guard cannot fire (a CPU array is host
  # memory), so the test also looks at the device from the input pipeline: when the
  # loop asks for the next batch, the metrics of the step it just dispatched are
  # ready only where the loop read them. On a GPU or TPU the guard fails any other
  # device-to-host transfer.
  loop = _Loop(steps_per_epoch=10, log_every_steps=4, checkpoint_every_steps=7)
  dispatched, dispatched_at, ready, waited, saved = [], [], {}, {}, []
  busy_s = []

  def wrap(step_fn):
    slowed, seconds = _slowed(step_fn, loop.mesh)
    busy_s.append(seconds)

    def step(state, batch, targets):
      state, metrics = slowed(state, batch, targets)
      dispatched.append(metrics)
      dispatched_at.append(time.perf_counter())
      return state, metrics

    return step

  def look(n):
    # The copy on the first device: the one a read waits for (the metrics are
    # replicated, and the other devices may still be computing theirs).
    ready[n] = dispatched[n - 1]["loss"].addressable_data(0).is_ready()
    waited[n] = time.perf_counter() - dispatched_at[n - 1]

  with jax.transfer_guard_device_to_host("disallow_explicit"):
    windowed = loop.run(tmp_path / "windowed", wrap_step=wrap, before_each=look,
                        save=lambda step, state: saved.append(step))
  assert saved == [7, 10]
  reads = [4, 7, 8, 10]  # the log points and the saves
  assert all(ready[n] for n in reads), ready
  # Elsewhere the metrics are still being computed when the loop asks for the next
  # batch, unless the host itself was held up for as long as the device work takes
  # (a loaded machine can deschedule it): such a step tells nothing and is left out.
  # From step 2: the first call compiles the step and the slowing, on the host.
  telling = [n for n in range(2, 11) if n not in reads and waited[n] < busy_s[0]]
  assert len(telling) >= 3, (waited, busy_s)
  assert not any(ready[n] for n in telling), (ready, waited, busy_s)

  # The epoch's means are the same numbers as when every step is read (the loop
  # before train.log_every_steps), which the slowing does not change.
  loop.config.train.log_every_steps = 1
  every_step = loop.run(tmp_path / "every_step")
  for record in (windowed, every_step):
    for name in _TIMING_FIELDS:
      del record[name]
  assert windowed == every_step
  assert windowed["step"] == 10 and np.isfinite(windowed["loss"])


def test_a_guard_would_catch_a_read_in_the_loop():
  # The premise of the test above: the reads it counts on are ones a guard sees
  # where the device is not the host (jax.device_get is explicit).
  x = jnp.arange(3.0) + 1
  if jax.devices()[0].platform == "cpu":
    pytest.skip("the device-to-host guard does not apply to the host CPU")
  with jax.transfer_guard_device_to_host("disallow_explicit"):
    with pytest.raises(Exception, match="[Dd]isallowed"):
      jax.device_get(x)


def _first_non_finite(error: str) -> tuple[int, int, int]:
  match = re.search(r"non-finite (.*) within steps \[(\d+), (\d+)\], first at step "
                    r"(\d+): training stopped", error)
  assert match, error
  assert "loss" in match.group(1)
  return int(match.group(2)), int(match.group(3)), int(match.group(4))


@pytest.mark.slow
def test_a_non_finite_loss_names_its_steps_and_nothing_after_it_is_saved(tmp_path):
  # learning_rate=1e30 (as test_reliability's CLI test): the warmup's first step has
  # learning rate 0, then the parameters blow up. Saves every 2 steps; no log point.
  loop = _Loop(steps_per_epoch=10, log_every_steps=100, checkpoint_every_steps=2)
  loop.config.optim.learning_rate = 1e30
  saved = []

  def save(step, state):
    saved.append(step)
    leaves = jax.tree.leaves(jax.device_get(state["params"]))
    assert all(np.all(np.isfinite(x)) for x in leaves), f"non-finite state saved at {step}"

  with pytest.raises(FloatingPointError) as error:
    loop.run(tmp_path / "windowed", save=save)
  first_step, last_step, bad_step = _first_non_finite(str(error.value))
  assert (first_step - 1) % 2 == 0 and last_step == first_step + 1
  assert first_step <= bad_step <= last_step
  assert saved and max(saved) < bad_step, (saved, bad_step)
  assert saved == list(range(2, first_step, 2))

  # Reading every step finds the same first bad step.
  loop.config.train.log_every_steps = 1
  with pytest.raises(FloatingPointError) as error:
    loop.run(tmp_path / "every_step")
  assert _first_non_finite(str(error.value)) == (bad_step, bad_step, bad_step)


@pytest.mark.slow
def test_a_non_finite_state_with_finite_metrics_is_not_saved(tmp_path):
  # A state can turn non-finite through the update while the metrics, computed
  # before it, are finite: the read before a save checks the state itself.
  loop = _Loop(steps_per_epoch=6, log_every_steps=100, checkpoint_every_steps=2)
  saved, calls = [], []

  def wrap(step_fn):
    def step(state, batch, targets):
      state, metrics = step_fn(state, batch, targets)
      calls.append(1)
      if len(calls) == 4:  # Step 4 leaves NaN parameters; its metrics are finite.
        state = dict(state, params=jax.tree.map(lambda p: p * jnp.nan, state["params"]))
      return state, metrics
    return step

  with pytest.raises(FloatingPointError, match=r"non-finite parameters or optimizer "
                     r"state after step 4 \(the metrics of steps \[3, 4\] are finite\)"):
    loop.run(tmp_path, wrap_step=wrap, save=lambda step, state: saved.append(step))
  assert saved == [2]
