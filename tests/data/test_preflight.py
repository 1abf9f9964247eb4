"""Rows that pass the load-time checks but would stop training halfway.

`vlm2emb data check` and training both run every row through the training path's own
preprocessing (full media decode, then the model's processor with its limits), so what the
check passes, training survives, under both bad-row policies; and the skip policy skips
exactly what the check reports. Everything here is a real file: real truncated JPEGs, real
16-bit PNGs, real invalid UTF-8 bytes, a real tiny Qwen2-VL and real training steps.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlm2emb.cli import main
from vlm2emb.data.check import check_files, load_preparer
from vlm2emb.data.media import load_image
from vlm2emb.data.schema import DataError, load_train_examples
from vlm2emb.train.config import load_recipe
from vlm2emb.train.loop import train

# (line number in the data file, reason kind, text in the message); the other lines are good.
BAD = {
    3: ("bad_text", "lone surrogate U+D800"),
    5: ("unprocessable", "aspect ratio"),
    7: ("bad_media", "truncated"),
    9: ("bad_encoding", "not valid UTF-8"),
    11: ("malformed_json", "nested too deeply"),
}


def _write_data(folder: Path, digit_images: list[Image.Image]) -> Path:
    """A JSONL file of 8 good rows (one a 16-bit PNG) and the 5 bad rows of ``BAD``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(digit_images[:8]):
        img.save(folder / f"d{i}.png")
    # 16-bit grayscale PNG (mode I;16): a real high-bit-depth image, decoded to 8 bits.
    gradient = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(gradient).save(folder / "deep.png")
    Image.new("RGB", (1, 300), (128, 128, 128)).save(folder / "thin.png")  # aspect ratio 300
    Image.effect_noise((64, 64), 50).convert("RGB").save(folder / "full.jpg", quality=90)
    raw = (folder / "full.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(raw[: len(raw) // 2])  # header intact, data cut short

    def row(i: int, query: dict) -> bytes:
        return json.dumps({"query": query, "positive": f"digit {i}"}).encode() + b"\n"

    lines = [row(i, {"image": f"d{i}.png"}) for i in range(7)] + [row(7, {"image": "deep.png"})]
    lines.insert(2, json.dumps({"query": "a\ud800b", "positive": "p"}).encode() + b"\n")  # line 3
    lines.insert(4, row(90, {"image": "thin.png"}))  # line 5
    lines.insert(6, row(91, {"image": "cut.jpg"}))  # line 7
    lines.insert(8, b'{"query": "caf\xe9", "positive": "p"}\n')  # line 9: Latin-1, not UTF-8
    lines.insert(10, b"[" * 100_000 + b"]" * 100_000 + b"\n")  # line 11
    path = folder / "train.jsonl"
    path.write_bytes(b"".join(lines))
    return path


@pytest.fixture
def data_file(tmp_path: Path, digit_images) -> Path:
    return _write_data(tmp_path / "data", digit_images)


def _bad_lines(messages: list[str], path: Path) -> dict[int, str]:
    prefix = f"{path}:"
    out = {}
    for message in messages:
        assert message.startswith(prefix), message
        out[int(message[len(prefix) :].split(":")[0])] = message
    return out


def test_data_check_reports_every_row_training_would_choke_on(data_file, tiny_qwen2_vl_dir) -> None:
    printed: list[str] = []
    report = check_files(
        [str(data_file)], prepare=load_preparer(str(tiny_qwen2_vl_dir)), print_fn=printed.append
    )
    found = _bad_lines(printed, data_file)
    assert sorted(found) == sorted(BAD)
    for line, (kind, text) in BAD.items():
        assert text in found[line], found[line]
        assert report.reasons[kind] >= 1
    assert (report.rows, report.used, report.skipped) == (13, 8, 5)


def test_data_check_cli_names_the_rows_and_prints_no_traceback(data_file, tiny_qwen2_vl_dir, capsys) -> None:
    assert main(["data", "check", str(data_file), "--model", str(tiny_qwen2_vl_dir)]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert sorted(_bad_lines(captured.out.splitlines()[:-1], data_file)) == sorted(BAD)
    assert captured.out.splitlines()[-1].startswith("13 rows: 8 good, 5 bad")


def test_invalid_utf8_is_an_error_naming_file_and_line(data_file) -> None:
    lines = data_file.read_bytes().splitlines(keepends=True)
    only = data_file.with_name("latin1.jsonl")
    only.write_bytes(lines[0] + lines[8])
    with pytest.raises(DataError, match=r"latin1\.jsonl:2: not valid UTF-8 \(bytes e9") as info:
        load_train_examples([str(only)])
    assert info.value.kind == "bad_encoding"


def test_deeply_nested_json_is_a_row_error_not_an_internal_one(data_file) -> None:
    lines = data_file.read_bytes().splitlines(keepends=True)
    only = data_file.with_name("deep.jsonl")
    only.write_bytes(lines[10] + lines[0])
    with pytest.raises(DataError, match=r"deep\.jsonl:1: malformed JSON \(nested too deeply\)"):
        load_train_examples([str(only)])


@pytest.mark.parametrize(
    "mode,array,expected_mean",
    [
        # 16-bit PNG: 0..65535 maps onto 0..255 (PIL's convert clips it to white).
        ("I;16", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16), 127.5),
        # 32-bit integer image holding 16-bit data (a TIFF; older PIL opens 16-bit PNGs so).
        ("I", np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.int32), 127.5),
        # float image in 0..1 (a float TIFF).
        ("F", np.linspace(0, 1, 64 * 64).reshape(64, 64).astype(np.float32), 127.5),
    ],
)
def test_high_bit_depth_images_decode_to_their_tones(tmp_path, mode, array, expected_mean) -> None:
    img = Image.fromarray(array)
    assert img.mode == mode
    path = tmp_path / ("x.png" if mode == "I;16" else "x.tiff")  # PNG holds 16 bits, TIFF 32
    img.save(path)
    rgb = np.asarray(load_image(str(path)))
    assert rgb.shape == (64, 64, 3)
    assert abs(rgb.mean() - expected_mean) < 1.5
    assert (rgb == 255).mean() < 0.01  # not washed out to white
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255


