"""requirements.txt pins two stacks by Python version, and the README's accelerator
installs pin, for each Python, the jax that requirements.txt gives it."""
import os
import re

from tests.helpers import requirement_pins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The Pythons of the two stacks .ci/run tests.
_PYTHONS = ("3.11", "3.12")


def _read(name: str) -> str:
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def test_each_python_gets_one_exact_pin_of_every_package():
  stacks = {python: requirement_pins(python) for python in _PYTHONS}
  assert stacks["3.11"].keys() == stacks["3.12"].keys()
  for pins in stacks.values():
    assert pins["jaxlib"] == pins["jax"]
  assert stacks["3.11"]["jax"] != stacks["3.12"]["jax"]  # two stacks, really


def test_readme_gpu_and_tpu_lines_install_the_tested_jax():
  requirements, readme = _read("requirements.txt"), _read("README.md")
  for python in _PYTHONS:
    jax_pin = requirement_pins(python)["jax"]
    for extra in ("cuda13", "tpu"):
      assert f'"jax[{extra}]=={jax_pin}"' in readme, (python, extra)
      assert f'"jax[{extra}]=={jax_pin}"' in requirements, (python, extra)
  # Every jax install the README shows is pinned, none an upgrade to whatever is new.
  assert not re.search(r"pip install -U[^`\n]*jax", readme)
  assert all("==" in spec for spec in re.findall(r'"jax\[[^"]*"', readme))
