"""CUDA checks (run on a GPU machine; CPU-only machines skip them, see docs/benchmarks.md)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import (
    check_frozen_vision_is_served,
    check_gradcache_replays_dropout,
    check_random_tower_runs_again,
    check_step_flops_against_forward,
    gradcache_rows,
    lora,
)
from vlm2emb import EmbeddingModel


@pytest.fixture(scope="module")
def rows(digit_images, tmp_path_factory):
    return gradcache_rows(tmp_path_factory.mktemp("gc-images"), digit_images)


pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def items(digit_images):
    return [
        "seven",
        "a longer caption about the digit three",
        digit_images[0],
        {"text": "q", "image": digit_images[1]},
    ]


def test_cuda_matches_cpu_and_is_batch_invariant(tiny_qwen2_vl_dir, items):
    cpu = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).encode(items)
    gpu_model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda")
    gpu = gpu_model.encode(items)
    torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)
    alone = torch.stack([gpu_model.encode(x) for x in items])
    torch.testing.assert_close(gpu, alone, atol=1e-5, rtol=0)


def test_bf16_on_cuda_is_close_to_fp32(tiny_qwen2_vl_dir, items):
    fp32 = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda").encode(items)
    bf16 = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda", torch_dtype="bf16").encode(items)
    assert torch.nn.functional.cosine_similarity(bf16, fp32).min() > 0.98


def test_training_step_on_cuda_updates_weights(tiny_qwen2_vl_dir, items):
    from vlm2emb.losses import InfoNCELoss

    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda").train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = InfoNCELoss()(model(model.collate(items[:2])), model(model.collate(items[2:])))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_replays_dropout_on_cuda(tiny_qwen2_vl_dir, rows, single_backward):
    """GradCache's re-forward must replay the CUDA generator, not only the CPU one."""
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda").train()
    check_gradcache_replays_dropout(model, rows, single_backward, device="cuda", atol=1e-4)


def test_mfu_flop_count_on_cuda_counts_the_sdpa_kernels(tmp_path):
    """On CUDA the harness counts with SDPA (its kernels are in torch's FLOP registry) under
    bf16 autocast; the full fine-tune step must still come to about 3x its forward."""
    ratios = check_step_flops_against_forward(tmp_path, device="cuda")
    assert 2.85 < ratios["full"] < 3.05, ratios
    assert ratios["lora"] < ratios["full"] - 0.2, ratios


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_serves_the_frozen_tower_on_cuda(tiny_qwen2_vl_dir, rows, single_backward):
    """The frozen tower's outputs are served on CUDA (the determinism check reads the CUDA
    generator too) with the plain step's gradients; with dropout they are not served."""
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda").train()
    check_frozen_vision_is_served(lora(model), rows, single_backward, device="cuda", atol=1e-4)
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda").train()
    check_random_tower_runs_again(model, rows, single_backward, device="cuda", atol=1e-4)


def test_compiled_blocks_on_cuda_match_eager(tiny_qwen2_vl_dir, items):
    """compile_blocks on CUDA (inductor's Triton kernels) embeds like the eager model."""
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, device="cuda")
    eager = model.encode(items)
    assert model.compile_blocks() == 4
    torch.testing.assert_close(model.encode(items), eager, atol=1e-4, rtol=0)
