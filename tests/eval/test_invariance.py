"""Reproducibility as a tested property: one model, the same scores however the run is shaped.

Every built-in task kind (local canonical rows, local MMEB-layout rows, corpus + qrels, BEIR
folder) runs in one small suite on the real tiny Qwen2-VL model. The scores must not move
with the batch size, the padding side, the encode worker (prefetch) count, the order of
candidates / corpus rows / queries in the files, or the process count (one 2-process run).
The tolerances asserted here are the ones docs/evaluation.md states.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers import accelerate_launch, launch_env
from vlm2emb import EmbeddingModel
from vlm2emb.data.demo import caption, write_digits
from vlm2emb.eval.harness import load_suite_tasks, run_suite
from vlm2emb.eval.kinds import get_task_kind, task_kind_names
from vlm2emb.eval.metrics import ranking_metrics
from vlm2emb.eval.suite import load_suite

REPO = Path(__file__).resolve().parents[2]

# The tolerances docs/evaluation.md states ("Reproducibility").
FP32_EMBEDDING_ATOL = 1e-6  # fp32: batch size / padding side move embeddings by < 1e-6
BF16_SCORE_ATOL = 0.02  # bf16 vs fp32 cosine scores on the tiny model


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_mini_suite(out: Path, digits: Path, *, shuffle: int | None = None) -> Path:
    """A suite with one task of every built-in kind on the digits images (a few rows each).

    With ``shuffle`` set, the same tasks are written with the candidates of every row, the
    corpus rows, the queries and the qrels lines in a seeded random order (positives and
    relevance follow their items; MMEB rows keep their positive first, as the layout says).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(shuffle) if shuffle is not None else None

    def perm(n: int) -> list[int]:
        return rng.permutation(n).tolist() if rng is not None else list(range(n))

    labels = json.loads((digits / "labels.json").read_text())
    images = {int(k): v for k, v in labels.items()}  # digit -> two image paths
    img = lambda p: str(digits / p)  # noqa: E731 - a short local helper
    captions = [{"text": caption(d)} for d in range(10)]

    # local, canonical rows: image query, the 10 captions as candidates.
    local = []
    for d in range(8):
        order = perm(10)
        local.append(
            {
                "query": {"image": img(images[d][0])},
                "candidates": [captions[i] for i in order],
                "positive": order.index(d),
                "instruction": "Represent the given image for classification.",
            }
        )
    # local, MMEB layout: caption query, 5 image candidates, the positive first.
    mmeb = []
    for d in range(6):
        others = [images[(d + j) % 10][1] for j in range(1, 5)]
        others = [others[i] for i in perm(4)]
        mmeb.append(
            {
                "qry_text": caption(d),
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>"] * 5,
                "tgt_img_path": [img(p) for p in [images[d][1], *others]],
            }
        )
    # corpus + qrels: 20 images, 10 caption queries, graded relevance (first image 2, second 1).
    docs = [(f"img{d}_{j}", images[d][j]) for d in range(10) for j in range(2)]
    corpus = [{"id": docs[i][0], "item": {"image": img(docs[i][1])}} for i in perm(len(docs))]
    queries = [{"id": f"q{d}", "item": {"text": caption(d)}} for d in (perm(10))]
    qrels = [f"q{d}\timg{d}_{j}\t{2 - j}" for d in range(10) for j in range(2)]
    qrels = [qrels[i] for i in perm(len(qrels))]
    _jsonl(out / "local.jsonl", local)
    _jsonl(out / "mmeb.jsonl", mmeb)
    _jsonl(out / "corpus.jsonl", corpus)
    _jsonl(out / "queries.jsonl", queries)
    (out / "qrels.tsv").write_text("query_id\tcorpus_id\trelevance\n" + "\n".join(qrels) + "\n")
    # BEIR folder (JSONL layout): the same pages under BEIR's field names.
    beir = out / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": r["id"], "image": r["item"]["image"]} for r in corpus])
    _jsonl(beir / "queries.jsonl", [{"_id": r["id"], "text": r["item"]["text"]} for r in queries])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "\n".join(qrels) + "\n")
    # mmeb-video (VLM2Vec's K700 layout): a table of video ids and labels, a frame folder per
    # video (three frames of one digit), each video ranked against every label.
    video_rows = []
    for d in perm(6):
        folder = out / "frames" / f"v{d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j, src in enumerate([images[d][0], images[d][1], images[d][0]], start=1):
            shutil.copyfile(digits / src, folder / f"frame_{j}{Path(src).suffix}")
        video_rows.append({"video_id": f"v{d}", "pos_text": caption(d)})
    _jsonl(out / "video.jsonl", video_rows)
    suite = out / "suite.yaml"
    suite.write_text(
        "name: invariance\nmetric: hit@1\nks: [1, 3, 5]\ntasks:\n"
        "  - {name: local, kind: local, meta_task: classification, data: local.jsonl}\n"
        "  - {name: mmeb, kind: local, meta_task: retrieval, data: mmeb.jsonl, format: mmeb}\n"
        "  - {name: corpus, kind: corpus, meta_task: retrieval, corpus: corpus.jsonl,"
        " queries: queries.jsonl, qrels: qrels.tsv, metric: ndcg@5}\n"
        "  - {name: beir, kind: beir, meta_task: retrieval, data: beir, metric: ndcg@5}\n"
        "  - {name: video, kind: mmeb-video, meta_task: classification, data: video.jsonl,"
        ' frame_root: frames, query_video: "{video_id}", answer_field: pos_text, scope: global}\n'
    )
    return suite


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo images plus labels.json: digit -> two image paths of that digit."""
    root = write_digits(tmp_path_factory.mktemp("digits"))
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    by_digit: dict[int, list[str]] = {}
    for r in rows:
        if r["task"] == "digits-i2t":
            by_digit.setdefault(r["positive"], []).append(r["query"]["image"])
    (root / "labels.json").write_text(json.dumps({d: paths[:2] for d, paths in by_digit.items()}))
    return root


@pytest.fixture(scope="module")
def suite_file(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mini_suite(tmp_path_factory.mktemp("mini"), digits)


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


@pytest.fixture(scope="module")
def baseline(model: EmbeddingModel, suite_file: Path) -> dict[str, Any]:
    suite = load_suite(suite_file)
    return run_suite(model, suite, loaded=load_suite_tasks(suite), batch_size=32, cache_dir=None)


class WithPrefetch:
    """The real model, encoding with a fixed number of batches prepared ahead in a worker."""

    def __init__(self, model: EmbeddingModel, prefetch: int) -> None:
        self.model, self.prefetch, self.config = model, prefetch, model.config

    def encode(self, items: Any, instruction: str | None = None, **kwargs: Any) -> torch.Tensor:
        return self.model.encode(items, instruction=instruction, prefetch=self.prefetch, **kwargs)


def assert_same_tasks(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Every metric of every task equal (fp32 noise below 1e-6 never reorders these items)."""
    assert a["tasks"].keys() == b["tasks"].keys()
    for task, metrics in a["tasks"].items():
        for name, value in metrics.items():
            assert b["tasks"][task][name] == value, (task, name, value, b["tasks"][task][name])


