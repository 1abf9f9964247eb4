"""Real short training runs on the tiny model with the data pipeline's options: bad rows
skipped and reported, MMEB-train rows used as they are, video / PDF / multi-image items,
homogeneous and length-grouped batches; plus validation of the data.* recipe keys."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from vlm2emb.train.config import ConfigError, load_recipe
from vlm2emb.train.loop import train


def _run(tmp_path: Path, model_dir: Path, data: list[Path], *extra: str) -> dict:
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.name_or_path={model_dir}",
        "data.train=[" + ", ".join(str(p) for p in data) + "]",
        "train.batch_size=4",
        "train.max_steps=2",
        "train.log_steps=1",
        "train.learning_rate=1e-3",
        *extra,
    ]
    return train(load_recipe(None, overrides), progress=False)


def _losses(tmp_path: Path) -> list[float]:
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if "loss" in json.loads(line)]


def test_skip_policy_trains_past_bad_rows_and_reports_them(tmp_path, tiny_qwen2_vl_dir, digit_images):
    from tests.helpers import write_pdf, write_video

    data = tmp_path / "data"
    data.mkdir()
    for i, img in enumerate(digit_images[:6]):
        img.save(data / f"d{i}.png")
    write_video(data / "clip.mp4")
    write_pdf(data / "doc.pdf")
    good = [{"query": {"image": f"d{i}.png"}, "positive": f"digit {i}", "dataset": "img"} for i in range(6)]
    good += [
        {"query": {"video": "clip.mp4"}, "positive": "a fading clip", "dataset": "media"},
        {"query": {"pdf": "doc.pdf", "page": 1}, "positive": "a blue page", "dataset": "media"},
        {
            "query": {"images": ["d0.png", "d1.png"], "text": "two"},
            "positive": "two digits",
            "dataset": "media",
        },
        {"query": {"pdf": "doc.pdf"}, "positive": "a red page", "dataset": "media"},
    ]
    lines = [json.dumps(r) for r in good]
    lines.insert(2, json.dumps({"query": {"image": "missing.png"}, "positive": "x"}))
    lines.insert(4, '{"query": "broken')
    lines.insert(6, json.dumps({"query": {"image": "../escape.png"}, "positive": "x"}))
    lines.insert(8, json.dumps("just a string"))
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")

    summary = _run(
        tmp_path,
        tiny_qwen2_vl_dir,
        [data / "train.jsonl"],
        "data.on_bad_example=skip",
        "data.homogeneous=true",
        "data.group_by_length=true",
        "data.video_frames=3",
        "data.max_pixels=1024",
        "train.max_steps=4",
    )
    assert math.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert len(_losses(tmp_path)) == 4
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["rows"] == 14 and report["used"] == 10 and report["skipped"] == 4
    assert report["reasons"] == {
        "escapes_root": 1,
        "malformed_json": 1,
        "missing_file": 1,
        "not_an_object": 1,
    }
    assert [
        e.split(":")[1] for e in (s.removeprefix(str(data / "train.jsonl")) for s in report["examples"])
    ] == [
        "3",
        "5",
        "7",
        "9",
    ]


def test_error_policy_stops_before_training(tmp_path, tiny_qwen2_vl_dir):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"query": "q", "positive": "p"}) + "\n" + json.dumps({"query": "q"}) + "\n")
    from vlm2emb.data.schema import DataError

    with pytest.raises(DataError, match=r"train\.jsonl:2: missing field 'positive'"):
        _run(tmp_path, tiny_qwen2_vl_dir, [path])
    assert not (tmp_path / "run" / "final").exists()
    assert not (tmp_path / "run" / "data_report.json").exists()


def test_mmeb_train_rows_train_without_conversion(tmp_path, tiny_qwen2_vl_dir, digit_images):
    import datasets

    (tmp_path / "images").mkdir()
    rows = []
    for i, img in enumerate(digit_images[:8]):
        img.save(tmp_path / "images" / f"{i}.png")
        rows.append(
            {
                "qry": "<|image_1|>\nRepresent the given image for classification",
                "qry_image_path": f"images/{i}.png",
                "pos_text": f"digit {i}",
                "pos_image_path": "",
                "neg_text": f"digit {(i + 1) % 8}",
                "neg_image_path": "",
            }
        )
    (tmp_path / "ImageNet_1K.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    datasets.Dataset.from_list(rows[4:]).to_parquet(str(tmp_path / "VOC2007.parquet"))
    summary = _run(
        tmp_path,
        tiny_qwen2_vl_dir,
        [tmp_path / "ImageNet_1K.jsonl", tmp_path / "VOC2007.parquet"],
        "data.homogeneous=true",
        "data.weights=[1, 1]",
    )
    assert math.isfinite(summary["final_loss"])
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert len(_losses(tmp_path)) == 2


def test_streaming_training_run(tmp_path, tiny_qwen2_vl_dir):
    rows = [
        {"query": f"number {i}", "positive": f"n{i}", "dataset": "a" if i % 2 else "b"} for i in range(12)
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"broken\n')
    summary = _run(
        tmp_path,
        tiny_qwen2_vl_dir,
        [path],
        "data.streaming=true",
        "data.shuffle_buffer=4",
        "data.homogeneous=true",
        "data.on_bad_example=skip",
        "train.max_steps=3",
    )
    assert math.isfinite(summary["final_loss"]) and len(_losses(tmp_path)) == 3
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["skipped"] == 1 and report["reasons"] == {"malformed_json": 1}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.format=vlm2vec", "data.format: 'vlm2vec' is not one of auto, canonical, mmeb"),
        ("data.on_bad_example=ignore", "data.on_bad_example: 'ignore' is not one of error, skip"),
        ("data.max_pixels=0", "data.max_pixels: must be > 0"),
        ("data.video_frames=-1", "data.video_frames: must be > 0"),
        ("data.weights=[1, 2]", "data.weights: 2 values for 1 data.train entries"),
        ("data.weights=[0]", "data.weights: must be >= 0 and not all 0"),
        ("data.max_rows=[1, 2]", "data.max_rows: give one value or one per data.train entry"),
        ("data.mega_batch=0", "data.mega_batch: must be > 0"),
    ],
)
def test_bad_data_keys_are_config_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(None, ["data.train=x.jsonl", override])


def test_streaming_refuses_whole_epoch_options() -> None:
    for key in ("data.group_by_length", "data.dedup_positives"):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: not available with data.streaming")):
            load_recipe(None, ["data.train=x.jsonl", "data.streaming=true", f"{key}=true"])


def test_min_pixels_above_max_pixels_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=re.escape("data.min_pixels: 4096 is larger than data.max_pixels 1024")
    ):
        load_recipe(None, ["data.train=x.jsonl", "data.min_pixels=4096", "data.max_pixels=1024"])


def test_data_keys_load_with_types() -> None:
    cfg = load_recipe(
        None,
        [
            "data.train=a.jsonl,b.jsonl",
            "data.weights=[2, 0.5]",
            "data.max_rows=100",
            "data.max_image_pixels=null",
        ],
    )
    assert cfg.data.weights == [2.0, 0.5] and cfg.data.max_rows == [100]
    assert cfg.data.max_image_pixels is None and cfg.data.video_frames == 8 and cfg.data.format == "auto"
