"""Evaluation suites: a YAML file listing tasks, loaded into typed dataclasses.

Example (paths are relative to the suite file's folder, or to ``data_root`` when one is
given; a path written ``suite:NAME`` is always relative to the suite file's folder)::

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

Each task's ``kind`` picks its keys and behaviour (:mod:`vlm2emb.eval.kinds`: ``local`` and
``corpus`` are built in; ``local`` when a task names none). The suite and every kind's spec
are typed dataclasses filled by the recipes' mechanism
(:func:`vlm2emb._typed_config.build_dataclass`): values are converted to their declared
types, and unknown keys are errors naming the file and the key, like recipes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2emb._typed_config import ConfigError, build_dataclass, config_keys, required_keys
from vlm2emb.data.schema import DataError
from vlm2emb.eval.kinds import (
    DEFAULT_KIND,
    FALLBACKS,
    PATH,
    TaskSpec,
    get_task_kind,
    task_kind_names,
)
from vlm2emb.eval.metrics import metric_names

__all__ = ["SuiteConfig", "TaskSpec", "load_suite"]


@dataclass
class SuiteConfig:
    """A whole suite: tasks plus defaults.

    ``tasks`` holds one spec per task, of its kind's spec class (a
    :class:`~vlm2emb.eval.kinds.TaskSpec` subclass). ``prompt_style`` asks for a prompt
    style for the run (``vlm2emb`` or ``vlm2vec``, :mod:`vlm2emb.prompts`); None keeps the
    model's. The style itself belongs to the model's config; the harness switches it for the
    run and back.
    """

    name: str = "suite"  # default: the file's stem
    metric: str = "hit@1"
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    media_root: str | None = field(default=None, metadata=PATH)  # default media_root of every task
    instruction_fallback: str = "auto"  # default of every task (module docstring)
    prompt_style: str | None = None
    tasks: list[TaskSpec] = field(default_factory=list)
    source: str = field(default="", metadata={"key": False})  # the YAML file, for messages


SUITE_PREFIX = "suite:"


def _resolve(base: Path, ref: str, suite_dir: Path) -> str:
    # demo: specs and absolute paths stay as they are; relative ones follow the suite file
    # (or the data root). "suite:" paths always follow the suite file: files shipped beside
    # a bundled suite (MMEB-V2's label lists) while its data lives under --data-root.
    if ref.startswith("demo:"):
        return ref
    if ref.startswith(SUITE_PREFIX):
        return str(suite_dir / ref[len(SUITE_PREFIX) :])
    if Path(ref).expanduser().is_absolute():
        return str(Path(ref).expanduser())
    return str(base / ref)


def _resolve_paths(obj: Any, base: Path, suite_dir: Path) -> None:
    """Resolves every path field (``metadata=PATH``) of a suite or spec against ``base``."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not f.metadata.get("path") or not value:
            continue
        if isinstance(value, list):
            setattr(obj, f.name, [_resolve(base, v, suite_dir) if v else v for v in value])
        else:
            setattr(obj, f.name, _resolve(base, value, suite_dir))


def _given(raw: dict[str, Any]) -> dict[str, Any]:
    """The keys a file sets; ``key: null`` means the default, as if absent."""
    return {k: v for k, v in raw.items() if v is not None}


