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
