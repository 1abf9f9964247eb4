"""The multi-vector head (vlm2emb/multivector.py and its use in EmbeddingModel) and MaxSim.

colpali-engine is not installed as a test dependency: its release pins a torch older than
the one this project uses. Its scoring formula (token sets zero-padded, einsum
``bnd,csd->bcns``, max over document tokens, sum over query tokens) is recomputed here in
plain PyTorch instead.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlm2emb import EmbeddingModel
from vlm2emb.model import MULTIVECTOR_HEAD_NAME
from vlm2emb.multivector import MultiVectorEmbeddings, maxsim, maxsim_lists, pad_token_sets

ITEMS = ["a handwritten digit seven", "two", "the number eight written by hand, slanted"]


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _colpali_style_scores(queries: list[torch.Tensor], docs: list[torch.Tensor]) -> torch.Tensor:
    """colpali-engine's score_multi_vector formula: zero padding, no masks."""
    q = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)  # [Nq, Lq, D]
    d = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)  # [Nd, Ld, D]
    return torch.einsum("bnd,csd->bcns", q, d).max(dim=3)[0].sum(dim=2)  # [Nq, Nd]


def _loop_scores(queries: list[torch.Tensor], docs: list[torch.Tensor]) -> torch.Tensor:
    """The definition, one pair at a time: sum over query tokens of the best doc token."""
    return torch.tensor(
        [[float((q @ d.T).max(dim=1).values.sum()) if len(d) else 0.0 for d in docs] for q in queries],
        dtype=torch.float64,
    )


# --------------------------------------------------------------------- MaxSim
def test_maxsim_equals_colpali_formula_and_the_definition():
    queries = [_unit(n, 8, seed=n) for n in (3, 5, 1, 4)]  # ragged: query padding
    docs = [_unit(6, 8, seed=10 + i) for i in range(5)]  # equal lengths: no doc padding
    got = maxsim_lists(queries, docs)
    assert got.shape == (4, 5) and got.dtype == torch.float64
    torch.testing.assert_close(got, _colpali_style_scores(queries, docs))
    ragged_docs = [_unit(n, 8, seed=20 + n) for n in (2, 7, 4)]
    torch.testing.assert_close(maxsim_lists(queries, ragged_docs), _loop_scores(queries, ragged_docs))


def test_padded_doc_tokens_are_masked_not_zero_scored():
    """Zero-padding (colpali-engine) lets a padded doc slot score 0 against a query token
    whose every real dot product is negative; masking does not: the score stays negative."""
    q = [torch.tensor([[1.0, 0.0]])]
    docs = [torch.tensor([[-1.0, 0.0]]), torch.tensor([[-1.0, 0.0], [0.0, 1.0]])]  # doc 0 is padded
    assert maxsim_lists(q, docs).tolist() == [[-1.0, 0.0]]
    assert _colpali_style_scores(q, docs).tolist() == [[0.0, 0.0]]  # the padded slot won


@pytest.mark.parametrize("chunk_elements", [1, 7, 60])
def test_chunked_maxsim_equals_one_block_values_and_gradients(chunk_elements):
    q_tokens, q_mask = pad_token_sets([_unit(n, 4, seed=n) for n in (2, 5, 3)])
    d_tokens, d_mask = pad_token_sets([_unit(n, 4, seed=9 + n) for n in (4, 1, 6, 2)])
    d_mask[1] = False  # a document without tokens scores 0 (no NaN, no -inf)
    grads = []
    for elements in (chunk_elements, 1 << 30):
        q, d = q_tokens.clone().requires_grad_(), d_tokens.clone().requires_grad_()
        scores = maxsim(q, d, q_mask, d_mask, chunk_elements=elements)  # [3, 4]
        (scores * torch.arange(12.0, dtype=scores.dtype).view(3, 4)).sum().backward()
        grads.append((scores.detach(), q.grad, d.grad))
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b)
    assert torch.all(grads[0][0][:, 1] == 0) and torch.isfinite(grads[0][1]).all()
    assert grads[0][2][1].abs().sum() == 0  # the empty document gets no gradient


