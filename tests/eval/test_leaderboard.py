"""The MMEB leaderboard block equals VLM2Vec's ``RankingMetrics`` row for row, and
`vlm2emb eval --submission` writes the leaderboard's file from a real run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests import vlm2vec_reference as ref
from vlm2emb.data.demo import caption, write_digits
from vlm2emb.eval.leaderboard import MISSING, accumulate, mmeb_metrics, mmeb_submission
from vlm2emb.eval.suite import load_suite


def _cases(scores: np.ndarray, relevant: list[list[int]], gains: list[list[float]] | None = None) -> list:
    """VLM2Vec's inputs: candidates ranked by ``np.argsort(-scores)``, named by index."""
    cases = []
    for q, row in enumerate(scores):
        labels = list(relevant[q])
        case = {"prediction": np.argsort(-row).tolist(), "label": labels, "rel_scores": None}
        if gains is not None:
            # Upstream pairs rel_scores with list(set(label)), not with label: hand it the
            # gains in that order, so each gain stays with its label (docs/evaluation.md).
            by_label = dict(zip(relevant[q], gains[q]))
            case["rel_scores"] = [by_label[c] for c in list(set(labels))]
        cases.append(case)
    return cases


@pytest.mark.parametrize("n_candidates", [2, 7, 30])  # 2 < k: precision@5 still divides by 5
@pytest.mark.parametrize("graded", [False, True])
def test_block_equals_vlm2vec_ranking_metrics(n_candidates: int, graded: bool) -> None:
    rng = np.random.default_rng(n_candidates + 100 * graded)
    n_queries = 40
    scores = rng.normal(size=(n_queries, n_candidates))  # continuous: no ties
    relevant = [
        rng.choice(n_candidates, size=int(rng.integers(1, min(4, n_candidates) + 1)), replace=False).tolist()
        for _ in range(n_queries)
    ]
    gains = [[float(rng.integers(1, 4)) for _ in rel] for rel in relevant] if graded else None
    ours = mmeb_metrics(scores, relevant, ks=(1, 5, 10), gains=gains)
    theirs = ref.rm_evaluate(_cases(scores, relevant, gains))
    assert list(ours)[:-2] == list(theirs)  # same keys in the score files' order
    for name, value in theirs.items():
        assert ours[name] == pytest.approx(value, abs=1e-12), name
    assert ours["num_pred"] == ours["num_data"] == n_queries
    if not graded:  # binary gains: both nDCG forms coincide, as in VLM2Vec's published files
        assert ours["ndcg_linear@5"] == ours["ndcg_exponential@5"]


def test_groups_accumulate_to_the_whole_task() -> None:
    """Rows scored in groups (by candidate count, corpus blocks) add up to one pass."""
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(30, 8))
    relevant = [[int(rng.integers(8))] for _ in range(30)]
    whole = mmeb_metrics(scores, relevant)
    totals: dict = {}
    for part in (slice(0, 7), slice(7, 30)):
        rows = range(30)[part]
        accumulate(totals, {"leaderboard": mmeb_metrics(scores[part], relevant[part])}, len(rows) / 30)
    for name, value in whole.items():
        assert totals["leaderboard"][name] == pytest.approx(value, abs=1e-12), name
    assert totals["leaderboard"]["num_data"] == 30


