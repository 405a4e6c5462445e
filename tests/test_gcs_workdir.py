"""Every command on a gs:// work directory, against the Cloud Storage emulator.

What a Cloud TPU user relies on (issue 11): `--workdir=gs://bucket/run` writes the
run to Cloud Storage (not to a local folder named "gs:"), a run SIGKILLed after its
first checkpoint resumes from that bucket to the codes of an uninterrupted run, and
`--mode=eval`, `python -m psch_jax.commands.search` and `python -m psch_jax.commands.reports` work on
the bucket alone; two processes (jax.distributed on localhost, gloo) train one run
into one gs:// work directory.

The emulator (tests/gcs_emulator.py, fixture `gcs_bucket`) is reached through the
real client code paths: tf.io.gfile for io_utils and Orbax's directories,
TensorStore for Orbax's arrays. One killed-and-resumed run is trained once for the
module and reused by the eval, search and reports tests.
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
from PIL import Image
import pytest

from psch_jax import generations
from psch_jax import io_utils
from psch_jax import reports
from psch_jax import search
from psch_jax import train
from psch_jax.evaluators import retrieval
from tests import test_train
from tests.helpers import free_port, FASHION_MNIST, ROOT, needs_fashion_mnist, repo_config


# Seconds a tiny run may take on a busy 2-core CPU (as tests/test_train.py allows).
_RUN_TIMEOUT_S = 600
# The runs on gs:// save at the epoch ends only (steps 5 and 10 of the tiny run's 10)
# instead of every 2 steps: a save is many requests to the emulator, and one save
# before the last is all a kill, a resumption and two processes need.
_EPOCH_END_SAVES = 5


def _epoch_end_saves_config():
  config = repo_config("fashion_mnist", "tiny")
  config.train.checkpoint_every_steps = _EPOCH_END_SAVES
  return config


def _unique_workdir(bucket, name: str) -> str:
  """gs://bucket/<unique>/<name>: tests share the session's bucket."""
  return f"{bucket.url}/{uuid.uuid4().hex[:12]}/{name}"


def _object_name(workdir: str) -> str:
  """gs://bucket/a/b -> a/b, the prefix of the run's objects in the bucket."""
  return workdir.split("://", 1)[1].split("/", 1)[1]


def read_gcs_outputs(workdir: str) -> tuple[dict, dict[str, np.ndarray]]:
  """results.json and the packed codes of its generation, of a run on gs://, read
  through io_utils (on gs:// results.json names the generation its files are in)."""
  return test_train.read_outputs(workdir)


def _first_checkpoint_committed(bucket, workdir: str) -> bool:
  """Whether a step of workdir/checkpoints is finalized. On GCS Orbax does not
  rename a temporary directory (a GCS rename is a copy); it marks a finished step
  with a commit_success.txt object."""
  prefix = _object_name(workdir) + "/checkpoints/"
  for name in bucket.objects(prefix):
    step, _, rest = name[len(prefix):].partition("/")
    if step.isdigit() and rest == "commit_success.txt":
      return True
  return False


@pytest.fixture(scope="module")
def resumed_gcs_run(gcs_bucket):
  """A tiny main.py run on gs://, SIGKILLed after its first checkpoint and rerun (in
  this process) to the end: (work directory, output of the rerun)."""
  if not FASHION_MNIST:
    pytest.skip("apt-get install dataset-fashion-mnist")
  workdir = _unique_workdir(gcs_bucket, "run")
  proc = test_train.run_main(
      workdir, f"--config.train.checkpoint_every_steps={_EPOCH_END_SAVES}")
  deadline = time.monotonic() + _RUN_TIMEOUT_S
  while not _first_checkpoint_committed(gcs_bucket, workdir):
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      pytest.fail("the run ended before it could be killed after its first "
                  "checkpoint:\n" + proc.communicate()[0])
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)  # no cleanup handler runs
  proc.communicate()
  assert not io_utils.exists(io_utils.join(workdir, "results.json"))
  # The rerun in this process: what `main.py` calls, with its output.
  output = io.StringIO()
  with contextlib.redirect_stdout(output):
    train.train_and_evaluate(_epoch_end_saves_config(), workdir)
  return workdir, output.getvalue()