def test_the_suite_covers_every_registered_task_kind(suite_file: Path, baseline: dict[str, Any]) -> None:
    kinds = {t.kind for t in load_suite(suite_file).tasks}
    runnable = {k for k in task_kind_names() if get_task_kind(k).runnable}  # not ``pending``
    assert runnable <= kinds, f"add a task of kind {runnable - kinds} here"
    # A model that is not degenerate: scores spread, not all 0 or all 1.
    scores = [t["score"] for t in baseline["tasks"].values()]
    assert len(set(scores)) > 1 and baseline["tasks"]["corpus"] == {
        **baseline["tasks"]["beir"],
        "kind": "corpus",
    }


@pytest.mark.parametrize(
    ("batch_size", "padding_side", "prefetch"),
    [(1, "right", 0), (5, "right", 0), (32, "left", 0), (3, "left", 2)],
    ids=["batch1", "batch5", "left-padding", "batch3-left-2-workers"],
)
def test_scores_do_not_depend_on_batch_size_padding_side_or_workers(
    suite_file: Path,
    baseline: dict[str, Any],
    model: EmbeddingModel,
    batch_size: int,
    padding_side: str,
    prefetch: int,
) -> None:
    other = (
        model
        if padding_side == "right"
        else EmbeddingModel.from_pretrained("tiny:qwen2_vl", padding_side="left")
    )
    suite = load_suite(suite_file)
    report = run_suite(
        WithPrefetch(other, prefetch),
        suite,
        loaded=load_suite_tasks(suite),
        batch_size=batch_size,
        cache_dir=None,
    )
    assert_same_tasks(baseline, report)
    assert report["average"] == baseline["average"]


