"""Qwen2-VL family (``model_type`` ``qwen2_vl``), e.g. ``Qwen/Qwen2-VL-2B-Instruct``.

Prompt format follows VLM2Vec's Qwen2-VL setup: no chat template, each image as
``<|vision_start|><|image_pad|><|vision_end|>`` in front of the text, the instruction
before the text. The processor expands each ``<|image_pad|>`` to the image's number of
merged patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn

from vlm2emb.backbones.base import CU_SEQLENS, BackboneAdapter, _modality_map, set_output_field
from vlm2emb.backbones.lora_targets import named_projections
from vlm2emb.backbones.pixels import qwen_vl_pixels
from vlm2emb.backbones.varlen import use_for_packed_language_model, use_for_vision

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class Qwen2VLAdapter(BackboneAdapter):
    """Adapter for Qwen2-VL checkpoints."""

    # Plain causal + padding decoder masks (see BackboneAdapter).
    padding_mask_optional_when_causal: ClassVar[bool] = True
    # Padding-free batches (pack_sequences): see pack_inputs and enable_packing.
    supports_packing: ClassVar[bool] = True

    family: ClassVar[str] = "qwen2_vl"
    tokenize_text_directly: ClassVar[bool] = True
    model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)
    lora_target_modules: ClassVar[str] = named_projections("language_model")
    image_placeholder: ClassVar[str] = "<|vision_start|><|image_pad|><|vision_end|>"
    # VLM2Vec writes the bare pad token, without vision start/end (its VLM_IMAGE_TOKENS).
    vlm2vec_image_token: ClassVar[str | None] = "<|image_pad|>"
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

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """The processor's batch, built without it for image batches, plus their M-RoPE
        ``position_ids`` [3, B, L].

        The processor writes each image's placeholder out as its full run of
        ``<|image_pad|>`` tokens in the text (hundreds to thousands per image) and has the
        tokenizer read them back. Here the prompts are tokenised with one placeholder each
        and the ids repeated: the same ``input_ids``, mask, pixels and modality map (tested
        against the processor per Qwen family).

        transformers derives the positions inside the forward, row by row and image by
        image in Python, reading the token types and every image's grid back to the host
        (on a GPU: a device sync per row and three per image). Built here on the CPU from
        the same tensors (:func:`mrope_position_ids`) they cost no device sync, and under
        encode()'s prefetch they are prepared while the model runs.
        """
        flat = [img for per_item in images for img in per_item]
        if not flat:
            return super().build_inputs(prompts, images)
        # The processor's own pixels, without its per-image channel-first copy (pixels.py).
        pixels = qwen_vl_pixels(self.processor.image_processor, flat)
        merge = int(self.processor.image_processor.merge_size)
        counts = (pixels["image_grid_thw"].prod(-1) // merge**2).numpy()  # [N] tokens per image
        image_id = int(self.processor.image_token_id)
        # Unpadded ids: _expand_and_pad pads on self.padding_side after the expansion.
        rows = self.tokenizer(list(prompts), return_attention_mask=False)["input_ids"]
        input_ids, mask = _expand_and_pad(
            rows, image_id, counts, int(self.tokenizer.pad_token_id), left=self.padding_side == "left"
        )
        out = {"input_ids": input_ids, "attention_mask": mask, **pixels}
        out["mm_token_type_ids"] = _modality_map(self.processor, input_ids)
        positions = mrope_position_ids(out["mm_token_type_ids"], mask, out["image_grid_thw"], merge)
        if positions is not None:
            out["position_ids"] = positions
        return out

    def configure_backbone(self, model: nn.Module) -> None:
        # The tower packs a batch's images into one sequence: attend over it in one SDPA
        # call per image size instead of one per image (vlm2emb/backbones/varlen.py).
        tower = self.vision_tower(model)
        if tower is not None:
            use_for_vision(tower.config)

    def enable_packing(self, model: nn.Module) -> None:
        # The decoder attends within each packed row (vlm2emb/backbones/varlen.py); the
        # vision tower is packed already and keeps its own function.
        use_for_packed_language_model(self.language_model(model).config)

    def pack_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The padded batch as one row of real tokens, with per-row M-RoPE positions.

        transformers' Qwen-VL decoders take ``position_ids`` [4, 1, T]: row 0 the text
        positions, restarting at 0 with every packed row (transformers' packing convention;
        the packed attention function reads the row boundaries from it), rows 1-3 the
        M-RoPE (t, h, w) positions each row has in the padded batch. Images keep their
        order (rows are concatenated in batch order), so ``pixel_values`` and
        ``image_grid_thw`` stay as they are.

        Raises:
            ValueError: An image batch has no precomputed positions (video tokens).
        """
        mask = inputs["attention_mask"].bool()  # [B, L]
        lengths = mask.sum(dim=1)  # [B]
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))  # [B + 1]
        index = (mask.cumsum(dim=1) - 1)[mask]  # [T] each token's place in its row
        if "position_ids" in inputs:
            rope = inputs["position_ids"][:, mask]  # [3, T]
        elif "image_grid_thw" in inputs or "pixel_values" in inputs:
            raise ValueError("pack_sequences: this image batch has no M-RoPE positions (video tokens?)")
        else:  # text: positions count the row's tokens on all three axes, as in the padded path
            rope = index.expand(3, -1)  # [3, T]
        out: dict[str, Any] = {}
        for key, value in inputs.items():
            if key in ("attention_mask", "position_ids"):
                continue
            if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                value = value[mask][None]  # [1, T] (input_ids, mm_token_type_ids)
            out[key] = value
        out["position_ids"] = torch.cat([index[None], rope])[:, None]  # [4, 1, T]
        out[CU_SEQLENS] = cu_seqlens
        return out

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


