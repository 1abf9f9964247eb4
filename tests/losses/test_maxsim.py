"""The MaxSim InfoNCE loss (vlm2emb/losses/maxsim.py): values against independent
recomputations, masking, the registry, and GradCache giving the plain step's gradients.

colpali-engine is not installed (its release pins an older torch); its ColbertLoss formula
(MaxSim over zero-padded token sets, divided by the count of non-zero query tokens, then
cross-entropy of scores / temperature against arange + offset) is recomputed here.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_step, gradcache_rows
from vlm2emb import EmbeddingModel
from vlm2emb.data.collate import ContrastiveCollator
from vlm2emb.gradcache import ContrastiveStep
from vlm2emb.items import ContrastiveBatch
from vlm2emb.losses import InfoNCELoss, build_loss, info_nce_loss
from vlm2emb.losses.maxsim import MaxSimLoss, maxsim_info_nce_loss
from vlm2emb.multivector import MultiVectorEmbeddings, pad_token_sets


def _sets(lengths: list[int], dim: int = 6, seed: int = 0) -> MultiVectorEmbeddings:
    g = torch.Generator().manual_seed(seed)
    sets = [F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=-1) for n in lengths]
    return MultiVectorEmbeddings(*pad_token_sets(sets))


def _colbert_loss(q: torch.Tensor, d: torch.Tensor, temperature: float, offset: int = 0) -> torch.Tensor:
    """colpali-engine's ColbertLoss formula on zero-padded tensors (normalize_scores=True)."""
    scores = torch.einsum("bnd,csd->bcns", q, d).max(dim=3)[0].sum(dim=2)  # [Bq, Bt]
    scores = scores / (q[:, :, 0] != 0).sum(dim=1).unsqueeze(-1)
    return F.cross_entropy(scores / temperature, torch.arange(q.shape[0]) + offset)


def _loop_loss(q, cands, targets, temperature, dropped=()):
    """Per query: -log softmax over MaxSim / n_tokens of every candidate not dropped."""
    total = 0.0
    for i, target in enumerate(targets):
        qi = q.tokens[i][q.mask[i]]
        scores = {}
        for c in range(len(cands)):
            if (i, c) in dropped:
                continue
            dc = cands.tokens[c][cands.mask[c]]
            scores[c] = float((qi @ dc.T).max(dim=1).values.sum()) / len(qi) / temperature
        log_z = math.log(sum(math.exp(s - max(scores.values())) for s in scores.values())) + max(
            scores.values()
        )
        total += log_z - scores[target]
    return total / len(targets)


def test_loss_equals_colbert_formula_without_negatives():
    q = _sets([3, 5, 2, 4], seed=1)
    p = _sets([6, 6, 6, 6], seed=2)  # equal lengths: zero padding and masks agree
    for offset, rows in ((0, slice(0, 4)), (2, slice(2, 4))):
        local = q.take_rows(torch.arange(4)[rows] - offset)
        got = maxsim_info_nce_loss(local, p, temperature=0.05, query_offset=offset)
        assert float(got) == pytest.approx(
            float(_colbert_loss(local.tokens, p.tokens, 0.05, offset)), abs=1e-12
        )


def test_loss_with_ragged_hard_negatives_and_false_negatives_equals_a_loop():
    q, p = _sets([3, 5, 2], seed=3), _sets([4, 2, 6], seed=4)
    negs = MultiVectorEmbeddings.cat_rows([_sets([3, 5], seed=5), _sets([2], seed=6)])
    mask = torch.tensor([[True, True], [False, False], [True, False]])
    grouped = negs.grouped(mask, padded=False)  # [3, 2, L, D]
    keys = torch.tensor([7, 8, 7])  # rows 0 and 2 share a positive: a false negative
    got = maxsim_info_nce_loss(
        q, p, grouped, temperature=0.1, positive_keys=keys, negative_mask=mask, reduction="mean"
    )
    cands = MultiVectorEmbeddings.cat_rows([p, grouped.flatten_rows()])  # 3 positives + 6 slots
    padding = {(i, 3 + s) for i in range(3) for s in (2, 3, 5)}
    dupes = {(0, 2), (2, 0)}
    want = _loop_loss(q, cands, [0, 1, 2], 0.1, dropped=padding | dupes)
    assert float(got) == pytest.approx(want, abs=1e-10)


