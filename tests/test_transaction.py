"""The work directory as a transaction (issue 19), through the command line.

Each class of docs/reliability.md "Check everything, then write" is run as a user runs
it (`python main.py ...`, `python -m psch_jax.commands.<name> ...`), and checked by
its exit code, its message, and the work directory: byte for byte as before for a
refusal (a directory that did not exist stays absent), or the expected generation of
results for a success.
"""
import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from psch_jax import checkpointing
from psch_jax import diagnostics
from psch_jax import experiments
from psch_jax import search
from psch_jax import train
from psch_jax import workdir as workdir_lib
from psch_jax.errors import UserError
from tests.helpers import ROOT, copy_run, needs_fashion_mnist, repo_config

TINY = "--config=configs/fashion_mnist.py:tiny"
pytestmark = needs_fashion_mnist


def run_command(*args: str, timeout: float = 600) -> tuple[int, str]:
  """(exit code, stdout + stderr) of `python *args` from the repository root."""
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, check=False)
  return proc.returncode, proc.stdout + proc.stderr


def snapshot(workdir: str) -> dict[str, str]:
  """{relative path: sha256 of a file, or "-> target" of a link} of everything under
  `workdir`, the lock files included; {} for a directory that does not exist."""
  entries = {}
  for directory, dirs, names in os.walk(workdir):
    for name in dirs + names:
      path = os.path.join(directory, name)
      relative = os.path.relpath(path, workdir)
      if os.path.islink(path):
        entries[relative] = "-> " + os.readlink(path)
      elif os.path.isfile(path):
        with open(path, "rb") as f:
          entries[relative] = hashlib.sha256(f.read()).hexdigest()
      else:
        entries[relative] = "dir"
  return entries


def assert_refused(code: int, output: str, *expected: str) -> None:
  assert code == 2, output
  assert "Traceback" not in output, output
  assert output.count("error: ") == 1, output
  for text in expected:
    assert text in output, output


def _results(workdir: str) -> dict:
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def _lsh_table(table: str) -> None:
  """The table of `experiments --bits=8 --seeds=0 --methods=lsh` on the tiny config,
  made in this process (what the command calls; its refusals are the subprocesses)."""
  experiments.run_experiments(repo_config("fashion_mnist", "tiny"), workdir=table,
                              bits=(8,), seeds=(0,), methods=("lsh",))


def _rerun_in_process(workdir: str) -> str:
  """What the rerun of `main.py TINY --workdir=workdir` calls, in this process
  (compiled already); returns what it printed."""
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    train.train_and_evaluate(repo_config("fashion_mnist", "tiny"), workdir)
  return output.getvalue()


# ------------------------------------------------- 1. a failed start writes nothing

@pytest.mark.parametrize("args,expected", [
    (("--config.model.num_bits=100000000",),
     ("the training step needs at least", "config.model.num_bits")),
    (("--config.model.image_size=100000",), ("config.model.image_size",)),
    (("--config.eval.batch_size=1000000000",),
     ("the evaluation needs at least", "config.eval.batch_size")),
    (("--config.data.query_per_class=0",), ("query",)),
    (("--mode=eval",), ("no checkpoint in", "train first")),
])
def test_a_refused_start_leaves_a_new_workdir_absent(tmp_path, args, expected):
  workdir = str(tmp_path / "new")
  code, output = run_command("main.py", TINY, f"--workdir={workdir}", *args)
  assert_refused(code, output, *expected)
  assert not os.path.lexists(workdir)


