"""Config of the tiny masked-diffusion VLM used by the tests (shipped as remote code)."""

from __future__ import annotations

from transformers import PretrainedConfig


class TinyMDVLMConfig(PretrainedConfig):
    """A few-layer bidirectional LM with a patch-embedding vision encoder or a VQ tokenizer.

    Args:
        mask_input: How ``forward`` reads a padding mask, mimicking the real families:
            ``"4d_bool"`` (``attention_mask`` [B, 1, L, L], True = attend; Dream/Dimple style),
            ``"2d"`` (``attention_mask`` [B, L]), ``"additive"`` (``attention_bias``
            [B, 1, L, L] added to the scores; MMaDA style) or ``"none"`` (every mask is
            ignored; LLaDA style).
        vision: ``"features"`` (vision-tower features replace image placeholder tokens;
            LLaVA/SigLIP style) or ``"vq"`` (a VQ tokenizer turns an image into codes that
            live in the LM vocabulary after ``vq_offset``; MMaDA style).
    """

    model_type = "tiny_mdvlm"

    def __init__(
        self,
        vocab_size: int = 640,
        hidden_size: int = 64,
        intermediate_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        rope_theta: float = 10000.0,
        image_token_id: int = 0,
        mask_token_id: int = 0,
        mask_input: str = "4d_bool",
        vision: str = "features",
        image_size: int = 16,
        patch_size: int = 4,
        vision_hidden_size: int = 32,
        vq_codebook_size: int = 32,
        vq_offset: int | None = None,
        **kwargs,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.rope_theta = rope_theta
        self.image_token_id = image_token_id
        self.mask_token_id = mask_token_id
        self.mask_input = mask_input
        self.vision = vision
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_hidden_size = vision_hidden_size
        self.vq_codebook_size = vq_codebook_size
        self.vq_offset = vocab_size if vq_offset is None else vq_offset
        super().__init__(**kwargs)