def test_submission_needs_a_modality() -> None:
    with pytest.raises(ValueError, match="no leaderboard submission format"):
        mmeb_submission({"suite": "x", "tasks": {}}, {"a": None})


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An image task (MMEB layout), a visual-document task (BEIR folder, graded qrels) and a
    pending video task, on the digits images."""
    root = write_digits(tmp_path_factory.mktemp("digits"))
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    by_digit: dict[int, list[str]] = {}
    for r in rows:
        if r["task"] == "digits-i2t":
            by_digit.setdefault(r["positive"], []).append(str(root / r["query"]["image"]))
    mmeb = [
        {
            "qry_text": caption(d),
            "qry_img_path": "",
            "tgt_text": ["<|image_1|>"] * 4,
            "tgt_img_path": [by_digit[(d + j) % 10][0] for j in range(4)],
        }
        for d in range(6)
    ]
    (root / "mmeb.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mmeb))
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True)
    docs = [(f"p{d}_{j}", by_digit[d][j]) for d in range(10) for j in range(2)]
    (beir / "corpus.jsonl").write_text("".join(json.dumps({"_id": i, "image": p}) + "\n" for i, p in docs))
    queries = "".join(json.dumps({"_id": f"q{d}", "text": caption(d)}) + "\n" for d in range(10))
    (beir / "queries.jsonl").write_text(queries)
    qrels = "".join(f"q{d}\tp{d}_{j}\t{2 - j}\n" for d in range(10) for j in range(2))
    (beir / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + qrels)
    suite = root / "suite.yaml"
    suite.write_text(
        "name: mini-mmeb\nmetric: hit@1\nks: [1, 5, 10]\ntasks:\n"
        "  - {name: Digits, meta_task: retrieval, format: mmeb, data: mmeb.jsonl, modality: image}\n"
        "  - {name: DigitPages, meta_task: visdoc, kind: beir, data: beir, metric: ndcg@5, modality: visdoc}\n"
        "  - {name: K700, meta_task: video_classification, kind: pending, reason: no loader, modality: video}\n"
    )
    return suite


def test_eval_writes_the_leaderboard_submission(suite_file: Path, tmp_path: Path) -> None:
    from vlm2emb.cli import main

    out, sub = tmp_path / "report.json", tmp_path / "submission.json"
    argv = ["eval", "--model", "tiny:qwen2_vl", "--suite", str(suite_file), "--no-cache"]
    assert main([*argv, "--out", str(out), "--submission", str(sub), "--model-name", "tiny-qwen"]) == 0
    report, submission = json.loads(out.read_text()), json.loads(sub.read_text())
    assert submission["metadata"]["model_name"] == "tiny-qwen"
    assert "report_generated_date" in submission["metadata"]
    assert list(submission["metrics"]) == ["image", "video", "visdoc"]
    assert submission["metrics"]["video"] == {"K700": MISSING}
    image = submission["metrics"]["image"]["Digits"]
    visdoc = submission["metrics"]["visdoc"]["DigitPages"]
    assert image == report["tasks"]["Digits"]["leaderboard"] and image["num_data"] == 6
    assert visdoc["num_data"] == 10
    # The leaderboard's headline numbers agree with ours where the definitions coincide:
    # hit@1 everywhere, graded nDCG (linear gain) on the documents.
    assert image["hit@1"] == pytest.approx(report["tasks"]["Digits"]["hit@1"])
    assert visdoc["ndcg_linear@5"] == pytest.approx(report["tasks"]["DigitPages"]["ndcg@5"])
    assert visdoc["ndcg_exponential@5"] != visdoc["ndcg_linear@5"]  # gains 2 and 1 differ


def test_submission_flag_is_refused_before_the_model_loads(tmp_path: Path) -> None:
    from vlm2emb.cli import main

    suite = tmp_path / "s.yaml"
    (tmp_path / "rows.jsonl").write_text(
        json.dumps({"query": {"text": "a"}, "candidates": ["a"], "positive": 0})
    )
    suite.write_text("tasks:\n  - {name: t, data: rows.jsonl}\n")
    with pytest.raises(SystemExit, match="no task of suite 's' names a modality"):
        main(["eval", "--model", "no/such/model", "--suite", str(suite), "--submission", str(tmp_path / "x")])
    suite.write_text("tasks:\n  - {name: t, data: rows.jsonl, modality: audio}\n")
    with pytest.raises(Exception, match="'modality' is 'audio'; choose one of image, video, visdoc"):
        load_suite(suite)


def test_bundled_mmeb_suites_name_every_task_s_modality() -> None:
    from vlm2emb.eval.suites import SUITES_DIR

    counts = {}
    for name in ("mmeb-v1", "mmeb-v2", "mmeb-v2-visdoc"):
        tasks = load_suite(SUITES_DIR / f"{name}.yaml").tasks
        counts[name] = {m: sum(t.modality == m for t in tasks) for m in ("image", "video", "visdoc")}
    assert counts == {
        "mmeb-v1": {"image": 36, "video": 0, "visdoc": 0},
        "mmeb-v2": {"image": 36, "video": 18, "visdoc": 24},
        "mmeb-v2-visdoc": {"image": 0, "video": 0, "visdoc": 24},
    }