@pytest.mark.parametrize("chunk_elements", [64, 1 << 24])
def test_length_bucketing_gives_the_unbucketed_scores_and_gradients(chunk_elements, monkeypatch):
    """Sorting rows by length and padding each block to its own longest member (the default)
    equals padding everything to the longest (``bucket_by_length=False``), in the input
    order, for token sets, for padded tensors whose masks have holes (content tokens), with
    an empty document, and through the gradients."""
    import vlm2emb.multivector as mv

    # Small block limits, so the lengths below fall into several buckets on both sides.
    monkeypatch.setattr(mv, "QUERY_BLOCK_TOKENS", 12)
    monkeypatch.setattr(mv, "BUCKET_BLOCK_ELEMENTS", 200)
    monkeypatch.setattr(mv, "QUERY_BLOCK_MIN_TOKENS", 0)
    g = torch.Generator().manual_seed(3)
    q_lengths = torch.randint(1, 9, (11,), generator=g).tolist()
    d_lengths = [*torch.randint(1, 14, (9,), generator=g).tolist(), 0]  # the last one is empty
    queries = [_unit(n, 6, seed=100 + i) for i, n in enumerate(q_lengths)]
    docs = [_unit(n, 6, seed=200 + i) for i, n in enumerate(d_lengths)]
    reference = maxsim_lists(queries, docs, bucket_by_length=False, chunk_elements=chunk_elements)
    torch.testing.assert_close(reference, _loop_scores(queries, docs))  # the reference is right
    got = maxsim_lists(queries, docs, chunk_elements=chunk_elements)
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-12)  # float64: rounding only
    assert got[:, -1].eq(0).all()

    # Padded tensors, masks with holes: a masked token sits before real ones.
    q_tokens, q_mask = pad_token_sets(queries)
    d_tokens, d_mask = pad_token_sets(docs)
    q_mask[0, 0] = False if q_lengths[0] > 1 else q_mask[0, 0]
    d_mask[2, 0] = False if d_lengths[2] > 1 else d_mask[2, 0]
    results = []
    for bucket in (False, True):
        q, d = q_tokens.clone().requires_grad_(), d_tokens.clone().requires_grad_()
        scores = maxsim(q, d, q_mask, d_mask, chunk_elements=chunk_elements, bucket_by_length=bucket)
        weights = torch.arange(scores.numel(), dtype=scores.dtype).view_as(scores)
        (scores * weights).sum().backward()
        results.append((scores.detach(), q.grad, d.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12)
    with torch.no_grad():  # the buffered path (index_select into a reused block buffer)
        buffered = maxsim(q_tokens, d_tokens, q_mask, d_mask, chunk_elements=chunk_elements)
    torch.testing.assert_close(buffered, results[0][0], rtol=0, atol=1e-12)
    # float32 as used in practice: equal up to the rounding of the sum over query tokens.
    q32, d32 = [t.float() for t in queries], [t.float() for t in docs]
    torch.testing.assert_close(
        maxsim_lists(q32, d32), maxsim_lists(q32, d32, bucket_by_length=False), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("small_blocks", [True, False])
def test_uniform_lengths_equal_the_formula_in_float32(small_blocks, monkeypatch):
    """Equal lengths (no padding anywhere, the ViDoRe case) take the buffered block path: a
    padded tensor's document blocks are views, a list's blocks are concatenated into one
    reused buffer, and every block's scores are written in place. Scores equal
    colpali-engine's formula in float32, for padded tensors and lists, with one block or many
    on both sides, and with query padding on unpadded documents; gradients (padded tensors,
    and token sets through the list's blocks) equal the unbucketed reference's."""
    import vlm2emb.multivector as mv

    if small_blocks:  # several query blocks and several document blocks, of uneven sizes
        monkeypatch.setattr(mv, "QUERY_BLOCK_TOKENS", 12)
        monkeypatch.setattr(mv, "BUCKET_BLOCK_ELEMENTS", 300)
        monkeypatch.setattr(mv, "QUERY_BLOCK_MIN_TOKENS", 0)
    queries = [_unit(5, 16, seed=300 + i).float() for i in range(7)]
    docs = [_unit(9, 16, seed=400 + i).float() for i in range(11)]
    formula = _colpali_style_scores(queries, docs)  # [7, 11]
    torch.testing.assert_close(formula, _loop_scores(queries, docs).float(), rtol=0, atol=1e-5)
    q, d = torch.stack(queries), torch.stack(docs)
    with torch.no_grad():
        got = {
            "lists": maxsim_lists(queries, docs),
            "tensors": maxsim(q, d),
            "tensors, all-True masks": maxsim(
                q, d, torch.ones(7, 5, dtype=torch.bool), torch.ones(11, 9, dtype=torch.bool)
            ),
            "reference": maxsim(q, d, bucket_by_length=False),
        }
    for name, scores in got.items():
        assert scores.shape == (7, 11) and scores.dtype == torch.float32, name
        torch.testing.assert_close(scores, formula, rtol=0, atol=1e-5, msg=name)
    # Query padding, unpadded documents (the peer's formula holds: no padded document slot).
    ragged_q = [_unit(n, 16, seed=500 + n).float() for n in (1, 5, 3, 8, 2)]
    torch.testing.assert_close(
        maxsim_lists(ragged_q, docs), _colpali_style_scores(ragged_q, docs), rtol=0, atol=1e-5
    )
    # With autograd (the allocating path): values and gradients equal the reference's.
    results = []
    for bucket in (False, True):
        qg, dg = q.clone().requires_grad_(), d.clone().requires_grad_()
        scores = maxsim(qg, dg, bucket_by_length=bucket)
        (scores * torch.arange(77.0).view(7, 11)).sum().backward()
        results.append((scores.detach(), qg.grad, dg.grad))
    for a, b in zip(*results):  # gradients reach ~100 here: float32 rounding is relative
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(results[1][0], formula, rtol=0, atol=1e-5)
    # Token sets with autograd: the allocating block path, built from the list.
    leaves = [t.clone().requires_grad_() for t in (*queries, *docs)]
    scores = maxsim_lists(leaves[:7], leaves[7:])
    (scores * torch.arange(77.0).view(7, 11)).sum().backward()
    torch.testing.assert_close(scores.detach(), results[0][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.stack([t.grad for t in leaves[:7]]), results[0][1], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(torch.stack([t.grad for t in leaves[7:]]), results[0][2], rtol=1e-6, atol=1e-5)


def test_embedding_rows_pad_group_and_flatten():
    a = MultiVectorEmbeddings(_unit(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), _unit(2, 5))
    b = MultiVectorEmbeddings(_unit(1, 5, 4, seed=1), torch.ones(1, 5, dtype=torch.bool), _unit(1, 5, seed=1))
    both = MultiVectorEmbeddings.cat_rows([a, b])
    assert both.tokens.shape == (3, 5, 4) and both.num_tokens.tolist() == [3, 3, 5]
    assert both.tokens[:2, 3:].abs().sum() == 0  # padded slots are zero vectors
    local_mask = torch.tensor([[True, False], [True, True]])
    grouped = both.grouped(local_mask, padded=False)  # [2, 2, 5, 4]
    assert grouped.tokens.shape == (2, 2, 5, 4) and not grouped.mask[0, 1].any()
    torch.testing.assert_close(grouped.tokens[1, 1], both.tokens[2])
    torch.testing.assert_close(grouped.flatten_rows().dense[3], both.dense[2])
    assert both.take_rows(torch.tensor([2, 0])).num_tokens.tolist() == [5, 3]


# --------------------------------------------------------------------- the model's head
@pytest.fixture(scope="module")
def multi(tiny_qwen2_vl_dir) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"multivector_dim": 16})


def test_encode_multivector_gives_unit_vectors_per_real_token(multi, tiny_qwen2_vl_dir):
    sets = multi.encode(ITEMS, output="multivector", batch_size=2)
    assert [tuple(s.shape) for s in sets] == [(len(multi.render(x).input_ids), 16) for x in ITEMS]
    for s in sets:
        torch.testing.assert_close(s.norm(dim=-1), torch.ones(len(s)))
    alone = multi.encode(ITEMS[1], output="multivector")  # no padding at all
    torch.testing.assert_close(alone, sets[1], atol=1e-5, rtol=1e-4)
    # One forward, both heads: the dense output is the head-less model's embedding.
    plain = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    torch.testing.assert_close(multi.encode(ITEMS), plain.encode(ITEMS), atol=1e-6, rtol=1e-5)
    out = multi(multi.collate(ITEMS))
    assert isinstance(out, MultiVectorEmbeddings) and out.dense.shape == (3, multi.embedding_dim)
    with pytest.raises(ValueError, match="multi-vector head"):
        plain.encode(ITEMS, output="multivector")


def test_multivector_head_save_and_load_round_trip(multi, tmp_path):
    before = multi.encode(ITEMS, output="multivector")
    multi.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "vlm2emb_config.json").read_text())["multivector_dim"] == 16
    loaded = EmbeddingModel.from_pretrained(tmp_path)
    for a, b in zip(before, loaded.encode(ITEMS, output="multivector")):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        loaded.multivector_head.proj.weight, multi.multivector_head.proj.weight, atol=0, rtol=0
    )
    with pytest.raises(ValueError, match="dim 16"):
        EmbeddingModel.from_pretrained(tmp_path, config_overrides={"multivector_dim": 32})
    (tmp_path / MULTIVECTOR_HEAD_NAME).unlink()
    with pytest.raises(ValueError, match="is missing"):
        EmbeddingModel.from_pretrained(tmp_path)


