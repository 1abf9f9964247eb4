"""LLaVA-NeXT family (``model_type`` ``llava_next``), e.g. ``llava-hf/llava-v1.6-mistral-7b-hf``.

Prompt format and LoRA targets are LLaVA's (:mod:`vlm2emb.backbones.llava`; VLM2Vec's
LLaVA-NeXT setup also writes ``<image>\\n`` before the text). What differs is "anyres" image
tiling: the image processor picks the best grid from ``image_grid_pinpoints`` for each
image's size, encodes the downscaled base image plus the grid tiles, and the model appends an
``image_newline`` embedding after each feature row. The processor counts those tokens from the
image's original size, so the number of ``<image>`` tokens per image varies with its shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vlm2emb.backbones.llava import LLAVA_SPECIALS, TINY_CLIP_VISION, LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    """Adapter for LLaVA-NeXT (LLaVA-1.6) checkpoints."""

    family: ClassVar[str] = "llava_next"
    model_types: ClassVar[tuple[str, ...]] = ("llava_next",)
    # VLM2Vec's LLaVA-NeXT token (its VLM_IMAGE_TOKENS): the bare <image>, no newline added.
    vlm2vec_image_token: ClassVar[str | None] = "<image>"

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
        from transformers.models.llava_next.image_processing_llava_next import LlavaNextImageProcessor

        from vlm2emb.testing import save_tiny_checkpoint, tiny_text_config, tiny_tokenizer

        tok = tiny_tokenizer(LLAVA_SPECIALS, eos_token="</s>", pad_token="<pad>")
        # 16 px tiles, patch 4. Pinpoints of one or two tiles: a square image gets the 16x16
        # grid (base 16 + tile 16 + 4 row newlines = 36 tokens), wide or tall images get two
        # tiles, so the anyres path (tiling, unpadding, newlines) really runs.
        pinpoints = [[16, 16], [16, 32], [32, 16]]
        image_processor = LlavaNextImageProcessor(
            size={"shortest_edge": 16},
            crop_size={"height": 16, "width": 16},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            patch_size=4,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        config = LlavaNextConfig(
            vision_config=dict(TINY_CLIP_VISION),
            text_config=tiny_text_config(tok, "llama", "<s>"),
            image_token_index=tok.convert_tokens_to_ids("<image>"),
            image_grid_pinpoints=pinpoints,
            image_seq_length=16,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
        )
        return save_tiny_checkpoint(LlavaNextForConditionalGeneration, config, processor, path, seed=seed)
