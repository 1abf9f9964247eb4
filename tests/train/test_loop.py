"""End to end: train -> save -> load -> encode -> eval on the tiny model, plus LoRA and negatives."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vlm2emb import EmbeddingModel
from vlm2emb.eval import evaluate
from vlm2emb.train.config import load_recipe
from vlm2emb.train.loop import train

RECIPE = "recipes/demo.yaml"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, request):
    repo = request.config.rootpath
    out = tmp_path_factory.mktemp("demo-run")
    cfg = load_recipe(
        repo / RECIPE,
        [f"output_dir={out}", "train.max_steps=60", "train.save_steps=30", "train.log_steps=10"],
    )
    summary = train(cfg, progress=False)
    return out, summary


def test_run_folders_honour_the_umask(demo_run):
    """final/ and checkpoints get the permissions the user's umask gives any new file (the
    temporary folder and safetensors' 0600 files made them private)."""
    import os
    import stat

    from vlm2emb._files import current_umask

    out, _ = demo_run
    mask = current_umask()
    for folder in (out / "final", out / "checkpoints" / "step-30", out / "checkpoints" / "step-30" / "state"):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~mask, folder
        for path in folder.glob("*.safetensors"):
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~mask, path


def test_outputs_are_written(demo_run):
    out, summary = demo_run
    assert (out / "recipe.yaml").is_file()
    assert (out / "final" / "model.safetensors").is_file()
    assert (out / "final" / "vlm2emb_config.json").is_file()
    assert (out / "checkpoints" / "step-30" / "model.safetensors").is_file()
    assert json.loads((out / "checkpoints" / "step-30" / "trainer_state.json").read_text())["step"] == 30
    assert not list(out.glob("**/.tmp-*"))  # atomic saves leave no temporaries
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [10, 20, 30, 40, 50, 60]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in steps)
    assert steps[-1]["loss"] < steps[0]["loss"]  # it learns
    assert records[-1]["eval"]["hit@1"] == summary["eval"]["average"]["hit@1"]


def test_training_beats_the_untrained_model(demo_run):
    out, _ = demo_run
    before = json.loads((out / "eval_before.json").read_text())
    after = json.loads((out / "eval.json").read_text())
    assert set(after["tasks"]) == {"digits-i2t", "digits-t2i"}
    for task in after["tasks"]:
        assert after["tasks"][task]["hit@1"] > before["tasks"][task]["hit@1"] + 0.3
    assert after["average"]["hit@1"] > 0.6  # chance is 0.1; the full demo reaches > 0.9


def test_final_model_reloads_and_reproduces_the_eval(demo_run):
    out, summary = demo_run
    from vlm2emb.data.schema import load_eval_examples

    model = EmbeddingModel.from_pretrained(out / "final")
    rows = [ex.as_row() for ex in load_eval_examples([str(out / "demo-data/digits/eval.jsonl")])]
    report = evaluate(model, rows, batch_size=64)
    for task, metrics in summary["eval"]["tasks"].items():
        assert report["tasks"][task]["hit@1"] == pytest.approx(metrics["hit@1"], abs=1e-9)


def _state(path) -> dict[str, torch.Tensor]:
    # Through transformers, so checkpoint key layouts (old and new Qwen2-VL names) line up.
    from transformers import AutoModel

    return AutoModel.from_pretrained(path).state_dict()


def _text_data(tmp_path, with_negatives: bool):
    rows = []
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    for i, w in enumerate(words):
        row = {"query": {"text": f"the number {w}"}, "positive": {"text": w}, "dataset": "numbers"}
        if with_negatives:  # ragged: odd rows get two hard negatives, even rows one
            row["negatives"] = [{"text": words[(i + 1 + j) % len(words)]} for j in range(1 + i % 2)]
        rows.append(row)
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_lora_training_with_hard_negatives(tmp_path, tiny_qwen2_vl_dir):
    data = _text_data(tmp_path, with_negatives=True)
    cfg = load_recipe(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_qwen2_vl_dir}",
            "model.lora.r=4",
            "model.lora.alpha=8",
            f"data.train={data}",
            "train.max_steps=4",
            "train.batch_size=4",
            "train.learning_rate=1e-2",
            "train.log_steps=1",
        ],
    )
    summary = train(cfg, progress=False)
    assert torch.isfinite(torch.tensor(summary["final_loss"]))
    final = tmp_path / "run" / "final"
    assert (final / "adapter" / "adapter_model.safetensors").is_file()
    # The base weights are saved unmerged: identical to the checkpoint LoRA started from.
    base = _state(tiny_qwen2_vl_dir)
    saved = _state(final)
    assert base.keys() == saved.keys()
    assert all(torch.equal(base[k], saved[k]) for k in base)
    trained = EmbeddingModel.from_pretrained(final).encode(["seven"])
    untouched = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).encode(["seven"])
    assert not torch.allclose(trained, untouched, atol=1e-4)  # the adapter learned something


def test_same_seed_gives_the_same_weights(tmp_path, tiny_qwen2_vl_dir):
    data = _text_data(tmp_path, with_negatives=False)
    finals = []
    for name in ("a", "b"):
        cfg = load_recipe(
            None,
            [
                f"output_dir={tmp_path / name}",
                f"model.name_or_path={tiny_qwen2_vl_dir}",
                f"data.train={data}",
                "train.max_steps=3",
                "train.batch_size=4",
            ],
        )
        train(cfg, progress=False)
        finals.append(load_file(tmp_path / name / "final" / "model.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])
    original = _state(tiny_qwen2_vl_dir)
    trained = _state(tmp_path / "a" / "final")
    assert [k for k in original if not torch.equal(original[k], trained[k])]  # full fine-tuning moved weights


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path, tiny_qwen2_vl_dir):
    from vlm2emb.train.loop import TrainingError

    data = _text_data(tmp_path, with_negatives=False)
    # cosine / 1e-40 overflows float32: every loss is NaN.
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.name_or_path={tiny_qwen2_vl_dir}",
        f"data.train={data}",
    ]
    overrides += [
        "train.batch_size=4",
        "train.max_steps=10",
        "train.temperature=1e-40",
        "train.max_bad_steps=3",
    ]
    with pytest.raises(TrainingError, match="3 non-finite losses in a row \\(last at step 3\\)"):
        train(load_recipe(None, overrides), progress=False)
    assert not (tmp_path / "run" / "final").exists()  # nothing written from a broken run


def test_freeze_vision_and_learnable_temperature(tmp_path, tiny_qwen2_vl_dir):
    data = _text_data(tmp_path, with_negatives=False)
    overrides = [
        f"output_dir={tmp_path / 'run'}",
        f"model.name_or_path={tiny_qwen2_vl_dir}",
        f"data.train={data}",
    ]
    overrides += ["train.batch_size=4", "train.max_steps=3", "train.learning_rate=1e-2", "train.log_steps=1"]
    overrides += ["model.freeze_vision=true", "train.learnable_temperature=true", "train.temperature=0.05"]
    train(load_recipe(None, overrides), progress=False)
    before, after = _state(tiny_qwen2_vl_dir), _state(tmp_path / "run" / "final")
    vision = [k for k in before if k.startswith("visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)  # frozen
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))
    saved = json.loads((tmp_path / "run" / "final" / "vlm2emb_config.json").read_text())
    assert saved["temperature"] != pytest.approx(0.05, abs=1e-6)  # learned and saved
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["temperature"] == pytest.approx(saved["temperature"], rel=1e-4)
