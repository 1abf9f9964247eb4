"""LLaVA family (``model_type`` ``llava``), e.g. ``llava-hf/llava-1.5-7b-hf``.

Prompt: one ``<image>`` per image on its own line, then the instruction and the text (the
plain form VLM2Vec uses for LLaVA-style models; no chat template). The processor expands
each ``<image>`` to one token per selected vision feature: with the ``default`` feature
select strategy the CLIP ``[CLS]`` feature is dropped, which the processor accounts for
through ``num_additional_image_tokens=1``.

The LLaVA-NeXT and LLaVA-OneVision adapters subclass :class:`LlavaAdapter`: they share the
prompt format and the LoRA targets, and differ in image tiling (see their modules).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from vlm2emb.backbones.base import BackboneAdapter, set_output_field
from vlm2emb.backbones.lora_targets import LANGUAGE_MODEL_PROJECTIONS

LLAVA_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", BackboneAdapter.embed_token]


# A 2-layer, 32-wide CLIP vision tower on 16 px images (patch 4), shared by the LLaVA tiny builders.
TINY_CLIP_VISION = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 16,
    "patch_size": 4,
    "projection_dim": 32,
}


class LlavaAdapter(BackboneAdapter):
    """Adapter for LLaVA-1.5 style checkpoints (CLIP tower + MLP projector + decoder)."""

    # Plain causal + padding decoder masks (see BackboneAdapter).
    padding_mask_optional_when_causal: ClassVar[bool] = True

    family: ClassVar[str] = "llava"
    tokenize_text_directly: ClassVar[bool] = True
    model_types: ClassVar[tuple[str, ...]] = ("llava",)
    # The decoder is ``language_model`` (a LlamaModel / Qwen2Model ...) inside the base model;
    # the CLIP/SigLIP tower lives under ``vision_tower`` and the projector under
    # ``multi_modal_projector`` (linear_1/linear_2), so neither can match this pattern.
    lora_target_modules: ClassVar[str] = LANGUAGE_MODEL_PROJECTIONS
    image_placeholder: ClassVar[str] = "<image>\n"

    def trim_vision_output(self, output: Any, config: Any) -> Any:
        # The LLaVA family (and InternVL's hidden-state path) select the hidden states of
        # ``vision_feature_layer`` (one index or a list); the other layers' are dropped.
        hidden = getattr(output, "hidden_states", None)
        if hidden is not None:
            layers = getattr(config, "vision_feature_layer", -1)
            keep = {i % len(hidden) for i in (layers if isinstance(layers, (list, tuple)) else [layers])}
            set_output_field(
                output, "hidden_states", tuple(h if i in keep else None for i, h in enumerate(hidden))
            )
            set_output_field(output, "last_hidden_state", None)
        return output

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import (
            CLIPImageProcessor,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        from vlm2emb.testing import save_tiny_checkpoint, tiny_text_config, tiny_tokenizer

        tok = tiny_tokenizer(LLAVA_SPECIALS, eos_token="</s>", pad_token="<pad>")
        # 16x16 px images, patch 4: 16 patches + CLS; the "default" strategy drops CLS,
        # so each image becomes 16 LM tokens.
        image_processor = CLIPImageProcessor(
            size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}
        )
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=4,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        config = LlavaConfig(
            vision_config=dict(TINY_CLIP_VISION),
            text_config=tiny_text_config(tok, "llama", "<s>"),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_seq_length=16,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        return save_tiny_checkpoint(LlavaForConditionalGeneration, config, processor, path, seed=seed)
