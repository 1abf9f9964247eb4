"""encode(convert_to=..., truncate_dim=...), Matryoshka truncation, similarity and search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.model import CONFIG_NAME


@pytest.fixture(scope="module")
def model(tiny_qwen2_vl_dir) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)


@pytest.fixture(scope="module")
def items(digit_images) -> list:
    return [
        "seven",
        "a handwritten digit three",
        digit_images[0],
        {"text": "which?", "image": digit_images[1]},
    ]


def test_convert_to_numpy(model, items):
    as_torch = model.encode(items)
    as_numpy = model.encode(items, convert_to="numpy")
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float32 and as_numpy.shape == (4, 64)
    np.testing.assert_array_equal(as_numpy, as_torch.numpy())
    single = model.encode("seven", convert_to="numpy")
    assert single.shape == (64,)
    assert model.encode([], convert_to="numpy").shape == (0, 64)
    with pytest.raises(ValueError, match="convert_to must be"):
        model.encode(items, convert_to="list")


def test_truncate_dim_is_prefix_then_renormalised(model, items, tiny_qwen2_vl_dir, tmp_path):
    full = model.encode(items)  # [4, 64]
    ref = full[:, :16] / full[:, :16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(model.encode(items, truncate_dim=16), ref)
    truncated = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, truncate_dim=16)
    assert truncated.embedding_dim == 16
    torch.testing.assert_close(truncated.encode(items), ref)
    assert truncated.encode(items, truncate_dim=8).shape == (4, 8)  # the call overrides the config
    # Saved with the model and restored.
    out = truncated.save_pretrained(tmp_path / "t16")
    assert json.loads((out / CONFIG_NAME).read_text())["truncate_dim"] == 16
    torch.testing.assert_close(EmbeddingModel.from_pretrained(out).encode(items), ref)
    # Without normalisation the prefix is returned as is.
    raw = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, normalize=False)
    torch.testing.assert_close(raw.encode(items, truncate_dim=16), raw.encode(items)[:, :16])
    with pytest.raises(ValueError, match="truncate_dim must be a positive integer"):
        model.encode(items, truncate_dim=0)
    with pytest.raises(ValueError, match="truncate_dim must be a positive integer"):
        EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, truncate_dim=-3)


def test_similarity_accepts_numpy_and_vectors(model, items):
    emb = model.encode(items)
    sim = model.similarity(emb.numpy(), emb[0])  # [4, 1]
    assert sim.shape == (4, 1)
    torch.testing.assert_close(sim[:, 0], emb @ emb[0])


def test_search_matches_brute_force(model, items):
    corpus = model.encode_targets([*items, "eight", "nine", "a handwritten digit one"])  # [7, d]
    queries = model.encode_queries(items[:2])
    hits = model.search(queries, corpus, top_k=3)
    scores = queries @ corpus.T
    for q, row in enumerate(hits):
        assert [h["corpus_id"] for h in row] == scores[q].argsort(descending=True)[:3].tolist()
        np.testing.assert_allclose(
            [h["score"] for h in row], scores[q].sort(descending=True).values[:3], atol=1e-6
        )
    assert hits[0][0]["corpus_id"] == 0 and hits[1][0]["corpus_id"] == 1  # each finds itself
    # Items as queries are embedded with encode_queries; numpy corpora work; k is capped.
    from_items = model.search(items[:2], corpus.numpy(), top_k=100)
    assert len(from_items[0]) == 7 and from_items[0][:3] == hits[0]
    with pytest.raises(ValueError, match="dimension 64 but corpus_embeddings have 8"):
        model.search(queries, corpus[:, :8])