def test_multivector_only_model(tiny_qwen2_vl_dir):
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    model.enable_multivector(8, dense=False)
    assert (model.config.multivector_dim, model.config.dense_head) == (8, False)
    out = model(model.collate(ITEMS[:2]))
    assert out.dense is None and out.tokens.shape[-1] == 8
    with pytest.raises(ValueError, match="no single-vector head"):
        model.encode(ITEMS)
    with pytest.raises(ValueError, match="positive integer"):
        model.enable_multivector(0)
    assert model.config.multivector_dim == 8  # a refused change leaves the config as it was
    with pytest.raises(ValueError, match="needs a multi-vector head"):
        EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"dense_head": False})


def test_export_carries_the_head_and_verifies_the_token_vectors(multi, tmp_path):
    from vlm2emb.export import ExportError, export_model

    multi.save_pretrained(tmp_path / "src")
    result = export_model(tmp_path / "src", tmp_path / "out", mode="merged")
    assert [v.loader for v in result.verifications] == ["vlm2emb", "vlm2emb token vectors"]
    assert all(v.passed for v in result.verifications)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "vlm2emb token vectors" in card and 'output="multivector"' in card and "encode_queries" in card
    loaded = EmbeddingModel.from_pretrained(tmp_path / "out")
    for a, b in zip(multi.encode(ITEMS, output="multivector"), loaded.encode(ITEMS, output="multivector")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # A multi-vector-only model exports, verified on its token vectors alone.
    only = EmbeddingModel.from_pretrained(tmp_path / "src", config_overrides={"dense_head": False})
    only.save_pretrained(tmp_path / "only")
    result = export_model(tmp_path / "only", tmp_path / "out2", mode="merged")
    assert [v.loader for v in result.verifications] == ["vlm2emb token vectors"]
    card = (tmp_path / "out2" / "README.md").read_text()
    assert 'output="multivector"' in card and "encode_queries" not in card  # no single vectors
    reloaded = EmbeddingModel.from_pretrained(tmp_path / "out2")
    for a, b in zip(only.encode(ITEMS, output="multivector"), reloaded.encode(ITEMS, output="multivector")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with pytest.raises(ExportError, match="needs the single-vector head"):
        export_model(tmp_path / "only", tmp_path / "out3", format="sentence-transformers")

    # The check can fail: a moved token vector or a changed token count.
    from vlm2emb.export import _compare_token_sets

    ref = multi.encode(ITEMS, output="multivector")
    assert _compare_token_sets(ref, [t.clone() for t in ref], torch.float32).passed
    moved = [t.clone() for t in ref]
    moved[2][3] = F.normalize(moved[2][3] + 0.01, dim=-1)
    assert not _compare_token_sets(ref, moved, torch.float32).passed
    shorter = [ref[0], ref[1], ref[2][:-1]]
    check = _compare_token_sets(ref, shorter, torch.float32)
    assert not check.passed and "token count" in check.rule


def test_sentence_transformers_multivector_encoder_gives_the_token_vectors(multi, tmp_path):
    """A --format sentence-transformers export plus the head, as sentence-transformers' own
    MultiVectorEncoder, gives encode(output="multivector")'s token vectors for text queries
    and image documents, and again after its own save and reload."""
    from PIL import Image
    from sentence_transformers import MultiVectorEncoder

    from vlm2emb.export import ExportError, export_model, multivector_encoder

    multi.save_pretrained(tmp_path / "src")
    export_model(tmp_path / "src", tmp_path / "st", format="sentence-transformers")
    mve = multivector_encoder(tmp_path / "st")
    image = Image.new("RGB", (48, 48), (200, 30, 90))
    want_q = multi.encode(ITEMS, output="multivector", instruction=multi.config.query_instruction)
    want_d = multi.encode([image, "two"], output="multivector", instruction=multi.config.target_instruction)
    got_q, got_d = mve.encode_query(ITEMS), mve.encode_document([image, "two"])
    for want, got in zip([*want_q, *want_d], [*got_q, *got_d]):
        assert want.shape == got.shape
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        mve.similarity(got_q, got_d).float(), maxsim_lists(want_q, want_d), atol=1e-4, rtol=1e-4
    )
    mve.save(str(tmp_path / "mve"))
    again = MultiVectorEncoder(str(tmp_path / "mve"), device="cpu").encode_query(ITEMS)
    for want, got in zip(want_q, again):
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ExportError, match="no multi-vector head"):
        (tmp_path / "st" / MULTIVECTOR_HEAD_NAME).unlink()
        multivector_encoder(tmp_path / "st")


