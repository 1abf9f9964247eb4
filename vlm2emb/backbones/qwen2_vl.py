"""Qwen2-VL family (``model_type`` ``qwen2_vl``), e.g. ``Qwen/Qwen2-VL-2B-Instruct``.

Prompt format follows VLM2Vec's Qwen2-VL setup: no chat template, each image as
``<|vision_start|><|image_pad|><|vision_end|>`` in front of the text, the instruction
before the text. The processor expands each ``<|image_pad|>`` to the image's number of
merged patches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from vlm2emb.backbones.base import BackboneAdapter, set_output_field
from vlm2emb.backbones.registry import register_backbone
from vlm2emb.backbones.varlen import use_for_vision

_LM_PROJ = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@register_backbone
class Qwen2VLAdapter(BackboneAdapter):
    """Adapter for Qwen2-VL checkpoints."""

    # Plain causal + padding decoder masks (see BackboneAdapter).
    padding_mask_optional_when_causal: ClassVar[bool] = True
    # Same-size images normalised and patchified as one stack (see BackboneAdapter).
    group_images_by_size: ClassVar[bool] = True

    family: ClassVar[str] = "qwen2_vl"
    tokenize_text_directly: ClassVar[bool] = True
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    lora_target_modules: ClassVar[str] = _LM_PROJ
    image_placeholder: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    # Special tokens of the Qwen-VL tokenizers that the tiny builders (this family and its
    # Qwen2.5-VL / Qwen3-VL subclasses) reproduce.
    tiny_specials: ClassVar[tuple[str, ...]] = (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    )

    def configure_backbone(self, model: nn.Module) -> None:
        # The tower packs a batch's images into one sequence: attend over it in one SDPA
        # call per image size instead of one per image (vlm2emb/backbones/varlen.py).
        tower = self.vision_tower(model)
        if tower is not None:
            use_for_vision(tower.config)

    def trim_vision_output(self, output: Any, config: Any) -> Any:
        # The forward reads the merged tokens (pooler_output) and, in Qwen3-VL, the deepstack
        # features; the pre-merge patches (4x as many rows) are not used.
        set_output_field(output, "last_hidden_state", None)
        return output

    # Patch 4 px, 2x2 merge: a 32x32 image is 8x8 patches -> 16 LM tokens.
    tiny_pixels: ClassVar[dict[str, int]] = {"patch_size": 4, "merge_size": 2, "temporal_patch_size": 2}

    @classmethod
    def _tiny_tokenizer(cls) -> Any:
        """The offline tokenizer shared by the Qwen-VL tiny builders."""
        from vlm2emb.testing import tiny_tokenizer

        specials = [*cls.tiny_specials, cls.embed_token]
        return tiny_tokenizer(specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>")

    @staticmethod
    def _tiny_text_config(tok: Any, **overrides: Any) -> dict[str, Any]:
        """The 64-wide, 2-layer decoder config shared by the Qwen-VL tiny builders."""
        from vlm2emb.testing import tiny_text_config

        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        return tiny_text_config(tok, None, "<|endoftext|>", rope_parameters=rope) | overrides

    @staticmethod
    def _tiny_vision_token_ids(tok: Any) -> dict[str, int]:
        """The image/video placeholder ids a Qwen-VL config names."""
        ids = {
            "image_token_id": "<|image_pad|>",
            "video_token_id": "<|video_pad|>",
            "vision_start_token_id": "<|vision_start|>",
            "vision_end_token_id": "<|vision_end|>",
        }
        return {key: tok.convert_tokens_to_ids(token) for key, token in ids.items()}

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        from vlm2emb.testing import save_tiny_checkpoint

        tok = cls._tiny_tokenizer()
        pixel_kw = cls.tiny_pixels | {"min_pixels": 16 * 16, "max_pixels": 64 * 64}
        processor = Qwen2VLProcessor(
            image_processor=Qwen2VLImageProcessor(**pixel_kw),
            tokenizer=tok,
            video_processor=Qwen2VLVideoProcessor(**pixel_kw),
        )
        config = Qwen2VLConfig(
            text_config=cls._tiny_text_config(tok),
            vision_config={
                "depth": 2,
                "embed_dim": 32,
                "hidden_size": 64,
                "num_heads": 4,
                "mlp_ratio": 2,
                "patch_size": 4,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                "in_channels": 3,
            },
            tie_word_embeddings=True,
            **cls._tiny_vision_token_ids(tok),
        )
        return save_tiny_checkpoint(Qwen2VLForConditionalGeneration, config, processor, path, seed=seed)
