"""The shape of the codebase that a newcomer relies on: library modules never load the
command line, modules import each other without circles, and every `module.function`
the docs name exists."""
import ast
import functools
import importlib
import os
import pkgutil
import re
import subprocess
import sys

import pytest

import psch_jax
from psch_jax import config_schema
from tests.helpers import ROOT

PACKAGE_DIR = os.path.join(ROOT, "psch_jax")
COMMAND_LINE = ("psch_jax.cli", "psch_jax.commands")


@functools.lru_cache(maxsize=None)
def _modules() -> dict[str, str]:
  """Every module of the package: dotted name -> file path."""
  found = {}
  for info in pkgutil.walk_packages([PACKAGE_DIR], prefix="psch_jax."):
    spec = importlib.util.find_spec(info.name)
    found[info.name] = spec.origin
  return found


def _is_command_line(name: str) -> bool:
  return any(name == c or name.startswith(c + ".") for c in COMMAND_LINE)


LIBRARY = sorted(n for n in _modules() if not _is_command_line(n))


def _python(code: str) -> str:
  """Runs `code` in a fresh interpreter (nothing imported yet) from the repository
  root; asserts it succeeded and returns its stdout."""
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def test_no_library_module_loads_the_command_line():
  output = _python("import importlib, sys\n"
                   f"for name in {LIBRARY!r}:\n"
                   "  importlib.import_module(name)\n"
                   "print(sorted(m for m in sys.modules if m == 'psch_jax.cli' or "
                   "m.startswith('psch_jax.commands')))\n")
  assert output.strip() == "[]", output


def _imports(path: str, package: str) -> set[str]:
  """The psch_jax modules `path` imports, at any depth of the file (an import inside
  a function closes a circle as surely as one at the top)."""
  modules = _modules()
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        names.add(full if full in modules else base)
  return {n for n in names if n in modules and n != "psch_jax"}


def test_no_import_circle():
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    graph[name] = _imports(path, package) - {name}
  # Depth-first search for a back edge; the circle is reported as a path.
  state, stack = {}, []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for nxt in sorted(graph[node]):
      if state.get(nxt) == "open":
        circle = stack[stack.index(nxt):] + [nxt]
        pytest.fail("import circle: " + " -> ".join(circle))
      if nxt not in state:
        visit(nxt)
    stack.pop()
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node)


def test_train_imports_without_the_command_line():
  # The acceptance line of issue 21, as a user would run it.
  _python("import psch_jax.train, sys; assert 'psch_jax.cli' not in sys.modules")


def test_config_rules_load_without_jax():
  # A config that breaks a rule is refused before JAX's 1.5 s of imports.
  _python("import psch_jax.config_schema, sys; "
          "assert 'jax' not in sys.modules, 'config_schema imports jax'")


COMMAND_MODULES = sorted(
    name[:-3] for name in os.listdir(os.path.join(ROOT, "psch_jax", "commands"))
    if name.endswith(".py") and name != "__init__.py")


@pytest.mark.parametrize("command", COMMAND_MODULES)
def test_every_command_defines_its_flags_without_jax(command):
  # `--help` and flag errors answer before JAX's imports (the experiments command
  # lists its --methods from psch_jax.table_rows, not from psch_jax.experiments).
  _python(f"import sys, psch_jax.commands.{command} as command; "
          "command.define_flags(); "
          "loaded = [m for m in ('jax', 'tensorflow') if m in sys.modules]; "
          "assert not loaded, loaded")


# ----------------------------------------------------------------- docs and code

DOC_FILES = [os.path.join(ROOT, "README.md")] + [
    os.path.join(ROOT, "docs", f) for f in sorted(os.listdir(os.path.join(ROOT, "docs")))
    if f.endswith(".md")]
_FILE_SUFFIXES = (".py", ".json", ".jsonl", ".md", ".npy", ".npz", ".png", ".txt",
                  ".gz", ".pth", ".safetensors", ".orbax-checkpoint-tmp")
_DOTTED = re.compile(r"`([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)(?:\([^`]*\))?`")


def _resolve(dotted: str):
  """(module, attribute path) when `dotted` names something of psch_jax, else None.

  `ranking.retrieval_metrics`, `psch_jax.run_setup.setup_run`, `data.splits.make_splits`
  and `splits.make_splits` (a module of psch_jax/data) all count; `config.<section>...`
  is a config field, not a function, and `jax.jit` is not ours.
  """
  parts = dotted.split(".")
  if parts[0] == "psch_jax":
    parts = parts[1:]
  modules = _modules()
  for prefix in ("psch_jax.", "psch_jax.data.", "psch_jax.evaluators.",
                 "psch_jax.commands."):
    for cut in range(len(parts), 0, -1):  # the longest module name first
      module = prefix + ".".join(parts[:cut])
      if module in modules:
        return module, parts[cut:]
  return None


def _named_in_docs():
  for path in DOC_FILES:
    text = open(path).read()
    for match in _DOTTED.finditer(text):
      dotted = match.group(1)
      if (dotted.endswith(_FILE_SUFFIXES) or dotted.startswith("config.")
          or ".".join(dotted.split(".")[:2]) in config_schema.FIELDS):
        continue  # a file, or a config field such as `train.num_epochs`
      resolved = _resolve(dotted)
      if resolved is not None:
        yield os.path.relpath(path, ROOT), dotted, resolved


def test_every_module_function_named_in_the_docs_exists():
  missing = []
  for doc, dotted, (module, attributes) in _named_in_docs():
    target = importlib.import_module(module)
    for attribute in attributes:
      if not hasattr(target, attribute):
        missing.append(f"{doc}: `{dotted}` ({module} has no {attribute!r})")
        break
      target = getattr(target, attribute)
  assert not missing, "\n".join(missing)


def test_the_docs_check_sees_names():
  # The check above is only as good as its parser: it must find the names the docs
  # hold (a regression that matched nothing would pass vacuously).
  named = {dotted for _, dotted, _ in _named_in_docs()}
  assert {"ranking.retrieval_metrics", "run_setup.setup_run"} <= named, sorted(named)
  assert _resolve("jax.jit") is None and _resolve("results.json") is None
  assert psch_jax.__name__ == "psch_jax"