def test_matryoshka_refuses_a_multivector_loss():
    from vlm2emb.losses import MatryoshkaLoss
    from vlm2emb.losses.maxsim import MaxSimLoss

    with pytest.raises(ValueError, match="multi-vector loss"):
        MatryoshkaLoss(MaxSimLoss(), [8])


# --------------------------------------------------------------------- content tokens only
def test_content_tokens_drop_instruction_and_template_tokens(tiny_qwen2_vl_dir, digit_images, tmp_path):
    """multivector_tokens='content' keeps the rows of the full token set that are the item's
    own text and image tokens (positions found here from the tokenizer alone), so the
    instruction's tokens take no part in MaxSim; the setting is saved with the model."""
    from vlm2emb.eval.cache import model_fingerprint

    overrides = {"multivector_dim": 16}
    every = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides=overrides)
    content = EmbeddingModel.from_pretrained(
        tiny_qwen2_vl_dir, config_overrides={**overrides, "multivector_tokens": "content"}
    )
    tok = every.adapter.tokenizer
    instruction = "Find the page that answers the question."
    n_instruction = len(tok(instruction + "\n")["input_ids"])
    text, image_item = "where is the seven", {"text": "a seven", "image": digit_images[7]}
    full = every.encode([text, image_item], instruction=instruction, output="multivector")
    kept = content.encode([text, image_item], instruction=instruction, output="multivector")
    # Text item: instruction + "\n" + text -> only the text's own tokens remain.
    n_text = len(tok(text)["input_ids"])
    assert len(full[0]) == n_instruction + n_text
    torch.testing.assert_close(kept[0], full[0][-n_text:])
    # Image item: <|vision_start|>, image tokens, <|vision_end|>, the instruction, the text
    # -> the image tokens and the text remain (the frame and the instruction go).
    tokens = every.render(image_item, instruction).tokens
    n_image = tokens.index("<|vision_end|>") + 1
    assert tokens[0] == "<|vision_start|>" and set(tokens[1 : n_image - 1]) == {"<|image_pad|>"}
    expected = torch.cat([full[1][1 : n_image - 1], full[1][n_image + n_instruction :]])
    torch.testing.assert_close(kept[1], expected)
    # MaxSim reads the kept tokens only, and the dropped ones did change the scores.
    docs = every.encode(["the seven is on page two", "eight"], output="multivector")
    torch.testing.assert_close(maxsim_lists(kept[:1], docs), maxsim_lists([full[0][-n_text:]], docs))
    assert not torch.allclose(maxsim_lists(full[:1], docs), maxsim_lists(kept[:1], docs))
    # Saved and loaded with the model; a different setting is a different cache key.
    content.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "vlm2emb_config.json").read_text())["multivector_tokens"] == "content"
    loaded = EmbeddingModel.from_pretrained(tmp_path)
    assert loaded.config.multivector_tokens == "content"
    for a, b in zip(kept, loaded.encode([text, image_item], instruction=instruction, output="multivector")):
        torch.testing.assert_close(a, b)
    assert model_fingerprint(content) != model_fingerprint(every)


