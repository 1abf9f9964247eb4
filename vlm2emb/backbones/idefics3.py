"""Idefics3 family (``model_type`` ``idefics3``), e.g. ``HuggingFaceM4/Idefics3-8B-Llama3``.

Prompt: one ``<image>`` per image in front of the instruction and the text, as in Idefics3's
chat template (``User:<image>...``) without the chat turns. The processor expands each
``<image>`` to ``<fake_token_around_image><global-img>`` + ``image_seq_len`` x ``<image>`` +
``<fake_token_around_image>``, or, with image splitting on (the checkpoints' default), to one
such block per tile plus the global view, each tile tagged ``<row_i_col_j>``.

The decoder lives in ``model.text_model`` (not ``language_model``), and the vision
encoder's layers also have ``q_proj``/``k_proj``/``v_proj``; the LoRA pattern therefore
anchors on ``text_model.layers``. Image splitting stays on for real checkpoints; it only
changes how many image tokens an image gets, never the adapter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.lora_targets import TEXT_MODEL_PROJECTIONS

# Idefics3/SmolVLM tokenizers carry these, including the tile tags the processor writes
# when it splits an image into up to 6x6 tiles.
IDEFICS_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
    BackboneAdapter.embed_token,
]


def tiny_idefics_configs(tok: Any) -> dict[str, Any]:
    """Tiny vision (32 px, patch 4) and Llama text configs shared by Idefics3 and SmolVLM.

    A 32x32 image is 8x8 patches; the connector's pixel shuffle (scale factor 2) folds them
    into 4x4 = 16 image tokens.
    """
    from vlm2emb.testing import tiny_text_config

    return {
        "vision_config": {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 4,
        },
        "text_config": tiny_text_config(tok, "llama", "<|im_start|>"),
        "image_token_id": tok.convert_tokens_to_ids("<image>"),
        "scale_factor": 2,
        "tie_word_embeddings": True,
    }


class Idefics3Adapter(BackboneAdapter):
    """Adapter for Idefics3 checkpoints (SigLIP-style encoder + pixel-shuffle connector + Llama)."""

    # Plain causal + padding decoder masks (see BackboneAdapter).
    padding_mask_optional_when_causal: ClassVar[bool] = True

    family: ClassVar[str] = "idefics3"
    tokenize_text_directly: ClassVar[bool] = True
    model_types: ClassVar[tuple[str, ...]] = ("idefics3",)
    lora_target_modules: ClassVar[str] = TEXT_MODEL_PROJECTIONS
    image_placeholder: ClassVar[str] = "<image>"

    def language_model(self, model: nn.Module) -> nn.Module:
        return model.text_model

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
        from transformers.models.idefics3.image_processing_idefics3 import Idefics3ImageProcessor

        from vlm2emb.testing import save_tiny_checkpoint, tiny_tokenizer

        tok = tiny_tokenizer(IDEFICS_SPECIALS, eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
        # Splitting off: every image is resized to 32 px (longest edge) and encoded once,
        # which keeps the tiny model at 16 image tokens per image.
        image_processor = Idefics3ImageProcessor(
            size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False
        )
        processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=16)
        config = Idefics3Config(**tiny_idefics_configs(tok))
        return save_tiny_checkpoint(Idefics3ForConditionalGeneration, config, processor, path, seed=seed)
