"""Eval suites on the tiny model: corpus + qrels, MMEB layout, meta-task averages, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.schema import DataError
from vlm2emb.eval import evaluate
from vlm2emb.eval.cache import CachedEncoder, data_fingerprint, model_fingerprint
from vlm2emb.eval.corpus import evaluate_corpus, load_corpus_task, read_qrels
from vlm2emb.eval.demo_suite import write_demo_suite
from vlm2emb.eval.harness import load_suite_tasks, run_suite
from vlm2emb.eval.mmeb import load_local_rows, strip_image_placeholder
from vlm2emb.eval.suite import load_suite

T2I = "Find the image that matches the caption."


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_suite(tmp_path_factory.mktemp("suite"))


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


def reference_metrics(scores: np.ndarray, relevant: list[set[int]], k: int) -> dict[str, float]:
    """Plain-loop hit@1, recall@k, ndcg@k, mrr with relevant items ranked last among ties."""
    hit1, recall, ndcg, mrr = [], [], [], []
    for q, rel in enumerate(relevant):
        # Sort by (-score, relevant last, index): pessimistic ties.
        order = sorted(range(scores.shape[1]), key=lambda c: (-scores[q, c], c in rel, c))
        ranks = [order.index(c) + 1 for c in rel]
        hit1.append(float(min(ranks) == 1))
        recall.append(sum(r <= k for r in ranks) / len(rel))
        dcg = sum(1 / np.log2(r + 1) for r in ranks if r <= k)
        ideal = sum(1 / np.log2(i + 2) for i in range(min(len(rel), k)))
        ndcg.append(dcg / ideal)
        mrr.append(1 / min(ranks))
    return {
        "hit@1": np.mean(hit1),
        f"recall@{k}": np.mean(recall),
        f"ndcg@{k}": np.mean(ndcg),
        "mrr": np.mean(mrr),
    }


def test_corpus_task_matches_a_plain_recomputation(suite_file: Path, model: EmbeddingModel) -> None:
    root = suite_file.parent
    task = load_corpus_task(str(root / "corpus.jsonl"), str(root / "queries.jsonl"), str(root / "qrels.tsv"))
    assert len(task.corpus_ids) == 300 and len(task.query_ids) == 10
    assert all(len(rel) == 30 for rel in task.qrels.values())  # 30 relevant images per caption
    got = evaluate_corpus(model, task, ks=(1, 10), query_instruction=T2I)
    assert got["n"] == 10 and got["corpus_size"] == 300 and got["n_skipped"] == 0

    docs = model.encode(task.corpus_items).numpy()
    queries = model.encode(task.query_items, instruction=T2I).numpy()
    scores = queries @ docs.T  # embeddings are unit length: cosine
    index = {cid: i for i, cid in enumerate(task.corpus_ids)}
    relevant = [{index[c] for c in task.qrels[q]} for q in task.query_ids]
    want = reference_metrics(scores, relevant, k=10)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name
    assert got["recall@10"] <= 10 / 30 + 1e-9  # 30 relevant, only 10 slots


def test_mmeb_rows_strip_placeholders_and_match_canonical_rows(
    suite_file: Path, model: EmbeddingModel
) -> None:
    assert strip_image_placeholder("<|image_1|>\nRepresent the given image.") == "Represent the given image."
    assert strip_image_placeholder("<|image_1|>") is None
    root = suite_file.parent
    mmeb = load_local_rows([str(root / "t2i_mmeb.jsonl")], query_instruction=T2I)  # format detected
    assert len(mmeb) == 100
    first = mmeb[0]
    assert first["positive"] == [0] and first["instruction"] == T2I
    # The marker stays in the item; the vlm2emb prompt style removes it when rendering.
    assert first["candidates"][0]["text"] == "<|image_1|>" and first["layout"] == "mmeb"
    assert (
        model.render(first["candidates"][0]).prompt
        == model.render({"images": first["candidates"][0]["images"]}).prompt
    )
    assert Path(first["candidates"][0]["images"][0]).is_file()  # resolved against the file
    # The same rows in the canonical schema give exactly the same metrics.
    canonical = load_local_rows([str(root / "eval.jsonl")])
    t2i = [{**r, "task": "t"} for r in canonical if r["query"].get("text")]
    assert any(r["positive"] != [0] for r in t2i)  # the conversion moved positives first
    via_mmeb = evaluate(model, [{**r, "task": "t"} for r in mmeb])["tasks"]["t"]
    via_canonical = evaluate(model, t2i)["tasks"]["t"]
    assert via_mmeb == via_canonical


def test_suite_report_has_meta_task_averages_and_headline_scores(
    suite_file: Path, model: EmbeddingModel, tmp_path: Path
) -> None:
    suite = load_suite(suite_file)
    report = run_suite(model, suite, cache_dir=None)
    tasks = report["tasks"]
    assert list(tasks) == ["digits-i2t", "digits-t2i-mmeb", "digits-corpus"]
    assert tasks["digits-corpus"]["score"] == tasks["digits-corpus"]["ndcg@10"]  # its own headline
    assert tasks["digits-i2t"]["score"] == tasks["digits-i2t"]["hit@1"]
    retrieval = report["meta_tasks"]["retrieval"]
    assert retrieval["n_tasks"] == 2
    assert retrieval["score"] == pytest.approx(
        (tasks["digits-t2i-mmeb"]["score"] + tasks["digits-corpus"]["score"]) / 2
    )
    assert report["average"]["score"] == pytest.approx(np.mean([t["score"] for t in tasks.values()]))
    # The local task equals evaluate() on the same rows.
    rows = load_local_rows([str(suite_file.parent / "i2t.jsonl")])
    direct = evaluate(model, [{**r, "task": "digits-i2t"} for r in rows])["tasks"]["digits-i2t"]
    assert {k: tasks["digits-i2t"][k] for k in direct} == direct


def test_second_run_is_served_from_the_cache(suite_file: Path, model: EmbeddingModel, tmp_path: Path) -> None:
    suite = load_suite(suite_file)
    loaded = load_suite_tasks(suite)
    first = run_suite(model, suite, loaded=loaded, cache_dir=tmp_path)
    assert first["cache"]["misses"] > 0 and first["cache"]["items_encoded"] > 0
    files = sorted(tmp_path.glob("*/*.safetensors"))
    assert len(files) == first["cache"]["misses"]
    assert [f.parent.name for f in files] == [model_fingerprint(model)] * len(files)

    calls: list[int] = []
    real_encode = model.encode

    def counting_encode(items, *args, **kwargs):  # a spy around the real encode
        calls.append(len(items))
        return real_encode(items, *args, **kwargs)

    model.encode = counting_encode
    try:
        second = run_suite(model, suite, loaded=loaded, cache_dir=tmp_path)
    finally:
        del model.encode
    assert calls == []  # the model never ran
    assert second["cache"]["misses"] == 0 and second["cache"]["items_encoded"] == 0
    assert second["cache"]["hits"] == first["cache"]["hits"] + first["cache"]["misses"]
    assert second["tasks"] == first["tasks"]
    # A cached file holds exactly what the model computes for those items.
    rows = loaded[0]
    queries = [r["query"] for r in rows]
    distinct = list({json.dumps(q, sort_keys=True): q for q in queries}.values())
    cached = load_file(
        str(tmp_path / model_fingerprint(model) / f"{data_fingerprint(distinct, None)}.safetensors")
    )
    torch.testing.assert_close(cached["embeddings"], model.encode(distinct))


def test_model_fingerprint_follows_the_weights(model: EmbeddingModel) -> None:
    key = model_fingerprint(model)
    assert model_fingerprint(model) == key
    with torch.no_grad():
        param = next(model.parameters())
        param[0].add_(1e-3)
        try:
            assert model_fingerprint(model) != key
        finally:
            param[0].sub_(1e-3)
    model.config.pooling = "mean"
    try:
        assert model_fingerprint(model) != key  # settings change embeddings too
    finally:
        model.config.pooling = "last"
    assert data_fingerprint(["a"], None) != data_fingerprint(["a"], "instr")


def test_cached_encoder_without_a_cache_dir_just_encodes(model: EmbeddingModel) -> None:
    enc = CachedEncoder(model, None)
    torch.testing.assert_close(enc.encode(["a b", "c"]), model.encode(["a b", "c"]))
    assert enc.stats.misses == 1 and enc.stats.hits == 0


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_suite_errors_name_the_file_and_key(suite_file: Path, tmp_path: Path) -> None:
    root = suite_file.parent
    bad = write(
        tmp_path / "s.yaml", f"tasks:\n  - name: a\n    data: {root / 'i2t.jsonl'}\n    metrc: hit@1\n"
    )
    with pytest.raises(DataError, match=r"s\.yaml: tasks\[0\]: unknown key 'metrc'"):
        load_suite(bad)
    bad = write(tmp_path / "s2.yaml", "tasks:\n  - name: a\n    kind: global\n")
    with pytest.raises(DataError, match="'kind' is 'global'"):
        load_suite(bad)
    bad = write(tmp_path / "s3.yaml", "tasks:\n  - name: a\n    kind: corpus\n    corpus: c.jsonl\n")
    with pytest.raises(DataError, match="needs 'queries'"):
        load_suite(bad)
    bad = write(tmp_path / "s4.yaml", "metric: hit@3\ntasks:\n  - name: a\n    data: x.jsonl\n")
    with pytest.raises(DataError, match="'metric' 'hit@3' is not one of"):
        load_suite(bad)
    bad = write(tmp_path / "s5.yaml", "taks: []\n")
    with pytest.raises(DataError, match="unknown key 'taks'"):
        load_suite(bad)


def test_qrels_and_mmeb_row_errors(suite_file: Path, tmp_path: Path) -> None:
    root = suite_file.parent
    qrels = write(tmp_path / "q.tsv", "digit0\timg0\t1\ndigit0\timg999\t1\n")
    with pytest.raises(DataError, match=r"q\.tsv:2: corpus id 'img999' is not in"):
        load_corpus_task(str(root / "corpus.jsonl"), str(root / "queries.jsonl"), str(qrels))
    qrels = write(tmp_path / "q2.jsonl", '{"query_id": "nobody", "corpus_id": "img0"}\n')
    with pytest.raises(DataError, match=r"q2\.jsonl:1: query id 'nobody' is not in"):
        load_corpus_task(str(root / "corpus.jsonl"), str(root / "queries.jsonl"), str(qrels))
    with pytest.raises(DataError, match=r"q3\.tsv:2: relevance 'high' is not a number"):
        read_qrels(str(write(tmp_path / "q3.tsv", "a\tb\t1\na\tc\thigh\n")))
    assert read_qrels(str(write(tmp_path / "q4.tsv", "query-id\tcorpus-id\tscore\na\tb\t2\n")))[0][:3] == (
        "a",
        "b",
        2.0,
    )
    mmeb = write(
        tmp_path / "m.jsonl",
        '{"qry_text": "x", "qry_img_path": "", "tgt_text": ["a", "b"], "tgt_img_path": ["", "", ""]}\n',
    )
    with pytest.raises(DataError, match=r"m\.jsonl:1: 'tgt_text' has 2 entries but 'tgt_img_path' has 3"):
        load_local_rows([str(mmeb)])
    mmeb = write(tmp_path / "m2.jsonl", '{"qry_text": "x", "tgt_text": ["a"]}\n')
    with pytest.raises(DataError, match=r"m2\.jsonl:1: missing field 'tgt_img_path'"):
        load_local_rows([str(mmeb)])


def test_cli_eval_suite_and_cache(
    suite_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache = tmp_path / "cache"
    argv = ["eval", "--model", "tiny:qwen2_vl", "--suite", str(suite_file), "--cache-dir", str(cache)]
    assert main([*argv, "--out", str(tmp_path / "r1.json")]) == 0
    out = capsys.readouterr().out
    assert "meta-task" in out and "classification" in out and "embedding cache:" in out
    assert main([*argv, "--out", str(tmp_path / "r2.json")]) == 0
    assert "0 misses" in capsys.readouterr().out
    r1, r2 = (json.loads((tmp_path / f"r{i}.json").read_text()) for i in (1, 2))
    assert r2["cache"]["items_encoded"] == 0 and r1["cache"]["items_encoded"] > 0
    assert r1["tasks"] == r2["tasks"] and set(r1["meta_tasks"]) == {"classification", "retrieval"}
    # User errors: exit status 2 and one line naming the file.
    bad = write(tmp_path / "bad.yaml", "tasks:\n  - name: a\n    data: nowhere.jsonl\n")
    assert main(["eval", "--model", "tiny:qwen2_vl", "--suite", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere.jsonl" in err[0]


def test_the_mmeb_v1_example_suite_lists_36_tasks_in_4_meta_tasks() -> None:
    suite = load_suite(Path(__file__).resolve().parents[2] / "examples" / "mmeb_v1_suite.yaml")
    assert len(suite.tasks) == 36
    counts = {
        m: sum(t.meta_task == m for t in suite.tasks)
        for m in ("classification", "vqa", "retrieval", "grounding")
    }
    assert counts == {"classification": 10, "vqa": 10, "retrieval": 12, "grounding": 4}
    assert all(t.format == "mmeb" and t.metric == "hit@1" for t in suite.tasks)
    assert all(t.media_root and t.media_root.endswith("eval_images") for t in suite.tasks)


class RecordingModel:
    """The real tiny model, recording the instruction of every encode call and its texts."""

    def __init__(self, model: EmbeddingModel) -> None:
        self.model = model
        self.config = model.config
        self.calls: list[tuple[str | None, list[str | None]]] = []

    def encode(self, items, instruction=None, **kwargs):
        self.calls.append((instruction, [i.get("text") if isinstance(i, dict) else i for i in items]))
        return self.model.encode(items, instruction=instruction, **kwargs)


def _mixed_suite(
    suite_file: Path, tmp_path: Path, extra: str = "", tasks: tuple[str, ...] = ("mmeb", "canonical")
) -> Path:
    """A suite of 20 MMEB-layout rows and 20 canonical rows without their own instruction."""
    root = suite_file.parent
    lines = {
        "mmeb": (root / "t2i_mmeb.jsonl").read_text().splitlines()[:20],
        "canonical": [
            json.dumps({k: v for k, v in json.loads(line).items() if k != "instruction"})
            for line in (root / "i2t.jsonl").read_text().splitlines()[:20]
        ],
    }
    for name, rows in lines.items():  # next to the demo's images (relative paths)
        (root / f"mini_{name}.jsonl").write_text("\n".join(rows) + "\n")
    body = "".join(f"  - name: {t}\n    data: {root / f'mini_{t}.jsonl'}\n" for t in tasks)
    return write(tmp_path / "mixed.yaml", f"{extra}tasks:\n{body}")


def test_mmeb_rows_get_no_model_instruction_unless_the_suite_asks(
    suite_file: Path, model: EmbeddingModel, tmp_path: Path
) -> None:
    """The documented behaviour: MMEB rows carry their instruction in the text; the model's
    saved instructions (run_suite's defaults, as the CLI passes them) do not apply to them."""

    def instructions(task: str, extra: str = "") -> set[str | None]:
        recorder = RecordingModel(model)
        suite = load_suite(_mixed_suite(suite_file, tmp_path, extra, (task,)))
        run_suite(recorder, suite, default_query_instruction="MODEL-Q", default_target_instruction="MODEL-T")
        return {instruction for instruction, _ in recorder.calls}

    assert instructions("mmeb") == {None}  # got MODEL-Q before
    assert instructions("canonical") == {"MODEL-Q", "MODEL-T"}
    always = "instruction_fallback: always\n"
    assert instructions("mmeb", always) == {"MODEL-Q", "MODEL-T"}
    assert instructions("canonical", "instruction_fallback: never\n") == {None}
    bad = _mixed_suite(suite_file, tmp_path, "instruction_fallback: sometimes\n")
    with pytest.raises(DataError, match=r"mixed\.yaml: 'instruction_fallback' is 'sometimes'; choose one of"):
        load_suite(bad)


def test_cli_eval_leaves_mmeb_rows_without_the_saved_instruction(
    suite_file: Path, tmp_path: Path, model: EmbeddingModel
) -> None:
    saved = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    saved.config.query_instruction = "Represent the given image for classification."
    saved.config.target_instruction = "Represent the given image."
    path = saved.save_pretrained(tmp_path / "with-instructions")
    suite = _mixed_suite(suite_file, tmp_path)
    argv = ["eval", "--model", str(path), "--suite", str(suite), "--no-cache"]
    assert main([*argv, "--out", str(tmp_path / "auto.json")]) == 0
    assert main([*argv, "--instruction-fallback", "always", "--out", str(tmp_path / "always.json")]) == 0
    auto, always = (json.loads((tmp_path / f"{n}.json").read_text())["tasks"] for n in ("auto", "always"))
    plain = run_suite(saved, load_suite(suite))["tasks"]  # no defaults at all
    assert auto["mmeb"]["mrr"] == plain["mmeb"]["mrr"]
    assert always["mmeb"]["mrr"] != plain["mmeb"]["mrr"]  # the fallback is there when asked for
    assert auto["canonical"]["mrr"] == always["canonical"]["mrr"]


def test_suite_prompt_style_is_used_for_the_run_and_restored(suite_file: Path, tmp_path: Path) -> None:
    mine = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    theirs = EmbeddingModel.from_pretrained("tiny:qwen2_vl", prompt_style="vlm2vec")
    styled = load_suite(_mixed_suite(suite_file, tmp_path, "prompt_style: vlm2vec\n"))
    assert styled.prompt_style == "vlm2vec"
    got = run_suite(CachedEncoder(mine, tmp_path / "cache"), styled)["tasks"]
    want = run_suite(theirs, load_suite(_mixed_suite(suite_file, tmp_path)))["tasks"]
    assert got["mmeb"]["mrr"] == pytest.approx(want["mmeb"]["mrr"])
    assert mine.config.prompt_style == "vlm2emb"
    default = run_suite(mine, load_suite(_mixed_suite(suite_file, tmp_path)))["tasks"]
    assert default["mmeb"]["mrr"] != got["mmeb"]["mrr"]
    bad = _mixed_suite(suite_file, tmp_path, "prompt_style: vlm3vec\n")
    with pytest.raises(DataError, match=r"mixed\.yaml: prompt_style: unknown prompt style 'vlm3vec'"):
        load_suite(bad)


def test_the_demo_suite_resolves_like_a_file(tmp_path, monkeypatch) -> None:
    from vlm2emb.data.errors import DataError as DemoError
    from vlm2emb.eval.suite import load_suite as load

    monkeypatch.setenv("VLM2EMB_CACHE", str(tmp_path))
    suite = load("demo:study/suite")
    assert [t.meta_task for t in suite.tasks] == ["classification", "vqa", "retrieval", "grounding"]
    assert all(Path(t.data[0]).is_file() and tmp_path in Path(t.data[0]).parents for t in suite.tasks)
    with pytest.raises(DemoError, match="not a suite"):
        load("demo:digits/train")
