"""Benchmarks of psch_jax against peer libraries; shared reporting helpers.

Every script is run from the repository root as `python -m benchmarks.<name>` and
prints the machine it ran on (`describe_machine`), the exact command, and a table of
peer time, our time and their ratio (`print_table`). See benchmarks/README.md for the
commands and docs/benchmarks.md for measured figures.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import sys
import time
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def peak_rss_mib() -> float:
  """VmHWM of this process (peak resident memory so far) in MiB; nan without /proc."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return float("nan")


def describe_machine(packages: Sequence[str] = ("jax", "jaxlib", "flax", "numpy")
                     ) -> str:
  """Lines naming the CPU, cores, load, package versions and the exact command."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
      os.cpu_count())
  load = os.getloadavg()
  versions = ", ".join(f"{p} {_version(p)}" for p in packages)
  blas_env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                                         "OMP_NUM_THREADS", "XLA_FLAGS")
              if k in os.environ}
  command = shlex.join(getattr(sys, "orig_argv", [sys.executable] + sys.argv))
  return "\n".join([
      f"machine: {cpu_model()}, {cores} cores usable ({os.cpu_count()} online), "
      f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)",
      f"python {platform.python_version()}; {versions}",
      f"environment: {blas_env or 'no BLAS / OpenMP / XLA variables set'}",
      f"command: {command}",
  ])


def blas_threads() -> str:
  """threadpoolctl's view of the BLAS and OpenMP pools loaded in this process."""
  try:
    import threadpoolctl  # pylint: disable=import-outside-toplevel
  except ImportError:
    return "threadpoolctl not installed"
  pools = [f"{p['internal_api']} {p.get('version') or ''} "
           f"{p.get('architecture', '')} {p['num_threads']} threads "
           f"({os.path.basename(p['filepath'])})".replace("  ", " ")
           for p in threadpoolctl.threadpool_info()]
  return "; ".join(pools) or "no BLAS / OpenMP pool loaded"


def interleaved_best_of(repeats: int, runs: dict[str, Callable[[], T]]
                        ) -> dict[str, tuple[float, float, T]]:
  """Best wall and CPU seconds of each of `runs`, taken in turn `repeats` times.

  Round-robin, so a burst of load from other processes hits every contender alike.
  Returns {name: (best wall seconds, best process CPU seconds, last result)}; the
  CPU time counts every thread of this process, so it moves less than the wall time
  when other processes compete for the cores.
  """
  best = {name: (float("inf"), float("inf"), None) for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      wall, cpu = time.perf_counter(), time.process_time()
      result = run()
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      best[name] = (min(best[name][0], wall), min(best[name][1], cpu), result)
  return best


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
  """A Markdown table (pasteable into docs/benchmarks.md); floats get 3 decimals."""

  def cell(value: object) -> str:
    if not isinstance(value, float):
      return str(value)
    if value != value:  # NaN: no figure.
      return "-"
    if abs(value) < 1e-2:
      return f"{value:.3g}"
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"

  cells = [[cell(v) for v in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
  line = lambda values: "| " + " | ".join(
      v.ljust(w) for v, w in zip(values, widths)) + " |"
  print(line(header))
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in cells:
    print(line(row))
  sys.stdout.flush()
