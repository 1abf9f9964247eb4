"""Evaluation: ranking metrics, the MMEB-style runner, suites, the embedding cache.

Importing this package pulls in numpy and torch but not transformers, matplotlib or
scikit-learn: :func:`evaluate` and :func:`run_suite` only need an object with an ``encode``
method. Analysis and plots live in :mod:`vlm2emb.eval.analysis` (matplotlib and
scikit-learn are imported inside its plotting functions).
"""

from __future__ import annotations

from vlm2emb.eval.cache import CachedEncoder
from vlm2emb.eval.harness import format_suite_report, run_suite
from vlm2emb.eval.metrics import metric_names, per_query_ranks, ranking_metrics
from vlm2emb.eval.rescore import Rescorer
from vlm2emb.eval.runner import SupportsEncode, evaluate, format_report
from vlm2emb.eval.suite import load_suite

__all__ = [
    "CachedEncoder",
    "Rescorer",
    "SupportsEncode",
    "evaluate",
    "format_report",
    "format_suite_report",
    "load_suite",
    "metric_names",
    "per_query_ranks",
    "ranking_metrics",
    "run_suite",
]