def _task(where: str, raw: Any, base: Path, suite_dir: Path) -> TaskSpec:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: a task must be a mapping, got {type(raw).__name__}")
    given = _given(raw)
    name = given.get("name")
    named = f"{where} ({name})" if isinstance(name, str) and name else where
    kind_name = given.get("kind", DEFAULT_KIND)
    if not isinstance(kind_name, str):
        raise DataError(f"{named}: 'kind' must be a string, got {type(kind_name).__name__}")
    try:
        kind = get_task_kind(kind_name)
    except ValueError:
        raise DataError(
            f"{named}: 'kind' is {kind_name!r}; choose one of {', '.join(task_kind_names())}"
        ) from None
    keys = config_keys(kind.spec)
    for key in given:
        if key in keys:
            continue
        owners = [k for k in task_kind_names() if key in config_keys(get_task_kind(k).spec)]
        if owners:  # a key of another kind: say which
            raise DataError(f"{named}: {key!r} belongs to {owners[0]} tasks (set kind: {owners[0]})")
    missing = [k for k in required_keys(kind.spec) if k not in given]
    if missing and set(given) <= set(keys):  # an unknown key is reported first (below)
        raise DataError(f"{named}: a {kind_name} task needs {missing[0]!r}")
    try:
        spec = build_dataclass(kind.spec, {**given, "kind": kind_name})
    except ConfigError as exc:
        raise DataError(f"{where}: {exc}") from None
    _resolve_paths(spec, base, suite_dir)
    if spec.instruction_fallback is not None and spec.instruction_fallback not in FALLBACKS:
        raise DataError(
            f"{named}: 'instruction_fallback' is {spec.instruction_fallback!r}; choose one of {', '.join(FALLBACKS)}"
        )
    from vlm2emb.eval.scoring import SCORINGS

    if spec.scoring not in SCORINGS:
        raise DataError(f"{named}: 'scoring' is {spec.scoring!r}; choose one of {', '.join(SCORINGS)}")
    from vlm2emb.eval.leaderboard import MODALITIES

    if spec.modality is not None and spec.modality not in MODALITIES:
        raise DataError(f"{named}: 'modality' is {spec.modality!r}; choose one of {', '.join(MODALITIES)}")
    kind.check(spec, named)
    return spec


def load_suite(path: str | Path, *, data_root: str | Path | None = None) -> SuiteConfig:
    """Reads and validates a suite YAML file.

    Args:
        path: The suite file, or the name of a suite bundled with vlm2emb
            (:func:`vlm2emb.eval.suites.bundled_suites`: ``mmeb-v1``, ``vidore-v2``, ...).
        data_root: Folder that the suite's relative paths resolve against instead of the
            suite file's folder (needed for bundled suites: they name no data location).

    Returns:
        The :class:`SuiteConfig`, with every path made absolute (or left as ``demo:``).

    Raises:
        DataError: Missing file, invalid YAML, unknown key, bad value or duplicate task name;
            the one-line message names the file, the task and the key.
    """
    from vlm2emb.eval.suites import resolve_suite

    p = resolve_suite(path, data_root)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise DataError(f"{p}: a suite must be a YAML mapping with a 'tasks' list")

    def tasks(_key: str, value: Any) -> list[TaskSpec]:
        if not isinstance(value, list) or not value:
            raise DataError(f"{p}: 'tasks' must be a non-empty list")
        return [_task(f"{p}: tasks[{i}]", t, base, p.parent) for i, t in enumerate(value)]

    base = Path(data_root).expanduser().resolve() if data_root is not None else p.parent
    given = _given(raw)
    try:
        suite = build_dataclass(SuiteConfig, given, converters={"tasks": tasks})
    except ConfigError as exc:
        raise DataError(f"{p}: {exc}") from None
    if not suite.tasks:
        raise DataError(f"{p}: 'tasks' must be a non-empty list")
    suite.source = str(p)
    suite.name = suite.name if given.get("name") else p.stem
    _resolve_paths(suite, base, p.parent)
    if not all(k > 0 for k in suite.ks):
        raise DataError(f"{p}: 'ks' must be a list of positive integers")
    if suite.instruction_fallback not in FALLBACKS:
        raise DataError(
            f"{p}: 'instruction_fallback' is {suite.instruction_fallback!r}; choose one of {', '.join(FALLBACKS)}"
        )
    if suite.prompt_style is not None:
        from vlm2emb.prompts import check_prompt_style

        try:
            check_prompt_style(suite.prompt_style)
        except ValueError as exc:
            raise DataError(f"{p}: {exc}") from None
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
