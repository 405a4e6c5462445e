"""Work-directory integrity: layout, the config on resume, one run at a time.

Work directories are generated in tmp dirs; the lock is contended by a real second
process (a subprocess holding it), which is then SIGKILLed.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from psch_jax import config as psch_config
from psch_jax import config_schema
from psch_jax import io_utils
from psch_jax import workdir as workdir_lib
from psch_jax.errors import UserError

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


def make_complete_workdir(root) -> str:
  """Every entry of a finished run, of the right kind."""
  for name, (kind, _) in workdir_lib.LAYOUT.items():
    path = os.path.join(root, name)
    if kind == workdir_lib.DIRECTORY:
      os.makedirs(path, exist_ok=True)
    else:
      os.makedirs(os.path.dirname(path), exist_ok=True)
      with open(path, "w") as f:
        f.write("x")
  return str(root)


# ----------------------------------------------------------------------- layout

def test_a_complete_or_missing_workdir_passes(tmp_path):
  workdir_lib.check_layout(str(tmp_path / "not_yet"))
  workdir_lib.check_layout(make_complete_workdir(tmp_path))


@pytest.mark.parametrize("name,message", [
    ("checkpoints", r"checkpoints is a file, but the run keeps its checkpoints in a "
                    r"directory of that name. Move or delete it, or pass another "
                    r"--workdir."),
    ("splits", r"splits is a file, but the run keeps its split index files in a "
               r"directory"),
    ("codes", r"codes is a file, but the run keeps its hash codes in a directory"),
    ("config.json", r"config.json is a directory, but the run writes its config to a "
                    r"file of that name. Move or delete it"),
    ("metrics.jsonl", r"metrics.jsonl is a directory, but the run writes its training "
                      r"metrics to a file"),
    ("results.json", r"results.json is a directory, but the run writes its results"),
    ("splits/train.npy", r"train.npy is a directory, but the run writes its train "
                         r"split to a file"),
])
def test_an_entry_of_the_wrong_kind_is_named_with_the_fix(tmp_path, name, message):
  make_complete_workdir(tmp_path)
  path = tmp_path / name
  kind, _ = workdir_lib.LAYOUT[name]
  if kind == workdir_lib.DIRECTORY:
    for child in sorted(path.rglob("*"), reverse=True):
      child.unlink()
    path.rmdir()
    path.write_text("a stray file")
  else:
    path.unlink()
    path.mkdir()
  with pytest.raises(UserError, match=message) as raised:
    workdir_lib.check_layout(str(tmp_path))
  assert str(path) in str(raised.value)


def test_a_workdir_that_is_a_file_or_a_broken_link(tmp_path):
  blocker = tmp_path / "run"
  blocker.write_text("keep me")
  with pytest.raises(UserError, match=r"work directory .*run is not writable: it is a "
                                      r"file, not a directory; pass a --workdir"):
    workdir_lib.check_layout(str(blocker))
  assert blocker.read_text() == "keep me"
  os.symlink(tmp_path / "gone", tmp_path / "config.json")
  with pytest.raises(UserError, match=r"config.json is a broken symbolic link"):
    workdir_lib.check_layout(str(tmp_path))


# ------------------------------------------------------------ config on resume

def saved_run(tmp_path, config=None) -> str:
  config = config or psch_config.base_config()
  io_utils.write_json(os.path.join(tmp_path, "config.json"), config.to_dict())
  return str(tmp_path)


def test_fields_are_split_into_safe_and_fixed_on_resume():
  fields = set(config_schema.FIELDS)
  assert set(workdir_lib.RESUME_SAFE) <= fields
  assert set(workdir_lib.RESUME_SAFE) | set(workdir_lib.RESUME_FIXED) == fields
  assert not set(workdir_lib.RESUME_SAFE) & set(workdir_lib.RESUME_FIXED)
  fixed = set(workdir_lib.RESUME_FIXED)
  for prefix in ("data.", "model.", "pseudo_labels.", "attention.", "similarity.",
                 "loss.", "optim."):
    section = {name for name in fields if name.startswith(prefix)}
    assert section - {"data.data_dir", "data.manual_dir"} <= fixed, prefix
  assert {"seed", "train.global_batch_size", "train.num_epochs"} <= fixed


@pytest.mark.parametrize("field,value,message", [
    ("data.train_per_class", 100,
     r"config.data.train_per_class: None in .*config.json, 100 now.*Start a new "
     r"--workdir for this config, or restore the old value \(leave "
     r"config.data.train_per_class unset\)"),
    ("train.global_batch_size", 64,
     r"config.train.global_batch_size: 128 in .*, 64 now.*the data, the splits, the "
     r"schedule or the model.*\(--config.train.global_batch_size=128\)"),
    ("data.mean", (0.2,), r"config.data.mean: \(0.5,\) in .*, \(0.2,\) now.*"
                          r"--config.data.mean='\(0.5,\)'"),
    ("seed", 1, r"config.seed: 0 in .*, 1 now"),
    ("train.num_epochs", 40, r"config.train.num_epochs: 30 in .*, 40 now"),
    ("model.num_bits", 64, r"config.model.num_bits: 32 in .*, 64 now"),
])
def test_a_changed_fixed_field_is_refused_naming_old_and_new(tmp_path, field, value,
                                                            message):
  workdir = saved_run(tmp_path)
  config = psch_config.base_config()
  *sections, name = field.split(".")
  (config[sections[0]] if sections else config)[name] = value
  before = open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(UserError, match="(?s)" + message):
    workdir_lib.check_config_unchanged(config, workdir)
  assert open(os.path.join(workdir, "config.json")).read() == before


def test_every_changed_field_is_listed(tmp_path):
  workdir = saved_run(tmp_path)
  config = psch_config.base_config()
  config.seed = 3
  config.optim.learning_rate = 0.01
  with pytest.raises(UserError, match=r"(?s)config.optim.learning_rate: 0.001 .*"
                                      r"config.seed: 0 .*restore the old values"):
    workdir_lib.check_config_unchanged(config, workdir)


def test_safe_fields_may_change_and_a_new_workdir_has_nothing_to_compare(tmp_path):
  workdir = saved_run(tmp_path)
  config = psch_config.base_config()
  config.eval.batch_size = 64
  config.eval.topk = (10, 100)
  config.train.tensorboard = True
  config.train.checkpoint_every_steps = 7
  config.train.keep_checkpoints = 5
  config.data.data_dir = "/elsewhere"
  workdir_lib.check_config_unchanged(config, workdir)
  workdir_lib.check_config_unchanged(config, str(tmp_path / "new"))


@pytest.mark.parametrize("content,message", [
    ("{not json", r"cannot read .*config.json .*restore it, or start a new --workdir"),
    ("[1, 2]", r"config.json holds a list, not a config"),
])
def test_a_damaged_saved_config_is_named(tmp_path, content, message):
  (tmp_path / "config.json").write_text(content)
  with pytest.raises(UserError, match=message):
    workdir_lib.check_config_unchanged(psch_config.base_config(), str(tmp_path))


def test_a_field_missing_from_the_saved_config_is_a_change(tmp_path):
  saved = psch_config.base_config().to_dict()
  del saved["attention"]["uniform"]
  io_utils.write_json(os.path.join(tmp_path, "config.json"), saved)
  with pytest.raises(UserError, match=r"config.attention.uniform: absent in .*, "
                                      r"False now"):
    workdir_lib.check_config_unchanged(psch_config.base_config(), str(tmp_path))


def test_a_run_saved_before_the_method_section_existed_is_a_psch_run(tmp_path):
  """A work directory PSCH wrote before the deep peers came resumes as PSCH, and
  refuses any other method."""
  saved = psch_config.base_config().to_dict()
  del saved["method"]
  io_utils.write_json(os.path.join(tmp_path, "config.json"), saved)
  workdir_lib.check_config_unchanged(psch_config.base_config(), str(tmp_path))
  other = psch_config.base_config()
  other.method.name = "bihalf"
  with pytest.raises(UserError, match=r"config.method.name: 'psch' in .*, 'bihalf' now"):
    workdir_lib.check_config_unchanged(other, str(tmp_path))


def test_another_methods_section_is_no_change_but_the_runs_own_is(tmp_path):
  """A peer's default tuned later leaves the runs of every other method resumable."""
  io_utils.write_json(os.path.join(tmp_path, "config.json"),
                      psch_config.base_config().to_dict())
  tuned = psch_config.base_config()
  tuned.method.ssdh.right_stds = 1.0
  workdir_lib.check_config_unchanged(tuned, str(tmp_path))  # a PSCH run
  saved = psch_config.base_config()
  saved.method.name = "ssdh"
  io_utils.write_json(os.path.join(tmp_path, "config.json"), saved.to_dict())
  tuned.method.name = "ssdh"
  with pytest.raises(UserError, match=r"config.method.ssdh.right_stds: 2.0 in .*, "
                                      r"1.0 now"):
    workdir_lib.check_config_unchanged(tuned, str(tmp_path))


