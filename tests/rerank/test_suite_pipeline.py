"""evaluate_suite_pipeline: every suite task kind reports embedder-only and recall -> rerank.

The suite is written here in the released layouts: canonical local rows (text and image
queries), VLM2Vec's MMEB-eval rows, corpus + qrels (graded), and a BEIR folder. Images are
real scikit-learn digits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytrec_eval
import torch
from PIL import Image

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.schema import DataError
from vlm2emb.eval.corpus import CorpusTask
from vlm2emb.eval.harness import load_suite_tasks, run_suite
from vlm2emb.eval.kinds import TaskKind, TaskSpec, register_task_kind, unregister_task_kind
from vlm2emb.eval.suite import load_suite
from vlm2emb.rerank import Reranker, evaluate_suite_pipeline
from vlm2emb.rerank.evaluate import RerankStage, format_pipeline_report

WORDS = ["zero", "one", "two", "three", "four"]
METRICS = ("hit@1", "ndcg@5", "recall@5", "mrr", "map")


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_suite(root: Path, images: list[Image.Image]) -> Path:
    """Four tasks, one per released layout, small enough for a reranker over everything."""
    (root / "img").mkdir(parents=True)
    for i, img in enumerate(images[:6]):
        img.save(root / "img" / f"{i}.png")
    captions = [{"text": f"a handwritten digit {w}"} for w in WORDS]
    local = [
        {
            "query": {"text": WORDS[i]},
            "candidates": captions,
            "positive": i,
            "instruction": "Find the caption.",
        }
        for i in range(4)
    ]
    local.append({"query": {"image": "img/3.png"}, "candidates": captions, "positive": 3})
    _jsonl(root / "local.jsonl", local)
    _jsonl(
        root / "mmeb.jsonl",
        [
            {
                "qry_text": f"Find the image of the digit {WORDS[i]}",
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>"] * 4,
                "tgt_img_path": [f"img/{(i + j) % 4}.png" for j in range(4)],  # positive first
            }
            for i in range(3)
        ],
    )
    _jsonl(root / "corpus.jsonl", [{"id": f"d{i}", "item": {"image": f"img/{i}.png"}} for i in range(6)])
    _jsonl(root / "queries.jsonl", [{"id": f"q{i}", "item": {"text": f"digit {WORDS[i]}"}} for i in range(3)])
    (root / "qrels.tsv").write_text(
        "query_id\tcorpus_id\trelevance\nq0\td0\t2\nq0\td5\t1\nq1\td1\t1\nq2\td2\t1\n"
    )
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    _jsonl(beir / "corpus.jsonl", [{"_id": f"p{i}", "text": f"page about {w}"} for i, w in enumerate(WORDS)])
    _jsonl(beir / "queries.jsonl", [{"_id": f"b{i}", "text": f"which page is {WORDS[i]}?"} for i in range(2)])
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nb0\tp0\t1\nb1\tp1\t2\nb1\tp3\t1\n")
    suite = root / "suite.yaml"
    suite.write_text(
        "name: tiny\nmetric: hit@1\nks: [1, 5]\ntasks:\n"
        "  - {name: local, meta_task: classification, data: local.jsonl}\n"
        "  - {name: mmeb, meta_task: retrieval, data: mmeb.jsonl, format: mmeb}\n"
        "  - {name: corpus, meta_task: retrieval, kind: corpus, corpus: corpus.jsonl, queries: queries.jsonl,\n"
        "     qrels: qrels.tsv, query_instruction: Find the image., metric: ndcg@5}\n"
        "  - {name: beir, meta_task: visdoc, kind: beir, data: beir, metric: ndcg@5}\n"
    )
    return suite


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory: pytest.TempPathFactory, digit_images: list[Image.Image]) -> Path:
    return write_suite(tmp_path_factory.mktemp("suite"), digit_images)


@pytest.fixture(scope="module")
def embedder() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker.from_pretrained("tiny:qwen2_vl", seed=3)


@pytest.fixture(scope="module")
def digit_images() -> list[Image.Image]:  # module scope (the conftest one is per test)
    import numpy as np

    from vlm2emb.data.demo import load_digit_scans

    out = []
    for pixels in load_digit_scans()[0][:6]:
        gray = (255 - pixels * (255.0 / 16.0)).astype(np.uint8)
        out.append(Image.fromarray(gray, mode="L").resize((32, 32)).convert("RGB"))
    return out


class CosineReranker:
    """Scores a pair by the embedder's own cosine, each pair embedded alone: a reranker
    that keeps the embedder's order (up to float noise far below the scores' gaps)."""

    def __init__(self, embedder: EmbeddingModel) -> None:
        self.embedder = embedder

    def score_pairs(self, pairs, instructions=None, batch_size=16):
        out = []
        for (q, c), instruction in zip(pairs, instructions, strict=True):
            qe = self.embedder.encode([q], instruction=instruction)
            ce = self.embedder.encode([c])
            out.append(float(torch.nn.functional.cosine_similarity(qe, ce)[0]))
        return torch.tensor(out)


def _run(embedder, reranker, suite_file, top_k):
    suite = load_suite(suite_file)
    return evaluate_suite_pipeline(
        embedder, reranker, suite, loaded=load_suite_tasks(suite), rerank_top_k=top_k
    )


def test_top_k_0_leaves_the_embedders_column_which_is_vlm2emb_eval(embedder, reranker, suite_file):
    report = _run(embedder, reranker, suite_file, 0)
    suite = load_suite(suite_file)
    reference = run_suite(embedder, suite, loaded=load_suite_tasks(suite), cache_dir=None)
    assert list(report["tasks"]) == ["local", "mmeb", "corpus", "beir"]
    for name, ref in reference["tasks"].items():
        task = report["tasks"][name]
        assert task["kind"] == ref["kind"] and task["n"] == ref["n"] and task["pairs_reranked"] == 0
        for metric in ("score", *METRICS):
            assert task["embedder"][metric] == ref[metric]
            assert task["reranked"][metric] == task["embedder"][metric]
        assert task["seconds"]["rerank"] == 0.0
    for side in ("embedder", "reranked"):
        assert report["average"][side]["score"] == pytest.approx(reference["average"]["score"], abs=1e-12)
        assert report["meta_tasks"]["retrieval"][side]["score"] == pytest.approx(
            reference["meta_tasks"]["retrieval"]["score"], abs=1e-12
        )


def test_an_order_keeping_reranker_changes_nothing(embedder, suite_file):
    report = _run(embedder, CosineReranker(embedder), suite_file, 3)
    for task in report["tasks"].values():
        assert task["pairs_reranked"] == 3 * task["n"]
        for metric in ("score", *METRICS):
            assert task["reranked"][metric] == pytest.approx(task["embedder"][metric], abs=1e-9)


def _views(suite_file: Path) -> dict[str, list[tuple]]:
    """Per task: (query, reranker instruction, candidates, {candidate index: gain})."""
    suite = load_suite(suite_file)
    views: dict[str, list[tuple]] = {}
    for spec, payload in zip(suite.tasks, load_suite_tasks(suite), strict=True):
        if isinstance(payload, CorpusTask):
            instruction = spec.query_instruction
            views[spec.name] = [
                (
                    q,
                    instruction,
                    payload.corpus_items,
                    {payload.corpus_ids.index(d): g for d, g in payload.qrels[qid].items()},
                )
                for qid, q in zip(payload.query_ids, payload.query_items, strict=True)
            ]
        else:
            views[spec.name] = [
                (
                    r["query"],
                    r["instruction"],
                    r["candidates"],
                    dict.fromkeys(_as_list(r.get("positive", 0)), 1),
                )
                for r in payload
            ]
    return views


def _as_list(positive) -> list[int]:
    return [positive] if isinstance(positive, int) else list(positive)


def test_reranking_everything_equals_the_reranker_alone_pair_by_pair(embedder, reranker, suite_file):
    report = _run(embedder, reranker, suite_file, 1000)  # more than any task's candidates
    for name, view in _views(suite_file).items():
        run, qrels = {}, {}
        for i, (query, instruction, candidates, gains) in enumerate(view):
            scores = [float(reranker.score_pairs([(query, c)], [instruction])[0]) for c in candidates]
            run[f"q{i}"] = {f"c{j}": s for j, s in enumerate(scores)}
            qrels[f"q{i}"] = {f"c{j}": int(g) for j, g in gains.items()}
        measured = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank", "ndcg_cut_5"}).evaluate(run)
        task = report["tasks"][name]
        mean = {m: sum(v[m] for v in measured.values()) / len(measured) for m in ("recip_rank", "ndcg_cut_5")}
        assert task["reranked"]["mrr"] == pytest.approx(mean["recip_rank"], abs=1e-6), name
        assert task["reranked"]["ndcg@5"] == pytest.approx(mean["ndcg_cut_5"], abs=1e-6), name
        assert task["pairs_reranked"] == sum(len(c) for _, _, c, _ in view)
        assert all(task["seconds"][s] > 0 for s in ("embed", "search", "rerank")), task["seconds"]
    assert all(report["average"]["seconds"][s] > 0 for s in ("embed", "search", "rerank"))
    # The random reranker's order is not the embedder's, so the columns tell them apart.
    assert any(t["reranked"]["mrr"] != t["embedder"]["mrr"] for t in report["tasks"].values())
    # The whole table prints, with one line per task and the average.
    table = format_pipeline_report(report)
    assert all(name in table for name in report["tasks"]) and "score +rr@1000" in table


def test_rerank_stage_lifts_the_head_in_the_rerankers_order():
    class ByText:  # scores a candidate by the number it names
        def score_pairs(self, pairs, instructions, batch_size=16):
            return torch.tensor([float(c) for _, c in pairs])

    stage = RerankStage(ByText(), 2)
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.5], [0.2, 0.3, 0.4, 0.1]])  # [2, 4]
    out = stage(scores, ["q", "q"], [None, None], [["1", "9", "5", "7"], ["4", "3", "2", "8"]])
    # Row 0: head {0, 2} re-ordered by 5 > 1; then 3, 1 in embedder order.
    assert out[0].argsort(descending=True).tolist() == [2, 0, 3, 1]
    assert out[1].argsort(descending=True).tolist() == [1, 2, 0, 3]
    assert stage.pairs == 4
    with pytest.raises(ValueError, match="rerank_top_k"):
        RerankStage(ByText(), -1)


def test_a_kind_without_rescore_is_refused_by_name(embedder, reranker, tmp_path):
    class Plain(TaskKind):
        name = "plain-test"
        spec = TaskSpec

        def load(self, spec, *, verify_images=True, work_dir=None):
            return None

    register_task_kind(Plain())
    try:
        (tmp_path / "s.yaml").write_text("tasks:\n  - {name: x, kind: plain-test}\n")
        suite = load_suite(tmp_path / "s.yaml")
        with pytest.raises(DataError, match="task 'x': kind 'plain-test' cannot report a re-ranked pipeline"):
            evaluate_suite_pipeline(embedder, reranker, suite, loaded=[None])
    finally:
        unregister_task_kind("plain-test")


def test_cli_suite_writes_json_and_table(suite_file, tmp_path, capsys):
    out = tmp_path / "rr" / "pipeline.json"
    argv = ["rerank", "eval", "--embedder", "tiny:qwen2_vl", "--reranker", "tiny:qwen2_vl"]
    assert (
        main([*argv, "--suite", str(suite_file), "--rerank-top-k", "2", "--no-cache", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["rerank_top_k"] == 2 and list(report["tasks"]) == ["local", "mmeb", "corpus", "beir"]
    assert report["tasks"]["corpus"]["pairs_reranked"] == 6 and report["tasks"]["corpus"]["corpus_size"] == 6
    assert out.with_suffix(".txt").read_text().strip() == printed.strip()
    # A bad suite key: one line naming the key, exit status 2, no model loaded.
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks:\n  - {name: x, data: local.jsonl, colour: red}\n")
    assert main([*argv, "--suite", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "colour" in err and len(err.splitlines()) == 1


def test_embedding_cache_serves_the_second_run(embedder, reranker, suite_file, tmp_path):
    suite = load_suite(suite_file)
    loaded = load_suite_tasks(suite)
    runs = [
        evaluate_suite_pipeline(embedder, reranker, suite, loaded=loaded, rerank_top_k=1, cache_dir=tmp_path)
        for _ in range(2)
    ]
    assert runs[0]["cache"]["items_encoded"] > 0 and runs[1]["cache"]["items_encoded"] == 0
    assert runs[1]["cache"]["items_from_cache"] == runs[0]["cache"]["items_encoded"]
    for name, task in runs[1]["tasks"].items():
        assert task["embedder"] == runs[0]["tasks"][name]["embedder"]
        assert task["reranked"]["mrr"] == pytest.approx(runs[0]["tasks"][name]["reranked"]["mrr"], abs=1e-6)


def test_mmeb_video_tasks_report_the_pipeline(embedder, reranker, tmp_path):
    """Two MMEB-V2 video layouts (local QA, a corpus of videos) from the video tests' files."""
    import yaml

    from tests.eval.test_mmeb_video import LAYOUT, bundled_video_tasks, write_frames, write_table

    tasks = [{**t, "num_frames": 2} for t in bundled_video_tasks() if t["name"] in ("NExTQA", "MSR-VTT")]
    for seed, task in enumerate(tasks):
        rows, folders = LAYOUT[task["name"]]
        write_table(tmp_path / task["data"], rows)
        for j, (rel, n) in enumerate(folders.items()):
            write_frames(tmp_path / task["frame_root"] / rel, n, seed * 100 + j)
    (tmp_path / "video.yaml").write_text(
        yaml.safe_dump({"name": "video", "metric": "hit@1", "ks": [1, 2], "tasks": tasks}, sort_keys=False)
    )
    suite = load_suite(tmp_path / "video.yaml")
    loaded = load_suite_tasks(suite)
    reference = run_suite(embedder, suite, loaded=loaded, cache_dir=None)
    report = evaluate_suite_pipeline(embedder, reranker, suite, loaded=loaded, rerank_top_k=0)
    for name, ref in reference["tasks"].items():
        assert (
            report["tasks"][name]["embedder"]["mrr"] == ref["mrr"] == report["tasks"][name]["reranked"]["mrr"]
        )
    report = evaluate_suite_pipeline(embedder, reranker, suite, loaded=loaded, rerank_top_k=2)
    for task in report["tasks"].values():
        assert task["pairs_reranked"] == 2 * task["n"] and task["seconds"]["rerank"] > 0
        # Re-ordering inside the top 2 leaves hit@2 as the embedder's (NExTQA: 5 answers).
        assert task["reranked"]["hit@2"] == task["embedder"]["hit@2"]
    # MSR-VTT here ranks a corpus of 2 videos: top 2 is all of it, so the pipeline is the
    # reranker alone; its MRR recomputed from each (caption, video) pair scored alone.
    corpus = dict(zip([t.name for t in suite.tasks], loaded, strict=True))["MSR-VTT"].corpus
    # The reranker reads the instruction the embedder's query side used (the task's own).
    instruction = next(t for t in suite.tasks if t.name == "MSR-VTT").query_instruction
    reciprocal = []
    for qid, query in zip(corpus.query_ids, corpus.query_items, strict=True):
        if not any(r > 0 for r in corpus.qrels.get(qid, {}).values()):
            continue
        scores = [
            float(reranker.score_pairs([(query, doc)], [instruction])[0]) for doc in corpus.corpus_items
        ]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        relevant = {corpus.corpus_ids.index(d) for d, r in corpus.qrels[qid].items() if r > 0}
        reciprocal.append(1.0 / (1 + next(rank for rank, i in enumerate(order) if i in relevant)))
    assert report["tasks"]["MSR-VTT"]["reranked"]["mrr"] == pytest.approx(sum(reciprocal) / len(reciprocal))
