"""Qwen3-VL family (``model_type`` ``qwen3_vl``), e.g. ``Qwen/Qwen3-VL-2B-Instruct``.

Prompt layout and image placeholders are Qwen2-VL's (``<|vision_start|><|image_pad|>
<|vision_end|>``, expanded by the processor to one token per merged patch). The model adds
"DeepStack" visual features to the first decoder layers' hidden states and uses a Qwen3
decoder (q/k RMSNorm); neither changes the adapter, because attention switching and LoRA
targets live in the decoder's standard attention and MLP modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from vlm2emb.backbones.qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for Qwen3-VL (dense) checkpoints."""

    family: ClassVar[str] = "qwen3_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)
    # VLM2Vec trains no Qwen3-VL model, so there is no token sequence to reproduce.
    vlm2vec_image_token: ClassVar[str | None] = None

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        from vlm2emb.testing import save_tiny_checkpoint

        tok = cls._tiny_tokenizer()
        pixel_kw = cls.tiny_pixels
        image_processor = Qwen2VLImageProcessor(**pixel_kw, min_pixels=16 * 16, max_pixels=64 * 64)
        video_processor = Qwen3VLVideoProcessor(
            **pixel_kw, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
        )
        processor = Qwen3VLProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor
        )
        config = Qwen3VLConfig(
            text_config=cls._tiny_text_config(
                tok,
                head_dim=16,
                rope_parameters={
                    "rope_type": "default",
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                    "rope_theta": 10000.0,
                },
            ),
            vision_config={
                "depth": 2,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 4,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "out_hidden_size": 64,
                # A 4x4 grid of learned position embeddings, interpolated to the image grid.
                "num_position_embeddings": 16,
                # Vision layer 0's merged features are added to decoder layer 0 (DeepStack).
                "deepstack_visual_indexes": [0],
            },
            tie_word_embeddings=True,
            **cls._tiny_vision_token_ids(tok),
        )
        return save_tiny_checkpoint(Qwen3VLForConditionalGeneration, config, processor, path, seed=seed)
