"""XLA settings: train.deterministic puts XLA's deterministic-ops flag in place before
JAX starts its backend, and a GPU run without it in effect is refused."""
import os
import subprocess
import sys

import pytest

from psch_jax import config as psch_config
from psch_jax import xla_settings
from psch_jax.errors import UserError
from tests.helpers import ROOT

FLAG = "--xla_gpu_deterministic_ops=true"


def test_apply_adds_the_flag_once_and_keeps_the_users_flags(monkeypatch):
  config = psch_config.base_config()
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  xla_settings.apply(config)
  xla_settings.apply(config)
  assert os.environ["XLA_FLAGS"].split() == [
      "--xla_force_host_platform_device_count=8", FLAG]
  config.train.deterministic = False
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  xla_settings.apply(config)
  assert FLAG not in os.environ["XLA_FLAGS"]


def test_a_gpu_run_without_the_flag_in_effect_is_refused(monkeypatch):
  config = psch_config.base_config()
  monkeypatch.setattr(xla_settings.jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  with pytest.raises(UserError, match="train.deterministic is on.*deterministic=False"):
    xla_settings.check_in_effect(config)
  monkeypatch.setenv("XLA_FLAGS", FLAG)
  xla_settings.check_in_effect(config)
  config.train.deterministic = False
  monkeypatch.setenv("XLA_FLAGS", "")
  xla_settings.check_in_effect(config)


# Runs main.py's main with `xla_settings.apply` wrapped: it records whether JAX's
# backend had started when the flag was added, and the XLA_FLAGS the backend then
# started with (read back after the command, from the process environment).
_PROBE = r"""
import os, runpy, sys
from jax._src import xla_bridge
from psch_jax import xla_settings
original = xla_settings.apply
def spy(config):
  print("backend started before apply:", xla_bridge.backends_are_initialized())
  original(config)
  print("XLA_FLAGS after apply:", os.environ.get("XLA_FLAGS", ""))
xla_settings.apply = spy
sys.argv = ["main.py", "--config=configs/fashion_mnist.py:tiny",
            "--workdir=" + sys.argv[1], "--mode=eval"] + sys.argv[2:]
runpy.run_path("main.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.parametrize("extra,expected", [((), True),
                                            (("--config.train.deterministic=False",),
                                             False)])
def test_main_sets_the_flag_before_the_backend_starts(tmp_path, extra, expected):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / "run"), *extra],
                        cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300, check=False)
  output = proc.stdout + proc.stderr
  assert "backend started before apply: False" in output, output
  assert (FLAG in output.split("XLA_FLAGS after apply:")[1].splitlines()[0]) == expected
  assert proc.returncode == 2 and "no checkpoint" in output  # the eval then refuses
