"""PaliGemma family (``model_type`` ``paligemma``), e.g. ``google/paligemma-3b-pt-224`` and
PaliGemma 2 (``google/paligemma2-3b-pt-224``, same model type, Gemma-2 decoder).

PaliGemma is a prefix-LM: during pre-training the image tokens and the text prefix attend
to each other bidirectionally and only the generated suffix is causal. An embedding input is
all prefix, so the family's native mode is ``bidirectional``, and that is its default here
(pooling then defaults to ``mean``); ``attention="causal"`` is available for comparisons.

Two details make the adapter build inputs itself instead of calling the processor:

- The processor signals the prefix through ``token_type_ids`` (0 = prefix), and the model then
  overrides the causal mask with a bidirectional prefix block. Passing them would make
  ``attention="causal"`` silently bidirectional, so the adapter never passes them: the
  attention mode alone decides (config ``is_causal`` for the mask builder, the modules'
  ``is_causal`` for the unmasked SDPA path, both set by :meth:`BackboneAdapter.set_attention`).
- The processor refuses text-only batches, and when a batch holds images it inserts ``<bos>``
  after the last ``<image>`` of each prompt, which misplaces it in text-only prompts of a
  mixed batch. Here every prompt has PaliGemma's prefix layout whatever its batch mates:
  ``<image>`` x (images x ``image_seq_length``) + ``<bos>`` + instruction + text + ``\\n``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.lora_targets import LANGUAGE_MODEL_PROJECTIONS

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class PaliGemmaAdapter(BackboneAdapter):
    """Adapter for PaliGemma and PaliGemma 2 checkpoints."""

    family: ClassVar[str] = "paligemma"
    model_types: ClassVar[tuple[str, ...]] = ("paligemma",)
    # Gemma decoder under ``language_model``; the SigLIP tower's layers use q/k/v/out_proj and
    # fc1/fc2 under ``vision_tower``, and the projector is ``multi_modal_projector.linear``.
    lora_target_modules: ClassVar[str] = LANGUAGE_MODEL_PROJECTIONS
    default_attention: ClassVar[str] = "bidirectional"
    image_placeholder: ClassVar[str] = "<image>"

    def render_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        parts = [self.image_placeholder * num_images, self.tokenizer.bos_token]
        if instruction:
            parts.append(instruction.strip() + "\n")
        if text:
            parts.append(text)
        parts.append("\n")  # PaliGemma's prefix ends with a newline
        return "".join(parts)

    def render_segments(self, segments: Sequence[tuple[str, int]]) -> str:
        # PaliGemma's processor wants every image before the BOS token; the texts follow in
        # order and the prefix ends with a newline, as in render_prompt.
        images = self.image_placeholder * sum(n for _, n in segments)
        return images + self.tokenizer.bos_token + "".join(text for text, _ in segments) + "\n"

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Expands ``<image>`` and tokenises directly (see the module docstring for why)."""
        per_image = self.image_placeholder * int(self.processor.image_seq_length)
        texts = [p.replace(self.image_placeholder, per_image) for p in prompts]
        self.tokenizer.padding_side = self.padding_side
        out = dict(self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt"))
        out.pop("token_type_ids", None)
        flat = [img for per_item in images for img in per_item]
        if flat:
            out["pixel_values"] = self.processor.image_processor(flat, return_tensors="pt")["pixel_values"]
        return out

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
        from transformers.models.siglip.image_processing_siglip import SiglipImageProcessor

        from vlm2emb.testing import save_tiny_checkpoint, tiny_tokenizer

        specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>", cls.embed_token]
        tok = tiny_tokenizer(specials, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
        # 16x16 px, SigLIP patch 4 -> 16 image tokens (the real 224 px checkpoints have 256).
        image_processor = SiglipImageProcessor(size={"height": 16, "width": 16})
        image_processor.image_seq_length = 16
        # The processor adds PaliGemma's <loc....>/<seg...> tokens to the tokenizer, so the
        # vocabulary size is read after building it.
        processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
        config = PaliGemmaConfig(
            vision_config={
                "model_type": "siglip_vision_model",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "image_size": 16,
                "patch_size": 4,
            },
            text_config={
                "model_type": "gemma",
                "vocab_size": len(tok),
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 1,
                "head_dim": 16,
                "max_position_embeddings": 1024,
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "pad_token_id": tok.pad_token_id,
            },
            image_token_index=processor.image_token_id,
            vocab_size=len(tok),
            projection_dim=64,
            hidden_size=64,
        )
        return save_tiny_checkpoint(PaliGemmaForConditionalGeneration, config, processor, path, seed=seed)