# ------------------------------------------------------------------------- lock

_HOLDER = """
import sys, time
from psch_jax import workdir
held = workdir.lock(sys.argv[1])
print("held", flush=True)
time.sleep(120)
"""


def start_holder(workdir: str) -> subprocess.Popen:
  """A second process that takes the lock and keeps it."""
  holder = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, workdir], cwd=REPO, stdout=subprocess.PIPE,
      text=True, env={**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"})
  line = holder.stdout.readline()
  assert line.strip() == "held", line
  return holder


def test_a_second_run_is_refused_naming_the_holder_and_a_killed_one_does_not_block(
    tmp_path):
  workdir = str(tmp_path / "run")
  holder = start_holder(workdir)
  try:
    with pytest.raises(UserError) as raised:
      workdir_lib.lock(workdir)
    message = str(raised.value)
    assert f"work directory {workdir} is in use by another run: pid {holder.pid} on " \
           f"host {socket.gethostname()}, started " in message
    assert "Wait for it to finish or stop it, or pass another --workdir" in message
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
  # The kernel dropped the killed holder's lock: the next run takes it.
  with workdir_lib.lock(workdir) as held:
    saved = json.loads(open(held.path).read())
    assert saved["pid"] == os.getpid() and saved["host"] == socket.gethostname()


def test_the_lock_is_exclusive_within_a_process_too_and_released(tmp_path):
  workdir = str(tmp_path)
  first = workdir_lib.lock(workdir)
  with pytest.raises(UserError, match=f"pid {os.getpid()}"):
    workdir_lib.lock(workdir)
  # The processes of one multi-process run do not exclude each other.
  other_process = workdir_lib.lock(workdir, process_index=1)
  other_process.release()
  first.release()
  workdir_lib.lock(workdir).release()
  # Released, the lock file names no holder: a refused run changes no byte.
  assert os.path.getsize(first.path) == 0


def test_a_workdir_that_cannot_be_created_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match=r"work directory .*file/run is not writable "
                                      r"\(Not a directory\); pass a --workdir"):
    workdir_lib.lock(str(tmp_path / "file" / "run"))