@needs_fashion_mnist
def test_killed_run_on_gcs_resumes_to_the_codes_of_an_uninterrupted_local_run(
    resumed_gcs_run, tiny_run, gcs_bucket):
  workdir, output = resumed_gcs_run
  assert "resumed from step" in output
  results, codes = read_gcs_outputs(workdir)
  local_results, local_codes = test_train.read_outputs(tiny_run)
  for name in codes:
    np.testing.assert_array_equal(codes[name], local_codes[name])
  metrics = [k for k, v in local_results.items()
             if k.startswith(("map", "precision")) and isinstance(v, float)]
  assert metrics and all(results[k] == local_results[k] for k in metrics)
  # Written into the bucket, not into a local folder named "gs:".
  objects = gcs_bucket.objects(_object_name(workdir) + "/")
  prefix = _object_name(workdir) + "/"
  generation = f"generations/{generations.read(workdir)['generation']['id']}/"
  for name in ("config.json", "metrics.jsonl", "results.json", "splits/train.npy",
               "kind.json", "checksums/10.json", generation + "results.md",
               generation + "codes/database.npy", generation + "results.json"):
    assert prefix + name in objects
  assert not os.path.exists(os.path.join(ROOT, "gs:"))


@needs_fashion_mnist
def test_eval_mode_on_gcs_reproduces_the_final_metrics(resumed_gcs_run):
  workdir, _ = resumed_gcs_run
  results, codes = read_gcs_outputs(workdir)
  io_utils.remove(io_utils.join(workdir, "results.json"))
  # In-process: what `main.py --mode=eval` calls (the command line is test_main's).
  train.evaluate_checkpoint(_epoch_end_saves_config(), workdir)
  again, codes_again = read_gcs_outputs(workdir)
  assert again["selection"] == "last epoch"  # the checkpoint of the finished run
  metrics = [k for k, v in results.items()
             if k.startswith(("map", "precision", "validation/")) and isinstance(v, float)]
  assert metrics and all(again[k] == results[k] for k in metrics)
  for name in codes:
    np.testing.assert_array_equal(codes[name], codes_again[name])


@needs_fashion_mnist
def test_search_on_gcs_finds_a_database_image_stored_on_gcs(resumed_gcs_run):
  workdir, _ = resumed_gcs_run
  source = reports.load_run_source(workdir)
  database = io_utils.load_npy(io_utils.join(workdir, "splits", "database.npy"))
  index = int(database[3])
  pixels = source.read(np.asarray([index]))[0]
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(
      buffer, format="PNG")
  image = workdir.rsplit("/", 1)[0] + "/query.png"  # an image on gs:// too
  io_utils.write_bytes(image, buffer.getvalue())
  # In-process: what `python -m psch_jax.commands.search` calls.
  (matches,) = search.search(workdir, [image], topk=len(database))
  distance = {m["index"]: m["distance"] for m in matches}
  assert len(distance) == len(database)
  # Its own code is in the database (the image was encoded as training encodes).
  assert distance[index] == 0, matches[:5]


@needs_fashion_mnist
def test_reports_on_gcs_recompute_every_metric(resumed_gcs_run):
  workdir, _ = resumed_gcs_run
  # In-process: what `python -m psch_jax.commands.reports` calls.
  checks = reports.verify_results(workdir, reports.load_run_source(workdir))
  assert checks and all(c.agrees for c in checks)


@needs_fashion_mnist
def test_two_processes_train_one_run_into_one_gcs_workdir(gcs_bucket):
  workdir = _unique_workdir(gcs_bucket, "two_processes")
  # One device each: the mesh spans the two processes, each feeding its own device.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  address = f"127.0.0.1:{free_port()}"
  saves = f"--config.train.checkpoint_every_steps={_EPOCH_END_SAVES}"
  procs = [test_train.run_main(workdir, f"--coordinator_address={address}",
                               "--num_processes=2", f"--process_id={i}", saves, env=env)
           for i in range(2)]
  outputs = [p.communicate(timeout=_RUN_TIMEOUT_S)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out
  printed = [out[out.index("[process"):].split("\n", 1)[1] for out in outputs]
  assert "map@all" in printed[0] and printed[0] == printed[1]
  results, codes = read_gcs_outputs(workdir)
  # The block each process printed (after its "[process i/2]" line) is the saved
  # results.json's.
  assert printed[0] == retrieval.format_results(results).split("\n", 1)[1] + "\n"
  assert codes["database"].shape == (results["num_database"], 1)
  # Each process probed the directory with its own name and removed the probe.
  assert not [n for n in gcs_bucket.objects(_object_name(workdir) + "/")
              if ".write-test" in n]


@needs_fashion_mnist
def test_a_bucket_that_does_not_exist_is_an_error_line(gcs_bucket):
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/fashion_mnist.py:tiny",
       "--workdir=gs://no-such-bucket-psch/run"], cwd=ROOT, capture_output=True,
      text=True, timeout=600, check=False)
  output = proc.stdout + proc.stderr
  assert proc.returncode == 2, output
  assert "Traceback" not in output, output
  assert "error: " in output and "no-such-bucket-psch" in output, output
