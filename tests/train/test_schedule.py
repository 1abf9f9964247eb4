"""The learning-rate schedule is transformers' curve, in the optimizer and in metrics.jsonl."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vlm2emb.train.config import load_recipe
from vlm2emb.train.loop import make_scheduler, train

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"


def transformers_curve(kind: str, step: int, warmup: int, total: int) -> float:
    """transformers' definitions (optimization.py), written out: warmup s / w from 0, then
    linear (T - s) / (T - w), half a cosine, or 1."""
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, (total - step) / max(1, total - warmup))


def _rates(kind: str, warmup_ratio: float, total: int) -> list[float]:
    """The rate each optimizer step 0 .. total-1 trains at, read from the optimizer."""
    cfg = load_recipe(
        RECIPE,
        [f"train.lr_scheduler={kind}", f"train.warmup_ratio={warmup_ratio}", f"train.max_steps={total}"],
    )
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    scheduler = make_scheduler(optimizer, cfg)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
@pytest.mark.parametrize(("warmup_ratio", "total"), [(0.0, 7), (0.3, 10), (0.05, 100)])
def test_schedule_is_the_transformers_curve(kind: str, warmup_ratio: float, total: int) -> None:
    warmup = round(warmup_ratio * total)
    expected = [transformers_curve(kind, s, warmup, total) for s in range(total)]
    assert _rates(kind, warmup_ratio, total) == pytest.approx(expected, abs=1e-12)


def test_warmup_starts_at_zero_unlike_the_old_curve() -> None:
    # The change from vlm2emb <= 0.1: warmup was (s + 1) / (w + 1), so step 0 trained at
    # 1/(w+1) of the peak; transformers starts at 0 and reaches the peak one step later.
    rates = _rates("linear", 0.3, 10)  # warmup 3
    assert rates[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])
    old = [(s + 1) / (3 + 1) for s in range(3)]
    assert rates[:3] != pytest.approx(old)


def test_logged_rates_follow_the_schedule(tmp_path: Path) -> None:
    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path / 'run'}",
            "train.max_steps=4",
            "train.warmup_ratio=0.5",
            "train.lr_scheduler=linear",
            "train.log_steps=1",
            "train.batch_size=8",
            "data.eval=[]",
        ],
    )
    train(cfg, progress=False)
    logged = [
        json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    peak = cfg.train.learning_rate
    # Each record holds the rate after its step's update: the one step `step` (0-based) uses.
    assert logged == pytest.approx([peak * transformers_curve("linear", s, 2, 4) for s in (1, 2, 3, 4)])
