"""Embedding quantization against numpy references, and recall of quantized search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm2emb.quantization import (
    binarize,
    calibrate_int8,
    dequantize_int8,
    hamming_distance,
    quantize_int8,
    recall_at_k,
    search_quantized,
)


def _corpus(n_docs=4000, n_queries=200, d=256, n_clusters=40, seed=0):
    """Clustered unit vectors (like real embeddings: anisotropic, with neighbourhoods)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g)
    scale = torch.rand(d, generator=g) * 1.5 + 0.25  # dimensions of different spread
    assign = torch.randint(0, n_clusters, (n_docs,), generator=g)
    docs = centres[assign] + 0.9 * torch.randn(n_docs, d, generator=g)
    docs = torch.nn.functional.normalize(docs * scale, dim=-1)  # [m, d]
    picks = torch.randint(0, n_docs, (n_queries,), generator=g)
    queries = torch.nn.functional.normalize(
        docs[picks] + 0.05 * torch.randn(n_queries, d, generator=g), dim=-1
    )
    return docs, queries


def test_binarize_matches_numpy_packbits():
    x = torch.randn(7, 21)  # d not a multiple of 8: padded with zero bits
    ref = np.packbits((x.numpy() > 0).astype(np.uint8), axis=1)
    assert binarize(x).dtype == torch.uint8
    np.testing.assert_array_equal(binarize(x).numpy(), ref)


def test_hamming_matches_unpacked_bit_count():
    a, b = binarize(torch.randn(9, 40)), binarize(torch.randn(5, 40))
    bits_a, bits_b = np.unpackbits(a.numpy(), axis=1), np.unpackbits(b.numpy(), axis=1)
    ref = (bits_a[:, None, :] != bits_b[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming_distance(a, b, chunk=4).numpy(), ref)


def test_int8_round_trip_and_formula():
    x = torch.randn(100, 16) * torch.linspace(0.1, 5, 16)  # per-dimension scales
    ranges = calibrate_int8(x)
    np.testing.assert_allclose(ranges.low.numpy(), x.numpy().min(0))
    codes = quantize_int8(x, ranges)
    assert codes.dtype == torch.int8 and int(codes.min()) == -128 and int(codes.max()) == 127
    step = (x.numpy().max(0) - x.numpy().min(0)) / 255.0
    ref = np.clip(np.round((x.numpy() - x.numpy().min(0)) / step) - 128, -128, 127)
    np.testing.assert_array_equal(codes.numpy(), ref.astype(np.int8))
    err = (dequantize_int8(codes, ranges) - x).abs()
    assert bool((err <= torch.from_numpy(step).float() / 2 + 1e-5).all())  # half a step at most
    # Percentile calibration clips outliers: values beyond the range saturate.
    clipped = calibrate_int8(x, percentile=90.0)
    assert bool((clipped.high < ranges.high).all())
    assert int(quantize_int8(x, clipped).max()) == 127


def test_full_shortlist_with_float_rescoring_is_exact():
    docs, queries = _corpus(n_docs=300, n_queries=20, d=32)
    exact = (queries @ docs.T).topk(10, dim=1)
    for kind, codes in (("binary", binarize(docs)), ("int8", quantize_int8(docs, calibrate_int8(docs)))):
        ids, scores = search_quantized(
            queries, codes, 10, kind=kind, ranges=calibrate_int8(docs), oversample=1000, rescore_with=docs
        )
        assert torch.equal(ids, exact.indices)
        torch.testing.assert_close(scores, exact.values)


def test_quantized_search_recall_on_a_synthetic_corpus():
    """The numbers docs/export.md reports (d=256, 4000 docs, 200 queries, recall@10)."""
    docs, queries = _corpus()
    exact = (queries @ docs.T).topk(10, dim=1).indices  # float search, the reference
    ranges = calibrate_int8(docs)
    int8_docs = quantize_int8(docs, ranges)
    bin_docs = binarize(docs)
    recalls = {
        "int8": recall_at_k(search_quantized(queries, int8_docs, 10, kind="int8", ranges=ranges)[0], exact),
        "binary": recall_at_k(search_quantized(queries, bin_docs, 10, kind="binary", oversample=1)[0], exact),
    }
    for x in (4, 10):
        recalls[f"binary+int8 rescore x{x}"] = recall_at_k(
            search_quantized(
                queries, bin_docs, 10, kind="binary", ranges=ranges, rescore_with=int8_docs, oversample=x
            )[0],
            exact,
        )
        recalls[f"binary+float rescore x{x}"] = recall_at_k(
            search_quantized(queries, bin_docs, 10, kind="binary", rescore_with=docs, oversample=x)[0], exact
        )
    print(recalls)
    assert recalls["int8"] >= 0.97
    assert recalls["binary+float rescore x10"] >= 0.95
    assert recalls["binary+int8 rescore x10"] >= 0.95
    # Rescoring a larger shortlist is what makes binary search usable.
    assert recalls["binary"] < recalls["binary+float rescore x4"] < recalls["binary+float rescore x10"]


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="needs the calibration ranges"):
        search_quantized(torch.randn(2, 8), torch.zeros(3, 8, dtype=torch.int8), kind="int8")
    with pytest.raises(ValueError, match="kind must be"):
        search_quantized(torch.randn(2, 8), binarize(torch.randn(3, 8)), kind="int4")
    with pytest.raises(ValueError, match="d=8 but the ranges were calibrated for 4"):
        quantize_int8(torch.randn(2, 8), calibrate_int8(torch.randn(5, 4)))
