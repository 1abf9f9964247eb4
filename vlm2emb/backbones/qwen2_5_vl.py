"""Qwen2.5-VL family (``model_type`` ``qwen2_5_vl``), e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``.

Same prompt layout, image placeholders and processor conventions as Qwen2-VL (see
:mod:`vlm2emb.backbones.qwen2_vl`); the vision tower differs (windowed attention, SwiGLU
MLP, RMSNorm), which only the tiny builder has to know about.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vlm2emb.backbones.qwen2_vl import Qwen2VLAdapter
from vlm2emb.backbones.registry import register_backbone


@register_backbone
class Qwen2_5VLAdapter(Qwen2VLAdapter):
    """Adapter for Qwen2.5-VL checkpoints."""

    family: ClassVar[str] = "qwen2_5_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_5_vl",)

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        from vlm2emb.testing import save_tiny_checkpoint

        specials, tok = cls._tiny_tokenizer()
        # Patch 4 px, 2x2 merge: a 32x32 image is 8x8 patches -> 16 LM tokens.
        pixel_kw = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
        pixel_kw |= {"min_pixels": 16 * 16, "max_pixels": 64 * 64}
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixel_kw),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(**pixel_kw),
        )
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        eos = ids["<|endoftext|>"]
        config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tok),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "max_position_embeddings": 1024,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [2, 3, 3],
                    "rope_theta": 10000.0,
                },
                "bos_token_id": eos,
                "eos_token_id": eos,
                "pad_token_id": eos,
            },
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": 64,
                # Windows of 16 px = 2x2 merged units, so a 32x32 image spans 4 windows and
                # the windowed layer (0) and the full-attention layer (1) both run.
                "window_size": 16,
                "fullatt_block_indexes": [1],
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
        )
        return save_tiny_checkpoint(Qwen2_5_VLForConditionalGeneration, config, processor, path, seed=seed)