def _train(tmp_path: Path, name: str, model_dir: Path, data: Path, *extra: str) -> dict:
    overrides = [
        f"output_dir={tmp_path / name}",
        f"model.name_or_path={model_dir}",
        f"data.train=[{data}]",
        "data.eval=[]",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.log_steps=1",
        "train.learning_rate=1e-3",
        *extra,
    ]
    return train(load_recipe(Path(__file__).parents[2] / "recipes" / "demo.yaml", overrides), progress=False)


def test_what_data_check_passes_training_survives_under_both_policies(
    data_file, tiny_qwen2_vl_dir, tmp_path
) -> None:
    printed: list[str] = []
    check_files([str(data_file)], prepare=load_preparer(str(tiny_qwen2_vl_dir)), print_fn=printed.append)
    bad = sorted(_bad_lines(printed, data_file))
    lines = data_file.read_bytes().splitlines(keepends=True)
    passed = data_file.with_name("passed.jsonl")
    passed.write_bytes(b"".join(line for n, line in enumerate(lines, start=1) if n not in bad))

    # error policy: the rows the check passed train, every step.
    summary = _train(tmp_path, "error", tiny_qwen2_vl_dir, passed)
    assert math.isfinite(summary["final_loss"])

    # skip policy on the whole file: the rows the check reports are skipped, and counted.
    summary = _train(tmp_path, "skip", tiny_qwen2_vl_dir, data_file, "data.on_bad_example=skip")
    assert math.isfinite(summary["final_loss"])
    report = json.loads((tmp_path / "skip" / "data_report.json").read_text())
    assert (report["rows"], report["used"], report["skipped"]) == (13, 8, 5)
    assert sorted(_bad_lines(report["examples"], data_file)) == bad
    assert report["reasons"]["unprocessable"] == 1 and report["reasons"]["bad_media"] == 1


def test_error_policy_stops_before_the_first_step_naming_the_row(
    data_file, tiny_qwen2_vl_dir, tmp_path
) -> None:
    lines = data_file.read_bytes().splitlines(keepends=True)
    thin = data_file.with_name("thin.jsonl")
    thin.write_bytes(b"".join([*lines[:2], lines[4], *lines[5:6]]))  # the 1x300 image on line 3
    with pytest.raises(DataError, match=r"thin\.jsonl:3: query: the model's processor refuses it"):
        _train(tmp_path, "stop", tiny_qwen2_vl_dir, thin)
    assert not (tmp_path / "stop" / "metrics.jsonl").exists()  # no step was taken


def test_streaming_skips_what_a_batch_would_choke_on(data_file, tiny_qwen2_vl_dir, tmp_path) -> None:
    summary = _train(
        tmp_path,
        "stream",
        tiny_qwen2_vl_dir,
        data_file,
        "data.streaming=true",
        "data.shuffle_buffer=4",
        "data.on_bad_example=skip",
    )
    assert math.isfinite(summary["final_loss"])
    report = json.loads((tmp_path / "stream" / "data_report.json").read_text())
    assert report["reasons"]["unprocessable"] >= 1 and report["reasons"]["bad_media"] >= 1
