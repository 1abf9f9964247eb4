"""The reranker's listwise loss against plain recomputations, and real tiny training runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.train.test_schedule import transformers_curve
from vlm2emb._typed_config import ConfigError
from vlm2emb.data.schema import DataError, TrainExample
from vlm2emb.rerank import Reranker, RerankTrainConfig, listwise_softmax_loss, train_reranker
from vlm2emb.rerank.train import group_scores, reranker_groups

CAPTIONS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _loop_loss(scores: list[list[float]], present: list[list[bool]], t: float) -> float:
    """-log softmax of column 0 over the present columns, averaged over rows, in plain math."""
    total = 0.0
    for row, keep in zip(scores, present):
        logs = [s / t for s, k in zip(row, keep) if k]
        total += -(row[0] / t) + math.log(sum(math.exp(x) for x in logs))
    return total / len(scores)


def test_loss_equals_a_plain_recomputation():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 4, generator=gen) * 3
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[1, 2:] = False
    mask[4, 1:] = False  # a lone positive: loss 0
    for t in (1.0, 0.5):
        got = listwise_softmax_loss(scores, mask, temperature=t)
        want = _loop_loss(scores.tolist(), mask.tolist(), t)
        assert float(got) == pytest.approx(want, abs=1e-5)
    assert float(listwise_softmax_loss(scores)) == pytest.approx(
        _loop_loss(scores.tolist(), [[True] * 4] * 5, 1.0), abs=1e-5
    )


def test_loss_gradient_matches_finite_differences():
    scores = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False

    def fn(s: torch.Tensor) -> torch.Tensor:
        return -torch.log_softmax((s / 0.7).masked_fill(~mask, float("-inf")), 1)[:, 0].mean()

    # listwise_softmax_loss casts to float32; check its gradient against float64 differences.
    s = scores.clone().float().requires_grad_(True)
    listwise_softmax_loss(s, mask, temperature=0.7).backward()
    eps = 1e-6
    numeric = torch.zeros_like(scores)
    for i in range(3):
        for j in range(5):
            up, down = scores.clone(), scores.clone()
            up[i, j] += eps
            down[i, j] -= eps
            numeric[i, j] = (fn(up) - fn(down)) / (2 * eps)
    torch.testing.assert_close(s.grad.double(), numeric, atol=1e-5, rtol=1e-4)
    assert float(numeric[2, 3:].abs().max()) == 0.0  # masked slots get no gradient


def test_loss_refuses_bad_input():
    with pytest.raises(ValueError, match="positive"):
        listwise_softmax_loss(torch.zeros(2, 3), torch.tensor([[True] * 3, [False, True, True]]))
    with pytest.raises(ValueError, match="mask shape"):
        listwise_softmax_loss(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="temperature"):
        listwise_softmax_loss(torch.zeros(2, 3), temperature=0.0)


def _rows(tmp_path, digit_images, n: int = 8) -> list[dict]:
    """Image queries, their caption as positive, two other captions as hard negatives."""
    rows = []
    for i in range(n):
        path = tmp_path / f"digit{i}.png"
        digit_images[i].save(path)
        rows.append(
            {
                "query": {"image": path.name},
                "positive": {"text": CAPTIONS[i]},
                "negatives": [{"text": CAPTIONS[(i + 1) % n]}, {"text": CAPTIONS[(i + 3) % n]}],
                "instruction": "Which digit is in the image?",
            }
        )
    return rows


def _write(tmp_path, rows) -> str:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_groups_fill_from_other_positives_and_mask_the_rest():
    rows = [
        TrainExample(query={"text": "q0"}, positive={"text": "a"}, negatives=[{"text": "n0"}]),
        TrainExample(query={"text": "q1"}, positive={"text": "a"}),  # same positive as row 0
        TrainExample(
            query={"text": "q2"}, positive={"text": "b"}, negatives=[{"text": f"m{i}"} for i in range(5)]
        ),
    ]
    groups, mask = reranker_groups(rows, 4, np.random.default_rng(0))
    assert groups[0][:2] == [{"text": "a"}, {"text": "n0"}]
    assert groups[0][2] == {"text": "b"} and mask[0].tolist() == [True, True, True, False]
    # Row 1's only other distinct positive is "b": its own positive twin is no negative.
    assert groups[1][:2] == [{"text": "a"}, {"text": "b"}] and mask[1].tolist() == [True, True, False, False]
    assert groups[2] == [{"text": "b"}, {"text": "m0"}, {"text": "m1"}, {"text": "m2"}] and bool(
        mask[2].all()
    )
    # In-batch negatives come from the row's own dataset only.
    rows = [
        TrainExample(query={"text": "q0"}, positive={"text": "a"}, dataset="i2t"),
        TrainExample(query={"text": "q1"}, positive={"image": "x.png"}, dataset="t2i"),
        TrainExample(query={"text": "q2"}, positive={"text": "c"}, dataset="i2t"),
    ]
    groups, mask = reranker_groups(rows, 3, np.random.default_rng(0))
    assert groups[0][1] == {"text": "c"} and mask[0].tolist() == [True, True, False]
    assert mask[1].tolist() == [True, False, False]


def test_first_step_loss_equals_the_loss_of_the_untrained_model(tmp_path, digit_images):
    rows = _rows(tmp_path, digit_images, n=4)
    cfg = {
        "model": "tiny:qwen2_vl",
        "output_dir": str(tmp_path / "run"),
        "data": {"train": [_write(tmp_path, rows)]},
        "group_size": 3,  # positive + the two hard negatives: no random fill
        "batch_size": len(rows),  # one batch of all rows: its mean loss does not depend on order
        "max_steps": 1,
        "log_steps": 1,
    }
    result = train_reranker(cfg)
    model = Reranker.from_pretrained("tiny:qwen2_vl")
    model.base_dir = tmp_path
    scores = [
        model.score_pairs(
            [({"image": str(tmp_path / r["query"]["image"])}, c) for c in [r["positive"], *r["negatives"]]],
            r["instruction"],
        ).tolist()
        for r in rows
    ]
    want = _loop_loss(scores, [[True] * 3] * len(rows), 1.0)
    assert result.losses[0] == pytest.approx(want, abs=1e-4)
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [{"step": 1, "loss": result.losses[0], "lr": 1e-4}]


WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]


def _text_rows() -> list[dict]:
    """Text rows (fast on two cores): a query naming a digit, the digit word as positive."""
    return [
        {
            "query": {"text": f"a handwritten digit {w}"},
            "positive": {"text": w},
            "negatives": [{"text": WORDS[(i + 1) % 8]}, {"text": WORDS[(i + 3) % 8]}],
        }
        for i, w in enumerate(WORDS)
    ]


def _training_loss(model: Reranker, rows: list[dict]) -> float:
    examples = [
        TrainExample(query=r["query"], positive=r["positive"], negatives=r["negatives"]) for r in rows
    ]
    groups, mask = reranker_groups(examples, 3, np.random.default_rng(0))
    with torch.no_grad():
        return float(listwise_softmax_loss(group_scores(model.eval(), examples, groups, mask), mask))


def test_a_few_steps_reduce_the_loss_and_the_model_reloads(tmp_path):
    rows = _text_rows()
    # One batch of every row and groups without random fill: each step sees the same groups,
    # so the loss curve is the optimisation's alone. Full fine-tuning; lr 3e-4 measured to
    # fall steadily on this tiny model (1.099 -> 1.034 in 10 steps).
    result = train_reranker(
        {
            "data": {"train": [_write(tmp_path, rows)]},
            "output_dir": str(tmp_path / "run"),
            "group_size": 3,
            "batch_size": 8,
            "max_steps": 10,
            "learning_rate": 3e-4,
            "lr_scheduler": "constant",  # this test is about the optimisation, not the schedule
            "warmup_ratio": 0.0,
        }
    )
    assert result.losses[-1] < result.losses[0] - 0.03, result.losses
    trained = Reranker.from_pretrained(result.final_dir)
    untrained = Reranker.from_pretrained("tiny:qwen2_vl")
    # The saved model is the trained one: after the last update its loss is lower still.
    assert _training_loss(trained, rows) < result.losses[-1] < _training_loss(untrained, rows)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_logged_rates_follow_the_transformers_schedule(tmp_path, kind):
    result = train_reranker(
        {
            "data": {"train": [_write(tmp_path, _text_rows())]},
            "output_dir": str(tmp_path / "run"),
            "group_size": 2,
            "batch_size": 2,
            "max_steps": 6,
            "log_steps": 1,
            "learning_rate": 1e-3,
            "warmup_ratio": 0.34,  # round(0.34 * 6) = 2 warmup steps
            "lr_scheduler": kind,
        }
    )
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Each record holds the rate its own step trained at: step s (1-based) uses curve(s - 1).
    assert [r["lr"] for r in logged] == pytest.approx(
        [1e-3 * transformers_curve(kind, s, 2, 6) for s in range(6)]
    )
    assert logged[0]["lr"] == 0.0 and len(result.losses) == 6


def test_lora_training_saves_an_adapter(tmp_path):
    rows = _text_rows()
    result = train_reranker(
        {
            "data": {"train": [_write(tmp_path, rows)]},
            "output_dir": str(tmp_path / "run"),
            "group_size": 3,
            "batch_size": 8,
            "max_steps": 2,
            "learning_rate": 1e-2,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        }
    )
    assert (result.final_dir / "adapter" / "adapter_config.json").is_file()
    recipe = json.loads((tmp_path / "run" / "recipe.json").read_text())
    assert recipe["lora"]["r"] == 4 and recipe["group_size"] == 3
    trained = Reranker.from_pretrained(result.final_dir)
    assert _training_loss(trained, rows) != pytest.approx(
        _training_loss(Reranker.from_pretrained("tiny:qwen2_vl"), rows), abs=1e-4
    )


def test_chunked_forwards_give_the_same_gradient():
    examples = [
        TrainExample(query=r["query"], positive=r["positive"], negatives=r["negatives"])
        for r in _text_rows()[:4]
    ]
    groups, mask = reranker_groups(examples, 3, np.random.default_rng(0))
    from vlm2emb.rerank.train import _step_backward

    grads = []
    for per_forward in (0, 1):
        model = Reranker.from_pretrained("tiny:qwen2_vl").train()
        cfg = RerankTrainConfig.from_mapping({"data": {"train": ["x"]}, "queries_per_forward": per_forward})
        loss = _step_backward(model, examples, groups, mask, cfg)
        grads.append((loss, model.base_lm.get_output_embeddings().weight.grad.clone()))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-4)


def test_recipe_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'grup_size'"):
        RerankTrainConfig.from_mapping({"data": {"train": ["x"]}, "grup_size": 4})
    with pytest.raises(ConfigError, match="group_size must be at least 2"):
        RerankTrainConfig.from_mapping({"data": {"train": ["x"]}, "group_size": 1})
    with pytest.raises(ConfigError, match=r"data\.train"):
        RerankTrainConfig.from_mapping({})
    with pytest.raises(ConfigError, match="lr_scheduler must be one of linear, cosine, constant"):
        RerankTrainConfig.from_mapping({"data": {"train": ["x"]}, "lr_scheduler": "step"})
    with pytest.raises(ConfigError, match=r"warmup_ratio: must be in \[0, 1\)"):
        RerankTrainConfig.from_mapping({"data": {"train": ["x"]}, "warmup_ratio": 1.0})
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"query": {"text": "q"}}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        train_reranker({"data": {"train": [str(bad)]}, "output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run" / "final").exists()


def _weights(final_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(final_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    from vlm2emb.train.state import CheckpointError

    base = {
        "data": {"train": [_write(tmp_path, _text_rows())]},
        "group_size": 4,  # two own negatives + one in-batch fill: the fill's RNG must resume too
        "batch_size": 3,  # 8 rows: batches straddle epochs, so the row order must resume too
        "max_steps": 5,
        "log_steps": 1,
        "learning_rate": 1e-3,
        "warmup_ratio": 0.4,
        "lr_scheduler": "cosine",
        "save_steps": 2,
    }
    whole = train_reranker({**base, "output_dir": str(tmp_path / "whole")})
    ckpt = tmp_path / "whole" / "checkpoints" / "step-2"
    assert (ckpt / "manifest.json").is_file() and (tmp_path / "whole" / "checkpoints" / "step-4").is_dir()
    # A run stopped after step 2 (its later records and final/ never written), then resumed.
    (tmp_path / "part").mkdir()
    kept = (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "part" / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))  # 5 records
    resumed = train_reranker(
        {**base, "output_dir": str(tmp_path / "part"), "save_steps": 0, "resume_from_checkpoint": str(ckpt)}
    )
    assert resumed.losses == whole.losses  # steps 1-2 from the checkpoint, 3-5 recomputed
    a, b = _weights(whole.final_dir), _weights(resumed.final_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "part" / "metrics.jsonl").read_text() == (
        tmp_path / "whole" / "metrics.jsonl"
    ).read_text()
    # A damaged checkpoint is refused before anything loads, naming the file.
    state = ckpt / "state" / "optimizer.safetensors"
    state.write_bytes(state.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: .*bytes"):
        train_reranker({**base, "output_dir": str(tmp_path / "bad"), "resume_from_checkpoint": str(ckpt)})