def test_embeddings_agree_within_the_stated_fp32_tolerance(suite_file: Path, model: EmbeddingModel) -> None:
    """The stated tolerance itself: every item of the suite, batch 1 vs 32, left vs right."""
    root = suite_file.parent
    items = [r["item"] for r in map(json.loads, (root / "corpus.jsonl").read_text().splitlines())]
    items += [r["item"] for r in map(json.loads, (root / "queries.jsonl").read_text().splitlines())]
    left = EmbeddingModel.from_pretrained("tiny:qwen2_vl", padding_side="left")
    ref = model.encode(items, batch_size=32, prefetch=0)
    for other in (
        model.encode(items, batch_size=1, prefetch=0),
        left.encode(items, batch_size=7, prefetch=0),
    ):
        torch.testing.assert_close(other, ref, atol=FP32_EMBEDDING_ATOL, rtol=0)


def test_scores_do_not_depend_on_candidate_corpus_or_query_order(
    digits: Path, baseline: dict[str, Any], model: EmbeddingModel, tmp_path: Path
) -> None:
    for seed in (1, 2):
        suite = load_suite(write_mini_suite(tmp_path / f"shuffled{seed}", digits, shuffle=seed))
        first = load_suite_tasks(suite)[0]
        assert [r["positive"] for r in first] != [[d] for d in range(8)]  # really shuffled
        report = run_suite(model, suite, loaded=load_suite_tasks(suite), batch_size=4, cache_dir=None)
        assert_same_tasks(baseline, report)


def test_tied_scores_rank_the_same_whatever_the_candidate_order() -> None:
    """The pessimistic tie rule makes the metrics a function of the scores alone."""
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(40, 12)).astype(float)  # many exact ties
    relevant = [
        sorted(rng.choice(12, size=int(rng.integers(1, 4)), replace=False).tolist()) for _ in range(40)
    ]
    gains = [[float(rng.integers(1, 3)) for _ in rel] for rel in relevant]
    ref = ranking_metrics(scores, relevant, ks=(1, 3, 5), gains=gains)
    for _ in range(5):
        p = rng.permutation(12)  # new column j holds old column p[j]
        where = {int(old): new for new, old in enumerate(p)}
        moved = ranking_metrics(
            scores[:, p], [[where[i] for i in rel] for rel in relevant], ks=(1, 3, 5), gains=gains
        )
        assert moved == pytest.approx(ref, abs=1e-12)
    # Pessimistic: with all scores equal, the irrelevant items and lower gains come first.
    flat = ranking_metrics([[0.5, 0.5, 0.5]], [[0, 1]], ks=(1,), gains=[[1.0, 2.0]])
    assert flat["hit@1"] == 0.0 and flat["mrr"] == 0.5


def test_bf16_scores_stay_within_the_stated_tolerance(suite_file: Path, model: EmbeddingModel) -> None:
    """bf16 against fp32 on the tiny model: the measured gap, bounded as the docs state."""
    root = suite_file.parent
    docs = [r["item"] for r in map(json.loads, (root / "corpus.jsonl").read_text().splitlines())]
    queries = [r["item"] for r in map(json.loads, (root / "queries.jsonl").read_text().splitlines())]
    bf16 = EmbeddingModel.from_pretrained("tiny:qwen2_vl", torch_dtype=torch.bfloat16)
    gaps = []
    for m in (model, bf16):
        q = torch.nn.functional.normalize(m.encode(queries, batch_size=8, prefetch=0).float(), dim=-1)
        d = torch.nn.functional.normalize(m.encode(docs, batch_size=8, prefetch=0).float(), dim=-1)
        gaps.append(q @ d.T)
    diff = (gaps[0] - gaps[1]).abs().max().item()
    assert 0 < diff < BF16_SCORE_ATOL  # bf16 really ran (not bit-equal) and stays close


@pytest.mark.distributed
def test_two_processes_score_every_kind_like_one(
    suite_file: Path, baseline: dict[str, Any], tmp_path: Path
) -> None:
    env = launch_env()
    launch = [*accelerate_launch("ddp"), "-m", "vlm2emb"]
    out = tmp_path / "two.json"
    cmd = [
        *launch,
        "eval",
        "--model",
        "tiny:qwen2_vl",
        "--suite",
        str(suite_file),
        "--no-cache",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["cache"]["processes"] == 2
    assert_same_tasks(baseline, two)
