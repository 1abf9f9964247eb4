"""Tests for vlm2emb.data.schema: reading and validating training and evaluation files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from vlm2emb.data.schema import DataError, load_eval_examples, load_train_examples


def write_png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, value, value)).save(path)
    return path


def write_jsonl(path: Path, rows: list[Any], *, raw_lines: dict[int, str] | None = None) -> Path:
    """Writes rows as JSON lines; ``raw_lines`` replaces line N (1-based) with a raw string."""
    lines = [json.dumps(r) for r in rows]
    for lineno, text in (raw_lines or {}).items():
        lines[lineno - 1] = text
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def good_train_row(text: str = "a caption") -> dict[str, Any]:
    return {"query": {"text": text}, "positive": {"text": text + " (positive)"}}


def good_eval_row() -> dict[str, Any]:
    return {"query": {"text": "q"}, "candidates": [{"text": "a"}, {"text": "b"}], "positive": 1}


def assert_error(exc: pytest.ExceptionInfo[DataError], path: Path, lineno: int, *reason: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"{path}:{lineno}:" in msg, msg
    for part in reason:
        assert part in msg, msg


# --------------------------------------------------------------------------- happy paths


def test_relative_image_paths_resolve_against_the_file_folder(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    img = write_png(data_dir / "imgs" / "a.png")
    rows = [
        {"query": {"image": "imgs/a.png"}, "positive": {"text": "seven"}, "dataset": "mine"},
        {"query": {"text": "seven"}, "positive": {"images": ["imgs/a.png"]}, "instruction": "Find it."},
    ]
    path = write_jsonl(data_dir / "train.jsonl", rows)
    # Load from another working directory: resolution must not depend on the cwd.
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        examples = load_train_examples([str(path)])
    finally:
        os.chdir(cwd)
    assert len(examples) == 2
    first, second = examples
    assert first.query == {"text": None, "images": [str(img.resolve())]}
    assert first.positive == {"text": "seven"}
    assert first.dataset == "mine"
    assert first.instruction is None
    assert first.source == f"{path}:1"
    assert second.positive["images"] == [str(img.resolve())]
    assert second.instruction == "Find it."
    assert second.dataset == "train"  # defaults to the file's stem
    assert second.source == f"{path}:2"


def test_media_root_replaces_the_file_folder(tmp_path: Path) -> None:
    media = tmp_path / "media"
    img = write_png(media / "x.png")
    path = write_jsonl(tmp_path / "train.jsonl", [{"query": {"image": "x.png"}, "positive": "text"}])
    # Without media_root the image is looked up next to the data file and missing there.
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)])
    assert_error(exc, path, 1, "not found")
    (ex,) = load_train_examples([str(path)], media_root=media)
    assert ex.query["images"] == [str(img.resolve())]
    # A bare string item is text.
    assert ex.positive == {"text": "text"}


def test_absolute_image_paths_are_allowed_outside_the_folder(tmp_path: Path) -> None:
    img = write_png(tmp_path / "elsewhere" / "a.png")
    (tmp_path / "data").mkdir()
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [{"query": {"image": str(img)}, "positive": "p"}])
    (ex,) = load_train_examples([str(path)])
    assert ex.query["images"] == [str(img.resolve())]


def test_eval_rows_load_with_positive_index_and_task(tmp_path: Path) -> None:
    write_png(tmp_path / "c.png")
    rows = [
        {
            "query": {"text": "which one"},
            "candidates": [{"text": "a"}, {"image": "c.png"}],
            "positive": 1,
            "task": "t1",
            "instruction": "Pick.",
        },
        {"query": "q2", "candidates": ["a", "b", "c"], "positive": [0, 2]},
    ]
    path = write_jsonl(tmp_path / "ev.jsonl", rows)
    first, second = load_eval_examples([str(path)])
    assert first.positive == [1]
    assert first.task == "t1"
    assert first.instruction == "Pick."
    assert first.candidates[1]["images"] == [str((tmp_path / "c.png").resolve())]
    assert second.positive == [0, 2]
    assert second.task == "ev"
    assert [c["text"] for c in second.candidates] == ["a", "b", "c"]
    row = first.as_row()
    assert row["positive"] == [1]
    assert row["task"] == "t1"


def test_several_files_are_concatenated_in_order(tmp_path: Path) -> None:
    a = write_jsonl(tmp_path / "a.jsonl", [good_train_row("a1"), good_train_row("a2")])
    b = write_jsonl(tmp_path / "b.jsonl", [good_train_row("b1")])
    examples = load_train_examples([str(a), str(b)])
    assert [ex.query["text"] for ex in examples] == ["a1", "a2", "b1"]
    assert [ex.dataset for ex in examples] == ["a", "a", "b"]


def test_max_negatives_caps_negatives(tmp_path: Path) -> None:
    row = {**good_train_row(), "negatives": [{"text": f"n{i}"} for i in range(5)]}
    path = write_jsonl(tmp_path / "t.jsonl", [row, good_train_row()])
    full, no_negs = load_train_examples([str(path)])
    assert len(full.negatives) == 5
    assert no_negs.negatives == []
    (capped, _) = load_train_examples([str(path)], max_negatives=2)
    assert [n["text"] for n in capped.negatives] == ["n0", "n1"]
    (none, _) = load_train_examples([str(path)], max_negatives=0)
    assert none.negatives == []


def test_teacher_scores_load_and_follow_max_negatives(tmp_path: Path) -> None:
    row = {**good_train_row(), "negatives": [{"text": "n0"}, {"text": "n1"}], "teacher_scores": [3, 2.5, 1]}
    path = write_jsonl(tmp_path / "t.jsonl", [row, good_train_row()])
    scored, unscored = load_train_examples([str(path)])
    assert scored.teacher_scores == [3.0, 2.5, 1.0] and unscored.teacher_scores is None
    (capped, _) = load_train_examples([str(path)], max_negatives=1)
    assert capped.teacher_scores == [3.0, 2.5]  # still one score per kept item


def test_max_negatives_skips_validation_of_dropped_negatives(tmp_path: Path) -> None:
    # Negatives beyond the cap are never used, so a bad one there does not stop loading.
    row = {**good_train_row(), "negatives": [{"text": "ok"}, {"image": "missing.png"}]}
    path = write_jsonl(tmp_path / "t.jsonl", [row])
    (ex,) = load_train_examples([str(path)], max_negatives=1)
    assert ex.negatives == [{"text": "ok"}]
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)])
    assert_error(exc, path, 1, "negatives[1]", "not found")


def test_blank_lines_are_skipped_and_still_counted(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    lines = [json.dumps(good_train_row("first")), "", "   ", json.dumps(good_train_row("second")), "{bad"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)])
    assert_error(exc, path, 5, "malformed JSON")
    path.write_text("\n".join(lines[:4]) + "\n\n", encoding="utf-8")
    first, second = load_train_examples([str(path)])
    assert first.source.endswith(":1")
    assert second.source == f"{path}:4"
    assert second.query["text"] == "second"


# --------------------------------------------------------------------------- parquet


def test_parquet_rows_with_text_and_image_paths(tmp_path: Path) -> None:
    from datasets import Dataset

    img = write_png(tmp_path / "imgs" / "p.png", value=200)
    # Dataset.from_list takes its columns from the first row, so the full row goes first;
    # the second row's absent fields become Arrow nulls.
    rows = [
        {
            "query": {"image": "imgs/p.png"},
            "positive": {"text": "a grey square"},
            "negatives": [{"text": "a red circle"}],
            "instruction": "Describe.",
        },
        {"query": {"text": "plain text"}, "positive": {"text": "answer"}},
    ]
    path = tmp_path / "train.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    first, second = load_train_examples([str(path)])
    assert first.query["images"] == [str(img.resolve())]
    assert first.negatives == [{"text": "a red circle"}]
    assert first.instruction == "Describe."
    assert first.source == f"{path}:1"
    # Nulls read back as absent fields, not as None values.
    assert second.query == {"text": "plain text"}
    assert second.negatives == []
    assert second.instruction is None
    assert second.source == f"{path}:2"


def test_parquet_eval_rows_and_row_numbers_in_errors(tmp_path: Path) -> None:
    from datasets import Dataset

    rows = [good_eval_row(), {**good_eval_row(), "positive": 5}]
    path = tmp_path / "ev.parquet"
    Dataset.from_list(rows).to_parquet(str(path))
    with pytest.raises(DataError) as exc:
        load_eval_examples([str(path)])
    assert_error(exc, path, 2, "out of range")
    Dataset.from_list(rows[:1]).to_parquet(str(path))
    (ex,) = load_eval_examples([str(path)])
    assert ex.positive == [1]
    assert [c["text"] for c in ex.candidates] == ["a", "b"]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({"query": {"image": "nope.png"}, "positive": "p"}, ("query.image", "file not found")),
        ({"positive": "p"}, ("missing field 'query'",)),
        ({"query": "q"}, ("missing field 'positive'",)),
        (["q", "p"], ("must be a JSON object", "list")),
        ({**good_train_row(), "label": 3}, ("unknown field", "'label'")),
        ({"query": {"image": "../x.png"}, "positive": "p"}, ("escapes the media root",)),
        ({"query": {}, "positive": "p"}, ("query is empty",)),
        ({"query": {"text": ""}, "positive": "p"}, ("query is empty",)),
        ({"query": "q", "positive": {"caption": "p"}}, ("positive has unknown key", "caption")),
        ({"query": "q", "positive": "p", "negatives": "n"}, ("negatives must be a list",)),
        ({"query": 3, "positive": "p"}, ("query must be an object",)),
        ({"query": {"text": 3}, "positive": "p"}, ("query.text must be a string",)),
        (
            {"query": "q", "positive": "p", "teacher_scores": [0.5, 0.1]},
            ("teacher_scores has 2 values", "needs 1"),
        ),
        (
            {"query": "q", "positive": "p", "teacher_scores": ["0.5"]},
            ("teacher_scores must be a list of numbers",),
        ),
        (
            {"query": "q", "positive": "p", "teacher_scores": [float("nan")]},
            ("teacher_scores must be finite",),
        ),
    ],
)
def test_bad_train_rows_name_file_line_and_reason(
    tmp_path: Path, bad_row: Any, reason: tuple[str, ...]
) -> None:
    # The escaping file exists, so only the confinement check can reject it.
    write_png(tmp_path / "x.png")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = write_jsonl(data_dir / "train.jsonl", [good_train_row(), good_train_row(), bad_row])
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)])
    assert_error(exc, path, 3, *reason)


def test_malformed_json_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", [good_train_row()] * 3, raw_lines={2: '{"query": "q",'})
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)])
    assert_error(exc, path, 2, "malformed JSON")


def test_corrupt_image_is_caught_only_when_verifying(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    (tmp_path / "broken.png").write_bytes(rng.integers(0, 256, size=512, dtype=np.uint8).tobytes())
    path = write_jsonl(
        tmp_path / "t.jsonl", [good_train_row(), {"query": {"image": "broken.png"}, "positive": "p"}]
    )
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)], verify_images=True)
    assert_error(exc, path, 2, "broken.png", "not a readable image")
    # Without verification only existence is checked.
    examples = load_train_examples([str(path)], verify_images=False)
    assert examples[1].query["images"] == [str((tmp_path / "broken.png").resolve())]


@pytest.mark.parametrize(
    ("bad_row", "reason"),
    [
        ({**good_eval_row(), "positive": 2}, ("'positive' index 2 is out of range for 2 candidates",)),
        ({**good_eval_row(), "positive": -1}, ("out of range",)),
        ({**good_eval_row(), "positive": [0, 7]}, ("index 7 is out of range",)),
        ({**good_eval_row(), "positive": True}, ("'positive' must be a candidate index",)),
        ({**good_eval_row(), "positive": "1"}, ("'positive' must be a candidate index",)),
        ({**good_eval_row(), "candidates": []}, ("'candidates' must be a non-empty list",)),
        ({"candidates": ["a"], "positive": 0}, ("missing field 'query'",)),
        ({**good_eval_row(), "negatives": []}, ("unknown field", "'negatives'")),
        ({**good_eval_row(), "candidates": ["a", {}]}, ("candidates[1] is empty",)),
        (
            {**good_eval_row(), "candidates": ["a", {"image": "gone.png"}]},
            ("candidates[1].image", "not found"),
        ),
        ("just a string", ("must be a JSON object", "str")),
    ],
)
def test_bad_eval_rows_name_file_line_and_reason(
    tmp_path: Path, bad_row: Any, reason: tuple[str, ...]
) -> None:
    path = write_jsonl(tmp_path / "ev.jsonl", [good_eval_row(), bad_row])
    with pytest.raises(DataError) as exc:
        load_eval_examples([str(path)])
    assert_error(exc, path, 2, *reason)


def test_missing_data_file(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.jsonl"
    for loader in (load_train_examples, load_eval_examples):
        with pytest.raises(DataError, match="data file not found") as exc:
            loader([str(missing)])
        assert str(missing) in str(exc.value)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    path.write_text("query,positive\na,b\n")
    for loader in (load_train_examples, load_eval_examples):
        with pytest.raises(DataError) as exc:
            loader([str(path)])
        msg = str(exc.value)
        assert str(path) in msg
        assert "unsupported data file type '.csv'" in msg


def test_empty_files_are_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    full = write_jsonl(tmp_path / "full.jsonl", [good_train_row()])
    with pytest.raises(DataError, match="no training rows") as exc:
        load_train_examples([str(empty)])
    assert str(empty) in str(exc.value)
    # An empty file after a good one is still reported (it is almost certainly a mistake).
    with pytest.raises(DataError, match="no training rows") as exc:
        load_train_examples([str(full), str(empty)])
    assert str(empty) in str(exc.value)
    eval_full = write_jsonl(tmp_path / "ev.jsonl", [good_eval_row()])
    with pytest.raises(DataError, match="no evaluation rows") as exc:
        load_eval_examples([str(eval_full), str(empty)])
    assert str(empty) in str(exc.value)
