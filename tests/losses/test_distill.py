"""The distillation objective against a loop-based re-computation of its formula."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import ROOT
from vlm2emb.items import ContrastiveBatch
from vlm2emb.losses import build_loss, info_nce_loss
from vlm2emb.losses.distill import DistillationLoss, distillation_kl
from vlm2emb.train.config import ConfigError, load_recipe


def _kl_reference(q, groups, teacher, tau_s, tau_t):
    """KL(p_teacher || p_student) per row over the slots whose teacher score is not NaN."""
    out = []
    for i in range(q.shape[0]):
        slots = [g for g in range(groups.shape[1]) if not math.isnan(float(teacher[i, g]))]
        if not slots:  # a row without teacher scores
            out.append(0.0)
            continue
        s = [float(q[i] @ groups[i, g]) / tau_s for g in slots]
        u = [float(teacher[i, g]) / tau_t for g in slots]
        ls, lu = math.log(sum(math.exp(x) for x in s)), math.log(sum(math.exp(x) for x in u))
        out.append(sum(math.exp(a - lu) * ((a - lu) - (b - ls)) for a, b in zip(u, s)))
    return out


def _tensors(seed=0, b=4, k=3, d=5):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    pos = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(b, k, d, generator=g, dtype=torch.float64), dim=-1)
    teacher = torch.randn(b, 1 + k, generator=g, dtype=torch.float64)
    return q, pos, neg, teacher


def test_kl_matches_the_loop_reference_with_ragged_groups():
    q, pos, neg, teacher = _tensors()
    teacher[1, 2:] = float("nan")  # row 1 has one negative only
    teacher[3, 1:] = float("nan")  # row 3 has none: its KL is 0
    groups = torch.cat([pos.unsqueeze(1), neg], dim=1)
    got = distillation_kl(q, groups, teacher, student_temperature=0.05, teacher_temperature=0.2)
    want = _kl_reference(q, groups, teacher, 0.05, 0.2)
    assert got.tolist() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[3] == 0 and (got[:3] > 0).all()


def test_kl_gradient_matches_finite_differences():
    q, pos, neg, teacher = _tensors(1, b=2, k=2, d=3)
    groups = torch.cat([pos.unsqueeze(1), neg], dim=1).requires_grad_(True)
    q.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a, b: distillation_kl(a, b, teacher, student_temperature=0.1, teacher_temperature=0.5).sum(),
        (q, groups),
    )


def _batch(teacher, b, k):
    return ContrastiveBatch(
        query=[],
        positive=[],
        positive_keys=torch.arange(b),
        negative_mask=torch.ones(b, k, dtype=torch.bool),
        local_negative_mask=torch.ones(b, k, dtype=torch.bool),
        teacher_scores=teacher,
    )


def test_training_loss_is_infonce_plus_weighted_kl_over_rows_with_scores():
    q, pos, neg, teacher = _tensors(2)
    teacher[2] = float("nan")  # a row without teacher scores: InfoNCE only
    loss = DistillationLoss(kl_weight=0.7, contrastive_weight=0.4, teacher_temperature=0.3)
    got = loss.training_loss(q, pos, neg, _batch(teacher, 4, 3), 0.05)
    groups = torch.cat([pos.unsqueeze(1), neg], dim=1)
    kl = _kl_reference(q, groups, teacher, 0.05, 0.3)
    want = 0.4 * float(info_nce_loss(q, pos, neg, temperature=0.05, positive_keys=torch.arange(4)))
    want += 0.7 * (kl[0] + kl[1] + kl[3]) / 3
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_padding_slots_and_student_temperature():
    q, pos, neg, teacher = _tensors(3)
    batch = _batch(teacher, 4, 3)
    batch.local_negative_mask = batch.negative_mask = torch.tensor([[True, True, False]] * 4)
    loss = DistillationLoss(kl_weight=1.0, contrastive_weight=0.0, student_temperature=0.1)
    got = loss.training_loss(q, pos, neg, batch, 0.05)  # 0.05 is ignored for the KL
    groups = torch.cat([pos.unsqueeze(1), neg], dim=1)
    cut = teacher.clone()
    cut[:, 3] = float("nan")
    want = sum(_kl_reference(q, groups, cut, 0.1, 1.0)) / 4
    assert float(got) == pytest.approx(want, rel=1e-9)


def test_recipe_keys_and_their_errors():
    cfg = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        ["train.loss=distill", "train.loss_args.kl_weight=2", "train.loss_args.hardness_alpha=1"],
    )
    loss = build_loss(cfg.train)
    assert isinstance(loss, DistillationLoss)
    assert loss.kl_weight == 2.0 and loss.infonce.hardness_alpha == 1.0
    for bad, message in [
        ("kl_weight=-1", "kl_weight must be"),
        ("teacher_temperature=0", "teacher_temperature"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe(ROOT / "recipes" / "demo.yaml", ["train.loss=distill", f"train.loss_args.{bad}"])
