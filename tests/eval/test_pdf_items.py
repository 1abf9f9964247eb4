"""Evaluation with PDF-page items (``{"pdf": ..., "page": N}``): local rows and a corpus of
pages, scored against a hand computation on pages rendered here with pypdfium2 directly,
and the embedding cache keeping pages of one file apart."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers import write_pdf
from vlm2emb import EmbeddingModel
from vlm2emb.eval import evaluate
from vlm2emb.eval.harness import run_suite
from vlm2emb.eval.mmeb import load_local_rows
from vlm2emb.eval.suite import load_suite

pdfium = pytest.importorskip("pypdfium2")


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


def rendered_pages(path: Path, dpi: int = 144) -> list[Image.Image]:
    """The reference: every page rendered by pypdfium2 at ``dpi`` (vlm2emb's default)."""
    doc = pdfium.PdfDocument(str(path))
    try:
        return [doc[i].render(scale=dpi / 72).to_pil().convert("RGB") for i in range(len(doc))]
    finally:
        doc.close()


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def test_local_rows_with_pdf_pages_score_as_their_rendered_images(
    tmp_path: Path, model: EmbeddingModel
) -> None:
    pdf = write_pdf(tmp_path / "doc.pdf")  # page 0 red 100x50 pt, page 1 blue 60x80 pt
    pages = rendered_pages(pdf)
    assert [p.size for p in pages] == [(200, 100), (120, 160)]
    red, blue = (np.asarray(p, dtype=float).mean(axis=(0, 1)) for p in pages)
    assert red[0] > 200 > red[2] and blue[2] > 200 > blue[0]  # the pages are what they claim
    cands = [{"pdf": "doc.pdf", "page": 0}, {"pdf": "doc.pdf", "page": 1}]
    rows = [
        {"query": {"text": "the red page"}, "candidates": cands, "positive": 0, "task": "pages"},
        {"query": {"text": "the blue page"}, "candidates": cands, "positive": 1, "task": "pages"},
        {
            "query": {"pdf": "doc.pdf", "page": 1},
            "candidates": [{"text": "red"}, {"text": "blue"}],
            "positive": 1,
            "task": "page-query",
        },
    ]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_local_rows([str(tmp_path / "eval.jsonl")])  # paths resolved; no task field
    loaded = [{**row, "task": raw["task"]} for row, raw in zip(loaded, rows, strict=True)]
    report = evaluate(model, loaded, batch_size=2, ks=(1,))

    # By hand: the same rows with the pages as PIL images.
    page_emb = unit(model.encode([{"image": p} for p in pages]))  # [2, d]
    assert torch.allclose(unit(model.encode(loaded[0]["candidates"])), page_emb, atol=1e-5)
    assert not torch.allclose(page_emb[0], page_emb[1], atol=1e-3)  # two pages, two vectors
    q = unit(model.encode(["the red page", "the blue page"]))  # [2, d]
    # Rank = candidates scoring at least the positive's score (pessimistic ties, the
    # project's rule), from one score vector per query.
    scores = q @ page_emb.T  # [2, 2]
    ranks = [int((scores[i] >= scores[i, i]).sum()) for i in range(2)]
    q3 = unit(model.encode([{"image": pages[1]}]))[0]
    c3 = unit(model.encode(["red", "blue"]))
    s3 = c3 @ q3  # [2]
    ranks.append(int((s3 >= s3[1]).sum()))
    tasks = report["tasks"]
    assert tasks["pages"]["mrr"] == pytest.approx(np.mean([1 / r for r in ranks[:2]]), abs=1e-6)
    assert tasks["pages"]["hit@1"] == pytest.approx(np.mean([r == 1 for r in ranks[:2]]))
    assert tasks["page-query"]["mrr"] == pytest.approx(1 / ranks[2], abs=1e-6)


def test_a_corpus_of_pdf_pages_through_a_suite_and_the_cache(tmp_path: Path, model: EmbeddingModel) -> None:
    write_pdf(tmp_path / "a.pdf")
    Image.new("RGB", (80, 80), (0, 160, 0)).save(tmp_path / "b.pdf")  # one green page
    corpus = [
        {"id": f"{f}{p}", "item": {"pdf": f"{f}.pdf", "page": p}} for f, p in (("a", 0), ("a", 1), ("b", 0))
    ]
    queries = [{"id": "q-red", "item": {"text": "red page"}}, {"id": "q-blue", "item": {"text": "blue page"}}]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (tmp_path / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (tmp_path / "qrels.tsv").write_text("query_id\tcorpus_id\trelevance\nq-red\ta0\t1\nq-blue\ta1\t1\n")
    (tmp_path / "suite.yaml").write_text(
        "name: pages\nks: [1, 2]\ntasks:\n"
        "  - {name: pages, kind: corpus, corpus: corpus.jsonl, queries: queries.jsonl, qrels: qrels.tsv, metric: mrr}\n"
    )
    suite = load_suite(tmp_path / "suite.yaml")
    first = run_suite(model, suite, batch_size=2, cache_dir=tmp_path / "cache")
    again = run_suite(model, suite, batch_size=2, cache_dir=tmp_path / "cache")
    assert again["cache"]["items_encoded"] == 0 and again["tasks"] == first["tasks"]

    pages = rendered_pages(tmp_path / "a.pdf") + rendered_pages(tmp_path / "b.pdf")
    docs = unit(model.encode([{"image": p} for p in pages]))  # [3, d] a0 a1 b0
    q = unit(model.encode(["red page", "blue page"]))  # [2, d]
    scores = q @ docs.T  # [2, 3]
    # Pessimistic ties (the project's rule); relevant: a0 for the red query, a1 for the blue.
    rr = [1 / int((scores[i] >= scores[i, i]).sum()) for i in range(2)]
    assert first["tasks"]["pages"]["mrr"] == pytest.approx(np.mean(rr), abs=1e-6)
    assert first["tasks"]["pages"]["score"] == first["tasks"]["pages"]["mrr"]
    # Three pages, three vectors: the cache keys (and the encoder) tell pages of a file apart.
    cached = run_suite(model, suite, batch_size=2, cache_dir=tmp_path / "cache")
    assert cached["cache"]["items_from_cache"] == 5 and not torch.allclose(docs[0], docs[1], atol=1e-3)
