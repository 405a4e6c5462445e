"""The rows of the results table: PSCH, its ablations, the deep peers and the classical
baselines, by their `--methods` names (`METHODS`; `ABLATIONS` are the PSCH variants).

Plain data, without JAX, so `python -m psch_jax.commands.experiments --help` lists the
names at once; `experiments` trains and scores the rows.
"""
from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class TableRow:
  """One row of the table (a `--methods` name; not a training method of
  `psch_jax.methods`, which a peer row names in its overrides).

  Attributes:
    name: the --methods name.
    label: the row label.
    overrides: for PSCH variants and the deep peers, {dotted config field: value}
      applied to the config.
    baseline: True for a `psch_jax.baselines` method (trained without epochs).
    peer: True for a deep peer of `psch_jax.methods` (trained by the same loop, on
      the config's network, data and schedule).
  """
  name: str
  label: str
  overrides: tuple[tuple[str, Any], ...] = ()
  baseline: bool = False
  peer: bool = False


_METHOD_LIST = (
    TableRow("psch", "PSCH"),
    # No override: PSCH trained as long as the ablations (--epochs_ablation), the row
    # the ablations are read against when their schedule is shorter.
    TableRow("psch_short", "PSCH at the ablations' schedule (reference)"),
    TableRow("hard_similarity", "PSCH, hard similarity",
           (("similarity.hard", True),)),
    TableRow("no_threshold", "PSCH, no distance threshold (q = 1)",
           (("pseudo_labels.keep_quantile", 1.0),)),
    TableRow("one_part", "PSCH, one part (P = 1)", (("attention.num_parts", 1),)),
    TableRow("no_attention", "PSCH, no attention (uniform A)",
           (("attention.uniform", True),)),
    TableRow("no_lcls", "PSCH, no L_cls (alpha = 0)", (("loss.alpha", 0.0),)),
    TableRow("no_lq", "PSCH, no L_q (beta = 0)", (("loss.beta", 0.0),)),
    TableRow("pixel_kmeans", "PSCH, k-means on pixels (no Eq. 1a)",
           (("pseudo_labels.features", "pixels"),)),
    TableRow("minus_one_across", "PSCH, -1 across clusters (no Eq. 7b)",
           (("similarity.cross_cluster_ceiling", None),)),
    TableRow("one_level", "PSCH, one level of pseudo labels (no Eqs. 2b, 7c, 9b)",
           (("pseudo_labels.fine_clusters", None),)),
    TableRow("no_fine_classifier", "PSCH, no fine classifier (alpha_f = 0)",
           (("loss.fine_alpha", 0.0),)),
    TableRow("ssdh", "SSDH", (("method.name", "ssdh"),), peer=True),
    TableRow("greedyhash", "GreedyHash", (("method.name", "greedyhash"),), peer=True),
    TableRow("bihalf", "BiHalf", (("method.name", "bihalf"),), peer=True),
    TableRow("cibhash", "CIBHash", (("method.name", "cibhash"),), peer=True),
    TableRow("lsh", "LSH", baseline=True),
    TableRow("pcah", "PCAH", baseline=True),
    TableRow("itq", "ITQ", baseline=True),
    TableRow("sh", "SH", baseline=True),
)
METHODS: dict[str, TableRow] = {m.name: m for m in _METHOD_LIST}
ABLATIONS = tuple(m.name for m in _METHOD_LIST
                  if m.name != "psch" and not m.baseline and not m.peer)
