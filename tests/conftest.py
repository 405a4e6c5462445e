"""Test-wide setup: 8 fake CPU devices, so data-parallel code runs its real path.

XLA reads the flag once, when the backend starts, so it is set before anything
imports jax. Code that wants one device builds its mesh from `jax.devices()[:1]`.
"""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
