"""Run an evaluation suite: local and corpus tasks, cached embeddings, per-meta-task averages.

Report layout (``vlm2emb eval --suite``)::

    {"suite": "digits",
     "tasks": {"digits-i2t": {"hit@1": ..., ..., "n": 300, "kind": "local",
                              "meta_task": "classification", "metric": "hit@1", "score": ...}},
     "meta_tasks": {"classification": {"score": ..., "hit@1": ..., "n_tasks": 1}},
     "average": {"score": ..., "hit@1": ..., "n_tasks": 2},
     "cache": {"hits": 0, "misses": 4, "items_encoded": ..., "items_from_cache": 0}}

``score`` is each task's headline metric; a meta-task's ``score`` is the mean of its tasks'
scores and the overall ``score`` the mean over all tasks (MMEB's overall number).
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlm2emb.eval.cache import CachedEncoder
from vlm2emb.eval.corpus import evaluate_corpus, load_corpus_task
from vlm2emb.eval.metrics import metric_names
from vlm2emb.eval.mmeb import load_local_rows
from vlm2emb.eval.runner import evaluate, format_report
from vlm2emb.eval.suite import SuiteConfig

__all__ = ["format_suite_report", "load_suite_tasks", "run_suite", "summarize"]


def load_suite_tasks(
    suite: SuiteConfig, *, verify_images: bool = True, work_dir: str | Path | None = None
) -> list[Any]:
    """Reads every task's files before any model work, so a bad row fails fast.

    Returns:
        One loaded payload per task, in suite order: a list of rows (local) or a
        :class:`~vlm2emb.eval.corpus.CorpusTask`.
    """
    loaded: list[Any] = []
    for task in suite.tasks:
        if task.kind == "local":
            loaded.append(
                load_local_rows(
                    task.data,
                    fmt=task.format,
                    media_root=task.media_root,
                    query_instruction=task.query_instruction,
                    verify_images=verify_images,
                    work_dir=work_dir,
                )
            )
        else:
            loaded.append(
                load_corpus_task(
                    str(task.corpus),
                    str(task.queries),
                    str(task.qrels),
                    media_root=task.media_root,
                    verify_images=verify_images,
                )
            )
    return loaded


def run_suite(
    model: Any,
    suite: SuiteConfig,
    *,
    loaded: list[Any] | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    default_query_instruction: str | None = None,
    default_target_instruction: str | None = None,
) -> dict[str, Any]:
    """Evaluates ``model`` on every task of ``suite``.

    Args:
        model: An EmbeddingModel (or anything with ``encode`` and, for caching, weights).
        suite: The loaded suite.
        loaded: The output of :func:`load_suite_tasks` (read here when omitted).
        batch_size: Encoding batch size.
        cache_dir: Embedding cache root; ``None`` disables the cache.
        default_query_instruction: For tasks and rows without one (the model's own).
        default_target_instruction: For tasks without ``target_instruction``.

    Returns:
        The report described in the module docstring (plus ``seconds``).
    """
    start = time.perf_counter()
    loaded = loaded if loaded is not None else load_suite_tasks(suite)
    encoder = model if isinstance(model, CachedEncoder) else CachedEncoder(model, cache_dir)
    ks = tuple(suite.ks)
    tasks: dict[str, dict[str, Any]] = {}
    for spec, payload in zip(suite.tasks, loaded, strict=True):
        target_instruction = spec.target_instruction or default_target_instruction
        if spec.kind == "local":
            rows = [
                {**row, "task": spec.name, "instruction": row["instruction"] or default_query_instruction}
                for row in payload
            ]
            result = evaluate(
                encoder, rows, batch_size=batch_size, ks=ks, target_instruction=target_instruction
            )
            metrics = result["tasks"][spec.name]
        else:
            metrics = evaluate_corpus(
                encoder,
                payload,
                ks=ks,
                batch_size=batch_size,
                query_instruction=spec.query_instruction or default_query_instruction,
                target_instruction=target_instruction,
            )
        tasks[spec.name] = {
            **metrics,
            "kind": spec.kind,
            "meta_task": spec.meta_task,
            "metric": spec.metric,
            "score": metrics[str(spec.metric)],
        }
    report = summarize(tasks, metric_names(ks))
    report = {"suite": suite.name, **report}
    report["cache"] = asdict(encoder.stats)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def summarize(tasks: dict[str, dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per-meta-task and overall unweighted means of every metric and of ``score``."""

    def mean_of(reports: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ["score", *names]:
            values = [r[name] for r in reports if name in r]
            if values:
                out[name] = sum(values) / len(values)
        out["n_tasks"] = len(reports)
        return out

    groups: dict[str, list[dict[str, Any]]] = {}
    for rep in tasks.values():
        groups.setdefault(str(rep.get("meta_task", "other")), []).append(rep)
    return {
        "tasks": tasks,
        "meta_tasks": {meta: mean_of(reps) for meta, reps in groups.items()},
        "average": mean_of(list(tasks.values())),
    }


def format_suite_report(report: dict[str, Any]) -> str:
    """The task table of :func:`~vlm2emb.eval.format_report` plus meta-task and cache lines."""
    lines = [format_report(report, columns=("score", "hit@1", "ndcg@5", "recall@10", "mrr"))]
    meta = report.get("meta_tasks") or {}
    if meta:
        width = max(len("meta-task"), *(len(m) for m in meta))
        lines.append("")
        lines.append(f"{'meta-task':<{width}}  {'score':>8}  {'tasks':>5}")
        for name, rep in meta.items():
            lines.append(f"{name:<{width}}  {rep['score']:>8.4f}  {rep['n_tasks']:>5}")
    cache = report.get("cache")
    if cache:
        lines.append("")
        lines.append(
            f"embedding cache: {cache['hits']} hits, {cache['misses']} misses "
            f"({cache['items_from_cache']} items from cache, {cache['items_encoded']} encoded)"
        )
    return "\n".join(lines)
