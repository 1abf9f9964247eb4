"""`vlm2emb mine` against a brute-force re-computation with the same model's embeddings."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest
import torch

from tests.helpers import accelerate_launch, launch_env
from vlm2emb import EmbeddingModel
from vlm2emb.data.schema import load_train_examples
from vlm2emb.mine import MineConfig, _Corpus, mine_negatives

WORDS = [
    "apple",
    "banana",
    "cherry",
    "grape",
    "lemon",
    "mango",
    "melon",
    "olive",
    "peach",
    "pear",
    "plum",
    "kiwi",
]


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl_dir):
    return EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).eval()


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture
def data(tmp_path):
    rows = [
        {"query": {"text": f"which fruit is {w}?"}, "positive": {"text": f"the {w}"}, "dataset": "fruit"}
        for w in WORDS
    ]
    rows += [
        {"query": {"text": f"colour {i}"}, "positive": {"text": f"hue {i}"}, "dataset": "colour"}
        for i in range(5)
    ]
    return _write(tmp_path / "train.jsonl", rows)


def _brute_force(model, rows, cfg, dataset_of):
    """Expected negatives per row, written from the documented steps with python loops."""
    out = []
    for idx, ex in enumerate(rows):
        corpus = []  # distinct positives of the row's dataset, first-seen order
        for other in rows:
            if dataset_of(other) == dataset_of(ex) and other.positive not in corpus:
                corpus.append(other.positive)
        c_emb = model.encode(corpus)
        q = model.encode([ex.query])[0]
        p = model.encode([ex.positive])[0]
        pos = float(q @ p)
        ranked = sorted(range(len(corpus)), key=lambda c: -float(q @ c_emb[c]))
        kept = []
        for c in ranked:
            s = float(q @ c_emb[c])
            cos = float(torch.nn.functional.cosine_similarity(c_emb[c], p, dim=0))
            if corpus[c] == ex.positive or corpus[c] == ex.query:
                continue
            if cfg.max_score_ratio is not None and s > cfg.max_score_ratio * pos:
                continue
            if cfg.dedup_threshold is not None and cos > cfg.dedup_threshold:
                continue
            kept.append((corpus[c]["text"], s))
        window = kept[cfg.skip_top : cfg.skip_top + cfg.top_k]
        if cfg.sample == "random" and len(window) > cfg.num_negatives:
            rng = random.Random(cfg.seed * 1_000_003 + idx)
            window = [window[j] for j in sorted(rng.sample(range(len(window)), cfg.num_negatives))]
        out.append((pos, window[: cfg.num_negatives]))
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        MineConfig(num_negatives=3, top_k=5, max_score_ratio=None, dedup_threshold=None, teacher_scores=True),
        MineConfig(num_negatives=2, top_k=6, skip_top=2, sample="random", seed=3, teacher_scores=True),
        MineConfig(num_negatives=3, top_k=4, max_score_ratio=0.5, dedup_threshold=0.3, teacher_scores=True),
    ],
    ids=["plain", "window-random", "filters"],
)
def test_mined_rows_match_brute_force(model, data, tmp_path, cfg):
    cfg.block_size = 4  # several blocks, one of them partial
    report = mine_negatives(model, str(data), tmp_path / "mined.jsonl", cfg)
    rows = load_train_examples([str(data)])
    want = _brute_force(model, rows, cfg, lambda ex: ex.dataset)
    got = [json.loads(line) for line in (tmp_path / "mined.jsonl").read_text().splitlines()]
    assert len(got) == len(rows) == report.rows
    for row, ex, (pos, negs) in zip(got, rows, want):
        assert row["query"] == {"text": ex.query["text"]} and row["dataset"] == ex.dataset
        assert [n["text"] for n in row.get("negatives", [])] == [t for t, _ in negs]
        assert row["teacher_scores"] == pytest.approx([pos] + [s for _, s in negs], abs=1e-5)
    assert report.negatives == sum(len(n) for _, n in want)
    if cfg.dedup_threshold == 0.3:  # the "filters" case: both filters must have fired
        assert report.filtered["too_close"] > 0 and report.filtered["near_duplicate"] > 0
    # The mined file is valid training data, negatives from the row's own dataset only.
    mined = load_train_examples([str(tmp_path / "mined.jsonl")])
    fruit = {f"the {w}" for w in WORDS}
    for ex in mined:
        assert all((n["text"] in fruit) == (ex.dataset == "fruit") for n in ex.negatives)


def test_filters_are_counted_and_the_report_is_written(model, data, tmp_path):
    # A ratio below every positive-relative score drops almost everything as "too close".
    report = mine_negatives(model, str(data), tmp_path / "m.jsonl", MineConfig(num_negatives=2, top_k=4))
    on_disk = json.loads((tmp_path / "m.jsonl.report.json").read_text())
    assert on_disk["rows"] == report.rows == 17
    assert on_disk["filtered"]["positive"] == 17  # every positive is in its own corpus
    assert set(on_disk["scores"]) == {"positive", "negative", "margin"}
    assert not (tmp_path / "m.jsonl.partial").exists()


def test_faiss_and_torch_search_agree(model):
    items = [{"text": f"item {i}"} for i in range(40)]
    a, b = _Corpus(list(items), [None] * 40), _Corpus(list(items), [None] * 40)
    a.embed(model, 8)
    b.embed(model, 8)
    assert a.index is not None  # faiss-cpu is a test dependency
    b.index = None  # the fallback path
    q = model.encode([{"text": "item 7"}, {"text": "something else"}])
    (sa, ia), (sb, ib) = a.search(q, 10), b.search(q, 10)
    torch.testing.assert_close(sa, sb, atol=1e-5, rtol=1e-5)
    assert ia.tolist() == ib.tolist()


class _CrashAfter:
    """The real model, but its encode raises after ``n`` calls (an interrupted job)."""

    def __init__(self, model, n):
        self.model, self.n, self.config = model, n, model.config

    def encode(self, *args, **kwargs):
        self.n -= 1
        if self.n < 0:
            raise KeyboardInterrupt
        return self.model.encode(*args, **kwargs)

    def named_parameters(self):
        return self.model.named_parameters()


def test_an_interrupted_run_resumes_after_its_last_block(model, data, tmp_path):
    cfg = MineConfig(num_negatives=2, top_k=4, block_size=5, sample="random", teacher_scores=True)
    whole = mine_negatives(model, str(data), tmp_path / "whole.jsonl", cfg)
    # Corpus: 2 datasets (2 calls); each block: queries + positives (2 calls per dataset group).
    with pytest.raises(KeyboardInterrupt):
        mine_negatives(_CrashAfter(model, 2 + 2 + 2 + 1), str(data), tmp_path / "cut.jsonl", cfg)
    assert not (tmp_path / "cut.jsonl").exists()
    done = json.loads((tmp_path / "cut.jsonl.partial.json").read_text())["rows_done"]
    assert 0 < done < 17
    resumed = mine_negatives(model, str(data), tmp_path / "cut.jsonl", cfg)
    assert resumed.resumed_rows == done
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "whole.jsonl").read_text()
    assert resumed.negatives == whole.negatives and resumed.scores == whole.scores


def test_corpus_file_keep_existing_and_bad_settings(model, tmp_path):
    data = _write(
        tmp_path / "t.jsonl",
        [{"query": "q1", "positive": "p1", "negatives": ["own negative"]}, {"query": "q2", "positive": "p2"}],
    )
    corpus = _write(tmp_path / "c.jsonl", [{"id": str(i), "item": {"text": f"doc {i}"}} for i in range(6)])
    cfg = MineConfig(num_negatives=2, top_k=3, max_score_ratio=None, keep_existing=True, teacher_scores=True)
    mine_negatives(model, str(data), tmp_path / "o.jsonl", cfg, corpus=str(corpus))
    rows = load_train_examples([str(tmp_path / "o.jsonl")])
    assert rows[0].negatives[0] == {"text": "own negative"} and len(rows[0].negatives) == 3
    assert all(n["text"].startswith("doc ") for n in rows[0].negatives[1:] + rows[1].negatives)
    # The kept negative is scored too: one score per positive/negative, the schema's rule.
    q, own = model.encode([{"text": "q1"}, {"text": "own negative"}])
    assert rows[0].teacher_scores[1] == pytest.approx(float(q @ own), abs=1e-5)
    with pytest.raises(ValueError, match="num_negatives"):
        mine_negatives(model, str(data), tmp_path / "x.jsonl", MineConfig(num_negatives=5, top_k=3))


def test_cli_mines_and_the_output_trains_with_distillation(tiny_qwen2_vl_dir, data, tmp_path):
    out = tmp_path / "mined.jsonl"
    cmd = [sys.executable, "-m", "vlm2emb", "mine", "--model", str(tiny_qwen2_vl_dir), "--data", str(data)]
    cmd += ["--out", str(out), "--teacher-scores", "--num-negatives", "2", "--top-k", "4", "--no-cache"]
    cmd += ["--max-score-ratio", "-1", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mined 34 negatives for 17 rows" in proc.stdout
    bad = subprocess.run(
        [*cmd[:-9], "--out", str(tmp_path / "x"), "--top-k", "0"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "top_k must be >= 1" in bad.stderr

    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.loop import train

    cfg = load_recipe(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_qwen2_vl_dir}",
            f"data.train={out}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.loss=distill",
        ],
    )
    train(cfg, progress=False)
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_no_positive_of_a_query_is_mined_as_its_negative(model, tmp_path):
    rows = [{"query": "which are citrus?", "positives": ["lemon", "lime", "orange"]}]
    rows += [{"query": f"q {w}", "positive": w} for w in ["apple", "pear", "plum", "fig", "date"]]
    data = _write(tmp_path / "t.jsonl", rows)
    cfg = MineConfig(num_negatives=4, top_k=8, max_score_ratio=None, dedup_threshold=None)
    report = mine_negatives(model, str(data), tmp_path / "o.jsonl", cfg)
    mined = load_train_examples([str(tmp_path / "o.jsonl")])
    citrus = {"lemon", "lime", "orange"}
    assert len(mined) == 8
    for ex in mined[:3]:
        assert ex.positive["text"] in citrus
        negs = {n["text"] for n in ex.negatives}
        assert len(negs) == 4 and not negs & citrus  # 5 others exist: only they qualify
    assert report.filtered["positive"] == 3 * 3 + 5  # each citrus pair drops all 3; others 1


@pytest.mark.distributed
def test_two_process_mining_matches_one_process(tiny_qwen2_vl_dir, data, tmp_path):
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = ["mine", "--model", str(tiny_qwen2_vl_dir), "--data", str(data), "--teacher-scores", "--no-cache"]
    args += ["--num-negatives", "3", "--top-k", "6", "--max-score-ratio", "-1", "--block-size", "5"]
    one = subprocess.run(
        [sys.executable, "-m", "vlm2emb", *args, "--out", str(tmp_path / "one.jsonl")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    env = launch_env()
    launch = [*accelerate_launch("ddp"), "-m", "vlm2emb"]
    two = subprocess.run(
        [*launch, *args, "--out", str(tmp_path / "two.jsonl")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=repo,
    )
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert two.stdout.count("mined ") == 1  # only the main process reports
    rows1 = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().splitlines()]
    rows2 = [json.loads(x) for x in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert len(rows1) == len(rows2) == 17
    for a, b in zip(rows1, rows2):
        assert a["negatives"] == b["negatives"]
        assert a["teacher_scores"] == pytest.approx(b["teacher_scores"], abs=1e-5)
