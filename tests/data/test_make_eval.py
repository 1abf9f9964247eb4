"""`vlm2emb data make-eval`: held-out training rows become evaluation rows that pass
`vlm2emb data check --eval` and run through `vlm2emb eval`; no answer is trained on or
offered as a wrong candidate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vlm2emb.cli import main
from vlm2emb.data.demo import write_digits
from vlm2emb.data.errors import DataError
from vlm2emb.data.make_eval import make_eval


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def key(item: dict, root: Path) -> str:
    """An item with its media as absolute paths (the input's are relative to its folder)."""
    item = {("images" if k == "image" else k): v for k, v in item.items()}
    if "images" in item:
        paths = item["images"] if isinstance(item["images"], list) else [item["images"]]
        item["images"] = [str((root / p).resolve()) for p in paths]
    return json.dumps(item, sort_keys=True)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_digits(tmp_path_factory.mktemp("digits"))
    # 600 of the 2,994 demo rows keep the test fast; both directions (i2t and t2i) stay in.
    lines = (root / "train.jsonl").read_text().splitlines()[:600]
    (root / "some.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_held_out_rows_become_honest_eval_rows(digits: Path) -> None:
    source = read(digits / "some.jsonl")
    result = make_eval(
        str(digits / "some.jsonl"), digits / "ev.jsonl", digits / "tr.jsonl", rows=50, candidates=6, seed=3
    )
    ev, tr = read(digits / "ev.jsonl"), read(digits / "tr.jsonl")
    assert result.eval_rows == len(ev) == 50 and result.train_rows == len(tr)
    assert result.per_task == {t: sum(r["task"] == t for r in ev) for t in ("digits-i2t", "digits-t2i")}
    assert set(result.per_task) == {"digits-i2t", "digits-t2i"}  # both datasets sampled

    # Every answer each (query, instruction) has in the input, recomputed from the raw rows.
    answers: dict[tuple[str, str], set[str]] = {}
    for r in source:
        answers.setdefault((key(r["query"], digits), r["instruction"]), set()).add(key(r["positive"], digits))
    pairs = {(key(r["query"], digits), r["instruction"], key(r["positive"], digits)) for r in source}
    held_pairs = set()
    for row in ev:
        q = (key(row["query"], digits), row["instruction"])
        cands = [key(c, digits) for c in row["candidates"]]
        assert len(cands) == 6 and len(set(cands)) == 6  # distinct candidates, as many as asked
        pos = row["positive"]
        assert isinstance(pos, int)
        assert (*q, cands[pos]) in pairs  # the marked candidate is this query's positive in the input
        # No distractor is an answer of the query anywhere in the input (a t2i query such as
        # "a handwritten digit three" has ~60 correct images).
        assert not any(c in answers[q] for i, c in enumerate(cands) if i != pos)
        held_pairs.add((*q, cands[pos]))
        # Paths are relative: the outputs are in the data's folder.
        for c in [row["query"], *row["candidates"]]:
            assert all(not Path(p).is_absolute() for p in c.get("images", []))
    # Positives are not always first (a tie-breaking model would look perfect).
    assert len({row["positive"] for row in ev}) > 1
    # Training rows: the input less the held-out rows, less copies of a held-out pair.
    train_pairs = [(key(r["query"], digits), r["instruction"], key(r["positive"], digits)) for r in tr]
    assert not held_pairs & set(train_pairs)
    assert len(tr) + 50 + result.dropped_train_rows == len(source)
    assert {(r["dataset"]) for r in tr} == {"digits-i2t", "digits-t2i"}

    # Seeded: the same seed writes the same bytes, another seed another sample.
    first = (digits / "ev.jsonl").read_bytes()
    make_eval(
        str(digits / "some.jsonl"), digits / "ev2.jsonl", digits / "tr2.jsonl", rows=50, candidates=6, seed=3
    )
    assert (digits / "ev2.jsonl").read_bytes() == first
    make_eval(
        str(digits / "some.jsonl"), digits / "ev3.jsonl", digits / "tr3.jsonl", rows=50, candidates=6, seed=4
    )
    assert (digits / "ev3.jsonl").read_bytes() != first


def test_cli_output_passes_data_check_and_runs_through_eval(
    digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "elsewhere"  # another folder: media paths become absolute
    argv = ["data", "make-eval", str(digits / "some.jsonl"), "--eval-out", str(out / "eval.jsonl")]
    argv += ["--train-out", str(out / "train.jsonl"), "--rows", "24", "--candidates", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "wrote 24 evaluation rows" in printed and "training rows" in printed
    row = read(out / "eval.jsonl")[0]
    assert all(Path(p).is_absolute() for c in [row["query"], *row["candidates"]] for p in c.get("images", []))
    assert main(["data", "check", "--eval", str(out / "eval.jsonl")]) == 0
    assert main(["data", "check", str(out / "train.jsonl"), "--model", "none"]) == 0
    assert "24 rows: 24 good, 0 bad" in capsys.readouterr().out
    report_path = tmp_path / "report.json"
    argv = ["eval", "--model", "tiny:qwen2_vl", "--data", str(out / "eval.jsonl"), "--no-cache"]
    assert main([*argv, "--out", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    tasks = report["tasks"]
    assert set(tasks) <= {"digits-i2t", "digits-t2i"} and sum(t["n"] for t in tasks.values()) == 24
    assert all(0.0 <= t["hit@1"] <= 1.0 for t in tasks.values())


def test_several_positives_are_all_marked_and_never_distractors(tmp_path: Path) -> None:
    rows = [{"query": "q0", "positives": ["a0", "b0"], "dataset": "d"}]
    rows += [{"query": f"q{i}", "positive": f"a{i}", "dataset": "d"} for i in range(1, 12)]
    rows += [{"query": "q0", "positive": "c0", "dataset": "d"}]  # a third answer of q0, another row
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for seed in range(5):
        make_eval(
            str(tmp_path / "t.jsonl"),
            tmp_path / "e.jsonl",
            tmp_path / "r.jsonl",
            rows=12,
            candidates=4,
            seed=seed,
        )
        for row in read(tmp_path / "e.jsonl"):
            texts = [c["text"] for c in row["candidates"]]
            pos = row["positive"] if isinstance(row["positive"], list) else [row["positive"]]
            if row["query"] == {"text": "q0"} and len(pos) == 2:
                assert sorted(texts[p] for p in pos) == ["a0", "b0"]
            if row["query"] == {"text": "q0"}:
                assert not {"a0", "b0", "c0"} & {t for i, t in enumerate(texts) if i not in pos}
    # The row with two positives stays one training row when not held out.
    for seed in range(20):
        make_eval(
            str(tmp_path / "t.jsonl"),
            tmp_path / "e.jsonl",
            tmp_path / "r.jsonl",
            rows=1,
            candidates=2,
            seed=seed,
        )
        if read(tmp_path / "e.jsonl")[0]["query"] != {"text": "q0"}:
            break
    assert read(tmp_path / "e.jsonl")[0]["query"] != {"text": "q0"}
    left = read(tmp_path / "r.jsonl")
    assert {"query": {"text": "q0"}, "positives": [{"text": "a0"}, {"text": "b0"}], "dataset": "d"} in left


def test_bad_input_names_the_row_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [json.dumps({"query": f"q{i}", "positive": f"p{i}"}) for i in range(5)]
    (tmp_path / "bad.jsonl").write_text("\n".join([*good[:3], '{"query": "q"}', *good[3:]]) + "\n")
    argv = ["data", "make-eval", str(tmp_path / "bad.jsonl"), "--eval-out", str(tmp_path / "e.jsonl")]
    assert main([*argv, "--train-out", str(tmp_path / "r.jsonl"), "--rows", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:4" in err[0] and "positive" in err[0]
    assert not (tmp_path / "e.jsonl").exists() and not (tmp_path / "r.jsonl").exists()

    (tmp_path / "ok.jsonl").write_text("\n".join(good) + "\n")
    with pytest.raises(DataError, match="leaves no training rows"):
        make_eval(str(tmp_path / "ok.jsonl"), tmp_path / "e.jsonl", tmp_path / "r.jsonl", rows=5)
    with pytest.raises(DataError, match="overwrite the input"):
        make_eval(str(tmp_path / "ok.jsonl"), tmp_path / "e.jsonl", tmp_path / "ok.jsonl", rows=2)
    with pytest.raises(ValueError, match="--candidates"):
        make_eval(
            str(tmp_path / "ok.jsonl"), tmp_path / "e.jsonl", tmp_path / "r.jsonl", rows=2, candidates=1
        )
