"""Tests for vlm2emb.losses against an independent, loop-based re-computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm2emb.data.keys import content_keys
from vlm2emb.losses import InfoNCELoss, info_nce_loss

# --------------------------------------------------------------------------- helpers


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _neg_log_softmax(scores: list[float], target: int) -> float:
    # Plain max-shifted log-sum-exp over python floats.
    m = max(scores)
    return -(scores[target] - m - math.log(sum(math.exp(s - m) for s in scores)))


def reference_losses(
    query,
    positive,
    negatives=None,
    *,
    temperature=0.02,
    symmetric=False,
    positive_keys=None,
    negative_keys=None,
    negative_mask=None,
    query_offset=0,
):
    """Per-query losses written from the definition with explicit python loops."""
    q = query.double().tolist()
    p = positive.double().tolist()
    n = negatives.double().tolist() if negatives is not None else []
    pk = positive_keys.tolist() if positive_keys is not None else None
    nk = negative_keys.tolist() if negative_keys is not None else None
    nm = negative_mask.tolist() if negative_mask is not None else None
    out = []
    for i, qi in enumerate(q):
        own = query_offset + i
        scores, target = [], None
        for j, pj in enumerate(p):
            if j != own and pk is not None and pk[j] == pk[own]:
                continue  # false negative: same content as query i's positive
            if j == own:
                target = len(scores)
            scores.append(_dot(qi, pj) / temperature)
        for b, group in enumerate(n):
            for k, nbk in enumerate(group):
                if nm is not None and not nm[b][k]:
                    continue  # padding
                if nk is not None and nk[b][k] == pk[own]:
                    continue  # hard negative identical to the positive
                scores.append(_dot(qi, nbk) / temperature)
        q2t = _neg_log_softmax(scores, target)
        if symmetric:
            pj = p[own]
            scores_t, target_t = [], None
            for i2, qi2 in enumerate(q):
                if i2 != i and pk is not None and pk[query_offset + i2] == pk[own]:
                    continue
                if i2 == i:
                    target_t = len(scores_t)
                scores_t.append(_dot(pj, qi2) / temperature)
            out.append((q2t + _neg_log_softmax(scores_t, target_t)) / 2)
        else:
            out.append(q2t)
    return torch.tensor(out, dtype=torch.float64)


def _unit(*shape: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture
def batch():
    # Bq = Bt = 5, K = 3, d = 6; temperature 0.1 keeps the losses far from 0 and from saturation.
    return _unit(5, 6, seed=0), _unit(5, 6, seed=1), _unit(5, 3, 6, seed=2)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-10) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --------------------------------------------------------------------------- reference checks


def test_in_batch_only_matches_reference(batch):
    q, p, _ = batch
    got = info_nce_loss(q, p, temperature=0.1, reduction="none")
    _close(got, reference_losses(q, p, temperature=0.1))
    _close(info_nce_loss(q, p, temperature=0.1), reference_losses(q, p, temperature=0.1).mean())


def test_hard_negatives_match_reference(batch):
    q, p, n = batch
    got = info_nce_loss(q, p, n, temperature=0.1, reduction="none")
    _close(got, reference_losses(q, p, n, temperature=0.1))
    # Extra competitors can only increase every per-query loss.
    assert (got > info_nce_loss(q, p, temperature=0.1, reduction="none")).all()


def test_ragged_negative_mask_matches_reference(batch):
    q, p, n = batch
    mask = torch.tensor(
        [
            [True, True, True],
            [True, False, False],
            [False, False, False],
            [True, True, False],
            [True, False, True],
        ]
    )
    got = info_nce_loss(q, p, n, temperature=0.1, negative_mask=mask, reduction="none")
    _close(got, reference_losses(q, p, n, temperature=0.1, negative_mask=mask))
    # Padding must be inert: changing padded rows leaves the loss unchanged.
    n2 = torch.where(mask.unsqueeze(-1), n, q[0].expand_as(n) * 7.0)
    _close(info_nce_loss(q, p, n2, temperature=0.1, negative_mask=mask, reduction="none"), got)
    # An all-True mask is the same as no mask.
    full = torch.ones_like(mask)
    _close(
        info_nce_loss(q, p, n, temperature=0.1, negative_mask=full),
        info_nce_loss(q, p, n, temperature=0.1),
    )


def test_false_negative_masking_matches_reference(batch):
    q, p, n = batch
    # Positives 0 and 3 are the same item; so are 1 and 4. Make them actually identical vectors.
    p = p.clone()
    p[3], p[4] = p[0], p[1]
    pkeys = torch.tensor([10, 11, 12, 10, 11])
    # Two hard negatives are really copies of positive 2 and positive 0.
    nkeys = torch.arange(100, 115).reshape(5, 3)
    nkeys[0, 1] = 12
    nkeys[4, 2] = 10
    kw = dict(temperature=0.1, positive_keys=pkeys, negative_keys=nkeys)
    got = info_nce_loss(q, p, n, reduction="none", **kw)
    _close(got, reference_losses(q, p, n, **kw))
    unmasked = info_nce_loss(q, p, n, temperature=0.1, reduction="none")
    # Masking removes competitors for queries 0, 1, 2, 3, 4 (each has a duplicate somewhere).
    assert (got < unmasked).all()
    # Without masking, duplicated positives cap the achievable loss at log(2); with masking they do not.
    aligned = info_nce_loss(p, p, temperature=0.001, positive_keys=pkeys, reduction="none")
    assert aligned.max() < 1e-6
    assert info_nce_loss(p, p, temperature=0.001, reduction="none")[0] == pytest.approx(math.log(2))


def test_positive_keys_without_negative_keys_leave_hard_negatives_alone(batch):
    q, p, n = batch
    pkeys = torch.tensor([1, 2, 1, 3, 4])
    got = info_nce_loss(q, p, n, temperature=0.1, positive_keys=pkeys, reduction="none")
    _close(got, reference_losses(q, p, n, temperature=0.1, positive_keys=pkeys))


@pytest.mark.parametrize("with_keys", [False, True])
def test_symmetric_matches_reference(batch, with_keys):
    q, p, n = batch
    kw: dict = dict(temperature=0.1, symmetric=True)
    if with_keys:
        kw["positive_keys"] = torch.tensor([7, 8, 7, 9, 8])
    got = info_nce_loss(q, p, n, reduction="none", **kw)
    _close(got, reference_losses(q, p, n, **kw))
    asym = info_nce_loss(q, p, n, temperature=0.1, positive_keys=kw.get("positive_keys"))
    assert not torch.isclose(got.mean(), asym)


def test_query_offset_local_block_equals_rows_of_full_computation():
    # 8 "global" targets with 2 negatives each, this process owns queries 3..5.
    q_all, p_all, n_all = _unit(8, 6, seed=3), _unit(8, 6, seed=4), _unit(8, 2, 6, seed=5)
    pkeys = torch.tensor([0, 1, 2, 3, 1, 5, 6, 3])
    nkeys = torch.arange(50, 66).reshape(8, 2)
    nkeys[6, 0] = 1
    mask = torch.rand(8, 2, generator=torch.Generator().manual_seed(0)) > 0.3
    kw = dict(temperature=0.1, positive_keys=pkeys, negative_keys=nkeys, negative_mask=mask)
    full = info_nce_loss(q_all, p_all, n_all, reduction="none", **kw)
    local = info_nce_loss(q_all[3:6], p_all, n_all, query_offset=3, reduction="none", **kw)
    _close(local, full[3:6])
    _close(local, reference_losses(q_all[3:6], p_all, n_all, query_offset=3, **kw))
    # The symmetric term only sees local queries (documented): compare with the reference.
    sym = info_nce_loss(q_all[3:6], p_all, n_all, query_offset=3, symmetric=True, reduction="none", **kw)
    _close(sym, reference_losses(q_all[3:6], p_all, n_all, query_offset=3, symmetric=True, **kw))


@pytest.mark.parametrize("symmetric", [False, True])
def test_reductions(batch, symmetric):
    q, p, n = batch
    none = info_nce_loss(q, p, n, temperature=0.1, symmetric=symmetric, reduction="none")
    assert none.shape == (5,)
    _close(info_nce_loss(q, p, n, temperature=0.1, symmetric=symmetric, reduction="sum"), none.sum())
    _close(info_nce_loss(q, p, n, temperature=0.1, symmetric=symmetric, reduction="mean"), none.mean())
    _close(none, reference_losses(q, p, n, temperature=0.1, symmetric=symmetric))
    with pytest.raises(ValueError, match="reduction"):
        info_nce_loss(q, p, n, reduction="avg")


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradcheck(symmetric):
    q = _unit(3, 4, seed=6).requires_grad_()
    p = _unit(4, 4, seed=7).requires_grad_()
    n = _unit(4, 2, 4, seed=8).requires_grad_()
    pkeys = torch.tensor([0, 1, 2, 1])
    nkeys = torch.tensor([[9, 0], [10, 11], [12, 13], [2, 14]])
    mask = torch.tensor([[True, True], [True, False], [False, False], [True, True]])

    def fn(q, p, n):
        return info_nce_loss(
            q,
            p,
            n,
            temperature=0.5,
            symmetric=symmetric,
            positive_keys=pkeys,
            negative_keys=nkeys,
            negative_mask=mask,
            query_offset=1,
        )

    assert torch.autograd.gradcheck(fn, (q, p, n), eps=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- properties


def test_temperature_scale_equivalence(batch):
    q, p, n = batch
    loss = info_nce_loss(q, p, n, temperature=0.02)
    # scale = 1/temperature: 50 x the similarities, cross-entropy with targets on the diagonal.
    cands = torch.cat([p, n.reshape(-1, 6)])
    manual = F.cross_entropy(50.0 * q @ cands.T, torch.arange(5))
    _close(loss, manual)
    # Scaling the queries by 50 at temperature 1 is the same thing.
    _close(info_nce_loss(q * 50.0, p, n, temperature=1.0), loss)
    # A tensor temperature behaves like the float one.
    _close(info_nce_loss(q, p, n, temperature=torch.tensor(0.02, dtype=torch.float64)), loss)
    crit = InfoNCELoss(temperature=0.02)
    assert crit.scale == pytest.approx(50.0)
    _close(crit(q, p, n), loss)
    assert not torch.isclose(info_nce_loss(q, p, n, temperature=0.05), loss)


def test_loss_module_holds_no_temperature_parameter():
    # The model owns a learnable temperature (tests/test_model.py); the loss holds none.
    assert list(InfoNCELoss(temperature=0.05).parameters()) == []


def test_module_forwards_kwargs(batch):
    q, p, n = batch
    pkeys = torch.tensor([1, 2, 1, 3, 4])
    crit = InfoNCELoss(temperature=0.1, symmetric=True, reduction="none")
    _close(
        crit(q, p, n, positive_keys=pkeys),
        reference_losses(q, p, n, temperature=0.1, symmetric=True, positive_keys=pkeys),
    )
    _close(crit(q, p, reduction="sum", symmetric=False), reference_losses(q, p, temperature=0.1).sum())
    with pytest.raises(TypeError, match="temperature"):
        crit(q, p, temperature=0.5)


def test_permutation_invariance(batch):
    q, p, n = batch
    pkeys = torch.tensor([1, 2, 1, 3, 4])
    nkeys = torch.arange(20, 35).reshape(5, 3)
    nkeys[2, 0] = 3
    mask = torch.tensor([[True, False, True]] * 5)
    perm = torch.tensor([3, 0, 4, 1, 2])
    kw = dict(temperature=0.1, symmetric=True)
    base = info_nce_loss(
        q, p, n, positive_keys=pkeys, negative_keys=nkeys, negative_mask=mask, reduction="none", **kw
    )
    permuted = info_nce_loss(
        q[perm],
        p[perm],
        n[perm],
        positive_keys=pkeys[perm],
        negative_keys=nkeys[perm],
        negative_mask=mask[perm],
        reduction="none",
        **kw,
    )
    _close(permuted, base[perm])
    # Permuting only the positives breaks the pairing and must change the loss.
    assert not torch.isclose(info_nce_loss(q, p[perm], **kw), info_nce_loss(q, p, **kw))


def test_perfectly_aligned_batch_has_near_zero_loss():
    e = torch.eye(6, dtype=torch.float64)
    assert info_nce_loss(e, e, temperature=0.01, symmetric=True) < 1e-30
    # At a high temperature the same batch is close to uniform: log(6).
    assert info_nce_loss(e, e, temperature=1e4).item() == pytest.approx(math.log(6), rel=1e-3)


def test_bf16_inputs_give_float32_loss_close_to_fp32(batch):
    q, p, n = (t.float() for t in batch)
    ref = info_nce_loss(q, p, n, temperature=0.05, symmetric=True)
    got = info_nce_loss(q.bfloat16(), p.bfloat16(), n.bfloat16(), temperature=0.05, symmetric=True)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
    assert info_nce_loss(q.half(), p, temperature=0.05).dtype == torch.float32


_BAD_CALLS = [
    (dict(query=torch.randn(4), positive=torch.randn(4, 3)), "query must have shape"),
    (dict(query=torch.randn(2, 3), positive=torch.randn(2, 3, 1)), "positive must have shape"),
    (dict(query=torch.randn(2, 3), positive=torch.randn(2, 4)), "embedding size"),
    (dict(query=torch.randn(3, 3), positive=torch.randn(2, 3)), "only Bt=2 rows"),
    (dict(query=torch.randn(2, 3), positive=torch.randn(3, 3), query_offset=2), "query_offset=2"),
    (dict(query=torch.randn(0, 3), positive=torch.randn(2, 3)), "empty batch"),
    (dict(query=torch.randn(2, 3), positive=torch.randn(2, 3), negatives=torch.randn(2, 3)), "negatives"),
    (
        dict(query=torch.randn(2, 3), positive=torch.randn(2, 3), negatives=torch.randn(3, 1, 3)),
        r"\[2, K, 3\]",
    ),
    (
        dict(query=torch.randn(2, 3), positive=torch.randn(2, 3), positive_keys=torch.tensor([1, 2, 3])),
        "positive_keys must have shape",
    ),
    (
        dict(query=torch.randn(2, 3), positive=torch.randn(2, 3), positive_keys=torch.tensor([1.0, 2.0])),
        "integer",
    ),
    (
        dict(
            query=torch.randn(2, 3),
            positive=torch.randn(2, 3),
            negatives=torch.randn(2, 2, 3),
            negative_mask=torch.ones(2, 3, dtype=torch.bool),
        ),
        "negative_mask must have shape",
    ),
    (
        dict(
            query=torch.randn(2, 3),
            positive=torch.randn(2, 3),
            negatives=torch.randn(2, 2, 3),
            negative_mask=torch.ones(2, 2),
        ),
        "bool",
    ),
    (
        dict(
            query=torch.randn(2, 3),
            positive=torch.randn(2, 3),
            negatives=torch.randn(2, 2, 3),
            negative_keys=torch.ones(2, 2, dtype=torch.int64),
        ),
        "requires positive_keys",
    ),
    (
        dict(
            query=torch.randn(2, 3),
            positive=torch.randn(2, 3),
            negative_mask=torch.ones(2, 2, dtype=torch.bool),
        ),
        "negatives is None",
    ),
    (dict(query=torch.randn(2, 3), positive=torch.randn(2, 3), temperature=0.0), "temperature"),
    (dict(query=torch.randn(2, 3), positive=torch.randn(2, 3), temperature=torch.ones(2)), "single value"),
]


@pytest.mark.parametrize(("kwargs", "message"), _BAD_CALLS)
def test_shape_errors_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        info_nce_loss(**kwargs)


# --------------------------------------------------------------------------- content_keys


def test_content_keys():
    a = {"text": "a cat", "image": "img/1.jpg"}
    a_reordered = {"image": "img/1.jpg", "text": "a cat"}
    b = {"text": "a cat", "image": "img/2.jpg"}
    keys = content_keys([a, a_reordered, b, "a cat", ("x", 1), Path("img/1.jpg"), b"\x00"])
    assert keys.dtype == torch.int64 and keys.shape == (7,)
    assert keys[0] == keys[1]
    assert len(set(keys[[0, 2, 3, 4, 5, 6]].tolist())) == 6
    assert (keys >= 0).all()
    # Pinned value: ids must not depend on the process (hash seed) nor change between releases.
    assert content_keys(["a cat"]).item() == content_keys(["a cat"]).item() == _PINNED_A_CAT
    assert content_keys([{1, 2, 3}]).item() == content_keys([{3, 2, 1}]).item()
    assert content_keys([]).shape == (0,)
    with pytest.raises(TypeError, match="stable id"):
        content_keys([object()])


def test_content_keys_drive_false_negative_masking():
    items = [{"text": "dog"}, {"text": "cat"}, {"text": "dog"}]
    keys = content_keys(items)
    assert keys[0] == keys[2] and keys[0] != keys[1]
    p = _unit(3, 4, seed=9)
    p[2] = p[0]
    # Query 0 and 2 share a positive; with keys the duplicate no longer competes.
    assert info_nce_loss(p, p, temperature=0.001, positive_keys=keys) < 1e-6


# sha256(b"\"a cat\"")[:8] >> 1, i.e. the canonical JSON dump of the string.
_PINNED_A_CAT = 1170919754854926043