def test_a_refused_start_leaves_a_finished_run_byte_for_byte(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  before = snapshot(workdir)
  code, output = run_command("main.py", TINY, f"--workdir={workdir}",
                             "--config.model.num_bits=100000000")
  assert_refused(code, output, "needs at least")
  assert snapshot(workdir) == before
  # And the refused value was not recorded: the next run with the right config is
  # not "a changed config" (in-process: what `main.py --mode=eval` calls).
  train.evaluate_checkpoint(repo_config("fashion_mnist", "tiny"), workdir)


def test_checkpoints_without_config_json_are_refused_not_adopted(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  os.remove(os.path.join(workdir, "config.json"))
  before = snapshot(workdir)
  code, output = run_command("main.py", TINY, f"--workdir={workdir}")
  assert_refused(code, output, "holds checkpoints but no config.json")
  assert snapshot(workdir) == before


# ------------------------------------- 2. results belong to the checkpoint that made them

def test_eval_writes_a_new_generation_with_every_metric_stamped_with_its_step(
    tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  trained = _results(workdir)
  code, output = run_command("main.py", TINY, f"--workdir={workdir}", "--mode=eval")
  assert code == 0, output
  evaluated = _results(workdir)
  stamp, old_stamp = evaluated["generation"], trained["generation"]
  assert stamp["id"] != old_stamp["id"] and stamp["step"] == old_stamp["step"] == 10
  # Every metric kept, the validation ones included, with the same values.
  without_stamp = lambda r: {k: v for k, v in r.items() if k != "generation"}
  assert without_stamp(evaluated) == without_stamp(trained)
  # One generation on disk, and the top-level names are links into it.
  assert os.listdir(os.path.join(workdir, "generations")) == [stamp["id"]]
  assert os.readlink(os.path.join(workdir, "current")) == f"generations/{stamp['id']}"
  code, output = run_command("-m", "psch_jax.commands.reports", f"--workdir={workdir}")
  assert code == 0 and "all 48 metrics agree" in output, output


def test_eval_reads_the_newest_checkpoint_once_to_verify_it(tiny_run, tmp_path,
                                                            monkeypatch):
  """The pre-write check (`check_newest`) and the restore verify one checkpoint, not
  twice: a VGG-16 checkpoint is GiBs, read back from the bucket on gs://."""
  workdir = copy_run(tiny_run, tmp_path / "run")
  verified = []
  verify = checkpointing.verify_checksums
  monkeypatch.setattr(checkpointing, "verify_checksums",
                      lambda workdir, step, **kwargs: (verified.append(step),
                                                       verify(workdir, step, **kwargs)))
  # In-process: what `main.py --mode=eval` calls.
  results = train.evaluate_checkpoint(repo_config("fashion_mnist", "tiny"), workdir)
  assert verified == [10] and results["generation"]["step"] == 10


def test_eval_killed_while_writing_leaves_the_previous_generation_whole(
    tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  before = _results(workdir)
  generations_dir = os.path.join(workdir, "generations")
  log = open(tmp_path / "eval.log", "w")
  proc = subprocess.Popen([sys.executable, "main.py", TINY, f"--workdir={workdir}",
                           "--mode=eval"], cwd=ROOT, stdout=log, stderr=log)
  deadline = time.monotonic() + 300
  # Killed as soon as the new generation's directory appears: mid-write.
  while len(os.listdir(generations_dir)) < 2:
    assert proc.poll() is None and time.monotonic() < deadline, "eval ended first"
    time.sleep(0.002)
  proc.kill()
  proc.wait()
  assert _results(workdir) == before
  code, output = run_command("-m", "psch_jax.commands.reports", f"--workdir={workdir}")
  assert code == 0 and "all 48 metrics agree" in output, output


def _flip_bytes(step_dir: str, count: int = 64) -> None:
  files = [os.path.join(d, n) for d, _, names in os.walk(step_dir) for n in names
           if f"{os.sep}d{os.sep}" in os.path.join(d, n)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 2, min(len(data) // 2 + count, len(data))):
    data[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_flipped_bytes_in_the_newest_checkpoint_are_refused_naming_both_steps(
    tiny_run, tmp_path, mode):
  workdir = copy_run(tiny_run, tmp_path / "run")
  _flip_bytes(os.path.join(workdir, "checkpoints", "10", "state"))
  # As a directory written before kind.json existed: the check comes before the
  # kind is recorded, so even that file is not written.
  os.remove(os.path.join(workdir, "kind.json"))
  before = snapshot(workdir)
  code, output = run_command("main.py", TINY, f"--workdir={workdir}", f"--mode={mode}")
  assert_refused(code, output, "checkpoints/10 is damaged",
                 "to resume from step 8")
  assert "learning rate" not in output and "last good checkpoint" not in output
  assert snapshot(workdir) == before


# ------------------------------------------------- 3. one directory, one kind of command

def test_experiments_on_a_main_py_run_and_main_py_on_a_table_are_refused(
    tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  before = snapshot(workdir)
  code, output = run_command("-m", "psch_jax.commands.experiments", TINY,
                             f"--workdir={workdir}", "--bits=8", "--seeds=0",
                             "--methods=lsh")
  assert_refused(code, output, "holds a training run of main.py",
                 "would overwrite that directory's results")
  assert snapshot(workdir) == before

  table = str(tmp_path / "table")
  _lsh_table(table)
  assert _results(table)["generation"]["step"] is None
  before = snapshot(table)
  code, output = run_command("main.py", TINY, f"--workdir={table}")
  assert_refused(code, output, "holds an experiments table")
  assert snapshot(table) == before
  # A reader says what the directory is instead of a missing file.
  code, output = run_command("-m", "psch_jax.commands.reports", f"--workdir={table}")
  assert_refused(code, output, "holds an experiments table, and reports reads a "
                 "training run of main.py", "runs/<method>/")


@pytest.mark.slow  # makes the report end to end first
def test_main_py_on_a_diagnostics_directory_is_refused(tmp_path):
  workdir = str(tmp_path / "diagnostics")
  # In-process: what the diagnostics command calls (test_diagnostics runs the command).
  diagnostics.target_quality(repo_config("fashion_mnist", "tiny"), workdir,
                             query_stride=1)
  with open(os.path.join(workdir, "kind.json")) as f:
    assert json.load(f) == {"kind": "diagnostics"}
  before = snapshot(workdir)
  code, output = run_command("main.py", TINY, f"--workdir={workdir}")
  assert_refused(code, output, "holds a diagnostics report, and main.py --mode=train "
                 "writes a training run of main.py")
  assert snapshot(workdir) == before


def test_experiments_takes_the_lock(tmp_path):
  table = str(tmp_path / "table")
  held = workdir_lib.lock(table)  # another experiments command, as far as it can tell
  try:
    before = snapshot(table)
    code, output = run_command("-m", "psch_jax.commands.experiments", TINY,
                               f"--workdir={table}", "--bits=8", "--seeds=0",
                               "--methods=lsh")
    assert_refused(code, output, "is in use by another run")
    assert snapshot(table) == before
  finally:
    held.release()


@pytest.mark.slow  # makes a table end to end first
def test_experiments_after_a_changed_data_field_never_reuses_the_old_splits(tmp_path):
  table = str(tmp_path / "table")
  common = ("-m", "psch_jax.commands.experiments", TINY, f"--workdir={table}",
            "--bits=8", "--seeds=0", "--methods=lsh")
  _lsh_table(table)
  code, output = run_command(*common, "--config.data.train_per_class=5")
  assert_refused(code, output, "was made with a different config",
                 "seed<seed>/ directories")
  # The advice: delete the run directories. The seed's old splits are refused, not
  # reused under a config.json that states the new value.
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(table, "runs"))
  before = snapshot(table)
  code, output = run_command(*common, "--config.data.train_per_class=5")
  assert_refused(code, output, "seed0/splits/", "is not the", "split this config draws")
  assert snapshot(table) == before


# ------------------------------------- 4. saved state that disagrees with the config

def test_a_cut_query_split_is_refused_not_evaluated(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  path = os.path.join(workdir, "splits", "query.npy")
  np.save(path, np.load(path)[:5])
  before = snapshot(workdir)
  code, output = run_command("main.py", TINY, f"--workdir={workdir}", "--mode=eval")
  assert_refused(code, output, "query.npy is not the query split this config draws",
                 "it holds 5 images where the config draws 40")
  assert snapshot(workdir) == before


def test_search_after_an_edit_of_data_mean_is_refused(tiny_run, tmp_path):
  workdir = copy_run(tiny_run, tmp_path / "run")
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    config = json.load(f)
  config["data"]["mean"] = [0.9]
  with open(path, "w") as f:
    json.dump(config, f)
  image = str(tmp_path / "query.png")
  Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
  before = snapshot(workdir)
  code, output = run_command("-m", "psch_jax.commands.search", f"--workdir={workdir}",
                             f"--images={image}")
  assert_refused(code, output, "config.json is not the config these results were "
                 "made with")
  assert snapshot(workdir) == before


# ------------------------------------------------ 5. images read at their real depth

def test_sixteen_bit_and_float_images_are_scaled_not_saturated(tmp_path):
  grey = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) % 256
  paths = {"8bit.png": grey.astype(np.uint8),
           "16bit.png": (grey * 257).astype(np.uint16),
           "float.tiff": (grey / 255.0).astype(np.float32)}
  for name, pixels in paths.items():
    Image.fromarray(pixels).save(tmp_path / name)
  for name in paths:
    read = search.read_image(str(tmp_path / name), (28, 28, 1))
    np.testing.assert_array_equal(read[..., 0], grey, err_msg=name)
  # Floats outside [0, 1] have no known scale: refused, naming the mode.
  Image.fromarray((grey * 4.0).astype(np.float32)).save(tmp_path / "wide.tiff")
  with pytest.raises(UserError, match="floating-point pixels .*mode 'F'"):
    search.read_image(str(tmp_path / "wide.tiff"), (28, 28, 1))


def test_search_ranks_a_sixteen_bit_png_as_its_eight_bit_original(tiny_run, tmp_path):
  # A database image of the run, as 8-bit and as 16-bit PNG (value * 257: the same
  # intensities at 16-bit depth); Pillow's own conversion would saturate the second.
  from psch_jax import reports  # pylint: disable=g-import-not-at-top
  from psch_jax.data import splits as splits_lib  # pylint: disable=g-import-not-at-top
  source = reports.load_run_source(tiny_run)
  database = splits_lib.load_split_file(os.path.join(tiny_run, "splits",
                                                     "database.npy"), name="database")
  pixels = source.read(database[:1])[0, ..., 0]
  Image.fromarray(pixels).save(tmp_path / "query.png")
  Image.fromarray(pixels.astype(np.uint16) * 257).save(tmp_path / "query16.png")
  # In-process: what the search command calls (test_search runs the command).
  eight_bit, sixteen_bit = search.search(
      tiny_run, [str(tmp_path / "query.png"), str(tmp_path / "query16.png")], topk=5)
  assert len(eight_bit) == 5 and eight_bit == sixteen_bit
  # A FIFO is refused before it is opened (opening it would wait for a writer).
  os.mkfifo(tmp_path / "pipe.png")
  code, output = run_command("-m", "psch_jax.commands.search", f"--workdir={tiny_run}",
                             f"--images={tmp_path / 'pipe.png'}")
  assert_refused(code, output, "is not a regular file")


def test_a_fifo_given_as_an_image_is_refused_before_it_is_opened(tmp_path):
  fifo = str(tmp_path / "pipe.png")
  os.mkfifo(fifo)  # opening it would block forever: no writer
  with pytest.raises(UserError, match="not a regular file"):
    search.read_image(fifo, (28, 28, 1))


# ---------------------------------------------------------- 6. no traceback, ever

@pytest.mark.parametrize("text,expected", [
    ("def get_config():\n  raise RuntimeError('boom')\n",
     "raised RuntimeError (boom)"),
    ("def get_config(:\n", "is not valid Python"),
])
def test_a_broken_config_file_is_an_error_line(tmp_path, text, expected):
  path = tmp_path / "config.py"
  path.write_text(text)
  code, output = run_command("main.py", f"--config={path}",
                             f"--workdir={tmp_path / 'new'}")
  assert_refused(code, output, expected)
  assert not os.path.lexists(tmp_path / "new")


def test_experiments_on_a_file_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("keep me")
  code, output = run_command("-m", "psch_jax.commands.experiments", TINY,
                             f"--workdir={blocker}", "--bits=8", "--seeds=0",
                             "--methods=lsh")
  assert_refused(code, output, "is a file, not a directory")
  assert blocker.read_text() == "keep me"


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_training_with_one_line_and_the_rerun_resumes(
    tiny_run, tmp_path, signum, code):
  workdir = str(tmp_path / "run")
  log_path = tmp_path / "run.log"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "main.py", TINY, f"--workdir={workdir}"],
                            cwd=ROOT, stdout=log, stderr=log)
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + 300
  while not (os.path.isdir(checkpoints) and any(n.isdigit() for n in
                                                os.listdir(checkpoints))):
    assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
    time.sleep(0.01)
  proc.send_signal(signum)
  assert proc.wait(timeout=300) == code, log_path.read_text()
  output = log_path.read_text()
  assert "Traceback" not in output, output
  stopped = [line for line in output.splitlines() if line.startswith("stopped by")]
  assert len(stopped) == 1 and signal.Signals(signum).name in stopped[0], output
  assert "Rerun the same command to resume" in stopped[0]
  output = _rerun_in_process(workdir)
  assert "resumed from step" in output, output
  with open(os.path.join(tiny_run, "codes", "database.npy"), "rb") as f:
    reference = f.read()
  with open(os.path.join(workdir, "codes", "database.npy"), "rb") as f:
    assert f.read() == reference


def _mount_tmpfs(path, size: str) -> bool:
  os.makedirs(path, exist_ok=True)
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                         str(path)], capture_output=True, check=False).returncode == 0


def test_a_full_disk_is_an_error_line_and_the_rerun_resumes(tiny_run, tmp_path):
  disk = tmp_path / "disk"
  if not _mount_tmpfs(disk, "600k"):
    pytest.skip("needs permission to mount a small tmpfs (root)")
  try:
    workdir = str(disk / "run")
    code, output = run_command("main.py", TINY, f"--workdir={workdir}")
    assert_refused(code, output, f"no space left on the device of {workdir}/checkpoints",
                   "free space and rerun the same command")
    assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
    # Space freed: the same command completes, to the uninterrupted run's codes.
    subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
    _rerun_in_process(workdir)
    for name in ("query", "database"):
      with open(os.path.join(tiny_run, "codes", f"{name}.npy"), "rb") as f:
        reference = f.read()
      with open(os.path.join(workdir, "codes", f"{name}.npy"), "rb") as f:
        assert f.read() == reference, name
  finally:
    subprocess.run(["umount", str(disk)], check=False)