def test_content_tokens_setting_is_checked(tiny_qwen2_vl_dir):
    with pytest.raises(ValueError, match="multivector_tokens must be one of all, content"):
        EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir, config_overrides={"multivector_tokens": "text"})
    with pytest.raises(ValueError, match="pack_sequences off"):
        EmbeddingModel.from_pretrained(
            tiny_qwen2_vl_dir, pack_sequences=True, config_overrides={"multivector_tokens": "content"}
        )


def test_bfloat16_dot_products_stay_close_to_float32():
    queries = [_unit(n, 32, seed=n).float() for n in (3, 8)]
    docs = [_unit(n, 32, seed=40 + n).float() for n in (5, 9, 2)]
    exact = maxsim_lists(queries, docs)
    fast = maxsim_lists(queries, docs, compute_dtype=torch.bfloat16)
    assert fast.dtype == torch.float32
    # bfloat16 keeps 8 significant bits: rounding the inputs and the product moves each
    # unit-vector dot product (and so each max) by less than 2**-7.
    lengths = torch.tensor([[3.0], [8.0]])
    assert ((fast - exact).abs() <= lengths * 2**-7).all() and not torch.equal(fast, exact)


def test_maxsim_equals_the_peers_own_code():
    """Peer check on the same ragged tensors: sentence-transformers' ``maxsim`` (a test
    dependency) and, when it imports, colpali-engine's ``score_multi_vector``. colpali-engine
    pins torch<2.14, so CI installs it beside the environment:
    ``pip install --no-deps --target .peers colpali-engine`` and ``PYTHONPATH=.peers``."""
    queries = [_unit(n, 16, seed=n).float() for n in (3, 7, 1)]
    docs = [_unit(n, 16, seed=30 + n).float() for n in (5, 12, 2, 9)]
    ours = maxsim_lists(queries, docs)
    checked = 0
    try:
        from sentence_transformers.util.similarity import maxsim as st_maxsim
    except ImportError:
        pass
    else:
        torch.testing.assert_close(ours, st_maxsim(queries, docs, device="cpu").float())
        checked += 1
    try:
        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
    except ImportError:
        pass
    else:
        # Equal document lengths: colpali-engine zero-pads documents, which equals masking
        # only when no padded slot can win (here: no padding at all).
        same = [_unit(8, 16, seed=60 + i).float() for i in range(4)]
        theirs = BaseVisualRetrieverProcessor.score_multi_vector(queries, same, device="cpu")
        torch.testing.assert_close(maxsim_lists(queries, same), theirs)
        checked += 1
    if not checked:
        pytest.skip("neither sentence-transformers' maxsim nor colpali-engine is installed")


