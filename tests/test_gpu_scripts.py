"""benchmarks/gpu_prepare.sh and gpu_check.sh: the GPU check (issue 22) must not rot on
a machine without a GPU. Both parse; prepare fetches, for the GPU machine's Python 3.12,
exactly the pins that requirements.txt gives Python 3.12 (not the Python 3.11 ones
listed first), and its check script runs the determinism comparison both ways.
"""
import subprocess

from tests.helpers import ROOT, requirement_pins

_PREPARE = "benchmarks/gpu_prepare.sh"
_CHECK = "benchmarks/gpu_check.sh"


def test_both_scripts_parse():
  for script in (_PREPARE, _CHECK):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def test_prepare_fetches_the_python_3_12_pins():
  listed = subprocess.run(["bash", _PREPARE, "--list"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.split()
  pinned = dict(item.split("==") for item in listed if "==" in item)
  wanted = requirement_pins("3.12")
  assert pinned and all(wanted[name] == version for name, version in pinned.items())
  # The two stacks differ where it matters, so the check above can fail.
  assert requirement_pins("3.11")["flax"] != pinned["flax"] == wanted["flax"]


def test_check_compares_codes_with_determinism_on_and_off():
  with open(f"{ROOT}/{_CHECK}", encoding="utf-8") as f:
    script = f.read()
  assert "--config.train.deterministic=False" in script
  assert 'same_codes "$work/tiny_det1" "$work/tiny_det2"' in script
  assert 'same_codes "$work/tiny_fast1" "$work/tiny_fast2"' in script
