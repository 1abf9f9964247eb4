"""Evaluation: ranking metrics and an MMEB-style evaluation runner.

Importing this package pulls in numpy and torch but not transformers: :func:`evaluate` only
needs an object with an ``encode`` method.
"""

from __future__ import annotations

from vlm2emb.eval.metrics import metric_names, per_query_ranks, ranking_metrics
from vlm2emb.eval.runner import SupportsEncode, evaluate, format_report

__all__ = [
    "SupportsEncode",
    "evaluate",
    "format_report",
    "metric_names",
    "per_query_ranks",
    "ranking_metrics",
]
