"""Evaluators: built from the config, each `run(params)` encodes, ranks and scores.

- `retrieval`: Hamming-ranking retrieval (query images against the database, and
  for model selection validation images against the rest of the database), over the
  ranking and metrics of `psch_jax/ranking.py`; also `score_codes` for codes computed
  elsewhere (baselines), and the results.json / results.md writer.

The shape follows big_vision's evaluators: `from_config(config, ...)` returns the
evaluators by name, each a small object whose `run` gives the metrics.
"""
