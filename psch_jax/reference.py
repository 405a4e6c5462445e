"""The NumPy reference of every retrieval metric: a stable argsort per query.

It shares no code with `psch_jax/ranking.py` (the package's one fast implementation)
and is written the way the metrics are defined in docs/evaluation.md, so the tests,
`python -m psch_jax.commands.reports` (which recomputes a run's results.json from its saved
codes) and `psch_jax/diagnostics.py` (which ranks training images by target scores)
check against it. Queries are ranked in blocks, so at most a (block x database)
matrix exists at a time.

Conventions: the database is ranked by increasing distance (a Hamming distance, or
any key, e.g. a negated score), ties by database index; AP@K = (1/R_K) sum over the
relevant items k <= K of P@k, 0 when R_K = 0 (the query stays in the mean); K larger
than the database means the whole database.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from psch_jax.errors import UserError

# Queries per block: (block x database) int32 distances and int64 orders in memory.
QUERY_BLOCK = 128


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
  """numerator / denominator, 0 where the denominator is 0."""
  return np.where(denominator > 0, numerator / np.maximum(denominator, 1), 0.0)


def hamming_distances(query_codes: np.ndarray, database_codes: np.ndarray) -> np.ndarray:
  """int32 (nq, ndb) Hamming distances of +-1 codes (nq, L), (ndb, L)."""
  code_length = database_codes.shape[1]
  # For +-1 codes, <q, b> = L - 2 * Hamming(q, b). In float32 (BLAS; NumPy's integer
  # matmul has none): every partial sum is an integer below 2^24, so exact.
  inner = query_codes.astype(np.float32) @ database_codes.astype(np.float32).T
  return ((code_length - inner) / 2).astype(np.int32)


def shares_a_label(query_labels: np.ndarray, database_labels: np.ndarray) -> np.ndarray:
  """bool (nq, ndb): query and database item share at least one label (multi-hot)."""
  # float32 for BLAS: the counts of shared labels are small integers, exact.
  return (query_labels.astype(np.float32) @ database_labels.astype(np.float32).T) > 0


def ranked_relevance(distances: np.ndarray, relevant: np.ndarray, *,
                     exclude: np.ndarray | None = None) -> np.ndarray:
  """Relevance in ranked order: increasing distance, ties by column.

  Args:
    distances: (C, N) finite ranking keys, smaller first (Hamming distances, or
      negated scores to rank by decreasing score).
    relevant: bool (C, N).
    exclude: optional int (C,): one column per row left out of its ranking (a query
      ranked against the rest of its own set).

  Returns:
    bool (C, N), or (C, N - 1) with `exclude`.
  """
  distances = np.asarray(distances)
  relevant = np.asarray(relevant, bool)
  if distances.ndim != 2 or relevant.shape != distances.shape:
    raise UserError(f"ranking needs distances and relevance of one shape (C, N); got "
                    f"{distances.shape} and {relevant.shape}.")
  if not np.isfinite(distances).all():
    raise UserError("the ranking got non-finite scores or distances; a NaN has no "
                    "place in a ranking (check the features they come from).")
  order = np.argsort(distances, axis=1, kind="stable")
  if exclude is not None:
    exclude = np.asarray(exclude)
    if exclude.shape != distances.shape[:1]:
      raise UserError(f"exclude must hold one column per row ({distances.shape[0]}), "
                      f"got shape {exclude.shape}.")
    order = order[order != exclude[:, None]].reshape(len(order), -1)
  return np.take_along_axis(relevant, order, axis=1)


def average_precision(ranked: np.ndarray, k: int | None = None) -> np.ndarray:
  """float64 (C,) AP@k of each row of `ranked_relevance` (None: the whole list)."""
  top = ranked[:, :k]
  hits = np.cumsum(top, axis=1)
  precision = np.where(top, hits / np.arange(1, top.shape[1] + 1), 0.0)
  return _ratio(np.sum(precision, axis=1), hits[:, -1])


def tie_aware_average_precision(distances: np.ndarray, relevant: np.ndarray
                                ) -> np.ndarray:
  """float64 (C,) expected AP@all when tied items come in a uniformly random order.

  A relevant item of a group of n items (r relevant) tied after C items (R' of them
  relevant) sits at each place p = 1..n with probability 1/n, and the expected number
  of relevant group members before it is (p - 1)(r - 1)/(n - 1), so
  E[P] = (1/n) sum_p (R' + 1 + (p - 1)(r - 1)/(n - 1)) / (C + p), summed directly
  (He et al., CVPR 2018). 0 for a row without a relevant item.
  """
  result = np.zeros(len(distances))
  for row, (row_distances, row_relevant) in enumerate(zip(distances, relevant)):
    total = 0.0
    before = hits_before = 0
    for distance in np.unique(row_distances):
      in_group = row_distances == distance
      n = int(in_group.sum())
      r = int(row_relevant[in_group].sum())
      if r:
        places = np.arange(1, n + 1, dtype=np.float64)
        slope = (r - 1) / (n - 1) if n > 1 else 0.0
        total += r * np.mean((hits_before + 1 + (places - 1) * slope)
                             / (before + places))
      before += n
      hits_before += r
    result[row] = total / hits_before if hits_before else 0.0
  return result


def retrieval_metrics_per_query(query_codes: np.ndarray, query_labels: np.ndarray,
                                database_codes: np.ndarray,
                                database_labels: np.ndarray, *,
                                topk: Sequence[int | None], topn: Sequence[int],
                                radius: int | None) -> dict[str, np.ndarray]:
  """Every metric of docs/evaluation.md per query, the keys of
  `ranking.retrieval_metrics_per_query`.

  Args:
    query_codes, database_codes: int8 (n, L) +-1 codes.
    query_labels, database_labels: uint8 (n, num_labels) multi-hot.
    topk: cut-offs K of AP@K (None: all; AP@all is always computed).
    topn: list sizes N of precision@N.
    radius: the radius of "precision@radius{radius}", or None for none.

  Returns:
    float64: "ap@{K}", "ap@all", "ap@all_tie_aware", "precision@top{N}" (nq,),
    "pr_precision", "pr_recall" (nq, L + 1) per radius 0..L, "precision@radius{r}"
    (nq,); int64 "num_relevant" (nq,).
  """
  num_database, code_length = database_codes.shape
  names = {f"ap@{'all' if k is None else k}": k for k in topk}
  names["ap@all"] = None
  blocks: dict[str, list] = {}

  def add(name: str, values: np.ndarray) -> None:
    blocks.setdefault(name, []).append(values)

  for start in range(0, len(query_codes), QUERY_BLOCK):
    block = slice(start, start + QUERY_BLOCK)
    distances = hamming_distances(query_codes[block], database_codes)
    relevant = shares_a_label(query_labels[block], database_labels)
    ranked = ranked_relevance(distances, relevant)
    for name, k in names.items():
      add(name, average_precision(ranked, k))
    hits = np.cumsum(ranked, axis=1)
    for n in topn:
      cut = min(n, num_database)
      add(f"precision@top{n}", hits[:, cut - 1] / cut)
    num_relevant = hits[:, -1]
    add("num_relevant", num_relevant.astype(np.int64))
    retrieved = np.stack([(distances <= r).sum(axis=1)
                          for r in range(code_length + 1)], axis=1)
    relevant_inside = np.stack([((distances <= r) & relevant).sum(axis=1)
                                for r in range(code_length + 1)], axis=1)
    add("pr_precision", _ratio(relevant_inside, retrieved))
    add("pr_recall", _ratio(relevant_inside, num_relevant[:, None]))
    add("ap@all_tie_aware", tie_aware_average_precision(distances, relevant))
  metrics = {name: np.concatenate(values) for name, values in blocks.items()}
  if radius is not None:
    metrics[f"precision@radius{radius}"] = metrics["pr_precision"][
        :, min(radius, code_length)]
  return metrics


def retrieval_metrics(query_codes: np.ndarray, query_labels: np.ndarray,
                      database_codes: np.ndarray, database_labels: np.ndarray, *,
                      topk: Sequence[int], topn: Sequence[int], radius: int | None
                      ) -> dict[str, float]:
  """The means over all queries of `retrieval_metrics_per_query` (same arguments), in
  the flat names of `reports.flatten_results`.

  Returns:
    {name: float}: "map@{K}", "map@all", "map@all_tie_aware", "precision@radius{r}",
    "precision@top{N}", "pr_precision@radius{r}" and "pr_recall@radius{r}" for
    r = 0..L.
  """
  per_query = retrieval_metrics_per_query(
      query_codes, query_labels, database_codes, database_labels, topk=topk,
      topn=topn, radius=radius)
  metrics = {}
  for name, values in per_query.items():
    if name == "num_relevant":
      continue
    if name.startswith("pr_"):
      for r, value in enumerate(values.mean(axis=0)):
        metrics[f"{name}@radius{r}"] = float(value)
    else:
      metrics[f"m{name}" if name.startswith("ap@") else name] = float(values.mean())
  return metrics
