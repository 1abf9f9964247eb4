"""Bad input: every kind of bad row under `error` and `skip`, the report, and
`vlm2emb data check`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vlm2emb.cli import main
from vlm2emb.data.check import DataReport, check_files
from vlm2emb.data.media import MediaOptions
from vlm2emb.data.schema import DataError, load_train_examples

GOOD = {"query": {"image": "ok.png"}, "positive": "a white square"}

# (line content, expected reason kind, expected text in the message)
BAD_LINES = [
    (json.dumps({"query": {"image": "gone.png"}, "positive": "p"}), "missing_file", "file not found"),
    (json.dumps({"query": {"image": "corrupt.png"}, "positive": "p"}), "bad_media", "not a readable image"),
    (json.dumps({"query": {"image": "empty.png"}, "positive": "p"}), "bad_media", "not a readable image"),
    (
        json.dumps({"query": {"image": "../outside.png"}, "positive": "p"}),
        "escapes_root",
        "escapes the media root",
    ),
    (
        json.dumps({"query": {"image": "huge.png"}, "positive": "p"}),
        "image_too_large",
        "data.max_image_pixels",
    ),
    (json.dumps(["q", "p"]), "not_an_object", "must be a JSON object"),
    (json.dumps({"query": "q"}), "missing_field", "missing field 'positive'"),
    (json.dumps({"query": {}, "positive": "p"}), "empty_item", "query is empty"),
    (json.dumps({"query": {"text": 7}, "positive": "p"}), "wrong_type", "query.text must be a string"),
    ('{"query": "q", "positive": ', "malformed_json", "malformed JSON"),
    (json.dumps({"query": "q", "positive": "p", "negatives": "n"}), "wrong_type", "negatives must be a list"),
]


@pytest.fixture
def bad_file(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (8, 8), (255, 255, 255)).save(data / "ok.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")  # exists: only confinement rejects it
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 30)
    (data / "empty.png").write_bytes(b"")
    Image.new("RGB", (200, 200)).save(data / "huge.png")  # over the 10,000-pixel limit used here
    lines = [json.dumps(GOOD)]
    for line, _, _ in BAD_LINES:
        lines += [line, json.dumps(GOOD)]
    path = data / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _bad_line_numbers() -> list[int]:
    return [2 + 2 * i for i in range(len(BAD_LINES))]


@pytest.mark.parametrize("index", range(len(BAD_LINES)), ids=[k for _, k, _ in BAD_LINES])
def test_each_bad_row_stops_the_run_with_file_line_reason(tmp_path: Path, index: int) -> None:
    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    Image.new("RGB", (8, 8)).save(data / "ok.png")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 30)
    (data / "empty.png").write_bytes(b"")
    Image.new("RGB", (200, 200)).save(data / "huge.png")
    line, kind, text = BAD_LINES[index]
    path = data / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as exc:
        load_train_examples([str(path)], options=MediaOptions(max_image_pixels=10_000))
    message = str(exc.value)
    assert message.startswith(f"{path}:2: ") and text in message and "\n" not in message
    assert exc.value.kind == kind


def test_skip_counts_every_bad_row_by_reason(bad_file: Path) -> None:
    report = DataReport()
    ex = load_train_examples(
        [str(bad_file)], on_bad_example="skip", report=report, options=MediaOptions(max_image_pixels=10_000)
    )
    assert len(ex) == len(BAD_LINES) + 1
    assert all(e.query["images"][0].endswith("ok.png") for e in ex)
    assert (report.rows, report.used, report.skipped) == (
        2 * len(BAD_LINES) + 1,
        len(BAD_LINES) + 1,
        len(BAD_LINES),
    )
    expected: dict[str, int] = {}
    for _, kind, _ in BAD_LINES:
        expected[kind] = expected.get(kind, 0) + 1
    assert report.as_dict()["reasons"] == dict(sorted(expected.items()))
    prefix = f"{bad_file}:"
    assert all(e.startswith(prefix) for e in report.examples)
    lines = [int(e[len(prefix) :].split(":")[0]) for e in report.examples]
    assert lines == _bad_line_numbers()


def test_skip_with_only_bad_rows_is_still_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"query": 1}\n{"broken\n')
    with pytest.raises(DataError, match="no usable training rows: all 2 rows were bad"):
        load_train_examples([str(path)], on_bad_example="skip")


def test_check_files_decodes_fully_and_catches_what_headers_miss(tmp_path: Path) -> None:
    # A JPEG cut in the middle passes PIL's header check but not a full decode.
    Image.effect_noise((64, 64), 50).convert("RGB").save(tmp_path / "full.jpg", quality=90)
    raw = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(raw[: len(raw) // 2])
    path = tmp_path / "t.jsonl"
    path.write_text(
        json.dumps({"query": {"image": "full.jpg"}, "positive": "p"})
        + "\n"
        + json.dumps({"query": {"image": "cut.jpg"}, "positive": "p"})
        + "\n"
    )
    assert len(load_train_examples([str(path)])) == 2  # the header check lets it through
    printed: list[str] = []
    report = check_files([str(path)], print_fn=printed.append)
    assert (report.used, report.skipped) == (1, 1)
    assert printed and printed[0].startswith(f"{path}:2: ")


def test_data_check_cli_names_every_bad_line_and_exits_1(bad_file: Path, capsys) -> None:
    rc = main(["data", "check", str(bad_file), "--max-image-pixels", "10000"])
    out = capsys.readouterr().out
    assert rc == 1
    for lineno in _bad_line_numbers():
        assert f"{bad_file}:{lineno}: " in out
    assert f"{len(BAD_LINES)} bad" in out.splitlines()[-1]


def test_data_check_cli_passes_clean_files(tmp_path: Path, capsys) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n")
    assert main(["data", "check", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "1 rows: 1 good, 0 bad; processor of tiny:qwen2_vl"


def test_data_check_cli_eval_rows(tmp_path: Path, capsys) -> None:
    path = tmp_path / "ev.jsonl"
    path.write_text(
        json.dumps({"query": "q", "candidates": ["a", "b"], "positive": 1})
        + "\n"
        + json.dumps({"query": "q", "candidates": ["a"], "positive": 3})
        + "\n"
    )
    assert main(["data", "check", "--eval", str(path)]) == 1
    assert f"{path}:2: 'positive' index 3 is out of range" in capsys.readouterr().out
