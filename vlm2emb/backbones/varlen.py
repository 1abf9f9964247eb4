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
from collections.abc import Callable
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


def _cached_on(
    tensor: torch.Tensor, name: str, compute: Callable[[torch.Tensor], tuple[Any, ...]]
) -> tuple[Any, ...]:
    """``compute(tensor)`` (a tuple), kept on the tensor as ``(version, *results)``: every
    layer of a model gets the same ``cu_seqlens`` / ``position_ids`` tensor, and on a GPU
    each host read is a device sync."""
    # Written in place since it was read: computed again. Inference tensors (encode runs
    # under torch.inference_mode) keep no version counter; they are trusted as they are.
    version = None if tensor.is_inference() else tensor._version
    cached = getattr(tensor, name, None)
    if cached is None or cached[0] != version:
        cached = (version, *compute(tensor))
        setattr(tensor, name, cached)  # dies with the tensor
    return cached[1:]


def _segments(cu_seqlens: torch.Tensor) -> tuple[list[int], list[int]]:
    """(starts, lengths) of the segments, read to the host once per tensor."""

    def read(cu: torch.Tensor) -> tuple[list[int], list[int]]:
        bounds = cu.tolist()
        return bounds[:-1], [b - a for a, b in itertools.pairwise(bounds)]

    starts, lengths = _cached_on(cu_seqlens, "_vlm2emb_segments", read)
    return starts, lengths


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


# ---------------------------------------------------------------------- packed language models
PACKED_LM_NAME = "vlm2emb_packed_lm_sdpa"


def packed_lm_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A decoder's attention over a packed batch: each row attends within itself only.

    Used as a language model's attention function when ``pack_sequences`` is on
    (:meth:`vlm2emb.backbones.base.BackboneAdapter.enable_packing`). The rows of a batch
    are concatenated into one sequence of real tokens, and transformers passes this
    function the text positions ``position_ids`` [1, T], which restart at 0 at the first
    token of every row. The row boundaries are read from them (no mask exists: this
    function's name is not in transformers' mask registry, so it builds none), then
    :func:`varlen_sdpa` attends per row. Causal or bidirectional follows the module's
    ``is_causal``, which :meth:`BackboneAdapter.set_attention` sets.

    Args:
        module: The calling attention module (its ``is_causal`` chooses the mask).
        query: [1, H, T, D] the packed rows' queries.
        key, value: [1, H_kv, T, D]; grouped-query heads are repeated to H here.
        attention_mask: Must be None (the rows are the mask).
        scaling: Softmax scale (default 1/sqrt(D)).
        dropout: Attention dropout probability.
        position_ids: [1, T] per-row text positions (0 at each row's first token).
        sliding_window: Must be None: windowed layers are not packed.

    Returns:
        ``(output [1, T, H, D], None)``.

    Raises:
        ValueError: A mask or a sliding window is given, or positions are missing.
    """
    if attention_mask is not None or position_ids is None:
        raise ValueError("packed_lm_sdpa takes a packed batch: per-row position_ids and no attention mask")
    if sliding_window is not None:
        raise ValueError("packed_lm_sdpa: sliding-window layers are not supported in packed batches")
    heads, kv_heads = query.shape[1], key.shape[1]
    if kv_heads != heads:  # grouped-query attention: varlen_sdpa wants one K/V head per query head
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
    cu = packed_cu_seqlens(position_ids)
    return varlen_sdpa(
        module,
        query,
        key,
        value,
        scaling=scaling,
        dropout=dropout,
        is_causal=bool(getattr(module, "is_causal", True)),
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
    )


def packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """[n + 1] cumulative row lengths of a packed batch, from its text positions [1, T].

    A row starts where its position is 0. Computed once per positions tensor (every decoder
    layer gets the same one), as :func:`_segments` reads its lengths once.
    """

    def bounds(positions: torch.Tensor) -> tuple[torch.Tensor]:
        flat = positions.reshape(-1)  # [T]
        starts = torch.nonzero(flat == 0).flatten()  # [n]
        if starts.numel() == 0 or int(starts[0]) != 0:
            raise ValueError("packed positions must start every row at 0")
        return (torch.cat([starts, torch.tensor([flat.numel()], device=flat.device)]),)

    (cu,) = _cached_on(position_ids, "_vlm2emb_cu_seqlens", bounds)
    return cu


def use_for_packed_language_model(text_config: Any) -> None:
    """Switches a language model from "sdpa" to :func:`packed_lm_sdpa` (packed batches only).

    Raises:
        ValueError: The language model runs another attention implementation (eager, flash,
            flex): packing is built and tested on the SDPA path only.
    """
    from transformers import AttentionInterface

    current = getattr(text_config, "_attn_implementation", None)
    if current == PACKED_LM_NAME:
        return
    if current != "sdpa":
        raise ValueError(
            f"pack_sequences needs attn_implementation='sdpa' for the language model, got {current!r}"
        )
    AttentionInterface.register(PACKED_LM_NAME, packed_lm_sdpa)
    text_config._attn_implementation = PACKED_LM_NAME
