"""The DiffusionGemma adapter (native transformers model) on a tiny random checkpoint."""

from __future__ import annotations

import re

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.backbones import get_adapter_class
from vlm2emb.backbones.diffusion_gemma import DiffusionGemmaAdapter
from vlm2emb.testing import tiny_backbone


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_backbone("diffusion_gemma", tmp_path_factory.mktemp("tiny-diffusion-gemma"))


@pytest.fixture(scope="module")
def items(digit_images):
    return [
        "seven",
        "a much longer caption about a handwritten digit that is clearly a three",
        digit_images[0],
        {"text": "which digit is this?", "image": digit_images[1]},
        {"images": [digit_images[2], digit_images[3]], "text": "two images"},
    ]


def test_tiny_checkpoint_is_a_real_diffusion_gemma(tiny_dir, digit_images):
    from transformers import AutoConfig, AutoProcessor

    assert get_adapter_class("diffusion_gemma") is DiffusionGemmaAdapter
    cfg = AutoConfig.from_pretrained(tiny_dir)
    assert cfg.model_type == "diffusion_gemma" and cfg.architectures == ["DiffusionGemmaForBlockDiffusion"]
    assert type(AutoProcessor.from_pretrained(tiny_dir)).__name__ == "Gemma4Processor"
    model = EmbeddingModel.from_pretrained(tiny_dir)
    assert (model.config.attention, model.config.pooling) == ("bidirectional", "mean")  # family defaults
    inputs = model.collate([{"text": "caption", "images": digit_images[:2]}])
    # 32x32 -> 96x96 px (aspect kept, 70-token budget), 4 px patches, 3x3 pooling: 64 each.
    assert int((inputs["input_ids"] == model.backbone.config.image_token_id).sum()) == 2 * 64


@pytest.mark.parametrize("attention", ["bidirectional", "causal"])
def test_embedding_does_not_depend_on_batch_mates(tiny_dir, items, attention):
    model = EmbeddingModel.from_pretrained(tiny_dir, attention=attention)
    alone = torch.stack([model.encode(item) for item in items])
    assert torch.isfinite(alone).all()
    for side in ("left", "right"):
        model.config.padding_side = side
        torch.testing.assert_close(model.encode(items, batch_size=len(items)), alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["last", "eos", "embed_token", "mean"])
def test_each_pooling_gives_finite_distinct_vectors(tiny_dir, items, pooling):
    emb = EmbeddingModel.from_pretrained(tiny_dir, pooling=pooling).encode(items[1:4])  # text, image, mixed
    assert torch.isfinite(emb).all()
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 1e-3


def test_attention_modes_and_padding(tiny_dir):
    pad_text = "a much longer sentence that forces padding of the others"
    for mode, should_change in (("causal", False), ("bidirectional", True)):
        model = EmbeddingModel.from_pretrained(tiny_dir, attention=mode, padding_side="left")
        inputs = model.collate(["one two three four", "one two three nine", pad_text])
        with torch.no_grad():
            h, mask = model.adapter.forward(model.backbone, inputs)
            alone, alone_mask = model.adapter.forward(model.backbone, model.collate(["one two three four"]))
        first = mask[0].nonzero()[0, 0]
        assert (not torch.allclose(h[0, first], h[1, first], atol=1e-5)) == should_change, mode
        torch.testing.assert_close(h[0][mask[0].bool()], alone[0][alone_mask[0].bool()], atol=1e-5, rtol=0)


def test_embeddings_come_from_the_encoder_not_the_random_canvas(tiny_dir):
    model = EmbeddingModel.from_pretrained(tiny_dir, attention="causal")
    inputs = model.collate(["one two three four"])
    with torch.no_grad():
        ours, _ = model.adapter.forward(model.backbone, inputs)
        again, _ = model.adapter.forward(model.backbone, inputs)
        # The full model samples a random canvas for its decoder; its encoder output is ours.
        full = model.backbone(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.equal(ours, again)
    torch.testing.assert_close(ours, full.encoder_last_hidden_state, atol=1e-5, rtol=0)
    assert full.last_hidden_state.shape[1] == model.backbone.config.canvas_length  # the canvas


def test_lora_step_changes_only_encoder_lm_lora_weights(tiny_dir, items):
    model = EmbeddingModel.from_pretrained(tiny_dir)
    pattern = re.compile(DiffusionGemmaAdapter.lora_target_modules)
    matched = [n for n, _ in model.backbone.named_modules() if pattern.fullmatch(n)]
    assert matched and all(n.startswith("encoder.language_model.layers.") for n in matched)
    kinds = {n.rsplit(".", 1)[1] for n in matched}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    loss = -(model(model.collate(items[:3])) * model(model.collate(items[2:]))).sum()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n and ".encoder.language_model." in n for n in changed)


def test_save_load_round_trip_is_exact(tiny_dir, items, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny_dir, pooling="last")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = model.encode(items)
    reloaded = EmbeddingModel.from_pretrained(model.save_pretrained(tmp_path / "saved"))
    assert (reloaded.config.attention, reloaded.config.pooling) == ("bidirectional", "last")
    assert torch.equal(reloaded.encode(items), before)


def test_lora_round_trip(tiny_dir, items, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny_dir)
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = model.encode(items)
    out = model.save_pretrained(tmp_path / "lora")
    torch.testing.assert_close(EmbeddingModel.from_pretrained(out).encode(items), before, atol=1e-5, rtol=0)
