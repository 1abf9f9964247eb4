"""Token pooling (vlm2emb.multivector.pool_tokens) and MultiVectorIndex (vlm2emb.index):
checked against brute-force MaxSim over every document."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vlm2emb.index as index_module
from vlm2emb.index import MultiVectorIndex
from vlm2emb.multivector import maxsim_lists, pool_token_sets, pool_tokens


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def _corpus(n: int = 40, dim: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 30, (n,), generator=g).tolist()
    docs = [_unit(length, dim, seed=seed * 1000 + i) for i, length in enumerate(lengths)]
    docs[5] = torch.empty(0, dim)  # a document without tokens scores 0
    return docs


def _queries_near(docs: list[torch.Tensor], picks: list[int], seed: int = 1) -> list[torch.Tensor]:
    """Queries made of noisy copies of some tokens of the picked documents."""
    out = []
    for j, d in enumerate(picks):
        noise = 0.1 * torch.randn(4, docs[d].shape[1], generator=torch.Generator().manual_seed(seed + j))
        out.append(F.normalize(docs[d][:4] + noise, dim=-1))
    return out


# --------------------------------------------------------------------- pooling
def test_pool_tokens_merges_clusters_into_their_normalised_means():
    centers = _unit(3, 8, seed=3)
    g = torch.Generator().manual_seed(4)
    tokens = F.normalize(centers.repeat_interleave(3, dim=0) + 0.01 * torch.randn(9, 8, generator=g), dim=-1)
    tokens = tokens[torch.randperm(9, generator=g)]  # clusters interleaved in token order
    pooled = pool_tokens(tokens, pool_factor=3)  # 9 // 3 = 3 clusters
    assert pooled.shape == (3, 8)
    expected = torch.stack([F.normalize(tokens[(tokens @ c) > 0.9].mean(0), dim=0) for c in centers])
    # One pooled vector per cluster (in any order), each the normalised mean of its members.
    match = (pooled @ expected.T).argmax(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2]
    torch.testing.assert_close(pooled, expected[match])
    assert pool_tokens(tokens, 1) is tokens and pool_tokens(tokens[:1], 4).shape == (1, 8)
    assert [len(s) for s in pool_token_sets([tokens, tokens[:5]], 2)] == [4, 2]
    with pytest.raises(ValueError, match="pool_factor must be a positive integer"):
        pool_tokens(tokens, 0)


# --------------------------------------------------------------------- search
def test_exact_search_equals_brute_force_maxsim():
    docs = _corpus()
    queries = [_unit(n, 16, seed=500 + n) for n in (1, 5, 9)]
    index = MultiVectorIndex(16)
    index.add(docs[:25])
    index.add(docs[25:])  # ids continue
    assert len(index) == 40 and index.num_tokens == sum(len(d) for d in docs)
    brute = maxsim_lists(queries, docs)  # [3, 40]
    scores, ids = index.search(queries, top_k=7)
    top = brute.topk(7, dim=1)
    torch.testing.assert_close(torch.from_numpy(scores), top.values)
    assert ids.tolist() == top.indices.tolist()
    # candidates >= the corpus means exact search too.
    assert index.search(queries, top_k=7, candidates=40)[1].tolist() == ids.tolist()
    torch.testing.assert_close(index.token_set(3), docs[3])


@pytest.mark.parametrize("first_stage", ["tokens", "mean"])
@pytest.mark.parametrize("with_faiss", [True, False])
def test_first_stage_candidates_are_rescored_exactly(first_stage, with_faiss, monkeypatch):
    if not with_faiss:
        monkeypatch.setattr(index_module, "_faiss_or_none", lambda: None)
    elif index_module._faiss_or_none() is None:
        pytest.skip("faiss is not installed")
    docs = _corpus()
    picks = [2, 17, 33]
    queries = _queries_near(docs, picks)
    index = MultiVectorIndex(16)
    index.add(docs)
    scores, ids = index.search(queries, top_k=3, candidates=8, first_stage=first_stage, probe=8)
    brute = maxsim_lists(queries, docs)  # [3, 40]
    for row in range(3):
        found = ids[row][ids[row] >= 0]
        # Every returned score is the exact MaxSim of its document, best first.
        torch.testing.assert_close(torch.from_numpy(scores[row][: len(found)]), brute[row, found])
        assert list(scores[row][: len(found)]) == sorted(scores[row][: len(found)], reverse=True)
    if first_stage == "tokens":
        # Each query token's nearest stored tokens lie in its source document.
        assert ids[:, 0].tolist() == picks == brute.argmax(dim=1).tolist()
    else:
        # The mean stage's pool, recomputed: the 8 documents whose mean token is closest
        # (cosine) to the query's mean token; the answer is the exact top 3 within it.
        doc_means = F.normalize(torch.stack([d.sum(0) for d in docs]), dim=-1)
        q_means = F.normalize(torch.stack([q.sum(0) for q in queries]), dim=-1)
        pool = (q_means @ doc_means.T).topk(8, dim=1).indices  # [3, 8]
        for row in range(3):
            restricted = brute[row, pool[row]].topk(3)
            assert ids[row].tolist() == pool[row][restricted.indices].tolist()


def test_save_load_round_trip_and_bad_files(tmp_path):
    docs = _corpus()
    queries = [_unit(4, 16, seed=9)]
    for dtype in ("float32", "float16"):
        index = MultiVectorIndex(16, dtype=dtype)
        index.add(docs)
        path = index.save(tmp_path / f"{dtype}.safetensors")
        assert not (tmp_path / f"{dtype}.safetensors.tmp").exists()
        loaded = MultiVectorIndex.load(path)
        assert (loaded.dim, loaded.dtype, len(loaded)) == (16, dtype, 40)
        for a, b in zip(index.search(queries, top_k=5), loaded.search(queries, top_k=5)):
            assert a.tolist() == b.tolist()
    half = MultiVectorIndex.load(tmp_path / "float16.safetensors")
    assert half.nbytes < 0.6 * MultiVectorIndex.load(tmp_path / "float32.safetensors").nbytes
    exact = maxsim_lists(queries, docs)[0]
    approx, ids = half.search(queries, top_k=40)
    torch.testing.assert_close(torch.from_numpy(approx[0]), exact[ids[0]], atol=2e-2, rtol=0)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((tmp_path / "float32.safetensors").read_bytes()[:100])
    with pytest.raises(ValueError, match=r"bad\.safetensors: unreadable index file"):
        MultiVectorIndex.load(bad)
    from safetensors.torch import save_file

    meta = {"format": "vlm2emb-multivector-index", "version": "1", "dim": "16", "dtype": "float32"}
    save_file({"tokens": torch.zeros(4, 16), "offsets": torch.tensor([0, 3, 2, 4])}, str(bad), metadata=meta)
    with pytest.raises(
        ValueError, match=r"bad\.safetensors: offsets must be int64, start at 0, never decrease"
    ):
        MultiVectorIndex.load(bad)
    with pytest.raises(ValueError, match="token set 1 must have shape"):
        MultiVectorIndex(16).add([docs[0], torch.zeros(3, 8)])


def test_pooled_index_stores_fewer_vectors_and_keeps_the_ranking_close():
    docs = [d for d in _corpus(seed=2) if len(d)]
    picks = [1, 10, 20]
    queries = _queries_near(docs, picks, seed=7)
    full, pooled = MultiVectorIndex(16), MultiVectorIndex(16, pool_factor=2)
    full.add(docs)
    pooled.add(docs)
    assert pooled.num_tokens <= sum(max(len(d) // 2, 1) for d in docs) < full.num_tokens
    expected = maxsim_lists(queries, pool_token_sets(docs, 2))  # the pooled sets, brute force
    scores, ids = pooled.search(queries, top_k=5)
    torch.testing.assert_close(torch.from_numpy(scores), expected.topk(5, dim=1).values)
    assert ids[:, 0].tolist() == picks


def test_model_search_over_token_sets_equals_brute_force(tiny_qwen2_vl_dir, digit_images):
    from vlm2emb import EmbeddingModel

    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"multivector_dim": 16})
    corpus_items = ["page one about sevens", {"image": digit_images[3]}, "a table of numbers", "eight"]
    queries = ["which page is about sevens", "numbers"]
    corpus = model.encode(corpus_items, output="multivector")
    brute = maxsim_lists(model.encode_queries(queries, output="multivector"), corpus)  # [2, 4]
    top = brute.topk(3, dim=1)
    index = MultiVectorIndex(16)
    index.add(corpus)
    for hits in (model.search(queries, corpus, top_k=3), model.search(queries, index, top_k=3)):
        assert [[h["corpus_id"] for h in row] for row in hits] == top.indices.tolist()
        torch.testing.assert_close(torch.tensor([[h["score"] for h in row] for row in hits]), top.values)
    with pytest.raises(ValueError, match="candidates applies to multi-vector corpora"):
        model.search(queries, model.encode(corpus_items), candidates=2)
