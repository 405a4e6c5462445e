"""Benchmark: psch_jax.kmeans against scikit-learn and faiss, 20 Lloyd iterations.

All three run the same work on the same float32 data from the same initial centroids
(K distinct rows drawn with a fixed seed): ours `kmeans(..., n_init=1, max_iter=20,
tol=0, init_centroids=init)`, scikit-learn `KMeans(algorithm="lloyd", n_init=1,
max_iter=20, tol=0, init=init)` and faiss `Kmeans(niter=20).train(x,
init_centroids=init)` with subsampling switched off (faiss otherwise clusters at most
256 points per centroid). Ours is timed after a compile warm-up with
`block_until_ready`. Each timing is the best of --repeats runs, the contenders taken
in turn so that load from other processes hits them alike; wall and process CPU time
are both shown (CPU time moves less on a shared machine). The final inertia of each is
recomputed the same way, to show they did comparable work. `--candidate FILE.py`
adds rows for another implementation with the same `kmeans` API (a patched copy of
psch_jax/kmeans.py), for an A/B test of a change before it lands.

Cases: N=50,000 D=512 K=100 and N=5,000 D=4,096 K=10; then ours alone at
N = 5k, 20k, 50k, 200k (D=512, K=100) for the time per point.

`--profile` adds one assignment pass timed op by op, to show where our time goes.

Run from the repository root:
  python -m benchmarks.bench_kmeans            (full sizes, about 5 min on 2 cores)
  python -m benchmarks.bench_kmeans --quick    (tiny sizes, seconds: a check that it runs)
OpenBLAS variables (OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE) slow scikit-learn's BLAS
where they are set: compare with `env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python
-m benchmarks.bench_kmeans`; the header prints which BLAS kernel and thread count ran.

Data: Gaussian blobs (K centres, noise 4 sqrt(D / 512) times the centre spread) so
that Lloyd does not converge within 20 iterations and every library runs all of them.
"""
from __future__ import annotations

import importlib.util
import os
from types import ModuleType
from typing import Callable, Sequence

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  # One XLA CPU device per core, for the "mesh over all devices" row.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_"
                             f"platform_device_count={os.cpu_count()}")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position
from jax import lax  # pylint: disable=wrong-import-position
from jax.sharding import Mesh  # pylint: disable=wrong-import-position

from benchmarks import blas_threads, describe_machine, interleaved_best_of, print_table  # pylint: disable=wrong-import-position
from psch_jax import cli  # pylint: disable=wrong-import-position
from psch_jax import kmeans as kmeans_lib  # pylint: disable=wrong-import-position
from psch_jax import sharding  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
ITERATIONS = 20


