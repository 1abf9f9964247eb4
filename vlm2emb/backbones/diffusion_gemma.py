"""DiffusionGemma (``model_type`` ``diffusion_gemma``), native in transformers 5.x.

DiffusionGemma is a block-diffusion VLM made of two stacks that share their text weights:

* an **encoder** (``DiffusionGemmaEncoderModel``): a Gemma 4 style vision tower plus a text
  stack that reads the prompt (text and image soft tokens) and fills a KV cache;
* a **decoder** (``DiffusionGemmaDecoderModel``): the denoiser. It refines a *canvas* of
  generated tokens that starts as uniform random token ids, attends bidirectionally to the
  canvas and to the encoder's cached prompt, and adds a self-conditioning signal from the
  previous denoising step. It has no vision input.

An item to embed is a prompt, not a canvas to denoise, so vlm2emb embeds with the
**encoder's** last hidden states: it is the only part that sees images, and one pass over it
is deterministic ("one clean forward": no random canvas, no self-conditioning, no step).
Because the decoder layers are tied to the encoder layers, running the encoder with
bidirectional attention is exactly the denoiser's transformer applied to clean tokens, so
``bidirectional`` is the default; ``causal`` gives the encoder as it prefills for generation.

``DiffusionGemmaModel.forward`` must not be used for embeddings: with no
``decoder_input_ids`` it samples a random canvas and runs the decoder on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.lora_targets import decoder_layer_projections

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

# Only the encoder's text stack: its attention and dense-MLP projections. The decoder shares
# these weights (tied), but LoRA layers wrap modules, not tensors, so adapters placed on the
# encoder change nothing in the (unused) decoder until merged. The MoE experts are fused 3D
# parameters, not Linear modules, and the vision tower stays frozen as in VLM2Vec.
_LM_PROJ = decoder_layer_projections(r"encoder\.language_model", anchor="")


def _encoder(model: nn.Module) -> nn.Module:
    """The ``DiffusionGemmaEncoderModel`` inside a bare, peft-wrapped or LM-head model."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "model") and hasattr(base.model, "encoder"):  # ...ForBlockDiffusion
        base = base.model
    return base.encoder


