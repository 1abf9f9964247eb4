"""Run an evaluation suite: every task through its kind, cached embeddings, per-meta-task averages.

Report layout (``vlm2emb eval --suite``)::

    {"suite": "digits",
     "tasks": {"digits-i2t": {"hit@1": ..., ..., "n": 300, "kind": "local",
                              "meta_task": "classification", "metric": "hit@1", "score": ...}},
     "meta_tasks": {"classification": {"score": ..., "hit@1": ..., "n_tasks": 1}},
     "average": {"score": ..., "hit@1": ..., "n_tasks": 2},
     "cache": {"hits": 0, "misses": 4, "items_encoded": ..., "items_from_cache": 0}}

``score`` is each task's headline metric; a meta-task's ``score`` is the mean of its tasks'
scores and the overall ``score`` the mean over all tasks (MMEB's overall number).

Each task is loaded and scored by its kind (:mod:`vlm2emb.eval.kinds`); this module only
runs them in order and averages. Instructions: a task's own ``query_instruction`` /
``target_instruction`` always apply. The defaults passed to :func:`run_suite` (the model's
saved instructions, or the CLI's) apply as the task's ``instruction_fallback`` says
(:mod:`vlm2emb.eval.suite`); each kind decides what that means for its rows (under
``auto``, never for MMEB-layout rows, whose text already holds MMEB's instruction).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlm2emb.data.schema import DataError
from vlm2emb.eval.cache import CachedEncoder, model_fingerprint
from vlm2emb.eval.kinds import InstructionDefaults, get_task_kind
from vlm2emb.eval.metrics import metric_names
from vlm2emb.eval.rescore import Rescorer
from vlm2emb.eval.runner import format_report
from vlm2emb.eval.suite import SuiteConfig

__all__ = ["format_suite_report", "load_suite_tasks", "run_suite", "summarize"]


def load_suite_tasks(
    suite: SuiteConfig, *, verify_images: bool = True, work_dir: str | Path | None = None
) -> list[Any]:
    """Reads every task's files before any model work, so a bad row fails fast.

    Returns:
        One loaded payload per task, in suite order, as its kind's ``load`` returns it (a
        list of rows for ``local``, a :class:`~vlm2emb.eval.corpus.CorpusTask` for ``corpus``).
    """
    return [
        get_task_kind(task.kind).load(task, verify_images=verify_images, work_dir=work_dir)
        for task in suite.tasks
    ]


def run_suite(
    model: Any,
    suite: SuiteConfig,
    *,
    loaded: list[Any] | None = None,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    default_query_instruction: str | None = None,
    default_target_instruction: str | None = None,
    rescore: Rescorer | None = None,
) -> dict[str, Any]:
    """Evaluates ``model`` on every task of ``suite``.

    Args:
        model: An EmbeddingModel (or anything with ``encode`` and, for caching, weights).
        suite: The loaded suite.
        loaded: The output of :func:`load_suite_tasks` (read here when omitted).
        batch_size: Encoding batch size.
        cache_dir: Embedding cache root; ``None`` disables the cache.
        default_query_instruction: For tasks and rows without one (the model's own), as
            the task's ``instruction_fallback`` allows.
        default_target_instruction: For tasks without ``target_instruction``, likewise.
        rescore: A second ranking of every task's scores
            (:class:`~vlm2emb.eval.rescore.Rescorer`); each task's report then holds its
            metrics (and ``score``) under ``"rescored"``.

    Returns:
        The report described in the module docstring (plus ``seconds``).

    Raises:
        DataError: ``rescore`` is given and a task's kind cannot take it (names the task).
    """
    start = time.perf_counter()
    loaded = loaded if loaded is not None else load_suite_tasks(suite)
    with _prompt_style(model, suite.prompt_style):
        encoder = model if isinstance(model, CachedEncoder) else CachedEncoder(model, cache_dir)
        tasks = _run_tasks(
            encoder, suite, loaded, batch_size, default_query_instruction, default_target_instruction, rescore
        )
    report = summarize(tasks, metric_names(tuple(suite.ks)))
    report = {"suite": suite.name, **report}
    not_run = {
        t.name: str(getattr(t, "reason", "")) for t in suite.tasks if not get_task_kind(t.kind).runnable
    }
    if not_run:  # listed by the suite, not scored: the averages leave them out
        report["not_run"] = not_run
    report["cache"] = asdict(encoder.stats)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


@contextlib.contextmanager
def _prompt_style(model: Any, style: str | None) -> Iterator[None]:
    """Runs with the model's prompt style set to ``style`` (None: unchanged), then restores it.

    A CachedEncoder's model fingerprint covers the style, so it is recomputed both ways.
    """
    inner = model.model if isinstance(model, CachedEncoder) else model
    config = getattr(inner, "config", None)
    if style is None or getattr(config, "prompt_style", style) == style:
        yield
        return
    if not hasattr(inner, "set_prompt_style"):
        raise DataError(f"prompt_style: {type(inner).__name__} has no prompt styles")
    before = config.prompt_style
    inner.set_prompt_style(style)
    try:
        if isinstance(model, CachedEncoder) and model.cache_dir is not None:
            model.fingerprint = model_fingerprint(inner)
        yield
    finally:
        inner.set_prompt_style(before)
        if isinstance(model, CachedEncoder) and model.cache_dir is not None:
            model.fingerprint = model_fingerprint(inner)


def _run_tasks(
    encoder: CachedEncoder,
    suite: SuiteConfig,
    loaded: list[Any],
    batch_size: int,
    default_query_instruction: str | None,
    default_target_instruction: str | None,
    rescore: Rescorer | None = None,
) -> dict[str, dict[str, Any]]:
    """Every task's metrics, in suite order (see :func:`run_suite`)."""
    ks = tuple(suite.ks)
    tasks: dict[str, dict[str, Any]] = {}
    for spec, payload in zip(suite.tasks, loaded, strict=True):
        if not get_task_kind(spec.kind).runnable:
            continue
        defaults = InstructionDefaults(
            query_instruction=default_query_instruction,
            target_instruction=default_target_instruction,
            fallback=spec.instruction_fallback or suite.instruction_fallback,
        )
        kind = get_task_kind(spec.kind)
        # Only a given rescore is passed on: kinds registered without it keep working.
        extra: dict[str, Any] = {}
        if rescore is not None:
            if not kind.supports_rescore:
                raise DataError(f"task {spec.name!r}: kind {spec.kind!r} cannot report a re-ranked pipeline")
            extra["rescore"] = rescore
        metrics = kind.evaluate(
            encoder, spec, payload, ks=ks, batch_size=batch_size, defaults=defaults, **extra
        )
        if "rescored" in metrics:
            metrics["rescored"]["score"] = metrics["rescored"][str(spec.metric)]
        tasks[spec.name] = {
            **metrics,
            "kind": spec.kind,
            "meta_task": spec.meta_task,
            "metric": spec.metric,
            "score": metrics[str(spec.metric)],
        }
    return tasks


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
    not_run = report.get("not_run") or {}
    if not_run:  # pending tasks: say so next to the averages they are missing from
        lines.append("")
        lines.append(f"not run ({len(not_run)} tasks, not in the averages): {', '.join(not_run)}")
    cache = report.get("cache")
    if cache:
        lines.append("")
        lines.append(
            f"embedding cache: {cache['hits']} hits, {cache['misses']} misses "
            f"({cache['items_from_cache']} items from cache, {cache['items_encoded']} encoded)"
        )
    return "\n".join(lines)
