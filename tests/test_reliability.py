"""Reliability: bad input stops with the fix, a killed run resumes to the same result,
and evaluation memory does not grow with the database.

docs/reliability.md lists every case with the test that covers it. The command-line
tests run `python main.py`: a few seconds when the input is refused before training,
about 30 s for a Fashion-MNIST tiny run on 2 cores (mostly start-up). One uninterrupted
reference run is shared (fixture `tiny_run`, conftest.py); the crash test's work
directory is killed three times and then completed.
"""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from psch_jax import checkpointing
from psch_jax import experiments
from psch_jax import config as psch_config
from psch_jax import io_utils
from psch_jax import monitoring
from psch_jax import ranking
from psch_jax import reports
from psch_jax import run_setup
from psch_jax import search
from psch_jax import train
from psch_jax.data import mirflickr25k
from psch_jax.data import nus_wide
from psch_jax.data import splits as splits_lib
from psch_jax.errors import UserError
from tests.helpers import (ROOT, copy_run, needs_fashion_mnist, nus_split_lists, write_image,
                           write_list)

TINY = "--config=configs/fashion_mnist.py:tiny"


TINY_CONFIG = os.path.join(ROOT, "configs", "fashion_mnist.py:tiny")


# ------------------------------------------------------------- running main.py

def start_main(log_path: str, *args: str) -> subprocess.Popen:
  """`python main.py *args` in the background, stdout and stderr into `log_path`."""
  with open(log_path, "w") as log:
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


# Linux counts in a child's peak RSS (ru_maxrss) what its parent held when it spawned
# it: a pytest worker that has run the VGG-16 tests holds 2 GB, and every child it
# starts then "peaked" at 2 GB. So main.py is spawned by a small Python that only
# waits for it and writes its peak (KiB) to a file.
_PEAK_RSS_OF_CHILD = (
    "import os, sys; pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ); "
    "_, status, usage = os.wait4(pid, 0); "
    "open(sys.argv[1], 'w').write(str(usage.ru_maxrss)); "
    "sys.exit(os.waitstatus_to_exitcode(status))")


def run_main(tmp_path, *args: str) -> tuple[int, str, int]:
  """Runs `python main.py *args` to the end: (exit code, output, peak RSS in MiB)."""
  log_path = str(tmp_path / f"main-{time.monotonic_ns()}.log")
  peak_path = log_path + ".peak"
  with open(log_path, "w") as log:
    code = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS_OF_CHILD, peak_path, sys.executable,
         "main.py", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        check=False).returncode
  with open(log_path) as f, open(peak_path) as peak:
    return code, f.read(), int(peak.read()) // 1024


def tiny_config(**fields):
  """configs/fashion_mnist.py:tiny with `fields` ("section.field": value) set, as
  --config.<section>.<field>=<value> sets them."""
  config = psch_config.load_config(TINY_CONFIG)
  for name, value in fields.items():
    section, field = name.split(".")
    config[section][field] = value
  return config


def snapshot(workdir: str) -> dict[str, str]:
  """{relative path: sha256} of every file under `workdir`."""
  files = {}
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
  return files


