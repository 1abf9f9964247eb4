"""InternVL family (``model_type`` ``internvl``): the transformers-native ("-hf") InternVL
checkpoints, e.g. ``OpenGVLab/InternVL3-1B-hf`` (the original ``OpenGVLab/InternVL3-1B``
repositories are remote code with another layout and do not load through this adapter).

Prompt: ``<IMG_CONTEXT>\\n`` per image (the placeholder InternVL's chat template writes), then
the instruction and the text. The processor expands each placeholder to ``<img>`` +
``image_seq_length`` x ``<IMG_CONTEXT>`` per tile + ``</img>``; with ``crop_to_patches`` on
(the checkpoints' default) an image is split into up to ``max_patches`` tiles plus a
thumbnail, which changes only the token count.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.lora_targets import LANGUAGE_MODEL_PROJECTIONS


class InternVLAdapter(BackboneAdapter):
    """Adapter for transformers-native InternVL checkpoints (InternViT + pixel shuffle + Qwen2)."""

    # Plain causal + padding decoder masks (see BackboneAdapter).
    padding_mask_optional_when_causal: ClassVar[bool] = True

    family: ClassVar[str] = "internvl"
    model_types: ClassVar[tuple[str, ...]] = ("internvl",)
    # Qwen2 decoder under ``language_model``; the InternViT tower (``vision_tower``) also has
    # q_proj/k_proj/v_proj, hence the anchor on ``language_model.layers``.
    lora_target_modules: ClassVar[str] = LANGUAGE_MODEL_PROJECTIONS

    def render_segments(self, segments: Sequence[tuple[str, int]]) -> str:
        # Each image as in render_prompt (token + newline), right before its part's text.
        return "".join((self.processor.image_token + "\n") * n + text for text, n in segments)

    def render_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        # The processor knows the placeholder the checkpoint's tokenizer declares.
        parts = [(self.processor.image_token + "\n") * num_images]
        if instruction:
            parts.append(instruction.strip() + "\n")
        if text:
            parts.append(text)
        return "".join(parts)

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
        from transformers.models.got_ocr2.image_processing_got_ocr2 import GotOcr2ImageProcessor
        from transformers.models.internvl.video_processing_internvl import InternVLVideoProcessor

        from vlm2emb.testing import save_tiny_checkpoint, tiny_text_config, tiny_tokenizer

        image_tokens = {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        }
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *image_tokens.values(), cls.embed_token]
        tok = tiny_tokenizer(
            specials, eos_token="<|im_end|>", pad_token="<|endoftext|>", extra_special_tokens=image_tokens
        )
        # 32x32 px, patch 4 -> 8x8 patches; pixel shuffle (ratio 0.5) -> 16 tokens per image.
        # No tiling in the tiny model: one 32 px view per image.
        image_processor = GotOcr2ImageProcessor(size={"height": 32, "width": 32}, crop_to_patches=False)
        video_processor = InternVLVideoProcessor(size={"height": 32, "width": 32})
        processor = InternVLProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video_processor,
            image_seq_length=16,
        )
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        config = InternVLConfig(
            vision_config={
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": [32, 32],
                "patch_size": [4, 4],
            },
            text_config=tiny_text_config(tok, "qwen2", "<|endoftext|>"),
            image_token_id=ids["<IMG_CONTEXT>"],
            image_seq_length=16,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
        )
        return save_tiny_checkpoint(InternVLForConditionalGeneration, config, processor, path, seed=seed)
