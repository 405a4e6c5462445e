"""Test-wide setup: 4 fake CPU devices, so data-parallel code runs its real path.

XLA reads the flag once, when the backend starts, so it is set before anything
imports jax. Code that wants one device builds its mesh from `jax.devices()[:1]`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache for the whole test session, subprocesses
# included (they inherit the environment): the tiny end-to-end runs compile the same
# programs many times, and compiling dominates their time on a CPU.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="psch-jax-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import fcntl  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


# Fixtures whose tests are end-to-end by nature: a trained run, a storage server.
_SLOW_FIXTURES = ("tiny_run", "gcs_bucket")

# The files that take the workers longest, longest first (per-file sums of
# `--durations=0`, docs/testing.md). xdist's loadfile hands out whole files in
# collection order (pytest.ini turns off its reordering by test count, which put
# these few-test files last), so starting with the longest leaves the many short
# files to even out the two workers' ends: longest processing time first. A stale
# list costs minutes, never a result.
_LONGEST_FILES = ("test_transaction.py", "test_methods.py", "test_reliability.py",
                  "test_mixed_precision.py", "test_train.py", "test_gcs_workdir.py",
                  "test_experiments.py", "test_spectral.py", "test_main.py",
                  "test_hub.py", "test_pretrained.py", "test_pseudo_labels.py",
                  "test_diagnostics.py", "test_search.py", "test_kmeans.py")


def pytest_collection_modifyitems(items):
  """Marks `slow` every test that needs a trained run or the Cloud Storage emulator
  (directly or through another fixture), beside the tests marked by hand; puts the
  longest files first (stable: each file's tests keep their order)."""
  for item in items:
    if any(name in getattr(item, "fixturenames", ()) for name in _SLOW_FIXTURES):
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(_LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> str:
  """The work directory of one finished Fashion-MNIST `:tiny` run (trained, evaluated,
  results.json and codes written), trained once per test session and shared by every
  xdist worker.

  Read only: a test that runs a command on it (which locks the directory) or changes
  it copies it first (`tests.helpers.copy_run`).
  """
  from tests import helpers  # pylint: disable=g-import-not-at-top
  if not helpers.FASHION_MNIST:
    pytest.skip("apt-get install dataset-fashion-mnist")
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the directory the workers' own temporary roots share
  workdir = root / "tiny_run"
  with open(root / "tiny_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # one worker trains, the others wait for it
    if not (workdir / "results.json").exists():
      from psch_jax import train  # pylint: disable=g-import-not-at-top
      partial = root / "tiny_run.partial"
      shutil.rmtree(partial, ignore_errors=True)
      train.train_and_evaluate(helpers.repo_config("fashion_mnist", "tiny"),
                               str(partial))
      partial.rename(workdir)
  return str(workdir)


class GcsBucket:
  """The emulated bucket of `gcs_bucket`: `url` ("gs://bucket"), `environment`
  (what points the clients at the emulator; already in os.environ), and
  `objects(prefix)`, the object names the emulator holds (read past the clients)."""

  def __init__(self, name: str, environment: dict):
    self.name, self.url, self.environment = name, f"gs://{name}", environment

  def objects(self, prefix: str = "") -> list:
    from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
    return gcs_emulator.list_objects(self.environment, self.name, prefix)


@pytest.fixture(scope="session")
def gcs_bucket():
  """A Cloud Storage emulator on 127.0.0.1 with one bucket, for the whole session.

  Sets the variables that point TensorStore, tf.io.gfile (through a local TLS proxy)
  and Google clients at it (tests/gcs_emulator.py says which and why) for this test
  process and the subprocesses it starts; restores them and stops the emulator at
  the end. Tests use distinct prefixes in the one bucket.
  """
  from tests import gcs_emulator  # pylint: disable=g-import-not-at-top
  with gcs_emulator.running_emulator("bucket") as environment:
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)
    try:
      yield GcsBucket("bucket", environment)
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