def mrope_position_ids(
    token_types: torch.Tensor, attention_mask: torch.Tensor | None, grid_thw: torch.Tensor, merge: int
) -> torch.Tensor | None:
    """Qwen-VL's multimodal rotary positions of an image batch, computed in one pass.

    The same values as transformers' ``get_rope_index`` (Qwen2-VL, Qwen2.5-VL and Qwen3-VL
    agree for images; tested): text tokens count up by one on all three axes; an image's
    ``t * h * w / merge**2`` tokens take ``start + (t, h, w)`` of their merged grid cell,
    and the text after it resumes at ``start + max(h, w) / merge``. Positions count real
    tokens only (padding is 0) when a mask is given.

    Args:
        token_types: [B, L] ``mm_token_type_ids`` (0 text, 1 image).
        attention_mask: [B, L] 1 for real tokens, or None (every token is real).
        grid_thw: [N, 3] the images' patch grids, in the order their tokens appear.
        merge: The vision tower's spatial merge size.

    Returns:
        [3, B, L] int64 positions, or None when the batch is not one this covers (video
        tokens, or image runs that do not match the grids); the model then derives them.
    """
    types = token_types.numpy()
    real = np.ones(types.shape, dtype=bool) if attention_mask is None else attention_mask.numpy().astype(bool)
    if (types > 1).any():
        return None
    vision = (types == 1) & real  # [B, L]
    rows, length = vision.shape
    # Each maximal run of image tokens is one image, as transformers groups them.
    edges = np.diff(np.pad(vision.astype(np.int8), ((0, 0), (1, 1))), axis=1)  # [B, L + 1]
    run_rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    grids = grid_thw.numpy().astype(np.int64)  # [N, 3]
    if len(starts) != len(grids):
        return None
    t, h, w = grids[:, 0], grids[:, 1] // merge, grids[:, 2] // merge
    if not np.array_equal(ends - starts, t * h * w):
        return None
    index = np.cumsum(real, axis=1) - 1  # [B, L] each token's place among its row's real tokens
    # After an image of n tokens the text resumes max(h, w) later, not n: a shift of n - that.
    delta = np.zeros((rows, length + 1), dtype=np.int64)
    np.add.at(delta, (run_rows, ends), (ends - starts) - np.maximum(h, w))
    shift = np.cumsum(delta[:, :length], axis=1)  # [B, L]
    text = index - shift  # [B, L]
    positions = np.broadcast_to(text, (3, rows, length)).copy()  # [3, B, L]
    cells: dict[tuple[int, int, int], np.ndarray] = {}  # grid -> its [3, n] (t, h, w) cells
    for i, (r, s, e) in enumerate(zip(run_rows, starts, ends)):
        grid = (int(t[i]), int(h[i]), int(w[i]))
        if grid not in cells:
            cells[grid] = np.stack([a.ravel() for a in np.indices(grid)])
        positions[:, r, s:e] = text[r, s] + cells[grid]
    positions[:, ~real] = 0
    return torch.from_numpy(positions)


def _expand_and_pad(
    rows: Sequence[Sequence[int]], image_id: int, counts: np.ndarray, pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows with each ``image_id`` repeated to its image's token count, padded.

    Args:
        rows: Per prompt, its token ids with one ``image_id`` per image.
        image_id: The image placeholder's token id.
        counts: [N] the token count of each image, in the order the placeholders appear.
        pad_id: The padding token id.
        left: Pad on the left instead of the right.

    Returns:
        ``input_ids`` [B, L] int64 and ``attention_mask`` [B, L] int64.

    Raises:
        ValueError: If the prompts hold another number of placeholders than there are images.
    """
    arrays = [np.asarray(row, dtype=np.int64) for row in rows]
    placeholders = [a == image_id for a in arrays]
    found = sum(int(at.sum()) for at in placeholders)
    if found != len(counts):
        raise ValueError(f"the prompts hold {found} image placeholders for {len(counts)} images")
    expanded, used = [], 0
    for a, at in zip(arrays, placeholders):
        repeats = np.ones(len(a), dtype=np.int64)
        n = int(at.sum())
        repeats[at] = counts[used : used + n]  # placeholders in prompt order, as the images
        used += n
        expanded.append(np.repeat(a, repeats))
    length = max(len(a) for a in expanded)
    input_ids = np.full((len(expanded), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(expanded), length), dtype=np.int64)
    for i, a in enumerate(expanded):
        cols = slice(length - len(a), length) if left else slice(0, len(a))
        input_ids[i, cols] = a
        mask[i, cols] = 1
    return torch.from_numpy(input_ids), torch.from_numpy(mask)
