"""InfoNCE's hardness weighting and score-based false-negative filter.

The reference below is written from the documented formulas with python loops; the
weights are explicit inputs there, so the autograd gradient (weights detached) can be
compared with finite differences of the reference at frozen weights.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from vlm2emb.losses import InfoNCELoss, build_loss, info_nce_loss
from vlm2emb.train.config import ConfigError, load_recipe


def _reference(q, t, neg, tau, margin, alpha, weights=None):
    """Mean over queries of -log(e^{s+/tau} / sum_c w_c e^{s_c/tau}) over kept candidates."""
    bq = q.shape[0]
    cands = [t[j] for j in range(t.shape[0])]
    if neg is not None:
        cands += [neg[j, k] for j in range(neg.shape[0]) for k in range(neg.shape[1])]
    total = 0.0
    for i in range(bq):
        scores = [float(q[i] @ c) for c in cands]
        pos = scores[i]
        denom = 0.0
        for c, s in enumerate(scores):
            if c != i and margin is not None and s > pos + margin:
                continue  # filtered false negative
            w = 1.0 if c == i else (weights[i][c] if weights is not None else math.exp(alpha * s))
            denom += w * math.exp(s / tau)
        total += -(pos / tau - math.log(denom))
    return total / bq


def _batch(seed=0, b=4, k=2, d=6):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    n = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    return q, t, n


@pytest.mark.parametrize("margin", [None, 0.0, 0.1])
@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_options_match_the_loop_reference(margin, alpha):
    q, t, n = _batch()
    # Make one in-batch candidate a near copy of query 0's positive: the filter must catch it.
    t[1] = F.normalize(t[0] + 1e-3, dim=-1)
    got = info_nce_loss(q, t, n, temperature=0.05, false_negative_margin=margin, hardness_alpha=alpha)
    want = _reference(q, t, n, 0.05, margin, alpha)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_defaults_are_plain_infonce():
    q, t, n = _batch(1)
    plain = info_nce_loss(q, t, n, temperature=0.05)
    assert info_nce_loss(q, t, n, temperature=0.05, hardness_alpha=0.0, false_negative_margin=None) == plain
    # A margin no score can exceed filters nothing.
    assert info_nce_loss(q, t, n, temperature=0.05, false_negative_margin=10.0).item() == pytest.approx(
        plain.item(), rel=1e-12
    )
    # Hardness weighting changes the loss (the test would be empty otherwise).
    assert info_nce_loss(q, t, n, temperature=0.05, hardness_alpha=2.0).item() > plain.item()


def test_filtered_candidate_gets_no_gradient():
    q, t, _n = _batch(2)
    t[0] = F.normalize(2 * q[0] + t[0], dim=-1)  # a positive that beats the random candidates
    t[2] = F.normalize(t[0] + 1e-4, dim=-1)  # scores like query 0's positive, plus a hair
    t[2] = F.normalize(t[2] + 0.05 * q[0], dim=-1)  # now strictly above it
    t.requires_grad_(True)
    loss = info_nce_loss(q[:1], t, None, temperature=0.05, false_negative_margin=0.0)
    loss.backward()
    assert float(q[0] @ t[2]) > float(q[0] @ t[0])
    assert torch.count_nonzero(t.grad[2]) == 0  # removed from the softmax entirely
    kept = [c for c in (1, 3) if float(q[0] @ t[c]) <= float(q[0] @ t[0])]
    assert kept  # the batch has ordinary negatives, and they still get gradient
    assert all(torch.count_nonzero(t.grad[c]) > 0 for c in kept)


def test_hardness_gradient_is_finite_differences_at_frozen_weights():
    q, t, n = _batch(3, b=3, k=1, d=4)
    tau, alpha = 0.1, 2.0
    q.requires_grad_(True)
    info_nce_loss(q, t, n, temperature=tau, hardness_alpha=alpha).backward()
    cands = [*t, *n.reshape(-1, 4)]
    frozen = [[math.exp(alpha * float(q[i].detach() @ c)) for c in cands] for i in range(3)]
    eps = 1e-6
    fd = torch.zeros_like(q)
    for i in range(3):
        for j in range(4):
            hi, lo = q.detach().clone(), q.detach().clone()
            hi[i, j] += eps
            lo[i, j] -= eps
            fd[i, j] = (
                _reference(hi, t, n, tau, None, alpha, frozen)
                - _reference(lo, t, n, tau, None, alpha, frozen)
            ) / (2 * eps)
    torch.testing.assert_close(q.grad, fd, atol=1e-6, rtol=1e-5)


def test_module_and_recipe_carry_the_options():
    cfg = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        ["train.loss_args.hardness_alpha=4", "train.loss_args.false_negative_margin=0.1"],
    )
    loss = build_loss(cfg.train)
    assert isinstance(loss, InfoNCELoss)
    assert (loss.hardness_alpha, loss.false_negative_margin) == (4.0, 0.1)
    q, t, n = _batch(4)
    want = info_nce_loss(q, t, n, temperature=loss.temperature, hardness_alpha=4, false_negative_margin=0.1)
    assert loss(q, t, n).item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.loss_args.hardnes_alpha=3", "hardnes_alpha"),
        ("train.loss_args.hardness_alpha=-1", "hardness_alpha must be"),
    ],
)
def test_bad_options_stop_the_recipe_at_load_time(override, message):
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "recipes" / "demo.yaml", [override])