def read_outputs(workdir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """The metrics of results.json and the packed codes of a finished run."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  metrics = {k: v for k, v in results.items()
             if k.startswith(("map", "precision", "validation/", "pr_curve"))}
  codes = {name: np.load(os.path.join(workdir, "codes", f"{name}.npy"))
           for name in ("query", "database")}
  return metrics, codes


# ----------------------------------------------------------------- crash safety

def _kill_when(workdir: str, log_path: str, ready, what: str) -> None:
  """Starts a run on `workdir` and SIGKILLs it as soon as `ready()` holds."""
  proc = start_main(log_path, TINY, f"--workdir={workdir}")
  deadline = time.monotonic() + 400
  while not ready():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      with open(log_path) as f:
        pytest.fail(f"the run ended before it could be killed {what}:\n{f.read()}")
    time.sleep(0.005)
  proc.kill()  # SIGKILL: no cleanup handler runs
  proc.wait()


@pytest.mark.slow
@needs_fashion_mnist
def test_killed_four_times_then_rerun_ends_with_the_uninterrupted_codes_and_metrics(
    tiny_run, tmp_path):
  workdir = str(tmp_path / "work")
  checkpoints = os.path.join(workdir, "checkpoints")
  results = os.path.join(workdir, "results.json")
  log = lambda i: str(tmp_path / f"run{i}.log")

  def entries():
    return os.listdir(checkpoints) if os.path.isdir(checkpoints) else []

  # 1. Before the first checkpoint: splits drawn (config.json is written before
  # them, the last split file last), pseudo labels being computed.
  last_split = os.path.join(workdir, "splits", f"{splits_lib.SPLIT_NAMES[-1]}.npy")
  _kill_when(workdir, log(1), lambda: os.path.exists(last_split),
             "before its first checkpoint")
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert not any(name.isdigit() for name in entries())

  # 2. During the first checkpoint save (Orbax writes into *.orbax-checkpoint-tmp*
  # and renames it when complete), or just after it when the save was too quick.
  _kill_when(workdir, log(2), lambda: any("tmp" in n or n.isdigit() for n in entries()),
             "while saving its first checkpoint")
  assert not os.path.exists(results)
  first_save_completed = any(name.isdigit() for name in entries())

  # 3. In the middle of training, once a checkpoint before the last is complete:
  # the next run must resume from it (the removed test_train.py kill case).
  config = psch_config.load_config(TINY_CONFIG)
  num_train = len(np.load(os.path.join(workdir, "splits", "train.npy")))
  last_step = num_train // config.train.global_batch_size * config.train.num_epochs
  saved_before = {n for n in entries() if n.isdigit()}
  _kill_when(workdir, log(3),
             lambda: any(n.isdigit() and n not in saved_before and int(n) < last_step
                         for n in entries()),
             "in the middle of training")
  assert not os.path.exists(results)
  with open(log(3)) as f:
    assert ("resumed from step" in f.read()) == first_save_completed

  # 4. During the evaluation after training: the last checkpoint is complete.
  _kill_when(workdir, log(4),
             lambda: str(last_step) in entries() and not os.path.exists(results),
             "during its final evaluation")
  assert not os.path.exists(results)  # written last, atomically
  with open(log(4)) as f:
    assert "resumed from step" in f.read()  # mid-training, from kill 3's checkpoint

  # 5. The rerun completes from the last checkpoint, evaluation only.
  proc = start_main(log(5), TINY, f"--workdir={workdir}")
  assert proc.wait(timeout=600) == 0, open(log(5)).read()
  with open(log(5)) as f:
    assert f"resumed from step {last_step}" in f.read()
  assert not any("tmp" in name for name in entries())  # left-overs were removed
  assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
  metrics, codes = read_outputs(workdir)
  reference_metrics, reference_codes = read_outputs(tiny_run)
  assert metrics and metrics == reference_metrics
  for name, value in reference_codes.items():
    np.testing.assert_array_equal(codes[name], value)


@needs_fashion_mnist
def test_run_killed_between_two_split_files_draws_the_splits_again(tiny_run, tmp_path):
  workdir = str(tmp_path / "work")
  shutil.copytree(os.path.join(tiny_run, "splits"),
                  os.path.join(workdir, "splits"))
  os.remove(os.path.join(workdir, "splits", f"{splits_lib.SPLIT_NAMES[-1]}.npy"))
  _, index_sets, complete = run_setup.load_data(psch_config.load_config(TINY_CONFIG),
                                                workdir)
  assert not complete  # so the run writes the missing one
  expected = splits_lib.load_splits(os.path.join(tiny_run, "splits"))
  for name in splits_lib.SPLIT_NAMES:
    np.testing.assert_array_equal(index_sets[name], expected[name])


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
  path = str(tmp_path / "results.json")
  io_utils.write_json(path, {"map@all": 0.5})
  with pytest.raises(RuntimeError, match="disk gone"):
    with io_utils.atomic_open(path) as f:
      f.write('{"map@all": 0.')
      raise RuntimeError("disk gone")
  with open(path) as f:
    assert json.load(f) == {"map@all": 0.5}
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left
  io_utils.save_npy(str(tmp_path / "codes.npy"), np.arange(3, dtype=np.uint32))
  np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), [0, 1, 2])


# ------------------------------------------------------ bad input, command line

# In-process where the command line adds nothing: a UserError is what main.py prints
# as "error: ..." with exit code 2 (cli.run; tests/test_main.py checks that mapping for
# every command).

def test_parts_that_do_not_divide_the_channels_are_refused_before_writing(tmp_path):
  workdir = tmp_path / "work"
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(**{"attention.num_parts": 5}), str(workdir))
  assert "num_parts=5 does not divide the 128 channels" in str(error.value)
  assert "1, 2, 4, 8, 16, 32, 64, 128" in str(error.value)
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["missing", "wrong_shapes"])
def test_bad_vgg16_weights_exit_2_before_allocating_vgg16(tmp_path, weights):
  path = tmp_path / "vgg16.npz"
  if weights == "wrong_shapes":  # a grey-scale first conv and nothing else
    np.savez(path, **{"features.0.weight": np.zeros((64, 1, 3, 3), np.float32)})
  workdir = tmp_path / "work"
  code, output, peak_mib = run_main(
      tmp_path, "--config=configs/cifar10.py:tiny", "--config.model.backbone=vgg16",
      f"--config.model.pretrained_path={path}", f"--workdir={workdir}",
      f"--config.data.data_dir={tmp_path}/no_tfds")
  assert code == 2, output
  expected = ("does not exist" if weights == "missing" else
              "wrong shape features.0.weight: got (64, 1, 3, 3)")
  assert expected in output and "save_file" in output
  # Initialising VGG-16 (138M parameters) takes the process past 2 GB.
  assert peak_mib < 1500, f"{peak_mib} MiB: the model was built before the check"
  assert not workdir.exists()


@pytest.mark.parametrize("override,field", [
    ({"model.num_bits": 32}, "config.model.num_bits: 16 in {}/config.json, 32 now"),
    ({"model.backbone": "vgg16", "model.image_size": 32, "model.pretrained": "none"},
     "config.model.backbone: 'small_cnn' in {}/config.json, 'vgg16' now"),
    # The two of issue 15 that resumed with the old splits and schedule.
    ({"data.train_per_class": 5}, "config.data.train_per_class: 8 in "
                                  "{}/config.json, 5 now"),
    ({"train.global_batch_size": 8}, "config.train.global_batch_size: 16 in "
                                     "{}/config.json, 8 now"),
])
@pytest.mark.slow
def test_checkpoint_of_another_config_is_refused_and_leaves_the_workdir_alone(
    tiny_run, tmp_path, override, field):
  workdir = copy_run(tiny_run, tmp_path / "copy")
  before = snapshot(workdir)
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(**override), workdir)
  message = str(error.value)
  assert "holds a run started with another config" in message
  assert field.format(workdir) in message, message
  assert "new --workdir" in message
  assert snapshot(workdir) == before  # config.json included


@pytest.mark.slow
@needs_fashion_mnist
def test_corrupt_checkpoint_is_refused_and_deleting_it_resumes_from_the_one_before(
    tiny_run, tmp_path):
  workdir = str(tmp_path / "work")
  shutil.copytree(tiny_run, workdir)
  os.remove(os.path.join(workdir, "results.json"))
  checkpoints = os.path.join(workdir, "checkpoints")
  latest = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
  for directory, _, names in os.walk(os.path.join(checkpoints, str(latest), "state")):
    for name in names:
      with open(os.path.join(directory, name), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(directory, name)) // 3)
  # What main.py --mode=eval calls.
  with pytest.raises(UserError) as error:
    train.evaluate_checkpoint(tiny_config(), workdir)
  assert f"checkpoints/{latest} is damaged" in str(error.value)
  assert f"Delete {checkpoints}/{latest} to resume from step" in str(error.value)
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  # The advice works: without the damaged step the one before is evaluated.
  shutil.rmtree(os.path.join(checkpoints, str(latest)))
  train.evaluate_checkpoint(tiny_config(), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    assert 0 < json.load(f)["steps"] < latest


@pytest.mark.slow
@needs_fashion_mnist
def test_non_finite_loss_exits_2_naming_step_and_term_and_keeps_a_finite_checkpoint(
    tmp_path):
  workdir = str(tmp_path / "work")
  code, output, _ = run_main(tmp_path, TINY, "--config.optim.learning_rate=1e30",
                             f"--workdir={workdir}")
  assert code == 2, output
  assert "Traceback" not in output
  error = re.search(r"error: non-finite .* at step (\d+)\b.*", output)
  assert error, output
  failed_step = int(error.group(1))
  assert "loss_" in error.group(0) and "optim.learning_rate" in error.group(0)
  checkpoints = os.path.join(workdir, "checkpoints")
  # The save in flight when training stopped completed: no temporary directory.
  assert all(name.isdigit() for name in os.listdir(checkpoints)), os.listdir(checkpoints)
  mngr = checkpointing.manager(workdir, keep=2)
  try:
    step = mngr.latest_step()
    assert step is not None and step < failed_step
    assert f"The last good checkpoint (step {step}) is kept" in error.group(0)
    state = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore())).state
  finally:
    mngr.close()
  leaves = jax.tree.leaves(state["params"])
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  assert not os.path.exists(os.path.join(workdir, "results.json"))


@pytest.mark.slow
@needs_fashion_mnist
def test_non_finite_loss_before_any_checkpoint_does_not_promise_one(tmp_path):
  # In-process; the test above runs the same stop through main.py (exit code 2).
  workdir = str(tmp_path / "work")
  with pytest.raises(FloatingPointError) as raised:
    train.train_and_evaluate(tiny_config(**{"optim.learning_rate": 1e30,
                                            "train.checkpoint_every_steps": 1000}),
                             workdir)
  output = "error: " + str(raised.value)
  error = re.search(r"error: non-finite .* at step (\d+)\b.*", output)
  assert error, output
  steps_per_epoch = 80 // 16  # the tiny config: the first save is at the epoch end
  assert int(error.group(1)) < steps_per_epoch, "diverged too late for this test"
  assert "No checkpoint was saved before it." in error.group(0)
  assert "checkpoint is kept" not in output
  checkpoints = os.path.join(workdir, "checkpoints")
  assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)


# ------------------------------------------- bad input, the work directory

def _wait_for(condition, proc, log_path, what: str, timeout_s: float = 300) -> None:
  deadline = time.monotonic() + timeout_s
  while not condition():
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      with open(log_path) as f:
        pytest.fail(f"the run ended before {what}:\n{f.read()}")
    time.sleep(0.05)


@pytest.mark.slow
@needs_fashion_mnist
def test_a_second_run_on_a_workdir_in_use_exits_2_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "work")
  lock_file = os.path.join(workdir, ".lock-0")
  first_log = str(tmp_path / "first.log")
  first = start_main(first_log, TINY, f"--workdir={workdir}")
  try:
    _wait_for(lambda: os.path.exists(lock_file) and os.path.getsize(lock_file) > 0,
              first, first_log, "it took the lock")
    code, output, _ = run_main(tmp_path, TINY, f"--workdir={workdir}")
    assert code == 2, output
    assert f"work directory {workdir} is in use by another run: pid {first.pid} " in output
    assert "main.py" in output and "Traceback" not in output
  finally:
    first.kill()  # SIGKILL: its lock goes with it
    first.wait()
  holder = json.loads(open(lock_file).read() or "null")
  assert holder is None or holder["pid"] == first.pid  # the refused run wrote nothing
  # The killed run left its lock file, not its lock: a rerun takes it (and is refused
  # only for the data it lacks here, never for the lock).
  code, output, _ = run_main(tmp_path, TINY, "--config.model.num_bits=8",
                             f"--workdir={workdir}")
  assert code == 2 and "in use by another run" not in output, output
  assert "config.model.num_bits: 16 in" in output


@pytest.mark.parametrize("entry,kind,message", [
    ("checkpoints", "file", "checkpoints is a file, but the run keeps its checkpoints "
                            "in a directory of that name"),
    ("splits", "file", "splits is a file, but the run keeps its split index files"),
    ("config.json", "directory", "config.json is a directory, but the run writes its "
                                 "config to a file of that name"),
])
@pytest.mark.slow
def test_a_workdir_entry_of_the_wrong_kind_is_refused_before_writing(tmp_path, entry,
                                                                    kind, message):
  workdir = tmp_path / "work"
  workdir.mkdir()
  if kind == "file":
    (workdir / entry).write_text("not a directory")
  else:
    (workdir / entry).mkdir()
  before = snapshot(str(workdir))
  with pytest.raises(UserError) as error:
    train.train_and_evaluate(tiny_config(), str(workdir))
  assert message in str(error.value) and "Move or delete it" in str(error.value)
  assert snapshot(str(workdir)) == before
  assert sorted(os.listdir(workdir)) == [entry]  # no lock file either


# ------------------------------------------ tools on edited work directories

def _edit_json(path: str, edit) -> None:
  with open(path) as f:
    value = json.load(f)
  value = edit(value)
  with open(path, "w") as f:
    json.dump(value, f)


def _set(section, field, value):
  def edit(config):
    config[section][field] = value
    return config
  return edit


def _drop(section):
  def edit(config):
    del config[section]
    return config
  return edit


@needs_fashion_mnist
@pytest.mark.parametrize("edit,expected", [
    (_set("model", "num_bits", 32),
     "config.json does not match the run's checkpoint: config.model.num_bits=32 but "
     "the checkpoint was trained with 16. config.json was edited after training: set "
     "model.num_bits back to 16 in it"),
    (_set("pseudo_labels", "num_clusters", 7), "config.pseudo_labels.num_clusters=7 "
                                               "but the checkpoint was trained with 4"),
    (_drop("model"), "config.json has no model section (edited?)"),
    (_set("model", "num_bits", "many"), "config.model.num_bits='many' must be an "
                                        "integer"),
])
@pytest.mark.slow
def test_search_after_an_edit_of_config_json_is_refused_naming_file_and_field(
    tiny_run, tmp_path, edit, expected):
  workdir = str(tmp_path / "work")
  shutil.copytree(tiny_run, workdir)
  _edit_json(os.path.join(workdir, "config.json"), edit)
  image = os.path.join(ROOT, "docs", "results.png")
  with pytest.raises(UserError) as error:  # what the search command calls
    search.search(workdir, [image], topk=10)
  assert str(error.value).startswith(workdir + "/config.json")
  assert expected in str(error.value)


@needs_fashion_mnist
@pytest.mark.parametrize("edit,code,expected", [
    (lambda results: [results], 2, "results.json holds a list, not the results of a run"),
    (lambda results: {**results, "map@all": "high"}, 2, "results.json: map@all is "
                                                        "'high', not a number"),
    (lambda results: {**results, "pr_curve": "steep"}, 2, "holds curves of an "
                                                          "unexpected form"),
    # An edited number is the one mismatch: exit code 1, no "error:".
    (lambda results: {**results, "map@all": results["map@all"] + 0.25}, 1,
     "MISMATCH"),
])
@pytest.mark.slow
def test_reports_on_an_edited_results_json_exits_2_and_1_only_on_a_mismatch(
    tiny_run, tmp_path, capsys, edit, code, expected):
  workdir = str(tmp_path / "work")
  shutil.copytree(tiny_run, workdir)
  _edit_json(os.path.join(workdir, "results.json"), edit)
  # What the reports command calls; it prints a UserError and exits 2, else exits
  # with the returned code.
  if code == 2:
    with pytest.raises(UserError, match=re.escape(expected)):
      reports.print_comparison(workdir)
  else:
    assert reports.print_comparison(workdir) == code == reports.EXIT_MISMATCH
    assert expected in capsys.readouterr().out


@pytest.mark.slow
@needs_fashion_mnist
@pytest.mark.parametrize("name", ["results.json", "config.json"])
def test_experiments_on_a_run_with_a_truncated_json_is_refused_and_the_fix_works(
    tmp_path, name):
  workdir = str(tmp_path / "experiment")

  def table():  # what the experiments command calls
    return experiments.run_experiments(tiny_config(), workdir=workdir, bits=[8],
                                       seeds=[0], methods=["lsh"])

  table()
  run_dir = os.path.join(workdir, "runs", "lsh", "8bits_seed0")
  path = os.path.join(run_dir, name)
  with open(path, "r+") as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(UserError) as error:
    table()
  assert str(error.value).startswith(f"cannot read {path}")
  assert f"delete its run directory {run_dir} to redo that run" in str(error.value)
  shutil.rmtree(run_dir)  # the advice
  table()
  with open(path) as f:
    assert json.load(f)


def test_metrics_log_never_reads_nor_extends_a_torn_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  log = monitoring.MetricsLog(str(tmp_path), tensorboard=False)
  log.write(1, {"loss": 0.5})
  with open(path, "a") as f:
    f.write('{"step": 2, "loss": 0.')  # a kill in the middle of an append
  assert io_utils.read_jsonl(path) == [{"step": 1, "loss": 0.5}]
  log.write(2, {"loss": 0.25})
  assert io_utils.read_jsonl(path) == [{"step": 1, "loss": 0.5},
                                       {"step": 2, "loss": 0.25}]
  assert path.read_text().endswith("\n")


# --------------------------------------------------- bad input, library level

def test_workdir_that_is_a_file_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("keep me")
  with pytest.raises(UserError, match="not writable.*--workdir"):
    train.train_and_evaluate(psch_config.load_config(TINY_CONFIG), str(blocker))
  assert blocker.read_text() == "keep me"


@needs_fashion_mnist
@pytest.mark.parametrize("field,value,message", [
    ("train.global_batch_size", 160, "global_batch_size=160 is larger than the 80 "
                                     "training images"),
    ("model.pretrained_path", "vgg16.npz", "backbone is 'small_cnn'; pretrained "
                                           "weights exist for 'vgg16' only"),
])
def test_config_that_does_not_fit_the_data_or_model_is_refused(tmp_path, field, value,
                                                               message):
  config = psch_config.load_config(TINY_CONFIG)
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(UserError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  checkpoints = os.path.join(tmp_path, "checkpoints")
  assert not os.path.isdir(checkpoints) or not os.listdir(checkpoints)


@needs_fashion_mnist
def test_evaluating_a_workdir_without_checkpoint_says_to_train_first(tmp_path):
  with pytest.raises(UserError, match="no checkpoint in .* train first"):
    train.evaluate_checkpoint(psch_config.load_config(TINY_CONFIG), str(tmp_path))


def _save_checkpoint(workdir: str) -> None:
  mngr = checkpointing.manager(workdir, keep=2)
  checkpointing.save(
      mngr, 3, state={"w": np.ones(3, np.float32)},
      targets={"pseudo_labels": np.zeros(4, np.int32)},
      meta={"epoch": 0,
            "signature": checkpointing.shape_signature(psch_config.base_config())})
  mngr.wait_until_finished()
  mngr.close()


@pytest.mark.parametrize("damage,message", [
    ("meta", "cannot be read"),
    ("state", "incomplete or corrupt"),
])
def test_checkpoint_with_a_damaged_or_missing_item_is_refused(tmp_path, damage, message):
  workdir = str(tmp_path)
  _save_checkpoint(workdir)
  item = os.path.join(workdir, "checkpoints", "3", damage)
  if damage == "meta":
    for name in os.listdir(item):
      with open(os.path.join(item, name), "w") as f:
        f.write("{not json")
  else:
    shutil.rmtree(item)
  abstract = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  mngr = checkpointing.manager(workdir, keep=2)
  try:
    with pytest.raises(UserError, match=f"{message}.*(Delete that step|new --workdir)"):
      checkpointing.restore_latest(
          mngr, abstract_state=abstract({"w": np.ones(3, np.float32)}),
          abstract_targets=abstract({"pseudo_labels": np.zeros(4, np.int32)}),
          config=psch_config.base_config())
  finally:
    mngr.close()


def _mirflickr_list_layout(root: str, num_labels_rows: int) -> None:
  paths = [f"mirflickr/im{n}.jpg" for n in range(1, 4)]
  for i, path in enumerate(paths):
    write_image(os.path.join(root, path), i)
  write_list(os.path.join(root, "img.txt"), paths)
  write_list(os.path.join(root, "targets.txt"),
              [" ".join(["1"] + ["0"] * 23)] * num_labels_rows)


@pytest.mark.parametrize("case,message", [
    ("nus_not_a_directory", r"NUS-WIDE manual_dir .* is not a directory"),
    ("nus_empty_list", r"test_img.txt lists no images"),
    ("nus_not_a_number", r"test_label_onehot.txt holds a value that is not a number"),
    ("mir_not_a_directory", r"MIRFlickr-25K manual_dir .* is not a directory"),
    ("mir_no_layout", r"Found neither img.txt nor mirflickr25k_annotations_v080/"),
    ("mir_row_mismatch", r"img.txt lists 3 images but .*targets.txt has 2"),
    ("mir_no_image_dir", r"Missing image directory .*mirflickr"),
])
def test_malformed_manual_files_name_the_file(tmp_path, case, message):
  root = str(tmp_path / "raw")
  if case.startswith("nus_") and case != "nus_not_a_directory":
    nus_split_lists(root)
  if case == "nus_empty_list":
    write_list(os.path.join(root, "test_img.txt"), [""])
  elif case == "nus_not_a_number":
    rows = open(os.path.join(root, "test_label_onehot.txt")).read().splitlines()
    write_list(os.path.join(root, "test_label_onehot.txt"),
                [rows[0].replace("0", "x", 1)] + rows[1:])
  elif case == "mir_no_layout":
    os.makedirs(root)
  elif case == "mir_row_mismatch":
    _mirflickr_list_layout(root, num_labels_rows=2)
  elif case == "mir_no_image_dir":
    os.makedirs(os.path.join(root, "mirflickr25k_annotations_v080"))
  reader = nus_wide if case.startswith("nus_") else mirflickr25k
  with pytest.raises(UserError, match=message):
    reader.read_manual_layout(root)


# ------------------------------------------------------------ bounded resources

class _RecordingRows:
  """An array that records which rows are read from it (as a memmap is read)."""

  def __init__(self, array: np.ndarray):
    self._array, self.shape, self.dtype = array, array.shape, array.dtype
    self.reads = []

  def __getitem__(self, rows: slice) -> np.ndarray:
    self.reads.append((rows.start, rows.stop))
    return self._array[rows]


def _random_retrieval_set(num_queries=37, num_database=3000, code_length=20, seed=0):
  rng = np.random.default_rng(seed)
  draw = lambda n: rng.choice(np.array([-1, 1], np.int8), (n, code_length))
  labels = lambda n: (rng.random((n, 5)) < 0.3).astype(np.uint8)
  return draw(num_queries), labels(num_queries), draw(num_database), labels(num_database)


KWARGS = dict(topk=(10, 100, None), topn=(5, 700), radius=2, db_chunk=128, query_chunk=3)


@pytest.mark.parametrize("algorithm", ranking.ALGORITHMS)
def test_database_larger_than_a_segment_is_read_in_segments_with_the_same_metrics(
    algorithm):
  query_codes, query_labels, db_codes, db_labels = _random_retrieval_set()
  whole = ranking.retrieval_metrics_per_query(
      query_codes, query_labels, db_codes, db_labels, algorithm=algorithm, **KWARGS)
  recorded_codes, recorded_labels = _RecordingRows(db_codes), _RecordingRows(db_labels)
  segmented = ranking.retrieval_metrics_per_query(
      query_codes, query_labels, recorded_codes, recorded_labels, db_segment=512,
      algorithm=algorithm, **KWARGS)
  for name, value in whole.items():
    np.testing.assert_array_equal(segmented[name], value, err_msg=name)
  # The whole database in index order, 512 rows at a time: once for the host form
  # (which ranks it packed), once per pass on the devices.
  starts = list(range(0, 3000, 512))
  expected = [(s, min(s + 512, 3000)) for s in starts] * (1 if algorithm == "host" else 2)
  assert recorded_codes.reads == expected and recorded_labels.reads == expected


def test_memory_mapped_packed_database_gives_the_same_metrics(tmp_path):
  query_codes, query_labels, db_codes, db_labels = _random_retrieval_set()
  np.save(tmp_path / "codes.npy", np.asarray(ranking.pack_codes(db_codes)))
  np.save(tmp_path / "labels.npy", db_labels)
  mapped_codes = np.load(tmp_path / "codes.npy", mmap_mode="r")
  mapped_labels = np.load(tmp_path / "labels.npy", mmap_mode="r")
  whole = ranking.retrieval_metrics(query_codes, query_labels, db_codes, db_labels,
                                       **KWARGS)
  for query in (query_codes, np.asarray(ranking.pack_codes(query_codes))):
    mapped = ranking.retrieval_metrics(query, query_labels, mapped_codes,
                                          mapped_labels, db_segment=1024,
                                          code_length=20, **KWARGS)
    assert mapped == whole


@pytest.mark.parametrize("change,message", [
    (lambda c: c.update(db_codes=np.zeros((5, 2), np.uint32)), "packed in 2 words"),
    (lambda c: c.update(db_codes=np.full((5, 1), 1 << 20, np.uint32)),
     "bits set past the code length 4"),
    (lambda c: c.update(code_length=8), "code_length=8 but the"),
    (lambda c: c.update(code_length=0), "code_length must be a positive int"),
    (lambda c: c.update(db_segment=0), "db_segment"),
])
def test_bad_packed_input_raises_user_error(change, message):
  query_codes = np.ones((2, 4), np.int8)
  call = {"query_codes": query_codes, "query_labels": np.eye(2, 3, dtype=np.uint8),
          "db_codes": np.ones((5, 4), np.int8),
          "db_labels": np.eye(5, 3, dtype=np.uint8)}
  change(call)
  with pytest.raises(UserError, match=message):
    ranking.retrieval_metrics(**call)
