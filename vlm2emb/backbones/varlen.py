"""Packed (variable-length) attention through torch SDPA, for packed vision towers.

Qwen2-VL-style vision towers concatenate the patches of every image in a batch into one
sequence and mark the image boundaries with ``cu_seqlens`` (cumulative lengths). With
``attn_implementation="sdpa"`` transformers splits that sequence back into one piece per
image and runs one SDPA call per image and layer, after reading the lengths to the host in
every layer. With an implementation whose name contains "flash", the towers instead pass
the whole packed sequence and ``cu_seqlens`` to the attention function (flash-attention's
varlen calling convention). :func:`varlen_sdpa` takes that call and runs one SDPA call per
distinct segment length: every image of a batch at once when they share a size (VLM2Vec
resizes to fixed sizes; a batch of one size is the common case). Same attention, fewer and
larger kernel calls: on the CPU benchmark's image batches the forward is about 16 % faster
(docs/benchmarks.md), and the outputs are equal (tests/backbones/test_families.py).

Only the vision tower's config is switched (:func:`use_for_vision`), and only from "sdpa":
an explicit ``eager`` or ``flash_attention_2`` choice is left alone. The function is
registered in transformers' global attention registry under :data:`NAME` when first used;
the saved ``config.json`` does not record attention implementations, so checkpoints load
anywhere.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "vlm2emb_flash_varlen_sdpa"


def varlen_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    is_causal: bool = False,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over packed segments, one SDPA call per distinct segment length.

    Args:
        module: The calling attention module (unused; transformers' interface passes it).
        query, key, value: [1, H, T, D], the segments packed along T.
        attention_mask: Must be None when ``cu_seq_lens_q`` is given (segments are the mask).
        scaling: Softmax scale (default 1/sqrt(D)).
        dropout: Attention dropout probability.
        is_causal: Causal attention within each segment.
        cu_seq_lens_q, cu_seq_lens_k: [n + 1] cumulative segment lengths (equal for self-
            attention). Without them this is plain SDPA over the whole sequence.

    Returns:
        ``(output [1, T, H, D], None)``: the layout transformers' attention functions return.
    """
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
        )
        return out.transpose(1, 2), None
    # Self-attention passes one tensor for both: compare values (a device sync) only if not.
    same_k = cu_seq_lens_k is None or cu_seq_lens_k is cu_seq_lens_q
    if attention_mask is not None or not (same_k or torch.equal(cu_seq_lens_k, cu_seq_lens_q)):
        raise ValueError("varlen_sdpa handles self-attention over packed segments without a mask")
    _, heads, total, dim = query.shape
    starts, lengths = _segments(cu_seq_lens_q)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=is_causal, scale=scaling)

    if len(set(lengths)) == 1:  # one size: a plain batch of segments
        n, length = len(lengths), lengths[0]
        q, k, v = (
            t[0].view(heads, n, length, dim).transpose(0, 1) for t in (query, key, value)
        )  # [n, H, L, D]
        return attend(q, k, v).transpose(1, 2).reshape(1, total, heads, dim), None
    by_length: dict[int, list[int]] = defaultdict(list)
    for start, length in zip(starts, lengths):
        by_length[length].append(start)
    out = query.new_empty(heads, total, dim)  # [H, T, D]
    for length, group in by_length.items():
        # [k, L] token positions of the k segments of this length
        idx = (torch.tensor(group)[:, None] + torch.arange(length)).to(query.device)
        q, k, v = (t[0][:, idx].transpose(0, 1) for t in (query, key, value))  # [k, H, L, D]
        out[:, idx] = attend(q, k, v).transpose(0, 1)
    return out.transpose(0, 1).unsqueeze(0), None  # [1, T, H, D]


def _segments(cu_seqlens: torch.Tensor) -> tuple[list[int], list[int]]:
    """(starts, lengths) of the segments, read to the host once per tensor: every layer of a
    tower gets the same ``cu_seqlens`` tensor, and on a GPU each read is a device sync."""
    # Written in place since it was read: read again. Inference tensors (encode runs under
    # torch.inference_mode) keep no version counter; they are trusted as they are.
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    cached = getattr(cu_seqlens, "_vlm2emb_segments", None)
    if cached is None or cached[0] != version:
        bounds = cu_seqlens.tolist()
        cached = (version, bounds[:-1], [b - a for a, b in itertools.pairwise(bounds)])
        cu_seqlens._vlm2emb_segments = cached  # dies with the tensor
    return cached[1], cached[2]


def register() -> str:
    """Registers :func:`varlen_sdpa` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_sdpa)
    return NAME


def use_for_vision(vision_config: Any) -> bool:
    """Switches a packed vision tower from "sdpa" to :func:`varlen_sdpa`; True if switched."""
    if vision_config is None or getattr(vision_config, "_attn_implementation", None) != "sdpa":
        return False
    vision_config._attn_implementation = register()
    return True
