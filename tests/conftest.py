"""Test-wide setup: 8 fake CPU devices, so data-parallel code runs its real path.

XLA reads the flag once, when the backend starts, so it is set before anything
imports jax. Code that wants one device builds its mesh from `jax.devices()[:1]`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# One persistent XLA compilation cache for the whole test session, subprocesses
# included (they inherit the environment): the tiny end-to-end runs compile the same
# programs many times, and compiling dominates their time on a CPU.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="psch-jax-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


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
