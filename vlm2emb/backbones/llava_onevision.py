"""LLaVA-OneVision family (``model_type`` ``llava_onevision``), e.g.
``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``.

Prompt format and LoRA targets are LLaVA's (:mod:`vlm2emb.backbones.llava`). Two things
differ from LLaVA-NeXT:

- The vision tower is SigLIP (no ``[CLS]``; the ``full`` feature strategy keeps every patch).
- An item with one image is tiled ("anyres_max_9"), while each image of a multi-image item is
  encoded whole (base features plus one newline). The processor and the model decide this
  from ``batch_num_images``, which the image processor only gets right when it receives the
  images nested per item; :meth:`LlavaOnevisionAdapter.build_inputs` passes them that way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlm2emb.backbones.llava import LlavaAdapter

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class LlavaOnevisionAdapter(LlavaAdapter):
    """Adapter for LLaVA-OneVision checkpoints (SigLIP tower + Qwen2 decoder)."""

    family: ClassVar[str] = "llava_onevision"
    model_types: ClassVar[tuple[str, ...]] = ("llava_onevision",)

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Like the base, but hands the images over nested per item (see the module docstring)."""
        if self.tokenize_text_directly and not any(images):
            return self.tokenize_text(prompts)
        self.tokenizer.padding_side = self.padding_side
        nested = [list(per_item) for per_item in images]
        has_images = any(nested)
        out = self.processor(
            text=list(prompts),
            images=nested if has_images else None,
            padding=True,
            return_tensors="pt",
        )
        return dict(out)

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import (
            LlavaOnevisionConfig,
            LlavaOnevisionForConditionalGeneration,
            LlavaOnevisionProcessor,
        )
        from transformers.models.llava_onevision.image_processing_llava_onevision import (
            LlavaOnevisionImageProcessor,
        )
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        from vlm2emb.testing import save_tiny_checkpoint, tiny_text_config, tiny_tokenizer

        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", cls.embed_token]
        tok = tiny_tokenizer(specials, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        # 16 px tiles, SigLIP patch 4: 16 features per tile. A square single image gets the
        # 16x16 grid: base 16 + tile 16 + 4 row newlines = 36 tokens; an image of a
        # multi-image item gets base 16 + 1 newline = 17 tokens.
        pinpoints = [[16, 16], [16, 32], [32, 16]]
        image_processor = LlavaOnevisionImageProcessor(
            size={"height": 16, "width": 16}, image_grid_pinpoints=pinpoints
        )
        video_processor = LlavaOnevisionVideoProcessor(size={"height": 16, "width": 16})
        processor = LlavaOnevisionProcessor(
            image_processor=image_processor,
            tokenizer=tok,
            video_processor=video_processor,
            num_image_tokens=16,
            vision_feature_select_strategy="full",
        )
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        config = LlavaOnevisionConfig(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 16,
                "patch_size": 4,
            },
            text_config=tiny_text_config(tok, "qwen2", "<|endoftext|>"),
            image_token_index=ids["<image>"],
            video_token_index=ids["<video>"],
            image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            tie_word_embeddings=True,
        )
        return save_tiny_checkpoint(
            LlavaOnevisionForConditionalGeneration, config, processor, path, seed=seed
        )