def test_a_lock_file_that_is_a_directory_is_named(tmp_path):
  os.makedirs(tmp_path / ".lock-0")
  with pytest.raises(UserError, match=r"cannot open the lock file .*\.lock-0"):
    workdir_lib.lock(str(tmp_path))


def test_claim_checks_layout_and_config_and_releases_on_refusal(tmp_path):
  workdir = saved_run(tmp_path)
  config = psch_config.base_config()
  config.seed = 5
  with pytest.raises(UserError, match="config.seed: 0"):
    workdir_lib.claim(workdir, config)
  with workdir_lib.claim(workdir, psch_config.base_config()):  # the lock was released
    pass
  (tmp_path / "splits").write_text("stray")
  with pytest.raises(UserError, match="splits is a file"):
    workdir_lib.claim(workdir, psch_config.base_config())


# ------------------------------------------------------------ lease (gs://)

def test_a_fresh_lease_is_refused_and_a_stale_one_taken_over(tmp_path):
  workdir = str(tmp_path)
  first = workdir_lib.Lease(workdir, settle_s=0.0, heartbeat_s=0.05)
  try:
    with pytest.raises(UserError, match=rf"is in use by another run: pid {os.getpid()} "
                                        r".*expires 300 s after its last heartbeat"):
      workdir_lib.Lease(workdir, settle_s=0.0)
  finally:
    first.release()
  assert not (tmp_path / workdir_lib.LEASE_NAME).exists()
  # A holder killed without releasing leaves its lease; once stale it is taken over.
  stale = {"pid": 1, "host": "elsewhere", "token": "dead",
           "heartbeat": time.time() - 600}
  (tmp_path / workdir_lib.LEASE_NAME).write_text(json.dumps(stale))
  with workdir_lib.Lease(workdir, settle_s=0.0) as lease:
    lease.check()
    assert json.loads((tmp_path / workdir_lib.LEASE_NAME).read_text())["pid"] == \
        os.getpid()


def test_a_lease_taken_over_by_another_run_is_detected(tmp_path):
  lease = workdir_lib.Lease(str(tmp_path), settle_s=0.0, heartbeat_s=0.02)
  try:
    intruder = {"pid": 7, "host": "other-host", "token": "other",
                "heartbeat": time.time()}
    (tmp_path / workdir_lib.LEASE_NAME).write_text(json.dumps(intruder))
    deadline, message = time.time() + 10, None
    while message is None and time.time() < deadline:  # the next heartbeat sees it
      try:
        lease.check()
      except UserError as e:
        message = str(e)
      time.sleep(0.02)
    assert message is not None
    assert "pid 7 on host other-host" in message and "took over" in message
  finally:
    lease.release()
  # Not ours any more: release leaves the other run's lease in place.
  assert json.loads((tmp_path / workdir_lib.LEASE_NAME).read_text())["pid"] == 7


def test_a_fresh_lease_of_a_dead_process_of_this_host_is_taken_over(tmp_path):
  # A run SIGKILLed on this host leaves a fresh lease; its rerun here must not wait
  # for it to expire, while a live holder (this process) is still refused.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lease = {"pid": dead.pid, "host": socket.gethostname(), "token": "killed",
           "heartbeat": time.time()}
  (tmp_path / workdir_lib.LEASE_NAME).write_text(json.dumps(lease))
  with workdir_lib.Lease(str(tmp_path), settle_s=0.0) as taken:
    taken.check()
    assert json.loads((tmp_path / workdir_lib.LEASE_NAME).read_text())["pid"] == \
        os.getpid()
    with pytest.raises(UserError, match=rf"in use by another run: pid {os.getpid()}"):
      workdir_lib.Lease(str(tmp_path), settle_s=0.0)
