"""Evaluation suites: a YAML file listing tasks, loaded into typed dataclasses.

Example (paths are relative to the suite file's folder)::

    name: digits
    metric: hit@1             # default headline metric of every task
    ks: [1, 5, 10]
    media_root: images/      # optional default for every task
    instruction_fallback: auto  # when the model's saved instructions apply (see below)
    prompt_style: null       # vlm2emb | vlm2vec; null = the model's own
    tasks:
      - name: digits-i2t
        meta_task: classification
        kind: local           # rows with their own candidates (canonical or MMEB layout)
        data: eval.jsonl
      - name: digits-corpus
        meta_task: retrieval
        kind: corpus          # global retrieval: corpus + queries + qrels
        corpus: corpus.jsonl
        queries: queries.jsonl
        qrels: qrels.tsv
        metric: ndcg@10

``instruction_fallback`` (suite default, overridable per task) says when rows and tasks
without their own instruction get the model's saved query / target instruction:

- ``auto``: canonical rows and corpus tasks do; MMEB-layout rows do not (their text holds
  MMEB's instruction), and in a task with MMEB rows the candidates do not either;
- ``always``: every row and task does;
- ``never``: none does.

A task's own ``query_instruction`` / ``target_instruction`` always applies.

Unknown keys are errors naming the file and the key, like recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2emb.data.schema import DataError
from vlm2emb.eval.metrics import metric_names

__all__ = ["SuiteConfig", "TaskSpec", "load_suite"]

KINDS = ("local", "corpus")
FORMATS = ("auto", "vlm2emb", "mmeb")
FALLBACKS = ("auto", "always", "never")


@dataclass
class TaskSpec:
    """One task of a suite.

    Attributes:
        name: Task name in the report.
        kind: ``local`` (each row ranks its own candidates) or ``corpus`` (each query ranks
            a shared corpus; relevance from qrels).
        meta_task: Group for the per-meta-task averages (MMEB: classification, vqa,
            retrieval, grounding; any string works).
        data: ``local``: eval file(s), canonical rows (docs/data.md) or VLM2Vec's MMEB-eval
            layout (``qry_text``, ``qry_img_path``, ``tgt_text``, ``tgt_img_path``).
        format: ``auto`` (detected from the first row), ``vlm2emb`` or ``mmeb``.
        corpus: ``corpus``: JSONL/Parquet rows ``{"id", "item"}``.
        queries: ``corpus``: rows ``{"id", "item", "instruction"?}``.
        qrels: ``corpus``: TSV (``query_id  corpus_id  relevance``, optional header) or
            JSONL ``{"query_id", "corpus_id", "relevance"}``; relevance > 0 is relevant.
        query_instruction: Instruction for queries without their own.
        target_instruction: Instruction for candidates / corpus items.
        media_root: Folder for relative image paths (default: each file's folder).
        metric: Headline metric (default: the suite's ``metric``).
        instruction_fallback: ``auto``, ``always`` or ``never`` (module docstring);
            None = the suite's.
    """

    name: str
    kind: str = "local"
    meta_task: str = "other"
    data: list[str] = field(default_factory=list)
    format: str = "auto"
    corpus: str | None = None
    queries: str | None = None
    qrels: str | None = None
    query_instruction: str | None = None
    target_instruction: str | None = None
    media_root: str | None = None
    metric: str | None = None
    instruction_fallback: str | None = None


@dataclass
class SuiteConfig:
    """A whole suite: tasks plus defaults.

    ``prompt_style`` asks for a prompt style for the run (``vlm2emb`` or ``vlm2vec``,
    :mod:`vlm2emb.prompts`); None keeps the model's. The style itself belongs to the model's
    config; the harness switches it for the run and back.
    """

    name: str = "suite"
    metric: str = "hit@1"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    media_root: str | None = None  # default media_root of every task
    instruction_fallback: str = "auto"  # default of every task (module docstring)
    prompt_style: str | None = None
    tasks: list[TaskSpec] = field(default_factory=list)
    source: str = ""  # the YAML file, for messages


def _fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "source"]


def _check_str(where: str, key: str, value: Any, *, optional: bool = True) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise DataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _resolve(base: Path, ref: str) -> str:
    # demo: specs and absolute paths stay as they are; relative ones follow the suite file.
    if ref.startswith("demo:") or Path(ref).expanduser().is_absolute():
        return str(Path(ref).expanduser()) if not ref.startswith("demo:") else ref
    return str(base / ref)


def _task(where: str, raw: Any, base: Path) -> TaskSpec:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a task must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_fields(TaskSpec)))
    if unknown:
        raise DataError(f"{where}: unknown key {unknown[0]!r}; task keys: {', '.join(_fields(TaskSpec))}")
    name = _check_str(where, "name", raw.get("name"))
    if not name:
        raise DataError(f"{where}: missing key 'name'")
    where = f"{where} ({name})"
    values: dict[str, Any] = {"name": name}
    for key in ("kind", "meta_task", "format", "corpus", "queries", "qrels", "query_instruction"):
        if key in raw:
            values[key] = _check_str(where, key, raw[key])
    for key in ("target_instruction", "media_root", "metric", "instruction_fallback"):
        if key in raw:
            values[key] = _check_str(where, key, raw[key])
    data = raw.get("data", [])
    if isinstance(data, str):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, str) for d in data):
        raise DataError(f"{where}: 'data' must be a path or a list of paths")
    values["data"] = [_resolve(base, d) for d in data]
    for key in ("corpus", "queries", "qrels", "media_root"):
        if values.get(key):
            values[key] = _resolve(base, values[key])
    spec = TaskSpec(**{k: v for k, v in values.items() if v is not None or k == "name"})
    if spec.kind not in KINDS:
        raise DataError(f"{where}: 'kind' is {spec.kind!r}; choose one of {', '.join(KINDS)}")
    if spec.format not in FORMATS:
        raise DataError(f"{where}: 'format' is {spec.format!r}; choose one of {', '.join(FORMATS)}")
    if spec.instruction_fallback is not None and spec.instruction_fallback not in FALLBACKS:
        raise DataError(
            f"{where}: 'instruction_fallback' is {spec.instruction_fallback!r}; choose one of {', '.join(FALLBACKS)}"
        )
    if spec.kind == "local":
        if not spec.data:
            raise DataError(f"{where}: a local task needs 'data'")
        stray = [k for k in ("corpus", "queries", "qrels") if getattr(spec, k)]
        if stray:
            raise DataError(f"{where}: '{stray[0]}' belongs to corpus tasks (set kind: corpus)")
    else:
        missing = [k for k in ("corpus", "queries", "qrels") if not getattr(spec, k)]
        if missing:
            raise DataError(f"{where}: a corpus task needs '{missing[0]}'")
        if spec.data:
            raise DataError(f"{where}: 'data' belongs to local tasks; corpus tasks use corpus/queries/qrels")
    return spec


def load_suite(path: str | Path) -> SuiteConfig:
    """Reads and validates a suite YAML file.

    Args:
        path: The suite file.

    Returns:
        The :class:`SuiteConfig`, with every path made absolute (or left as ``demo:``).

    Raises:
        DataError: Missing file, invalid YAML, unknown key, bad value or duplicate task name;
            the one-line message names the file, the task and the key.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"suite file not found: {p}")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{p}: a suite must be a YAML mapping with a 'tasks' list")
    unknown = sorted(set(raw) - set(_fields(SuiteConfig)))
    if unknown:
        raise DataError(f"{p}: unknown key {unknown[0]!r}; suite keys: {', '.join(_fields(SuiteConfig))}")
    tasks_raw = raw.get("tasks")
    if not isinstance(tasks_raw, list) or not tasks_raw:
        raise DataError(f"{p}: 'tasks' must be a non-empty list")
    ks = raw.get("ks", [1, 5, 10])
    if not isinstance(ks, list) or not all(
        isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in ks
    ):
        raise DataError(f"{p}: 'ks' must be a list of positive integers")
    media_root = _check_str(str(p), "media_root", raw.get("media_root"))
    fallback = str(raw.get("instruction_fallback") or "auto")
    if fallback not in FALLBACKS:
        raise DataError(f"{p}: 'instruction_fallback' is {fallback!r}; choose one of {', '.join(FALLBACKS)}")
    style = _check_str(str(p), "prompt_style", raw.get("prompt_style"))
    if style is not None:
        from vlm2emb.prompts import check_prompt_style

        try:
            check_prompt_style(style)
        except ValueError as exc:
            raise DataError(f"{p}: {exc}") from None
    suite = SuiteConfig(
        name=str(raw.get("name") or p.stem),
        media_root=_resolve(p.parent, media_root) if media_root else None,
        metric=str(raw.get("metric") or "hit@1"),
        ks=ks,
        instruction_fallback=fallback,
        prompt_style=style,
        tasks=[_task(f"{p}: tasks[{i}]", t, p.parent) for i, t in enumerate(tasks_raw)],
        source=str(p),
    )
    valid = metric_names(suite.ks)
    if suite.metric not in valid:
        raise DataError(f"{p}: 'metric' {suite.metric!r} is not one of {', '.join(valid)}")
    seen: set[str] = set()
    for i, task in enumerate(suite.tasks):
        if task.name in seen:
            raise DataError(f"{p}: tasks[{i}]: duplicate task name {task.name!r}")
        seen.add(task.name)
        if task.metric is not None and task.metric not in valid:
            raise DataError(
                f"{p}: tasks[{i}] ({task.name}): 'metric' {task.metric!r} is not one of {', '.join(valid)}"
            )
        task.metric = task.metric or suite.metric
        task.media_root = task.media_root or suite.media_root
    return suite
