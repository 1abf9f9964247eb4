"""MatryoshkaLoss against a plain PyTorch recomputation, through GradCache, and in training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm2emb import EmbeddingModel
from vlm2emb.data.collate import ContrastiveCollator
from vlm2emb.data.schema import TrainExample
from vlm2emb.gradcache import ContrastiveStep
from vlm2emb.losses import InfoNCELoss, MatryoshkaLoss
from vlm2emb.train.config import ConfigError, load_recipe

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"


def _reference(q, t, n, dims, weights, temperature):
    """Loop over prefixes and queries: -log softmax of the own positive among all candidates."""
    d = q.shape[1]
    total = 0.0
    for m, w in sorted({d: 1.0, **dict(zip(dims, weights))}.items()):
        qm = q[:, :m] / q[:, :m].norm(dim=1, keepdim=True)
        tm = t[:, :m] / t[:, :m].norm(dim=1, keepdim=True)
        nm = n[..., :m] / n[..., :m].norm(dim=-1, keepdim=True)
        cands = torch.cat([tm, nm.reshape(-1, m)])  # [Bt + Bt*K, m]
        per_query = []
        for i in range(q.shape[0]):
            logits = torch.stack([qm[i] @ c for c in cands]) / temperature
            per_query.append(-(logits[i] - torch.logsumexp(logits, dim=0)))
        total = total + w * torch.stack(per_query).mean()
    return total


def test_matches_a_plain_recomputation_with_gradients():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    n = torch.randn(5, 2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = MatryoshkaLoss(InfoNCELoss(temperature=0.1), dims=[4, 8], weights=[0.5, 2.0])
    ours = loss_fn(q, t, n)
    ref = _reference(q, t, n, [4, 8], [0.5, 2.0], 0.1)
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, (q, t, n))
    g_ref = torch.autograd.grad(ref, (q, t, n))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    # Outside distributed runs the gathered form is the same loss.
    torch.testing.assert_close(loss_fn.gathered(q, t, n), ours)
    # Different from plain InfoNCE (the prefixes add terms), equal when only the full size is used.
    full_only = MatryoshkaLoss(InfoNCELoss(temperature=0.1), dims=[12])
    torch.testing.assert_close(
        full_only(q, t, n),
        InfoNCELoss(temperature=0.1)(F.normalize(q, dim=-1), F.normalize(t, dim=-1), F.normalize(n, dim=-1)),
    )
    assert not torch.allclose(ours, full_only(q, t, n))


def test_errors():
    with pytest.raises(ValueError, match="positive integers"):
        MatryoshkaLoss(InfoNCELoss(), dims=[])
    with pytest.raises(ValueError, match="2 matryoshka weights for 1 dims"):
        MatryoshkaLoss(InfoNCELoss(), dims=[8], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"train.matryoshka_dims: \[32\] exceed the embedding size 16"):
        MatryoshkaLoss(InfoNCELoss(), dims=[8, 32])(torch.randn(3, 16), torch.randn(3, 16))
    with pytest.raises(ConfigError, match=r"train\.matryoshka_weights"):
        load_recipe(RECIPE, ["train.matryoshka_dims=[16,32]", "train.matryoshka_weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"train\.matryoshka_dims: must be positive"):
        load_recipe(RECIPE, ["train.matryoshka_dims=[0]"])
    assert load_recipe(RECIPE, ["train.matryoshka_dims=16,32"]).train.matryoshka_dims == [16, 32]


def test_gradcache_gives_the_plain_steps_gradients(tiny_qwen2_vl_dir, digit_images, tmp_path):
    paths = []
    for i, img in enumerate(digit_images[:6]):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    rows = [
        TrainExample(
            query={"images": [paths[i]], "text": None},
            positive={"text": f"a handwritten digit {i}"},
            negatives=[{"text": f"a handwritten digit {(i + 3) % 10}"}],
            instruction="Represent the given image.",
            source=f"t:{i}",
        )
        for i in range(6)
    ]
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).train()
    model.config.temperature = 0.05  # the model owns the training temperature
    loss_fn = MatryoshkaLoss(InfoNCELoss(temperature=0.05, symmetric=True), dims=[16, 32])

    def grads(batch, gradcache, single_backward=False):
        model.zero_grad(set_to_none=True)
        step = ContrastiveStep(
            model, loss_fn, gradcache=gradcache, device=torch.device("cpu"), single_backward=single_backward
        )
        loss = step.forward_loss(batch)
        step.backward(loss, lambda tensor, _sync: tensor.backward())
        return float(loss.detach()), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    plain_loss, plain = grads(ContrastiveCollator(model.inputs)(rows), gradcache=False)
    for single_backward in (False, True):
        loss, chunked = grads(ContrastiveCollator(model.inputs, chunk_size=2)(rows), True, single_backward)
        # rel: a loss of about 12 summed in float32 (eps 1.2e-7); the kept chunk runs with autograd
        assert loss == pytest.approx(plain_loss, rel=1e-6, abs=1e-6)
        assert chunked.keys() == plain.keys() and plain
        for name in plain:
            torch.testing.assert_close(chunked[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_training_with_matryoshka_dims(tmp_path):
    from vlm2emb.train.loop import train

    cfg = load_recipe(
        RECIPE,
        [
            f"output_dir={tmp_path}",
            "train.max_steps=4",
            "train.batch_size=8",
            "train.log_steps=2",
            "train.eval_before=false",
            "train.gradcache_chunk_size=4",
            "train.matryoshka_dims=[16, 32]",
            "data.eval=[]",
        ],
    )
    summary = train(cfg, progress=False)
    assert summary["final_loss"] == summary["final_loss"]  # finite, not NaN
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # Three InfoNCE terms (16, 32, 64), each near chance (about log 8) at the start.
    assert records[0]["loss"] > 3 * 1.0
    saved = json.loads((tmp_path / "final" / "vlm2emb_config.json").read_text())
    assert saved["matryoshka_dims"] == [16, 32]
    model = EmbeddingModel.from_pretrained(tmp_path / "final", truncate_dim=16)
    emb = model.encode(["a handwritten digit seven", "two"])
    assert emb.shape == (2, 16) and torch.allclose(emb.norm(dim=1), torch.ones(2))
