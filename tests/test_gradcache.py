"""GradCache gives the gradients of the plain step (single process; multi-process runs are
checked end to end in tests/train/test_distributed.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.helpers import assert_same_step as _assert_same
from tests.helpers import (
    check_frozen_vision_is_served,
    check_gradcache_replays_dropout,
    check_random_tower_runs_again,
    gradcache_rows,
    lora,
)
from tests.helpers import step_grads as _grads
from vlm2emb import EmbeddingModel
from vlm2emb.data.collate import ContrastiveCollator
from vlm2emb.data.schema import TrainExample
from vlm2emb.gradcache import chunk_cost
from vlm2emb.losses import InfoNCELoss
from vlm2emb.losses.distill import DistillationLoss


@pytest.fixture
def model(tiny_qwen2_vl_dir) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).train()


@pytest.fixture(scope="module")
def rows(digit_images, tmp_path_factory) -> list[TrainExample]:
    return gradcache_rows(tmp_path_factory.mktemp("gc-images"), digit_images)


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_equals_the_full_batch_step(model, rows, single_backward):
    plain = _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False)
    chunked = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    assert len(chunked.query) == 3 and len(chunked.negatives) == 3  # 6 negatives in chunks of 2
    _assert_same(_grads(model, chunked, gradcache=True, single_backward=single_backward), plain)


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_replays_dropout(model, rows, single_backward):
    check_gradcache_replays_dropout(model, rows, single_backward)


def test_gradcache_with_learnable_temperature(model, rows):
    model.enable_learnable_temperature(0.05)
    plain = _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False, learnable=True)
    assert "logit_scale" in plain[1] and plain[1]["logit_scale"].abs() > 0
    for single_backward in (False, True):
        batch = ContrastiveCollator(model.inputs, chunk_size=4)(rows)
        _assert_same(
            _grads(model, batch, gradcache=True, single_backward=single_backward, learnable=True), plain
        )


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_with_lora_and_gradient_checkpointing(model, rows, single_backward):
    lora(model)
    model.enable_gradient_checkpointing()
    plain = _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False)
    assert plain[1] and all("lora_" in name for name in plain[1])  # only adapters get gradients
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    _assert_same(_grads(model, batch, gradcache=True, single_backward=single_backward), plain)


def test_length_sorted_sub_batches_give_the_plain_step(model, rows):
    """Plain step with each side split into length-sorted sub-batches (train.length_buckets):
    same loss and gradients as one padded batch; the rows vary in length, so the sort
    really reorders them and the step must map embeddings back to their rows."""
    rows = [
        TrainExample(query={"text": "q " * (1 + (7 * i) % 5)}, positive=r.positive, negatives=r.negatives)
        for i, r in enumerate(rows)
    ]
    plain = _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False)
    bucketed = ContrastiveCollator(model.inputs, length_buckets=3)(rows)
    assert len(bucketed.query) == 3
    assert bucketed.query_order.tolist() != list(range(6))
    _assert_same(_grads(model, bucketed, gradcache=False), plain)
    _assert_same(_grads(model, ContrastiveCollator(model.inputs, chunk_size=4)(rows), gradcache=True), plain)


def test_gradcache_keeps_the_most_expensive_chunk(model, rows):
    """The chunk kept from the first pass (embedded once, never re-run) is the costliest by
    chunk_cost (here an image query chunk, not the last chunk, a caption one), and every
    other chunk is embedded twice: once without a graph, once with."""
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    chunks = [*batch.query, *batch.positive, *batch.negatives]
    costs = [chunk_cost(c) for c in chunks]
    expensive = max(range(len(chunks)), key=lambda i: (costs[i], i))
    assert expensive < len(batch.query) and costs[expensive] > costs[-1]  # an image chunk
    seen: list[tuple[int, bool]] = []
    forward = model.forward

    def spy(inputs, *args, **kwargs):
        for x in inputs:
            seen.append((next(i for i, c in enumerate(chunks) if c is x), torch.is_grad_enabled()))
        return forward(inputs, *args, **kwargs)

    model.forward = spy
    try:
        got = _grads(model, batch, gradcache=True)
    finally:
        del model.forward
    assert sorted(seen) == sorted(
        [(expensive, True)] + [(i, g) for i in range(len(chunks)) if i != expensive for g in (False, True)]
    )
    assert seen[expensive] == (expensive, True)  # embedded in its place: same random draws as plain
    _assert_same(got, _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False))


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_serves_a_frozen_vision_tower(model, rows, single_backward):
    check_frozen_vision_is_served(lora(model), rows, single_backward)


def test_gradcache_serves_a_tower_frozen_in_a_full_fine_tune(model, rows):
    for param in model.adapter.vision_tower(model.backbone).parameters():
        param.requires_grad_(False)  # what model.freeze_vision does
    check_frozen_vision_is_served(model, rows, single_backward=False)


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_frozen_tower_that_draws_random_numbers_runs_again(model, rows, single_backward):
    check_random_tower_runs_again(model, rows, single_backward)


@pytest.mark.parametrize(
    "objective",
    [
        lambda: InfoNCELoss(temperature=0.05, hardness_alpha=4.0, false_negative_margin=0.05),
        lambda: DistillationLoss(temperature=0.05, kl_weight=0.5, teacher_temperature=0.2),
    ],
    ids=["infonce-options", "distill"],
)
def test_gradcache_equals_the_full_batch_step_for_other_objectives(model, rows, objective):
    # Teacher scores on all rows but one (a row without them only adds InfoNCE).
    scored = [
        dataclasses.replace(ex, teacher_scores=[1.0 - 0.3 * j for j in range(1 + len(ex.negatives))])
        if i != 2
        else ex
        for i, ex in enumerate(rows)
    ]
    plain = _grads(model, ContrastiveCollator(model.inputs)(scored), gradcache=False, loss=objective())
    chunked = ContrastiveCollator(model.inputs, chunk_size=2)(scored)
    assert chunked.teacher_scores is not None and chunked.teacher_scores.shape == (6, 3)
    _assert_same(_grads(model, chunked, gradcache=True, loss=objective()), plain)


@pytest.mark.parametrize("gradcache", [False, True])
def test_a_single_vector_loss_leaves_the_multivector_head_out(tiny_qwen2_vl_dir, model, rows, gradcache):
    """InfoNCE on a model that also has a multi-vector head: the head is not run, so it gets
    no gradient (not zeros, which AdamW's weight decay would still act on, and no forward
    output DDP would wait for), and every other gradient is the head-less model's."""
    headed = EmbeddingModel.from_pretrained(
        tiny_qwen2_vl_dir, config_overrides={"multivector_dim": 16}
    ).train()
    headed.load_state_dict(model.state_dict(), strict=False)  # the same backbone weights
    batch = ContrastiveCollator(headed.inputs, chunk_size=2 if gradcache else 0)(rows)
    loss, grads = _grads(headed, batch, gradcache=gradcache)
    assert not any(name.startswith("multivector_head") for name in grads)
    assert all(p.grad is None for p in headed.multivector_head.parameters())
    _assert_same((loss, grads), _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False))
