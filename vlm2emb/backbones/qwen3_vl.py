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
from vlm2emb.backbones.registry import register_backbone


@register_backbone
class Qwen3VLAdapter(Qwen2VLAdapter):
    """Adapter for Qwen3-VL (dense) checkpoints."""

    family: ClassVar[str] = "qwen3_vl"
    model_types: ClassVar[tuple[str, ...]] = ("qwen3_vl",)

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        from vlm2emb.testing import save_tiny_checkpoint

        specials, tok = cls._tiny_tokenizer()
        # Patch 4 px, 2x2 merge: a 32x32 image is 8x8 patches -> 16 LM tokens.
        pixel_kw = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}
        image_processor = Qwen2VLImageProcessor(**pixel_kw, min_pixels=16 * 16, max_pixels=64 * 64)
        video_processor = Qwen3VLVideoProcessor(
            **pixel_kw, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}
        )
        processor = Qwen3VLProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor
        )
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        eos = ids["<|endoftext|>"]
        config = Qwen3VLConfig(
            text_config={
                "vocab_size": len(tok),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 16,
                "max_position_embeddings": 1024,
                "rope_parameters": {
                    "rope_type": "default",
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
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
                # A 4x4 grid of learned position embeddings, interpolated to the image grid.
                "num_position_embeddings": 16,
                # Vision layer 0's merged features are added to decoder layer 0 (DeepStack).
                "deepstack_visual_indexes": [0],
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
            tie_word_embeddings=True,
        )
        return save_tiny_checkpoint(Qwen3VLForConditionalGeneration, config, processor, path, seed=seed)