def make_blobs(num_points: int, dim: int, num_clusters: int, seed: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
  """float32 (N, D) blobs and (K, D) initial centroids: K distinct rows of them."""
  rng = np.random.default_rng(seed)
  centres = rng.standard_normal((num_clusters, dim), dtype=np.float32)
  labels = rng.integers(0, num_clusters, num_points)
  # Noise grows with sqrt(D): blobs separate more easily in more dimensions, and
  # Lloyd should not converge before the 20 iterations.
  noise = 4.0 * float(np.sqrt(dim / 512.0))  # A Python float keeps float32 data.
  points = centres[labels] + noise * rng.standard_normal((num_points, dim),
                                                         dtype=np.float32)
  init = points[rng.choice(num_points, num_clusters, replace=False)].copy()
  return points, init


def inertia_of(points: jax.Array, centroids: np.ndarray) -> float:
  """Sum of squared distances to the nearest of `centroids` (Eq. 1), same for all."""
  _, sq_distances = kmeans_lib.assign(points, jnp.asarray(centroids, jnp.float32))
  return float(jnp.sum(sq_distances))


def load_candidate(path: str) -> ModuleType:
  """A module from a file path, e.g. a patched copy of psch_jax/kmeans.py."""
  spec = importlib.util.spec_from_file_location("kmeans_candidate", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def ours_fit(points: jax.Array, init: np.ndarray, mesh: Mesh | None,
             module: ModuleType = kmeans_lib) -> Callable[[], tuple[int, np.ndarray]]:
  """Our k-means as a callable -> (iterations run, centroids); compiled on creation."""
  key = jax.random.key(0)

  def fit():
    result = jax.block_until_ready(module.kmeans(
        key, points, num_clusters=init.shape[0], n_init=1, max_iter=ITERATIONS,
        tol=0.0, init_centroids=init, mesh=mesh))
    return int(result.num_iterations), np.asarray(result.centroids)

  fit()  # Compiles.
  return fit


def sklearn_fit(points: np.ndarray, init: np.ndarray
                ) -> Callable[[], tuple[int, np.ndarray]]:
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel

  def fit():
    model = KMeans(n_clusters=init.shape[0], init=init, n_init=1, max_iter=ITERATIONS,
                   tol=0.0, algorithm="lloyd", random_state=0).fit(points)
    return int(model.n_iter_), model.cluster_centers_

  return fit


def faiss_fit(points: np.ndarray, init: np.ndarray
              ) -> Callable[[], tuple[int, np.ndarray]] | None:
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError:
    print("faiss-cpu is not installed: its row is skipped "
          "(pip install faiss-cpu==1.15.1 to add it).", flush=True)
    return None

  def fit():
    # max_points_per_centroid: faiss would otherwise subsample to 256 K points.
    model = faiss.Kmeans(points.shape[1], init.shape[0], niter=ITERATIONS, seed=0,
                         max_points_per_centroid=points.shape[0], verbose=False)
    model.train(points, init_centroids=init)
    return ITERATIONS, model.centroids

  return fit


def compare(num_points: int, dim: int, num_clusters: int, *, repeats: int,
            meshes: dict[str, Mesh | None], with_faiss: bool,
            candidate: ModuleType | None) -> float:
  """Prints one comparison table; returns ours (1 device) / scikit-learn, wall time."""
  points, init = make_blobs(num_points, dim, num_clusters)
  device_points = jnp.asarray(points)
  print(f"\n### N={num_points:,} D={dim:,} K={num_clusters}, {ITERATIONS} Lloyd "
        f"iterations from the same initial centroids (best of {repeats}, "
        "interleaved)\n", flush=True)
  ours_name = f"psch_jax.kmeans, {next(iter(meshes))}"
  sklearn_name = "scikit-learn KMeans lloyd"
  fits = {f"psch_jax.kmeans, {name}": ours_fit(device_points, init, mesh)
          for name, mesh in meshes.items()}
  if candidate is not None:
    fits.update({f"candidate, {name}": ours_fit(device_points, init, mesh, candidate)
                 for name, mesh in meshes.items()})
  fits[sklearn_name] = sklearn_fit(points, init)
  if with_faiss and (fit := faiss_fit(points, init)) is not None:
    fits["faiss Kmeans"] = fit
  best = interleaved_best_of(repeats, fits)
  ours_wall, ours_cpu, _ = best[ours_name]
  rows = []
  for name, (wall, cpu, (iterations, centroids)) in best.items():
    rows.append((name, wall, wall / ours_wall, cpu, cpu / ours_cpu, iterations,
                 wall / iterations, f"{inertia_of(device_points, centroids):.6g}"))
  print_table(("method", "wall s", "wall / ours", "CPU s", "CPU / ours", "iterations",
               "wall s / iteration", "final inertia"), rows)
  ratio = ours_wall / best[sklearn_name][0]
  print(f"\nours / scikit-learn: wall {ratio:.2f}, CPU "
        f"{ours_cpu / best[sklearn_name][1]:.2f} (goal <= 1.0 on wall time: "
        f"{'met' if ratio <= 1.0 else 'not met'})", flush=True)
  return ratio


def scaling(sizes: list[int], dim: int, num_clusters: int, repeats: int) -> None:
  print(f"\n### Ours alone, D={dim} K={num_clusters}, {ITERATIONS} iterations, "
        f"1 device (best of {repeats})\n", flush=True)
  rows = []
  for num_points in sizes:
    points, init = make_blobs(num_points, dim, num_clusters)
    best = interleaved_best_of(repeats, {"ours": ours_fit(jnp.asarray(points), init,
                                                          None)})
    wall, cpu, (iterations, _) = best["ours"]
    rows.append((f"{num_points:,}", wall, cpu, iterations,
                 1e6 * wall / (num_points * iterations)))
  print_table(("N", "wall s", "CPU s", "iterations", "wall us / point / iteration"),
              rows)


def pass_profile(num_points: int, dim: int, num_clusters: int, chunk: int,
                 repeats: int) -> None:
  """Times one assignment pass built up op by op, as psch_jax.kmeans runs it.

  Each variant is a jitted `lax.scan` over (chunk, D) blocks of zero-padded rows,
  1 device, in the chunks psch_jax.kmeans cuts (`row_layout`, about 2 MiB each): the
  distance product alone, then + argmin, + the exact recomputation of the distance
  to the chosen centroid (the final pass only; Lloyd iterations skip it), + the
  per-cluster sums as a one-hot product (K <= 32, and on accelerators) or as a
  scatter-add (`segment_sum`, K > 32 on CPU).
  """
  points, init = make_blobs(num_points, dim, num_clusters)
  padded_rows = -(-num_points // chunk) * chunk
  blocks = np.zeros((padded_rows, dim), np.float32)
  blocks[:num_points] = points
  blocks = jnp.asarray(blocks.reshape(-1, chunk, dim))
  valid = jnp.asarray((np.arange(padded_rows) < num_points).reshape(-1, chunk))
  centroids = jnp.asarray(init)
  cluster_ids = jnp.arange(num_clusters)

  def make(stage: int):
    @jax.jit
    def run(blocks, valid, centroids):
      c_sq = jnp.sum(centroids * centroids, axis=-1)

      def step(carry, block):
        sums, total = carry
        x, mask = block
        cross = jnp.dot(x, centroids.T)
        if stage == 0:
          return (sums, total + cross[0, 0]), None
        sq = jnp.sum(x * x, -1)[:, None] - 2.0 * cross + c_sq[None, :]
        assignment = jnp.argmin(jnp.maximum(sq, 0.0), axis=1)
        if stage == 1:
          return (sums, total + jnp.sum(assignment)), None
        exact = jnp.sum(jnp.square(x - centroids[assignment]), axis=1)
        total = total + jnp.sum(jnp.where(mask, exact, 0.0))
        if stage == 2:
          return (sums, total), None
        if stage == 3:
          member = (assignment[:, None] == cluster_ids[None, :]) & mask[:, None]
          return (sums + jnp.dot(member.astype(jnp.float32).T, x), total), None
        target = jnp.where(mask, assignment, num_clusters)
        return (sums + jax.ops.segment_sum(x, target, num_clusters + 1)[:-1],
                total), None

      init_carry = (jnp.zeros((num_clusters, dim)), jnp.zeros(()))
      return lax.scan(step, init_carry, (blocks, valid))[0]

    run(blocks, valid, centroids)[0].block_until_ready()  # Compiles.
    return lambda: jax.block_until_ready(run(blocks, valid, centroids))

  names = ["distance product x c^T", "+ distances and argmin",
           "+ exact distance to the chosen centroid",
           "+ sums by one-hot product (K <= 32)", "+ sums by segment_sum (K > 32, CPU)"]
  best = interleaved_best_of(repeats, {name: make(stage)
                                       for stage, name in enumerate(names)})
  print(f"\n### One assignment pass, N={num_points:,} D={dim} K={num_clusters}, "
        f"chunks of {chunk} rows, 1 device (best of {repeats})\n", flush=True)
  product = best[names[0]]
  print_table(("pass built up to", "wall ms", "CPU ms", "CPU / product alone"),
              [(name, 1e3 * wall, 1e3 * cpu, cpu / product[1])
               for name, (wall, cpu, _) in best.items()])


def parse_case(text: str) -> tuple[int, int, int]:
  num_points, dim, num_clusters = (int(v) for v in text.lower().split("x"))
  return num_points, dim, num_clusters


def define_flags() -> None:
  """The benchmark's flags (the module docstring has the commands)."""
  flags.DEFINE_string("cases", "50000x512x100,5000x4096x10",
                      "comma-separated NxDxK comparisons")
  flags.DEFINE_string("scaling-sizes", "5000,20000,50000,200000",
                      "comma-separated N for ours alone at D=512, K=100")
  flags.DEFINE_integer("repeats", 3, "timed runs per comparison")
  flags.DEFINE_integer("scaling-repeats", 2, "timed runs per scaling size")
  flags.DEFINE_bool("no-faiss", False, "skip the faiss rows")
  flags.DEFINE_bool("profile", False,
                    "also time one assignment pass op by op (first case)")
  flags.DEFINE_string("candidate", None, "FILE.py with the kmeans API of "
                      "psch_jax/kmeans.py, timed beside it (A/B test of a change)")
  flags.DEFINE_bool("quick", False, "tiny sizes, seconds (CI): cases "
                    "2000x64x10,500x256x5, scaling 1000,2000, 1 repeat")


def main(argv: Sequence[str]) -> None:
  del argv
  cases, scaling_sizes = FLAGS.cases, FLAGS["scaling-sizes"].value
  repeats, scaling_repeats = FLAGS.repeats, FLAGS["scaling-repeats"].value
  if FLAGS.quick:
    cases, scaling_sizes, repeats, scaling_repeats = (
        "2000x64x10,500x256x5", "1000,2000", 1, 1)

  print(describe_machine(("jax", "jaxlib", "numpy", "scikit-learn", "faiss-cpu")))
  print(f"XLA devices: {len(jax.devices())} ({jax.devices()[0].platform}); "
        f"threads: {blas_threads()}")
  try:
    import faiss  # pylint: disable=import-outside-toplevel
    print(f"faiss OpenMP threads: {faiss.omp_get_max_threads()}")
  except ImportError:
    pass
  candidate = load_candidate(FLAGS.candidate) if FLAGS.candidate else None
  meshes = {"1 device": None}
  if len(jax.devices()) > 1:
    meshes[f"mesh of {len(jax.devices())} devices"] = kmeans_lib.data_mesh(
        sharding.make_mesh())
  for case in cases.split(","):
    compare(*parse_case(case), repeats=repeats, meshes=meshes,
            with_faiss=not FLAGS["no-faiss"].value, candidate=candidate)
  scaling([int(n) for n in scaling_sizes.split(",")], 512, 100,
          scaling_repeats)
  if FLAGS.profile:
    first = parse_case(cases.split(",")[0])
    chunk = kmeans_lib.row_layout(first[0], first[1], 1, 4096).chunk
    pass_profile(*first, chunk=chunk, repeats=max(repeats, 3))
  load = os.getloadavg()
  print(f"\nload average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")


if __name__ == "__main__":
  cli.run(main, define_flags=define_flags,
          command="python -m benchmarks.bench_kmeans")
