r"""Embedding quantization: int8 with calibrated per-dimension ranges, packed binary, and
search with float rescoring.

int8
    For each dimension :math:`j` a range :math:`[lo_j, hi_j]` is calibrated on a sample of
    embeddings (min/max, or percentiles to ignore outliers). A value maps to
    :math:`q = \mathrm{round}((x - lo_j) / s_j) - 128` with :math:`s_j = (hi_j - lo_j) / 255`,
    clamped to :math:`[-128, 127]`; :math:`\hat{x} = (q + 128) s_j + lo_j`. 4x smaller than
    float32.

binary
    One bit per dimension, 1 where :math:`x_j > 0`, packed 8 per byte (most significant bit
    first, like ``numpy.packbits``). 32x smaller. Distance between codes is the Hamming
    distance (popcount of XOR).

Rescoring search (:func:`search_quantized`)
    First stage: rank the whole corpus with the cheap codes (Hamming distance for binary,
    float-query dot int8-reconstruction for int8) and keep ``top_k * oversample``
    candidates. Second stage: score those candidates with the float query against the
    float documents if given, else against the int8 reconstructions, and keep ``top_k``.
    Recall against exact float search is measured by :func:`recall_at_k`.

Shapes: embeddings ``[n, d]`` float; int8 codes ``[n, d]`` int8; binary codes
``[n, ceil(d / 8)]`` uint8.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "Int8Ranges",
    "binarize",
    "calibrate_int8",
    "dequantize_int8",
    "hamming_distance",
    "quantize_int8",
    "recall_at_k",
    "search_quantized",
]

# popcount of every byte value, for Hamming distances of packed codes.
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def _as_float(x: torch.Tensor, name: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"{name} must be a float [n, d] tensor, got shape {list(x.shape)} dtype {x.dtype}")
    return x.float()


@dataclass
class Int8Ranges:
    """Per-dimension calibration ranges of an int8 quantizer.

    Attributes:
        low: [d] lower bound per dimension (maps to -128).
        high: [d] upper bound per dimension (maps to 127).
    """

    low: torch.Tensor
    high: torch.Tensor

    @property
    def step(self) -> torch.Tensor:
        """[d] width of one int8 step; constant dimensions get a tiny step instead of 0."""
        return ((self.high - self.low) / 255.0).clamp_min(1e-12)


def calibrate_int8(embeddings: torch.Tensor, percentile: float = 100.0) -> Int8Ranges:
    """Calibrates int8 ranges per dimension on a sample of embeddings.

    Args:
        embeddings: [n, d] calibration sample (e.g. the corpus or a slice of it).
        percentile: 100 = min/max; e.g. 99.9 clips the 0.1% most extreme values at each end.

    Returns:
        The :class:`Int8Ranges`.
    """
    x = _as_float(embeddings, "embeddings")
    if not 50.0 < percentile <= 100.0:
        raise ValueError(f"percentile must be in (50, 100], got {percentile}")
    if percentile == 100.0:
        return Int8Ranges(x.min(dim=0).values, x.max(dim=0).values)
    q = torch.tensor([1.0 - percentile / 100.0, percentile / 100.0])
    low, high = torch.quantile(x, q, dim=0)  # [d], [d]
    return Int8Ranges(low, high)


def quantize_int8(embeddings: torch.Tensor, ranges: Int8Ranges) -> torch.Tensor:
    """[n, d] float -> [n, d] int8 with the calibrated ranges (values outside are clamped)."""
    x = _as_float(embeddings, "embeddings")
    if x.shape[1] != ranges.low.shape[0]:
        raise ValueError(
            f"embeddings have d={x.shape[1]} but the ranges were calibrated for {ranges.low.shape[0]}"
        )
    q = torch.round((x - ranges.low) / ranges.step) - 128.0
    return q.clamp(-128, 127).to(torch.int8)


def dequantize_int8(codes: torch.Tensor, ranges: Int8Ranges) -> torch.Tensor:
    """[n, d] int8 -> [n, d] float32 reconstruction (the centre of each int8 step)."""
    return (codes.float() + 128.0) * ranges.step + ranges.low


def binarize(embeddings: torch.Tensor) -> torch.Tensor:
    """[n, d] float -> [n, ceil(d / 8)] uint8: sign bits (1 where > 0), packed MSB first."""
    x = _as_float(embeddings, "embeddings")
    n, d = x.shape
    bits = (x > 0).to(torch.uint8)  # [n, d]
    pad = (-d) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.view(n, -1, 8)  # [n, d8, 8]
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
    return (bits * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)  # [n, d8]


def hamming_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """[n, m] int32 Hamming distances between packed codes a [n, B] and b [m, B]."""
    if a.dtype != torch.uint8 or b.dtype != torch.uint8 or a.shape[1] != b.shape[1]:
        raise ValueError("hamming_distance needs packed uint8 codes of the same width")
    out = torch.empty(a.shape[0], b.shape[0], dtype=torch.int32)
    for start in range(0, a.shape[0], chunk):  # bounds the [chunk, m, B] XOR buffer
        xor = a[start : start + chunk, None, :] ^ b[None, :, :]  # [c, m, B]
        out[start : start + chunk] = _POPCOUNT[xor.long()].sum(dim=-1)
    return out


def search_quantized(
    queries: torch.Tensor,
    corpus_codes: torch.Tensor,
    top_k: int = 10,
    *,
    kind: str,
    ranges: Int8Ranges | None = None,
    oversample: int = 4,
    rescore_with: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Searches quantized documents with float queries, then rescores the shortlist.

    Args:
        queries: [n, d] float query embeddings.
        corpus_codes: [m, d] int8 codes (``kind="int8"``) or [m, ceil(d/8)] packed bits
            (``kind="binary"``).
        top_k: Results per query.
        kind: ``"int8"`` or ``"binary"``.
        ranges: The int8 calibration (needed for ``kind="int8"``, and for rescoring binary
            results against int8 documents when ``rescore_with`` is an int8 tensor).
        oversample: The first stage keeps ``top_k * oversample`` candidates (1 = no
            rescoring beyond the shortlist order).
        rescore_with: [m, d] documents for the second stage: float32 (exact scores) or
            int8 codes (dequantized with ``ranges``). None: int8 search rescores with its
            own reconstructions; binary search keeps Hamming order.

    Returns:
        ``(indices [n, k], scores [n, k])``, best first; scores are dot products of the float
        query with the rescoring documents (negative Hamming distances without rescoring).
    """
    q = _as_float(queries, "queries")
    m = corpus_codes.shape[0]
    k = min(int(top_k), m)
    shortlist = min(m, k * max(1, int(oversample)))
    if kind == "int8":
        if ranges is None:
            raise ValueError("kind='int8' needs the calibration ranges")
        first = q @ dequantize_int8(corpus_codes, ranges).T  # [n, m]
    elif kind == "binary":
        first = -hamming_distance(binarize(q), corpus_codes).float()  # [n, m], higher is closer
    else:
        raise ValueError(f"kind must be 'int8' or 'binary', got {kind!r}")
    cand_scores, cand = first.topk(shortlist, dim=1)  # [n, s]
    if rescore_with is None and kind == "binary":
        return cand[:, :k], cand_scores[:, :k]
    if rescore_with is None:
        docs = dequantize_int8(corpus_codes, ranges)
    elif rescore_with.dtype == torch.int8:
        if ranges is None:
            raise ValueError("rescoring with int8 documents needs the calibration ranges")
        docs = dequantize_int8(rescore_with, ranges)
    else:
        docs = rescore_with.float()
    scores = torch.einsum("nd,nsd->ns", q, docs[cand])  # [n, s]: float query . shortlisted docs
    best, order = scores.topk(k, dim=1)  # [n, k]
    return cand.gather(1, order), best


def recall_at_k(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Mean fraction of each query's exact top-k ids [n, k] found in its approximate top-k [n, k]."""
    hits = (approx[:, :, None] == exact[:, None, :]).any(dim=1)  # [n, k]
    return float(hits.float().mean())