class DiffusionGemmaAdapter(BackboneAdapter):
    """Adapter for DiffusionGemma checkpoints (e.g. ``google/diffusiongemma-26B-A4B-it``)."""

    family: ClassVar[str] = "diffusion_gemma"
    model_types: ClassVar[tuple[str, ...]] = ("diffusion_gemma",)
    lora_target_modules: ClassVar[str] = _LM_PROJ
    default_attention: ClassVar[str] = "bidirectional"
    generative_head: ClassVar[bool] = False  # it denoises blocks, no next-token answer to score

    @property
    def image_placeholder(self) -> str:
        # The Gemma 4 processor expands each image token to <boi> + soft tokens + <eoi>.
        return self.processor.image_token

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Tokenizes and preprocesses one batch.

        The Gemma 4 processor matches images to prompts per item, so images go in as one
        list per prompt (the base class's flat list would be read as one item's images).
        """
        self.tokenizer.padding_side = self.padding_side
        has_images = any(len(per_item) for per_item in images)
        out = self.processor(
            text=list(prompts),
            images=[list(per_item) for per_item in images] if has_images else None,
            padding=True,
            return_tensors="pt",
        )
        return dict(out)

    def language_model(self, model: nn.Module) -> nn.Module:
        return _encoder(model).language_model

    def set_attention(self, model: nn.Module, mode: str) -> None:
        """Switches the encoder's attention modules between causal and bidirectional.

        Unlike the base class this leaves ``config.is_causal`` alone: transformers 5.x
        forwards a config-level ``is_causal`` into every attention call as a keyword, and
        DiffusionGemma's attention also passes its own, which fails with "multiple values
        for keyword argument". The masks are built in :meth:`forward` instead, and the
        module flags cover the no-padding case where SDPA receives no mask.
        """
        if mode not in self.attention_modes:
            raise ValueError(
                f"attention={mode!r} is not supported by backbone {self.family!r}; "
                f"choose one of {', '.join(self.attention_modes)}"
            )
        lm = self.language_model(model)
        if mode == "causal" and getattr(lm.config, "is_causal", True) is False:
            raise ValueError(
                "this DiffusionGemma checkpoint's encoder is configured bidirectional "
                "(use_bidirectional_attention='all'); attention='causal' is not available"
            )
        for module in lm.modules():
            if hasattr(module, "is_causal") and module is not lm:
                module.is_causal = mode == "causal"
        self.settings.attention = mode

    def _masks(self, model: nn.Module, mask: torch.Tensor, dtype: torch.dtype) -> dict[str, Any]:
        """Per-layer-type attention masks in the form the attention backend expects."""
        from transformers.masking_utils import (
            create_bidirectional_mask,
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        cfg = self.language_model(model).config
        # The mask builders read only the shape, dtype and device of the embeddings.
        shape_only = torch.empty((*mask.shape, 1), dtype=dtype, device=mask.device)
        if self.attention == "bidirectional":
            # Like the denoiser (which shares these weights): every token sees every real
            # token, in sliding layers too.
            full = create_bidirectional_mask(config=cfg, inputs_embeds=shape_only, attention_mask=mask)
            return {"full_attention": full, "sliding_attention": full}
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        kwargs = {"config": cfg, "inputs_embeds": shape_only, "attention_mask": mask}
        kwargs |= {"past_key_values": None, "position_ids": position_ids}
        return {
            "full_attention": create_causal_mask(**kwargs),
            "sliding_attention": create_sliding_window_causal_mask(**kwargs),
        }

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One deterministic encoder pass; returns its last hidden states and the mask."""
        mask = inputs["attention_mask"]
        encoder = _encoder(model)
        dtype = encoder.get_input_embeddings().weight.dtype
        # Positions count real tokens only, so a left-padded row gets the same positions as
        # the row alone (the encoder would otherwise number the padding too).
        position_ids = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        kwargs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        out = encoder(
            **kwargs,
            attention_mask=self._masks(model, mask, dtype),
            position_ids=position_ids,
            return_dict=True,
        )
        return out.last_hidden_state, mask

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion
        from transformers.models.gemma4 import Gemma4ImageProcessor, Gemma4Processor
        from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor
        from transformers.models.gemma4.video_processing_gemma4 import Gemma4VideoProcessor

        from vlm2emb._quiet import quiet_third_party
        from vlm2emb.testing import tiny_text_config, tiny_tokenizer

        quiet_third_party()
        # Gemma 4's named multimodal tokens; the processor requires the audio ones to exist
        # even for image-only use.
        named = {
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        }
        specials = ["<pad>", "<eos>", "<bos>", "<mask>", *named.values(), cls.embed_token]
        base = tiny_tokenizer(specials, eos_token="<eos>", pad_token="<pad>")
        tok = type(base)(
            tokenizer_object=base._tokenizer,
            eos_token="<eos>",
            pad_token="<pad>",
            bos_token="<bos>",
            mask_token="<mask>",
            extra_special_tokens={**named, "embed_token": cls.embed_token},
        )
        ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
        # Patch 4 px, 3x3 pooling, the smallest soft-token budget (70): a 32x32 digit is
        # resized to 48x48 -> 12x12 patches -> 16 soft tokens per image.
        pixel_kw = {"patch_size": 4, "max_soft_tokens": 70, "pooling_kernel_size": 3}
        processor = Gemma4Processor(
            feature_extractor=Gemma4AudioFeatureExtractor(),
            image_processor=Gemma4ImageProcessor(**pixel_kw),
            tokenizer=tok,
            video_processor=Gemma4VideoProcessor(**pixel_kw),
            image_seq_length=70,
        )
        config = DiffusionGemmaConfig(
            text_config=tiny_text_config(
                tok,
                None,
                "<bos>",
                head_dim=16,
                global_head_dim=16,
                num_global_key_value_heads=2,
                # One sliding and one full layer, so both mask kinds are exercised.
                layer_types=["sliding_attention", "full_attention"],
                sliding_window=512,
                num_experts=4,
                top_k_experts=2,
                moe_intermediate_size=32,
                max_position_embeddings=2048,
            ),
            vision_config={
                "model_type": "gemma4_vision",
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "head_dim": 8,
                "patch_size": 4,
                "pooling_kernel_size": 3,
                "position_embedding_size": 256,
            },
            boi_token_id=ids["<|image>"],
            eoi_token_id=ids["<image|>"],
            image_token_id=ids["<|image|>"],
            canvas_length=16,
        )
        torch.manual_seed(seed)
        model = DiffusionGemmaForBlockDiffusion(config)
        model.save_pretrained(path)
        processor.save_pretrained(path)
        return path
