"""The shipped objectives other than plain InfoNCE, selected by recipe keys, in real runs."""

from __future__ import annotations

import json

import pytest

from tests.helpers import tiny_run_losses
from vlm2emb.train.config import ConfigError, load_recipe
from vlm2emb.train.loop import train

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _data(tmp_path, scores: bool):
    rows = []
    for i, w in enumerate(WORDS):
        row = {
            "query": {"text": f"the number {w}"},
            "positive": {"text": w},
            "negatives": [{"text": WORDS[(i + 1) % 8]}, {"text": WORDS[(i + 2) % 8]}],
        }
        if scores:
            row["teacher_scores"] = [0.9, 0.4, 0.1]
        rows.append(row)
    path = tmp_path / ("scored.jsonl" if scores else "plain.jsonl")
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _losses(tmp_path, name, tiny_dir, data, *extra):
    return tiny_run_losses(tmp_path / name, tiny_dir, data, *extra)


def test_distillation_adds_its_kl_term_to_infonce(tmp_path, tiny_qwen2_vl_dir):
    data = _data(tmp_path, scores=True)
    plain = _losses(tmp_path, "plain", tiny_qwen2_vl_dir, data)
    no_kl = _losses(
        tmp_path, "no-kl", tiny_qwen2_vl_dir, data, "train.loss=distill", "train.loss_args.kl_weight=0"
    )
    with_kl = _losses(
        tmp_path, "kl", tiny_qwen2_vl_dir, data, "train.loss=distill", "train.loss_args.kl_weight=1"
    )
    # Same seed and first batch: kl_weight=0 is InfoNCE exactly; the KL term only adds.
    assert no_kl[0] == pytest.approx(plain[0], rel=1e-5)
    assert with_kl[0] > plain[0] + 1e-4
    assert (tmp_path / "kl" / "final" / "model.safetensors").exists()


def test_distillation_without_teacher_scores_stops_before_the_model_loads(tmp_path):
    cfg = load_recipe(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"model.name_or_path={tmp_path / 'no-such-model'}",  # never reached
            f"data.train={_data(tmp_path, scores=False)}",
            "train.loss=distill",
        ],
    )
    with pytest.raises(ConfigError, match="needs rows with teacher_scores"):
        train(cfg, progress=False)


@pytest.mark.parametrize("partitioner", ["greedy", "metis"])
def test_teacher_built_batches_train(tmp_path, tiny_qwen2_vl_dir, partitioner):
    data = _data(tmp_path, scores=False)  # each row's negatives are two other rows' positives
    losses = _losses(
        tmp_path,
        partitioner,
        tiny_qwen2_vl_dir,
        data,
        "data.batching=teacher",
        f"data.batch_partitioner={partitioner}",
        "train.max_steps=3",
    )
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
