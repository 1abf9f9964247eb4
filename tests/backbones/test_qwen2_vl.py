"""The Qwen2-VL adapter and its tiny offline builder."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

from vlm2emb.backbones import available_families, get_adapter_class
from vlm2emb.backbones.qwen2_vl import Qwen2VLAdapter
from vlm2emb.testing import tiny_backbone


def test_registry_finds_the_family_by_name_and_model_type():
    assert "qwen2_vl" in available_families()
    assert get_adapter_class("qwen2_vl") is Qwen2VLAdapter
    with pytest.raises(KeyError, match="no vlm2emb backbone adapter for model type 'llama9'"):
        get_adapter_class("llama9")


def test_tiny_checkpoint_has_the_downloaded_layout(tiny_qwen2_vl_dir):
    names = {p.name for p in tiny_qwen2_vl_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= names
    from transformers import AutoConfig, AutoProcessor

    cfg = AutoConfig.from_pretrained(tiny_qwen2_vl_dir)
    assert cfg.model_type == "qwen2_vl" and cfg.architectures == ["Qwen2VLForConditionalGeneration"]
    proc = AutoProcessor.from_pretrained(tiny_qwen2_vl_dir)
    assert type(proc).__name__ == "Qwen2VLProcessor"
    # The tokenizer is real: it round-trips arbitrary text, including non-ASCII.
    text = "Ünïcode digits 0123 and a cat!"
    assert proc.tokenizer.decode(proc.tokenizer(text)["input_ids"]) == text


def test_tiny_builder_is_deterministic(tmp_path):
    a = load_file(tiny_backbone("qwen2_vl", tmp_path / "a", seed=3) / "model.safetensors")
    b = load_file(tiny_backbone("qwen2_vl", tmp_path / "b", seed=3) / "model.safetensors")
    c = load_file(tiny_backbone("qwen2_vl", tmp_path / "c", seed=4) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_image_placeholders_expand_to_merged_patches(tiny_qwen2_vl_dir, digit_images):
    from vlm2emb import EmbeddingModel

    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    prompt = model.adapter.render_prompt("caption", 2, "Instr.")
    assert prompt == 2 * Qwen2VLAdapter.image_placeholder + "Instr.\ncaption"
    inputs = model.collate([{"text": "caption", "images": digit_images[:2]}])
    image_id = model.backbone.config.image_token_id
    # 32x32 px, patch 4 -> 8x8 patches, 2x2 merge -> 16 tokens per image.
    assert int((inputs["input_ids"] == image_id).sum()) == 2 * 16
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]


def test_default_lora_targets_are_language_model_projections_only(tiny_qwen2_vl_dir):
    from vlm2emb import EmbeddingModel

    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    pattern = re.compile(Qwen2VLAdapter.lora_target_modules)
    matched = [n for n, _ in model.backbone.named_modules() if pattern.fullmatch(n)]
    assert matched, "the LoRA regex matches nothing"
    assert all(n.startswith("language_model.") for n in matched)
    kinds = {n.rsplit(".", 1)[1] for n in matched}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    # Every decoder layer is covered.
    n_layers = model.backbone.config.text_config.num_hidden_layers
    assert len(matched) == 7 * n_layers
