"""vlm2emb.train(...): recipes from Python, in-memory rows, num_epochs, callbacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vlm2emb
from vlm2emb.train.api import build_recipe
from vlm2emb.train.callbacks import TrainerCallback
from vlm2emb.train.config import ConfigError, load_recipe

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]


class Recorder(TrainerCallback):
    """Keeps what each hook saw."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, float | None, bool, float | None]] = []
        self.evals: list[tuple[int, float]] = []
        self.saves: list[tuple[int, Path, bool]] = []

    def on_step_end(self, state) -> None:
        self.steps.append((state.step, state.loss, state.record is not None, state.epoch))

    def on_evaluate(self, state, report) -> None:
        self.evals.append((state.step, report["average"]["hit@1"]))

    def on_save(self, state, path) -> None:
        self.saves.append((state.step, path, (path / "model.safetensors").is_file()))


@pytest.fixture
def image_rows(tmp_path: Path, digit_images, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """12 caption -> image rows: images as paths relative to the working directory, and
    the last four as PIL images."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").mkdir()
    rows = []
    for i, image in enumerate(digit_images):
        image.save(tmp_path / "img" / f"{i}.png")
        ref = image if i >= 8 else f"img/{i}.png"
        rows.append({"query": {"text": f"the digit {WORDS[i]}"}, "positive": {"image": ref}})
    return rows


def test_in_memory_rows_epochs_and_callbacks(tmp_path: Path, image_rows: list[dict]) -> None:
    eval_rows = [
        {
            "query": {"text": r["query"]["text"]},
            "candidates": [r["positive"], image_rows[(i + 1) % 12]["positive"]],
        }
        for i, r in enumerate(image_rows[:4])
    ]
    recorder = Recorder()
    summary = vlm2emb.train(
        RECIPE,
        train_data=image_rows,
        eval_data=eval_rows,
        callbacks=[recorder],
        progress=False,
        output_dir=str(tmp_path / "run"),
        train={"num_epochs": 2, "batch_size": 4, "log_steps": 3, "save_steps": 3},
    )
    # 12 rows / batch 4 = 3 steps per epoch; 2 epochs = 6 steps (the recipe's 150 is replaced).
    assert summary["steps"] == 6 and summary["epochs"] == 2.0
    assert [s[0] for s in recorder.steps] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(loss, float) for _, loss, _, _ in recorder.steps)
    assert [s[0] for s in recorder.steps if s[2]] == [3, 6]  # the log steps carry their record
    assert recorder.steps[2][3] == 1.0  # epoch after step 3
    assert recorder.evals[0][0] == 0 and recorder.evals[-1] == (6, summary["eval"]["average"]["hit@1"])
    assert [(step, path.name, whole) for step, path, whole in recorder.saves] == [
        (3, "step-3", True),
        (6, "step-6", True),  # the last step's resumable checkpoint, then final/
        (6, "final", True),
    ]
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "memory:train" in saved and "num_epochs: 2" in saved
    last = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["step"] == 6 and last["loss"] == pytest.approx(
        sum(s[1] for s in recorder.steps[3:]) / 3, rel=1e-5
    )


def test_a_datasets_dataset_with_image_features_trains(tmp_path: Path, digit_images) -> None:
    import datasets

    features = datasets.Features(
        {
            "query": {"text": datasets.Value("string")},
            "positive": {"image": datasets.Image()},
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "query": [{"text": f"the digit {w}"} for w in WORDS],
            "positive": [{"image": image} for image in digit_images],
        },
        features=features,
    )
    summary = vlm2emb.train(
        RECIPE,
        train_data=ds,
        progress=False,
        **{"output_dir": str(tmp_path / "run"), "train.max_steps": 2, "train.batch_size": 4, "data.eval": []},
    )
    assert summary["steps"] == 2 and summary["epochs"] == pytest.approx(2 / 3, abs=1e-4)
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


def test_python_overrides_and_recipe_errors() -> None:
    cfg = build_recipe(RECIPE, {"train": {"learning_rate": 1e-3}, "model.lora.r": 4, "seed": 7})
    assert (cfg.train.learning_rate, cfg.train.max_steps, cfg.model.lora.r, cfg.seed) == (1e-3, 150, 4, 7)
    with pytest.raises(ConfigError, match="trian"):
        build_recipe(RECIPE, {"trian": {"max_steps": 3}})  # unknown keys stay errors
    with pytest.raises(ConfigError, match=r"give train_data or data\.train"):
        vlm2emb.train(RECIPE, train_data=[], **{"data.train": ["x.jsonl"]})
    with pytest.raises(ConfigError, match="train_data: in-memory rows must be"):
        vlm2emb.train(RECIPE, train_data="rows.jsonl")


def test_num_epochs_and_max_steps_exclude_each_other() -> None:
    # An override of one replaces the file's other; giving both is an error.
    assert load_recipe(RECIPE, ["train.num_epochs=1.5"]).train.max_steps is None
    assert load_recipe(RECIPE, ["train.num_epochs=2", "train.max_steps=9"]).train.num_epochs is None
    with pytest.raises(ConfigError, match="not both"):
        build_recipe({"data": {"train": "demo:digits/train"}, "train": {"num_epochs": 1, "max_steps": 5}}, {})
    with pytest.raises(ConfigError, match=r"train\.num_epochs: not available with data\.streaming"):
        load_recipe(RECIPE, ["train.num_epochs=1", "data.streaming=true"])
    with pytest.raises(ConfigError, match=r"train\.num_epochs: must be > 0"):
        load_recipe(RECIPE, ["train.num_epochs=0"])
