"""Gemma 3 family (``model_type`` ``gemma3``), e.g. ``google/gemma-3-4b-it``.

Prompt: one ``<start_of_image>`` per image, then the instruction and the text; the processor
expands each to ``\\n\\n<start_of_image>`` + ``mm_tokens_per_image`` x ``<image_soft_token>``
+ ``<end_of_image>\\n\\n``. The Gemma tokenizer of real checkpoints adds ``<bos>`` itself.

Attention needs care, because Gemma 3 builds its masks in the multimodal model, not the
decoder, in two different ways:

- With ``token_type_ids`` (the processor marks image tokens), each image's tokens attend to
  each other bidirectionally, text stays causal, and sliding-window layers intersect that with
  a one-sided window. This is the checkpoints' native attention, kept for
  ``attention="causal"``: text tokens never see later tokens.
- For ``attention="bidirectional"`` the adapter drops ``token_type_ids``. The model then uses
  transformers' generic masks, which honour the decoder config's ``is_causal=False``: full
  bidirectional attention in global layers and a symmetric window (``|i - j| <= window``) in
  sliding layers. Keeping ``token_type_ids`` there would combine a bidirectional mask with
  the one-sided window, letting a token see every later token but only a window of earlier
  ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.lora_targets import LANGUAGE_MODEL_PROJECTIONS

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class Gemma3Adapter(BackboneAdapter):
    """Adapter for Gemma 3 vision-language checkpoints (SigLIP tower + Gemma 3 decoder)."""

    family: ClassVar[str] = "gemma3"
    model_types: ClassVar[tuple[str, ...]] = ("gemma3",)
    lora_target_modules: ClassVar[str] = LANGUAGE_MODEL_PROJECTIONS
    image_placeholder: ClassVar[str] = "<start_of_image>"

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Processor call with images nested per item; ``token_type_ids`` only when causal."""
        self.tokenizer.padding_side = self.padding_side
        nested = [list(per_item) for per_item in images]
        out = dict(
            self.processor(
                text=list(prompts),
                images=nested if any(nested) else None,
                padding=True,
                return_tensors="pt",
            )
        )
        if self.attention == "bidirectional":
            out.pop("token_type_ids", None)
        return out

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
        from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

        from vlm2emb.testing import save_tiny_checkpoint, tiny_text_config, tiny_tokenizer

        image_tokens = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
        image_tokens["image_token"] = "<image_soft_token>"
        specials = ["<pad>", "<eos>", "<bos>", "<unk>", *image_tokens.values(), cls.embed_token]
        tok = tiny_tokenizer(
            specials,
            eos_token="<eos>",
            pad_token="<pad>",
            bos_token="<bos>",
            extra_special_tokens=image_tokens,
        )
        # 32x32 px, SigLIP patch 4 -> 8x8 patches, average-pooled 2x2 -> 16 image tokens.
        image_processor = Gemma3ImageProcessor(size={"height": 32, "width": 32}, do_pan_and_scan=False)
        processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=16)
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        config = Gemma3Config(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 32,
                "patch_size": 4,
            },
            text_config=tiny_text_config(
                tok,
                None,
                "<bos>",
                head_dim=16,
                query_pre_attn_scalar=16,
                # One sliding and one global layer, with a window shorter than the tests'
                # prompts, so that both mask kinds are exercised.
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=8,
            ),
            mm_tokens_per_image=16,
            boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"],
        )
        return save_tiny_checkpoint(Gemma3ForConditionalGeneration, config, processor, path, seed=seed)
