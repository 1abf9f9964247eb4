"""FlatIndex (faiss) against brute-force search; save/load round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlm2emb.index import FlatIndex


def test_flat_index_matches_brute_force_and_round_trips(tmp_path):
    g = torch.Generator().manual_seed(0)
    docs = torch.nn.functional.normalize(torch.randn(500, 32, generator=g), dim=-1)
    queries = torch.nn.functional.normalize(torch.randn(7, 32, generator=g), dim=-1)
    index = FlatIndex(32)
    index.add(docs[:200])
    index.add(docs[200:].numpy())  # tensors and arrays; ids continue
    assert len(index) == 500
    scores, ids = index.search(queries, top_k=5)
    exact = (queries @ docs.T).topk(5, dim=1)
    np.testing.assert_array_equal(ids, exact.indices.numpy())
    np.testing.assert_allclose(scores, exact.values.numpy(), atol=1e-5)

    path = index.save(tmp_path / "sub" / "docs.faiss")
    assert path.is_file() and path.read_bytes()[:4] != b"\x80\x04\x95\x00"[:4]  # not a pickle
    loaded = FlatIndex.load(path)
    assert loaded.dim == 32 and len(loaded) == 500
    s2, i2 = loaded.search(queries[0], top_k=3)  # a single [d] query
    np.testing.assert_array_equal(i2[0], ids[0, :3])
    np.testing.assert_allclose(s2[0], scores[0, :3], atol=1e-6)
    assert loaded.search(queries, top_k=10_000)[1].shape == (7, 500)  # k capped at the size


def test_flat_index_errors(tmp_path):
    index = FlatIndex(8)
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"shape \[n, 8\]"):
        index.add(torch.randn(3, 9))
    with pytest.raises(FileNotFoundError, match="index file not found"):
        FlatIndex.load(tmp_path / "missing.faiss")
