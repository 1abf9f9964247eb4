"""Benchmarks as the field runs them: BEIR/ViDoRe folders, bundled suites, --data-root, nDCG.

Everything runs offline on small synthetic folders in the published layouts, with real digit
images as pages, and the tiny Qwen2-VL model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.schema import DataError
from vlm2emb.eval.beir import load_beir_task
from vlm2emb.eval.harness import format_suite_report, load_suite_tasks, run_suite
from vlm2emb.eval.metrics import ranking_metrics
from vlm2emb.eval.suite import load_suite
from vlm2emb.eval.suites import bundled_suites

CAPTIONS = ["a handwritten zero", "a handwritten one", "a handwritten two"]
# Graded qrels as ViDoRe V2/V3 have them: q0 -> p0 (2) and p3 (1); q1 -> p1; q2 -> p2 (2), p4 (1).
QRELS = [("q0", "p0", 2), ("q0", "p3", 1), ("q1", "p1", 1), ("q2", "p2", 2), ("q2", "p4", 1)]


def write_pages(root: Path, images: list[Image.Image]) -> list[str]:
    """Five digit images as page files; returns their paths relative to ``root``."""
    (root / "pages").mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images[:5]):
        img.save(root / "pages" / f"p{i}.png")
        paths.append(f"pages/p{i}.png")
    return paths


def write_beir_jsonl(root: Path, images: list[Image.Image]) -> Path:
    """BEIR's own layout: corpus.jsonl, queries.jsonl, qrels/test.tsv (with a header)."""
    paths = write_pages(root, images)
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": f"p{i}", "image": p}) + "\n" for i, p in enumerate(paths))
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": f"q{i}", "text": c}) + "\n" for i, c in enumerate(CAPTIONS))
    )
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, d, s in QRELS]
    (root / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return root


def write_beir_parquet(root: Path, images: list[Image.Image]) -> Path:
    """The Hugging Face layout of vidore/*_beir: corpus/queries/qrels config folders of
    Parquet shards, integer ids, images as ``{"bytes", "path"}`` records."""
    for config in ("corpus", "queries", "qrels"):
        (root / config).mkdir(parents=True, exist_ok=True)
    shard = "test-00000-of-00001.parquet"
    blobs = []
    for img in images[:5]:
        path = root / "tmp.png"
        img.save(path)
        blobs.append({"bytes": path.read_bytes(), "path": None})
        path.unlink()
    pq.write_table(pa.table({"corpus-id": list(range(5)), "image": blobs}), root / "corpus" / shard)
    pq.write_table(pa.table({"query-id": [0, 1, 2], "query": CAPTIONS}), root / "queries" / shard)
    ids = [(int(q[1:]), int(d[1:]), s) for q, d, s in QRELS]
    pq.write_table(
        pa.table(
            {
                "query-id": [q for q, _, _ in ids],
                "corpus-id": [d for _, d, _ in ids],
                "score": [s for *_, s in ids],
            }
        ),
        root / "qrels" / shard,
    )
    return root


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


def pytrec_scores(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    pytrec_eval = pytest.importorskip("pytrec_eval")
    measures = {"ndcg_cut.5", "ndcg_cut.10", "recall.5", "P.5", "recip_rank", "map"}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = ("ndcg_cut_5", "ndcg_cut_10", "recall_5", "P_5", "recip_rank", "map")
    return {n: float(np.mean([v[n] for v in per_query.values()])) for n in names}


def test_ndcg_and_friends_match_pytrec_eval_on_graded_qrels() -> None:
    """Our metrics on the same run and graded qrels as pytrec_eval (trec_eval's definitions)."""
    rng = np.random.default_rng(0)
    n_q, n_d = 30, 40
    scores = rng.normal(size=(n_q, n_d))  # continuous: no ties (trec_eval breaks ties by doc id)
    relevant, gains, qrels = [], [], {}
    for q in range(n_q):
        docs = rng.choice(n_d, size=int(rng.integers(1, 6)), replace=False).tolist()
        grades = rng.integers(1, 4, size=len(docs)).tolist()
        relevant.append(docs)
        gains.append([float(g) for g in grades])
        qrels[f"q{q}"] = {f"d{d}": int(g) for d, g in zip(docs, grades, strict=True)}
    run = {f"q{q}": {f"d{d}": float(scores[q, d]) for d in range(n_d)} for q in range(n_q)}
    ours = ranking_metrics(scores, relevant, ks=(5, 10), gains=gains)
    ref = pytrec_scores(run, qrels)
    assert ours["ndcg@5"] == pytest.approx(ref["ndcg_cut_5"], abs=1e-9)
    assert ours["ndcg@10"] == pytest.approx(ref["ndcg_cut_10"], abs=1e-9)
    assert ours["recall@5"] == pytest.approx(ref["recall_5"], abs=1e-9)
    assert ours["precision@5"] == pytest.approx(ref["P_5"], abs=1e-9)
    assert ours["mrr"] == pytest.approx(ref["recip_rank"], abs=1e-9)
    assert ours["map"] == pytest.approx(ref["map"], abs=1e-9)
    # The grades matter: binary nDCG differs on the same ranking.
    assert ranking_metrics(scores, relevant, ks=(5,))["ndcg@5"] != pytest.approx(ours["ndcg@5"], abs=1e-6)


def test_jsonl_and_parquet_beir_layouts_load_the_same_task(
    digit_images: list[Image.Image], tmp_path: Path
) -> None:
    a = load_beir_task(write_beir_jsonl(tmp_path / "jsonl", digit_images))
    b = load_beir_task(write_beir_parquet(tmp_path / "parquet", digit_images))
    assert a.corpus_ids == ["p0", "p1", "p2", "p3", "p4"] and b.corpus_ids == ["0", "1", "2", "3", "4"]
    assert len(a.corpus_items) == len(b.corpus_items) == 5 and len(a.query_items) == len(b.query_items) == 3
    assert a.qrels["q0"] == {"p0": 2.0, "p3": 1.0} and b.qrels["0"] == {"0": 2.0, "3": 1.0}
    assert [q["text"] for q in a.query_items] == [q["text"] for q in b.query_items] == CAPTIONS
    assert isinstance(b.corpus_items[0]["images"][0], bytes)  # Parquet pages stay in memory


def test_beir_errors_name_the_file_and_row(digit_images: list[Image.Image], tmp_path: Path) -> None:
    root = write_beir_jsonl(tmp_path / "bad", digit_images)
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\tp9\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:2: corpus id 'p9' is not in .*corpus.jsonl"):
        load_beir_task(root)
    with pytest.raises(DataError, match=r"no qrels table for split 'dev'"):
        load_beir_task(root, split="dev")
    (root / "queries.jsonl").write_text(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(DataError, match=r"queries.jsonl:1: no id field"):
        load_beir_task(root)


def vidore_root(tmp_path: Path, images: list[Image.Image]) -> Path:
    """A data root for the bundled vidore-v1 suite: its 10 dataset folders, JSONL and
    Parquet layouts alternating, all holding the same five pages and three queries."""
    root = tmp_path / "vidore"
    names = [t.data.rsplit("/", 1)[-1] for t in load_suite("vidore-v1", data_root=tmp_path).tasks]
    for i, name in enumerate(names):
        (write_beir_jsonl if i % 2 == 0 else write_beir_parquet)(root / name, images)
    return root


def test_vidore_v1_suite_runs_end_to_end_from_a_data_root(
    digit_images: list[Image.Image], model: EmbeddingModel, tmp_path: Path
) -> None:
    root = vidore_root(tmp_path, digit_images)
    out = tmp_path / "vidore.json"
    args = ["eval", "--model", "tiny:qwen2_vl", "--suite", "vidore-v1", "--data-root", str(root)]
    assert main([*args, "--no-cache", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["tasks"]) == 10 and "vidore/docvqa_test_subsampled_beir" in report["tasks"]
    assert report["meta_tasks"]["vidore-v1"]["n_tasks"] == 10
    scores = {t["score"] for t in report["tasks"].values()}
    assert len(scores) == 1  # JSONL and Parquet copies of the same data score the same
    task = report["tasks"]["vidore/arxivqa_test_subsampled_beir"]
    assert task["metric"] == "ndcg@5" and task["score"] == task["ndcg@5"] and task["corpus_size"] == 5

    # The same nDCG@5 from pytrec_eval on the same model's scores and the graded qrels.
    pages = [{"image": str(root / "arxivqa_test_subsampled_beir" / f"pages/p{i}.png")} for i in range(5)]
    q = torch.nn.functional.normalize(model.encode([{"text": c} for c in CAPTIONS]), dim=-1)
    d = torch.nn.functional.normalize(model.encode(pages), dim=-1)
    s = (q @ d.T).double().numpy()
    run = {f"q{i}": {f"p{j}": float(s[i, j]) for j in range(5)} for i in range(3)}
    qrels: dict[str, dict[str, int]] = {}
    for qid, did, rel in QRELS:
        qrels.setdefault(qid, {})[did] = rel
    assert task["ndcg@5"] == pytest.approx(pytrec_scores(run, qrels)["ndcg_cut_5"], abs=1e-6)


def test_bundled_suites_list_the_published_tasks(tmp_path: Path) -> None:
    assert {"mmeb-v1", "mmeb-v2", "mmeb-v2-visdoc", "vidore-v1", "vidore-v2", "vidore-v3"} <= set(
        bundled_suites()
    )
    v1 = load_suite("mmeb-v1", data_root=tmp_path)
    assert len(v1.tasks) == 36
    assert Counter(t.meta_task for t in v1.tasks) == {
        "classification": 10,
        "vqa": 10,
        "retrieval": 12,
        "grounding": 4,
    }
    assert v1.tasks[0].data == [str(tmp_path / "ImageNet-1K" / "test-00000-of-00001.parquet")]
    assert v1.tasks[0].media_root == str(tmp_path / "eval_images")
    v2 = load_suite("mmeb-v2", data_root=tmp_path)
    assert len(v2.tasks) == 78 and len({t.name for t in v2.tasks}) == 78
    assert Counter(t.meta_task for t in v2.tasks) == {
        "classification": 10,
        "vqa": 10,
        "retrieval": 12,
        "grounding": 4,
        "video_classification": 5,
        "video_qa": 5,
        "video_retrieval": 5,
        "moment_retrieval": 3,
        "visdoc": 24,
    }
    assert Counter(t.kind for t in v2.tasks) == {"local": 36, "mmeb-video": 18, "beir": 24}
    assert all(t.metric == "ndcg@5" for t in v2.tasks if t.kind == "beir")
    assert [len(load_suite(f"vidore-v{i}", data_root=tmp_path).tasks) for i in (1, 2, 3)] == [10, 4, 8]
    with pytest.raises(DataError, match=r"bundled with vlm2emb .* give --data-root DIR"):
        load_suite("vidore-v2")
    with pytest.raises(DataError, match=r"suite file not found: vidore-v9 \(bundled suites: .*vidore-v1"):
        load_suite("vidore-v9", data_root=tmp_path)


def write_mmeb_root(root: Path, images: list[Image.Image]) -> Path:
    """The MMEB-eval layout for the 36 tasks of mmeb-v1: one Parquet per task folder, two
    rows each (digit image query, three caption candidates, the positive first), images
    under eval_images/."""
    (root / "eval_images" / "digits").mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images[:3]):
        img.save(root / "eval_images" / "digits" / f"{i}.png")
    rows: dict[str, Any] = {"qry_text": [], "qry_img_path": [], "tgt_text": [], "tgt_img_path": []}
    for i in range(2):
        rows["qry_text"].append("<|image_1|>\nRepresent the given image for classification")
        rows["qry_img_path"].append(f"digits/{i}.png")
        rows["tgt_text"].append([CAPTIONS[i], *(c for c in CAPTIONS if c != CAPTIONS[i])])
        rows["tgt_img_path"].append(["", "", ""])
    for task in load_suite("mmeb-v1", data_root=root).tasks:
        folder = root / task.name
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(rows), folder / "test-00000-of-00001.parquet")
    return root


def test_mmeb_v1_suite_runs_from_a_data_root_with_per_meta_task_averages(
    digit_images: list[Image.Image], model: EmbeddingModel, tmp_path: Path
) -> None:
    suite = load_suite("mmeb-v1", data_root=write_mmeb_root(tmp_path / "mmeb", digit_images))
    report = run_suite(model, suite, loaded=load_suite_tasks(suite), cache_dir=tmp_path / "cache")
    assert len(report["tasks"]) == 36 and report["average"]["n_tasks"] == 36
    assert {m: r["n_tasks"] for m, r in report["meta_tasks"].items()} == {
        "classification": 10,
        "vqa": 10,
        "retrieval": 12,
        "grounding": 4,
    }
    per_task = {t["hit@1"] for t in report["tasks"].values()}
    assert len(per_task) == 1  # the same rows in every task score the same
    assert report["average"]["score"] == pytest.approx(per_task.pop())
    assert report["cache"]["hits"] == 70  # 36 x (queries, candidates); only the first task encodes


def test_pending_tasks_are_listed_not_run_and_left_out_of_the_averages(
    digit_images: list[Image.Image], model: EmbeddingModel, tmp_path: Path
) -> None:
    write_beir_jsonl(tmp_path / "docs", digit_images)
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(
        "metric: ndcg@5\ntasks:\n"
        "  - {name: docs, kind: beir, meta_task: visdoc, data: docs}\n"
        "  - {name: MSR-VTT, kind: pending, meta_task: video_retrieval, reason: no video loader}\n"
    )
    suite = load_suite(suite_file)
    report = run_suite(model, suite, loaded=load_suite_tasks(suite), cache_dir=None)
    assert list(report["tasks"]) == ["docs"] and report["not_run"] == {"MSR-VTT": "no video loader"}
    assert report["average"]["n_tasks"] == 1 and "video_retrieval" not in report["meta_tasks"]
    assert "not run (1 tasks, not in the averages): MSR-VTT" in format_suite_report(report)
    # --data-root also re-roots a suite file's relative paths (here: a copy elsewhere).
    moved = tmp_path / "elsewhere" / "suite.yaml"
    moved.parent.mkdir()
    moved.write_text(suite_file.read_text())
    assert load_suite(moved, data_root=tmp_path).tasks[0].data == str(tmp_path / "docs")
    with pytest.raises(DataError, match=r"'data' belongs to local tasks"):
        bad = tmp_path / "bad.yaml"
        bad.write_text("tasks:\n  - {name: x, kind: pending, data: docs}\n")
        load_suite(bad)
