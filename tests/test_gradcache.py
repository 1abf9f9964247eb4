"""GradCache gives the gradients of the plain step (single process; multi-process runs are
checked end to end in tests/train/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.data.collate import ContrastiveCollator
from vlm2emb.data.schema import TrainExample
from vlm2emb.gradcache import ContrastiveStep, chunk_cost
from vlm2emb.losses import InfoNCELoss


@pytest.fixture
def model(tiny_qwen2_vl_dir) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).train()


@pytest.fixture(scope="module")
def rows(digit_images, tmp_path_factory) -> list[TrainExample]:
    folder = tmp_path_factory.mktemp("gc-images")
    paths = []
    for i, img in enumerate(digit_images[:6]):
        paths.append(str(folder / f"{i}.png"))
        img.save(paths[-1])
    out = []
    for i in range(6):
        negatives = [{"text": f"a handwritten digit {(i + 1 + j) % 10}"} for j in range(i % 3)]  # ragged
        out.append(
            TrainExample(
                query={"images": [paths[i]], "text": None},
                positive={"text": f"a handwritten digit {i % 4}"},  # rows 0 and 4 share a positive
                negatives=negatives,
                instruction="Represent the given image.",
                source=f"t:{i}",
            )
        )
    return out


def _grads(
    model,
    batch,
    *,
    gradcache,
    single_backward=False,
    learnable=False,
    seed=0,
    device="cpu",
    reuse_vision=True,
):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # seeds CUDA too
    assert (model.logit_scale is not None) == learnable
    model.config.temperature = 0.05  # the model owns the training temperature
    step = ContrastiveStep(
        model,
        InfoNCELoss(temperature=0.05, symmetric=True),
        gradcache=gradcache,
        device=torch.device(device),
        single_backward=single_backward,
        reuse_frozen_vision=reuse_vision,
    )
    loss = step.forward_loss(batch)
    step.backward(loss, lambda tensor, _sync: tensor.backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _assert_same(a, b, atol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(
            grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_equals_the_full_batch_step(model, rows, single_backward):
    plain = _grads(model, ContrastiveCollator(model.inputs)(rows), gradcache=False)
    chunked = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    assert len(chunked.query) == 3 and len(chunked.negatives) == 3  # 6 negatives in chunks of 2
    _assert_same(_grads(model, chunked, gradcache=True, single_backward=single_backward), plain)


def check_gradcache_replays_dropout(model, rows, single_backward, device="cpu", atol=1e-5):
    """Shared with tests/test_gpu.py, where the replayed state is the CUDA generator's."""
    for module in model.backbone.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3  # randomness in every attention layer
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    # Plain step over the same chunks draws the same random numbers in the same order.
    plain = _grads(model, batch, gradcache=False, seed=3, device=device)
    other_seed = _grads(model, batch, gradcache=False, seed=4, device=device)
    assert other_seed[0] != pytest.approx(plain[0], abs=1e-6)  # dropout really is active
    cached = _grads(model, batch, gradcache=True, single_backward=single_backward, seed=3, device=device)
    _assert_same(cached, plain, atol=atol)


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


def check_frozen_vision_is_served(model, rows, single_backward, device="cpu", atol=1e-5):
    """GradCache with a frozen vision tower gives the plain step's loss and gradients, and
    the tower runs only as often as in the plain step over the same chunks: its first-pass
    outputs are served to the re-forward. Without the reuse it runs again (the control).

    Shared with tests/backbones/test_families.py (every family) and tests/test_gpu.py.
    """
    from vlm2emb.gradcache import frozen_vision_tower

    tower = frozen_vision_tower(model)
    assert tower is not None  # LoRA (or model.freeze_vision) froze it
    # Count the tower's real work at its first parameterised module: a served output skips
    # the tower's forward, but not the hooks on the tower itself.
    leaf = next(m for m in tower.modules() if next(m.parameters(recurse=False), None) is not None)
    runs: list[int] = []
    handle = leaf.register_forward_hook(lambda *_: runs.append(1))
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    try:
        plain = _grads(model, batch, gradcache=False, device=device)
        n_plain, runs[:] = len(runs), []
        served = _grads(model, batch, gradcache=True, single_backward=single_backward, device=device)
        n_served, runs[:] = len(runs), []
        rerun = _grads(
            model, batch, gradcache=True, single_backward=single_backward, device=device, reuse_vision=False
        )
        n_rerun = len(runs)
    finally:
        handle.remove()
    assert n_plain >= 2 and n_served == n_plain and n_rerun > n_plain, (n_plain, n_served, n_rerun)
    _assert_same(served, plain, atol=atol)
    _assert_same(rerun, plain, atol=atol)


def lora(model):
    """LoRA r4 adapters without dropout and with random B (shared with tests/test_gpu.py and
    tests/backbones/test_families.py)."""
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero; give the adapters a nonzero effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_serves_a_frozen_vision_tower(model, rows, single_backward):
    check_frozen_vision_is_served(lora(model), rows, single_backward)


def test_gradcache_serves_a_tower_frozen_in_a_full_fine_tune(model, rows):
    for param in model.adapter.vision_tower(model.backbone).parameters():
        param.requires_grad_(False)  # what model.freeze_vision does
    check_frozen_vision_is_served(model, rows, single_backward=False)


def check_random_tower_runs_again(model, rows, single_backward, device="cpu", atol=1e-5):
    """Attention dropout in the frozen tower and in the decoder: skipping the tower in the
    re-forward would shift the random numbers the decoder draws after it, so the cache must
    refuse to serve it (it sees the random state change) and the tower runs again, replayed.
    Shared with tests/test_gpu.py (the CUDA generator's state)."""
    from vlm2emb.gradcache import frozen_vision_tower

    lora(model)
    tower = frozen_vision_tower(model)
    for module in model.backbone.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    plain = _grads(model, batch, gradcache=False, seed=3, device=device)
    assert _grads(model, batch, gradcache=False, seed=4, device=device)[0] != pytest.approx(
        plain[0], abs=1e-6
    )
    calls: list[int] = []
    handle = tower.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cached = _grads(model, batch, gradcache=True, single_backward=single_backward, seed=3, device=device)
    finally:
        handle.remove()
    image_chunks = sum("pixel_values" in c for c in batch.query)
    assert len(calls) > image_chunks  # ran again in the re-forward
    _assert_same(cached, plain, atol=atol)


@pytest.mark.parametrize("single_backward", [False, True])
def test_a_frozen_tower_that_draws_random_numbers_runs_again(model, rows, single_backward):
    check_random_tower_runs_again(model, rows, single_backward)