def test_unnormalized_scores_and_gradcheck():
    q, p = _sets([2, 3], seed=7), _sets([3, 1], seed=8)
    raw = maxsim_info_nce_loss(q, p, temperature=1.0, normalize_scores=False, reduction="none")
    s = torch.tensor(
        [
            [float((q.tokens[i][q.mask[i]] @ p.tokens[c][p.mask[c]].T).max(1).values.sum()) for c in range(2)]
            for i in range(2)
        ]
    )
    torch.testing.assert_close(raw, F.cross_entropy(s.double(), torch.arange(2), reduction="none"))
    tokens = q.tokens.clone().requires_grad_()

    def fn(t):
        return maxsim_info_nce_loss(MultiVectorEmbeddings(t, q.mask), p, temperature=0.5)

    assert torch.autograd.gradcheck(fn, (tokens,))


def _batch(b: int) -> ContrastiveBatch:
    return ContrastiveBatch(query=[], positive=[], positive_keys=torch.arange(b))


def test_joint_loss_is_the_weighted_sum_of_both_heads():
    q, p = _sets([3, 2, 4], seed=9), _sets([2, 5, 3], seed=10)
    q.dense, p.dense = _sets([1, 1, 1], seed=11).tokens[:, 0], _sets([1, 1, 1], seed=12).tokens[:, 0]
    loss = MaxSimLoss(dense_weight=0.5, multivector_weight=2.0)
    got = loss.training_loss(q, p, None, _batch(3), 0.05)
    want = 2.0 * maxsim_info_nce_loss(q, p, temperature=0.05) + 0.5 * info_nce_loss(
        q.dense, p.dense, temperature=0.05
    )
    assert float(got) == pytest.approx(float(want), abs=1e-10)
    with pytest.raises(TypeError, match="multi-vector head"):
        loss.training_loss(q.dense, p.dense, None, _batch(3), 0.05)


def test_registry_builds_the_loss_from_the_recipe():
    train = SimpleNamespace(
        loss="maxsim",
        loss_args={"dense_weight": 0.25},
        temperature=0.02,
        matryoshka_dims=[],
        symmetric_loss=False,
    )
    loss = build_loss(train)
    assert isinstance(loss, MaxSimLoss) and (loss.dense_weight, loss.temperature) == (0.25, 0.02)
    train.loss_args = {"dense_wieght": 1.0}
    with pytest.raises(ValueError, match="dense_wieght"):
        build_loss(train)


# --------------------------------------------------------------------- GradCache
def _step(model, batch, loss_fn, *, gradcache, single_backward=False):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    step = ContrastiveStep(
        model, loss_fn, gradcache=gradcache, device=torch.device("cpu"), single_backward=single_backward
    )
    loss = step.forward_loss(batch)
    step.backward(loss, lambda tensor, _sync: tensor.backward())
    return float(loss.detach()), {
        n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
    }


@pytest.fixture(scope="module")
def rows(digit_images, tmp_path_factory):
    return gradcache_rows(tmp_path_factory.mktemp("maxsim-images"), digit_images)


def test_gradcache_equals_the_full_batch_step(tiny_qwen2_vl_dir, rows):
    """Joint dense + MaxSim loss with ragged hard negatives: chunked GradCache (per-chunk
    and one-backward forms) gives the plain step's loss and gradients, head included."""
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"multivector_dim": 8}).train()
    model.config.temperature = 0.05
    loss_fn = MaxSimLoss(0.05, dense_weight=0.5)
    plain = _step(model, ContrastiveCollator(model.inputs)(rows), loss_fn, gradcache=False)
    assert plain[1]["multivector_head.proj.weight"].abs().sum() > 0
    chunked = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    assert len(chunked.query) == 3 and len(chunked.negatives) == 3
    for single_backward in (False, True):
        got = _step(model, chunked, loss_fn, gradcache=True, single_backward=single_backward)
        assert_same_step(got, plain)
    dense_only = _step(model, ContrastiveCollator(model.inputs)(rows), InfoNCELoss(0.05), gradcache=False)
    assert "multivector_head.proj.weight" not in dense_only[1]  # the head is trained by MaxSim only