def test_export_format_sentence_transformers_multivector_writes_a_verified_encoder_folder(
    multi, tiny_qwen2_vl_dir, tmp_path
):
    """`--format sentence-transformers-multivector`: one folder that MultiVectorEncoder loads
    (the backbone files written once, the head as its modules) and vlm2emb still loads."""
    from PIL import Image
    from sentence_transformers import MultiVectorEncoder

    from vlm2emb.cli import main
    from vlm2emb.export import ExportError, export_model

    multi.save_pretrained(tmp_path / "src")
    result = export_model(tmp_path / "src", tmp_path / "mv", format="sentence-transformers-multivector")
    checks = {v.loader: v for v in result.verifications}
    assert checks["sentence-transformers MultiVectorEncoder"].passed
    assert checks["vlm2emb token vectors"].passed
    folder = tmp_path / "mv"
    modules = json.loads((folder / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == [
        "Transformer",
        "Dense",
        "Normalize",
        "MultiVectorMask",
    ]
    assert (
        not (folder / "1_Pooling").exists() and len(list(folder.rglob("*.safetensors"))) == 3
    )  # backbone, head, Dense
    encoder = MultiVectorEncoder(str(folder), device="cpu")
    image = Image.new("RGB", (48, 48), (200, 30, 90))
    want_q = multi.encode(ITEMS, output="multivector", instruction=multi.config.query_instruction)
    want_d = multi.encode([image, "two"], output="multivector", instruction=multi.config.target_instruction)
    for want, got in zip(
        [*want_q, *want_d], [*encoder.encode_query(ITEMS), *encoder.encode_document([image, "two"])]
    ):
        torch.testing.assert_close(got.float(), want, atol=1e-5, rtol=1e-4)
    again = EmbeddingModel.from_pretrained(folder).encode(
        ITEMS, output="multivector", instruction=multi.config.query_instruction
    )
    for want, got in zip(want_q, again):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert "MultiVectorEncoder" in (folder / "README.md").read_text()

    EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).save_pretrained(tmp_path / "single")
    with pytest.raises(ExportError, match="needs a multi-vector head"):
        export_model(tmp_path / "single", tmp_path / "x", format="sentence-transformers-multivector")
    assert not (tmp_path / "x").exists()
    argv = [
        "export",
        str(tmp_path / "src"),
        str(tmp_path / "y"),
        "--format",
        "sentence-transformers-multivector",
    ]
    assert main([*argv, "--adapter-only"]) == 2 and not (tmp_path / "y").exists()
