"""The README's accelerator installs pin the jax that requirements.txt pins."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(name: str) -> str:
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def test_readme_gpu_and_tpu_lines_install_the_tested_jax():
  requirements = _read("requirements.txt")
  jax_pin = re.search(r"^jax==(\S+)$", requirements, re.M).group(1)
  assert re.search(rf"^jaxlib=={re.escape(jax_pin)}$", requirements, re.M)
  readme = _read("README.md")
  for extra in ("cuda13", "tpu"):
    assert f'pip install "jax[{extra}]=={jax_pin}"' in readme, extra
    assert f'"jax[{extra}]=={jax_pin}"' in requirements, extra
  # Every jax install the README shows is pinned, none an upgrade to whatever is new.
  assert not re.search(r"pip install -U[^`\n]*jax", readme)
  assert all("==" in spec for spec in re.findall(r'"jax\[[^"]*"', readme))
