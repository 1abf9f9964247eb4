"""Training a multi-vector model through a recipe: model.multivector_dim + train.loss maxsim."""

from __future__ import annotations

import json

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.model import MULTIVECTOR_HEAD_NAME
from vlm2emb.train.config import ConfigError, load_recipe
from vlm2emb.train.loop import train

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _recipe(tmp_path, tiny_dir, *extra):
    train_rows = [{"query": {"text": f"the number {w}"}, "positive": {"text": w}} for w in WORDS]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train_rows))
    eval_rows = [
        {"query": {"text": f"the number {w}"}, "candidates": [{"text": w}, {"text": WORDS[(i + 1) % 8]}]}
        for i, w in enumerate(WORDS[:4])
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_rows))
    return load_recipe(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tiny_dir}",
            f"data.train={tmp_path / 'train.jsonl'}",
            f"data.eval={tmp_path / 'eval.jsonl'}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.log_steps=1",
            "train.learning_rate=1e-3",
            *extra,
        ],
    )


def test_a_multivector_only_model_trains_saves_and_evaluates_by_maxsim(tmp_path, tiny_qwen2_vl_dir):
    cfg = _recipe(
        tmp_path,
        tiny_qwen2_vl_dir,
        "model.multivector_dim=8",
        "model.dense_head=false",
        "train.loss=maxsim",
        "train.gradcache_chunk_size=2",
    )
    train(cfg, progress=False)
    final = tmp_path / "run" / "final"
    assert (final / MULTIVECTOR_HEAD_NAME).is_file()
    losses = [
        json.loads(line).get("loss") for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len([x for x in losses if x is not None]) == 2
    assert "hit@1" in json.loads((tmp_path / "run" / "eval.json").read_text())["average"]  # scored by MaxSim
    model = EmbeddingModel.from_pretrained(final)
    assert (model.config.multivector_dim, model.config.dense_head) == (8, False)
    fresh = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"multivector_dim": 8})
    # The head trained (it starts from the seeded init of a fresh head).
    assert not torch.equal(model.multivector_head.proj.weight, fresh.multivector_head.proj.weight)
    assert len(model.encode(["one"], output="multivector")[0].shape) == 2


def test_maxsim_loss_without_a_head_stops_before_training(tmp_path, tiny_qwen2_vl_dir):
    cfg = _recipe(tmp_path, tiny_qwen2_vl_dir, "train.loss=maxsim")
    with pytest.raises(ValueError, match="needs a multi-vector head"):
        train(cfg, progress=False)
    with pytest.raises(ConfigError, match=r"model\.dense_head"):
        _recipe(tmp_path, tiny_qwen2_vl_dir, "model.dense_head=false")


def test_a_resumed_run_restores_the_head(tmp_path, tiny_qwen2_vl_dir):
    """The head is part of the training state: resuming from step 1 of a 2-step run lands on
    the uninterrupted run's final head and backbone."""
    from safetensors.torch import load_file

    extra = (
        "model.multivector_dim=8",
        "train.loss=maxsim",
        "train.loss_args.dense_weight=0.5",
        "data.eval=[]",
    )
    full = _recipe(tmp_path, tiny_qwen2_vl_dir, "train.save_steps=1", *extra)
    train(full, progress=False)
    step1 = tmp_path / "run" / "checkpoints" / "step-1"
    assert (step1 / MULTIVECTOR_HEAD_NAME).is_file()
    resumed = _recipe(tmp_path, tiny_qwen2_vl_dir, "train.save_steps=1", *extra)
    resumed.output_dir = str(tmp_path / "resumed")
    resumed.train.resume_from = str(step1)
    train(resumed, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [2]  # it resumed, it did not start over
    for name in (MULTIVECTOR_HEAD_NAME, "model.safetensors"):
        want, got = (
            load_file(tmp_path / "run" / "final" / name),
            load_file(tmp_path / "resumed" / "final" / name),
        )
        assert want.keys() == got.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)


def test_recipe_multivector_tokens_reaches_the_saved_model(tmp_path, tiny_qwen2_vl_dir):
    with pytest.raises(ConfigError, match=r"model\.multivector_tokens: must be one of all, content"):
        _recipe(tmp_path, tiny_qwen2_vl_dir, "model.multivector_dim=8", "model.multivector_tokens=text")
    cfg = _recipe(
        tmp_path,
        tiny_qwen2_vl_dir,
        "model.multivector_dim=8",
        "model.multivector_tokens=content",
        "train.loss=maxsim",
        "train.max_steps=1",
        "data.query_instruction=Find the word.",
    )
    train(cfg, progress=False)
    model = EmbeddingModel.from_pretrained(tmp_path / "run" / "final")
    assert model.config.multivector_tokens == "content"
    # The instruction's tokens are masked: the query's set holds only the text's tokens.
    query = model.encode_queries(["the number one"], output="multivector")[0]
    assert len(query) == len(model.adapter.tokenizer("the number one")["input_ids"])
