"""The device passes of the ranking, compiled without data: bounded memory at
NUS-WIDE's size, and no loop over database items in the "sort" form. (Their results
are tested through `ranking` in test_ranking.py, against the NumPy reference.)"""
import jax
import numpy as np
import pytest

from psch_jax import ranking_passes
from psch_jax import sharding

# NUS-WIDE's database at 64 bits, one 256-query chunk.
_NUS_WIDE = dict(num_queries=256, num_database=193_734, code_length=64)


@pytest.mark.parametrize("algorithm", sorted(ranking_passes.ALGORITHMS))
def test_device_memory_stays_small_for_a_nus_wide_sized_database(algorithm):
  # mAP@1000: breakpoints K = 1000 and the database size.
  arguments = ranking_passes.abstract_statistics_arguments(
      **_NUS_WIDE, num_breakpoints=2, largest_breakpoint_rank=1001)
  memory = ranking_passes.sharded_statistics.lower(
      *arguments, mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), (sharding.AXIS,)),
      code_length=64, num_database=_NUS_WIDE["num_database"], algorithm=algorithm
  ).compile().memory_analysis()
  assert memory.temp_size_in_bytes < 32 * 2**20
  assert memory.argument_size_in_bytes < 8 * 2**20


def test_the_sort_algorithm_loops_over_blocks_never_over_items():
  steps = {algorithm: ranking_passes.sequential_loop_steps(**_NUS_WIDE,
                                                           algorithm=algorithm)
           for algorithm in ranking_passes.ALGORITHMS}
  # Both passes of "sort" step once per 1,024-item block (190 blocks); the count sees
  # the per-item loop of "scan" (every item, block by block).
  assert steps == {"sort": 190, "scan": 190 * 1024}
