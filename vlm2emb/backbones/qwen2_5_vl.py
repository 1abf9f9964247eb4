"""Qwen2.5-VL family (``model_type`` ``qwen2_5_vl``), e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``.

Same prompt layout, image placeholders and processor conventions as Qwen2-VL (see
:mod:`vlm2emb.backbones.qwen2_vl`); the vision tower differs (windowed attention, SwiGLU
MLP, RMSNorm), which only the tiny builder has to know about.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vlm2emb.backbones.qwen2_vl import Qwen2VLAdapter


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

        tok = cls._tiny_tokenizer()
        pixel_kw = cls.tiny_pixels | {"min_pixels": 16 * 16, "max_pixels": 64 * 64}
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixel_kw),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(**pixel_kw),
        )
        config = Qwen2_5_VLConfig(
            text_config=cls._tiny_text_config(tok),
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
            tie_word_embeddings=True,
            **cls._tiny_vision_token_ids(tok),
        )
        return save_tiny_checkpoint(Qwen2_5_VLForConditionalGeneration, config, processor, path, seed=seed)
