"""Eval task kinds: the registry, and a kind registered from outside the package run end to end."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from vlm2emb.cli import main
from vlm2emb.data.schema import DataError
from vlm2emb.eval.harness import load_suite_tasks, run_suite
from vlm2emb.eval.kinds import (
    PATH,
    InstructionDefaults,
    TaskKind,
    TaskSpec,
    get_task_kind,
    register_task_kind,
    task_kind_names,
    unregister_task_kind,
)
from vlm2emb.eval.metrics import ranking_metrics
from vlm2emb.eval.suite import load_suite


@dataclass(kw_only=True)
class PairsTaskSpec(TaskSpec):
    """``kind: pairs``: a JSONL of ``{"query", "target"}`` texts; each query ranks all targets."""

    kind: str = "pairs"
    pairs: str = field(metadata=PATH)
    shuffle_targets: bool = False  # a typed key: the suite converts "yes" and refuses "maybe"


class PairsKind(TaskKind):
    name = "pairs"
    spec = PairsTaskSpec

    def check(self, spec: PairsTaskSpec, where: str) -> None:
        if not spec.pairs.endswith(".jsonl"):
            raise DataError(f"{where}: 'pairs' must be a .jsonl file")

    def load(self, spec: PairsTaskSpec, *, verify_images: bool = True, work_dir: Any = None) -> Any:
        rows = [json.loads(line) for line in Path(spec.pairs).read_text().splitlines()]
        return [r["query"] for r in rows], [r["target"] for r in rows]

    def evaluate(
        self,
        encoder: Any,
        spec: PairsTaskSpec,
        payload: Any,
        *,
        ks: tuple[int, ...],
        batch_size: int,
        defaults: InstructionDefaults,
    ) -> dict[str, Any]:
        queries, targets = payload
        applies = defaults.apply(mmeb=False)
        q = encoder.encode(
            queries,
            instruction=spec.query_instruction or (defaults.query_instruction if applies else None),
            batch_size=batch_size,
        )
        t = encoder.encode(
            targets,
            instruction=spec.target_instruction or (defaults.target_instruction if applies else None),
            batch_size=batch_size,
        )
        metrics = ranking_metrics(q @ t.T, [[i] for i in range(len(queries))], ks=ks)
        return {**metrics, "n": len(queries)}


class DigitEncoder:
    """Embeds a text as the one-hot vector of its last digit; records every instruction."""

    def __init__(self) -> None:
        self.instructions: list[str | None] = []

    def encode(self, items: list[str], instruction: str | None = None, **kwargs: Any) -> torch.Tensor:
        self.instructions.append(instruction)
        out = torch.zeros(len(items), 10)
        for i, text in enumerate(items):
            out[i, int(text[-1])] = 1.0
        return out


@pytest.fixture
def pairs_kind() -> Iterator[PairsKind]:
    kind = register_task_kind(PairsKind())
    try:
        yield kind
    finally:
        unregister_task_kind("pairs")


def write_pairs_suite(tmp_path: Path, extra: str = "") -> Path:
    # Query 3 is paired with "target 9": 3 of 4 queries find their target first.
    pairs = [
        ("query 0", "target 0"),
        ("query 1", "target 1"),
        ("query 2", "target 2"),
        ("query 3", "target 9"),
    ]
    (tmp_path / "pairs.jsonl").write_text(
        "".join(json.dumps({"query": q, "target": t}) + "\n" for q, t in pairs)
    )
    suite = tmp_path / "pairs_suite.yaml"
    suite.write_text(
        "name: pairs-demo\n"
        "tasks:\n"
        "  - name: digit-pairs\n"
        "    kind: pairs\n"
        "    meta_task: retrieval\n"
        "    pairs: pairs.jsonl\n"
        "    shuffle_targets: yes\n"
        "    metric: mrr\n" + extra
    )
    return suite


def test_a_registered_kind_runs_through_the_suite_and_harness(pairs_kind: PairsKind, tmp_path: Path) -> None:
    suite = load_suite(write_pairs_suite(tmp_path))
    (spec,) = suite.tasks
    assert isinstance(spec, PairsTaskSpec) and spec.kind == "pairs"
    assert spec.pairs == str(tmp_path / "pairs.jsonl")  # a PATH field: resolved against the suite file
    assert spec.shuffle_targets is True  # converted to the declared type
    encoder = DigitEncoder()
    loaded = load_suite_tasks(suite)
    report = run_suite(
        encoder, suite, loaded=loaded, default_query_instruction="Q", default_target_instruction="T"
    )
    task = report["tasks"]["digit-pairs"]
    assert task["kind"] == "pairs" and task["n"] == 4 and task["metric"] == "mrr"
    assert task["hit@1"] == pytest.approx(0.75)
    # Query 3 ("query 3") scores 0 against every target; pessimistic ties put its target last.
    assert task["score"] == task["mrr"] == pytest.approx((1 + 1 + 1 + 1 / 4) / 4)
    assert report["meta_tasks"]["retrieval"]["n_tasks"] == 1
    assert report["average"]["score"] == task["score"]
    assert encoder.instructions == ["Q", "T"]  # the suite's defaults reach the kind
    never = load_suite(write_pairs_suite(tmp_path, "    instruction_fallback: never\n"))
    encoder = DigitEncoder()
    run_suite(encoder, never, default_query_instruction="Q", default_target_instruction="T")
    assert encoder.instructions == [None, None]


def test_a_registered_kind_works_from_the_cli(
    pairs_kind: PairsKind, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = write_pairs_suite(tmp_path)
    out = tmp_path / "report.json"
    argv = ["eval", "--model", "tiny:qwen2_vl", "--suite", str(suite), "--no-cache", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["tasks"]["digit-pairs"]["kind"] == "pairs"
    assert 0 <= report["tasks"]["digit-pairs"]["score"] <= 1


def test_a_registered_kind_spec_is_validated_like_the_built_in_ones(
    pairs_kind: PairsKind, tmp_path: Path
) -> None:
    suite = write_pairs_suite(tmp_path, "    pairz: x\n")
    with pytest.raises(
        DataError, match=r"pairs_suite\.yaml: tasks\[0\]: unknown key 'pairz'; valid keys here: .*pairs"
    ):
        load_suite(suite)
    suite.write_text(suite.read_text().replace("shuffle_targets: yes", "shuffle_targets: maybe"))
    with pytest.raises(DataError, match=r"tasks\[0\]: shuffle_targets: expected true or false, got 'maybe'"):
        load_suite(suite)
    suite.write_text("tasks:\n  - name: p\n    kind: pairs\n")
    with pytest.raises(DataError, match=r"tasks\[0\] \(p\): a pairs task needs 'pairs'"):
        load_suite(suite)
    suite.write_text("tasks:\n  - name: p\n    kind: pairs\n    pairs: p.txt\n")
    with pytest.raises(DataError, match=r"tasks\[0\] \(p\): 'pairs' must be a \.jsonl file"):
        load_suite(suite)
    suite.write_text("tasks:\n  - name: p\n    pairs: p.jsonl\n")  # no kind: local, which has no 'pairs'
    with pytest.raises(DataError, match=r"'pairs' belongs to pairs tasks \(set kind: pairs\)"):
        load_suite(suite)


def test_registry_refuses_duplicates_and_lists_known_kinds(tmp_path: Path) -> None:
    assert task_kind_names() == ("local", "corpus", "beir", "mmeb-video", "pending")
    assert get_task_kind("local").spec.__name__ == "LocalTaskSpec"
    with pytest.raises(
        ValueError,
        match=r"unknown eval task kind 'pairs'; known kinds: local, corpus, beir, mmeb-video, pending$",
    ):
        get_task_kind("pairs")

    class Local(PairsKind):
        name = "local"

    with pytest.raises(ValueError, match="eval task kind 'local' is already registered"):
        register_task_kind(Local())
    with pytest.raises(ValueError, match="'corpus' is built in"):
        unregister_task_kind("corpus")
    with pytest.raises(TypeError, match="TaskKind instance"):
        register_task_kind(PairsKind)  # type: ignore[arg-type]
    register_task_kind(PairsKind())
    try:
        assert task_kind_names() == ("local", "corpus", "beir", "mmeb-video", "pending", "pairs")
        with pytest.raises(ValueError, match="eval task kind 'pairs' is already registered"):
            register_task_kind(PairsKind())
        suite = tmp_path / "s.yaml"
        suite.write_text("tasks:\n  - name: a\n    kind: global\n")
        with pytest.raises(
            DataError,
            match=r"'kind' is 'global'; choose one of local, corpus, beir, mmeb-video, pending, pairs$",
        ):
            load_suite(suite)
    finally:
        unregister_task_kind("pairs")
    assert task_kind_names() == ("local", "corpus", "beir", "mmeb-video", "pending")
    with pytest.raises(ValueError, match="'pairs' is not registered"):
        unregister_task_kind("pairs")
    # Unregistered, a suite naming the kind fails like any unknown kind.
    with pytest.raises(
        DataError, match=r"'kind' is 'pairs'; choose one of local, corpus, beir, mmeb-video, pending$"
    ):
        load_suite(write_pairs_suite(tmp_path))
