"""MaxSim scoring in evaluation (vlm2emb/eval/scoring.py): local rows, corpus tasks, suites
and the embedding cache, against a plain recomputation from encode(output="multivector")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.data.schema import DataError
from vlm2emb.eval import evaluate
from vlm2emb.eval.corpus import evaluate_corpus, load_corpus_task
from vlm2emb.eval.harness import load_suite_tasks, run_suite
from vlm2emb.eval.metrics import ranking_metrics
from vlm2emb.eval.suite import load_suite
from vlm2emb.multivector import maxsim_lists

CAPTIONS = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three", "four", "five")]
QUERIES = ["digit zero, drawn by hand", "number two", "the digit five", "one"]


@pytest.fixture(scope="module")
def multi(tiny_qwen2_vl_dir) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"multivector_dim": 16})


def _rows() -> list[dict]:
    # Candidate lists of two sizes (5 and 6), as MMEB tasks may have.
    return [
        {"query": {"text": q}, "candidates": [{"text": c} for c in CAPTIONS[: 5 + i % 2]], "positive": i % 3}
        for i, q in enumerate(QUERIES)
    ]


def test_local_rows_scored_by_maxsim_match_a_recomputation(multi):
    rows = _rows()
    got = evaluate(multi, rows, scoring="maxsim", ks=(1, 3))["tasks"]["default"]
    q_sets = multi.encode(QUERIES, output="multivector")
    c_sets = multi.encode(CAPTIONS, output="multivector")
    scores = maxsim_lists(q_sets, c_sets)  # [4, 6]
    by_size = {}
    for i, row in enumerate(rows):
        by_size.setdefault(len(row["candidates"]), []).append(i)
    want: dict[str, float] = {}
    for size, ids in by_size.items():
        metrics = ranking_metrics(scores[ids, :size], [[rows[i]["positive"]] for i in ids], ks=(1, 3))
        for name, value in metrics.items():
            want[name] = want.get(name, 0.0) + value * len(ids) / len(rows)
    assert set(want) <= set(got)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    with pytest.raises(ValueError, match="unknown scoring"):
        evaluate(multi, rows, scoring="colbert")


def _write_suite(root: Path) -> Path:
    (root / "local.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": f"c{i}", "item": {"text": c}}) + "\n" for i, c in enumerate(CAPTIONS))
    )
    (root / "queries.jsonl").write_text(
        "".join(json.dumps({"id": f"q{i}", "item": {"text": q}}) + "\n" for i, q in enumerate(QUERIES))
    )
    (root / "qrels.tsv").write_text("".join(f"q{i}\tc{(2 * i) % 6}\t1\n" for i in range(4)))
    (root / "suite.yaml").write_text(
        "name: late\nmetric: hit@1\nks: [1, 3]\ntasks:\n"
        "  - {name: local-maxsim, kind: local, data: local.jsonl, scoring: maxsim}\n"
        "  - {name: corpus-maxsim, kind: corpus, corpus: corpus.jsonl, queries: queries.jsonl,"
        " qrels: qrels.tsv, scoring: maxsim}\n"
    )
    return root / "suite.yaml"


def test_suite_with_maxsim_tasks_uses_and_fills_the_cache(multi, tmp_path):
    suite = load_suite(_write_suite(tmp_path))
    assert [t.scoring for t in suite.tasks] == ["maxsim", "maxsim"]
    loaded = load_suite_tasks(suite)
    first = run_suite(multi, suite, loaded=loaded, cache_dir=tmp_path / "cache")
    files = sorted((tmp_path / "cache").glob("*/*.multivector.safetensors"))
    assert len(files) == first["cache"]["misses"] > 0
    corpus = load_corpus_task(*(str(tmp_path / n) for n in ("corpus.jsonl", "queries.jsonl", "qrels.tsv")))
    direct = evaluate_corpus(multi, corpus, ks=(1, 3), scoring="maxsim")
    scores = maxsim_lists(
        multi.encode(QUERIES, output="multivector"), multi.encode(CAPTIONS, output="multivector")
    )
    hand = ranking_metrics(scores, [[(2 * i) % 6] for i in range(4)], ks=(1, 3))
    for name, value in hand.items():
        assert first["tasks"]["corpus-maxsim"][name] == pytest.approx(value, abs=1e-6) == direct[name]

    def no_encode(*_args, **_kwargs):
        raise AssertionError("the cache should have served every encoding")

    multi.encode = no_encode
    try:
        second = run_suite(multi, suite, loaded=loaded, cache_dir=tmp_path / "cache")
    finally:
        del multi.encode
    assert second["cache"]["misses"] == 0 and second["tasks"] == first["tasks"]


def test_suite_refuses_an_unknown_scoring(tmp_path):
    path = _write_suite(tmp_path)
    path.write_text(path.read_text().replace("scoring: maxsim}", "scoring: colbert}", 1))
    with pytest.raises(DataError, match="'scoring' is 'colbert'; choose one of cosine, maxsim"):
        load_suite(path)


def test_cosine_stays_the_default_and_needs_no_head(tiny_qwen2_vl_dir):
    plain = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    report = evaluate(plain, _rows(), ks=(1,))
    emb_q, emb_c = plain.encode(QUERIES), plain.encode(CAPTIONS)
    scores = torch.nn.functional.normalize(emb_q, dim=-1) @ torch.nn.functional.normalize(emb_c, dim=-1).T
    first_row = ranking_metrics(scores[:1, :5], [[0]], ks=(1,))
    assert report["tasks"]["default"]["n"] == 4 and set(first_row) <= set(report["tasks"]["default"])
    with pytest.raises(ValueError, match="multi-vector head"):
        evaluate(plain, _rows(), scoring="maxsim")


def test_cli_eval_scores_a_multivector_model_by_maxsim(multi, tmp_path):
    from vlm2emb.cli import main

    multi.save_pretrained(tmp_path / "model")
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()))
    args = ["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--scoring", "maxsim"]
    code = main([*args, "--no-cache", "--out", str(tmp_path / "report.json")])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    want = evaluate(multi, _rows(), scoring="maxsim")["tasks"]["default"]
    (got,) = report["tasks"].values()  # one task (the loader names it)
    assert want["mrr"] != pytest.approx(evaluate(multi, _rows())["tasks"]["default"]["mrr"])  # not cosine
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
