"""A small evaluation suite built from the digits demo: one task of each supported form.

``write_demo_suite(OUT)`` writes the digits demo data (``vlm2emb demo-data``) and then:

* ``digits-i2t``: local classification rows in the canonical schema (image -> 10 captions);
* ``digits-t2i-mmeb``: the caption -> image rows rewritten in VLM2Vec's MMEB-eval layout
  (``qry_text`` / ``tgt_img_path`` with ``<|image_1|>`` placeholders);
* ``digits-corpus``: global retrieval: the 10 captions search all 300 held-out images;
  qrels mark the 30 images of the caption's digit relevant (many relevant per query);
* ``suite.yaml`` listing the three tasks.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_demo_suite"]

_SUITE = """\
# The digits demo suite (vlm2emb.eval.demo_suite); paths are relative to this file.
name: digits-demo
metric: hit@1
ks: [1, 5, 10]
tasks:
  - name: digits-i2t
    meta_task: classification
    kind: local
    data: i2t.jsonl
  - name: digits-t2i-mmeb
    meta_task: retrieval
    kind: local
    format: mmeb
    data: t2i_mmeb.jsonl
    query_instruction: Find the image that matches the caption.
  - name: digits-corpus
    meta_task: retrieval
    kind: corpus
    corpus: corpus.jsonl
    queries: queries.jsonl
    qrels: qrels.tsv
    query_instruction: Find the image that matches the caption.
    metric: ndcg@10
"""


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _positive_first(candidates: list[dict], positive: int) -> list[dict]:
    return [candidates[positive], *(c for i, c in enumerate(candidates) if i != positive)]


def write_demo_suite(out_dir: str | Path) -> Path:
    """Writes the demo data and the three-task suite; returns the path of ``suite.yaml``."""
    from vlm2emb.data.demo import write_digits

    out = write_digits(out_dir)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines() if line.strip()]
    i2t = [r for r in rows if r["task"] == "digits-i2t"]
    t2i = [r for r in rows if r["task"] == "digits-t2i"]
    _write(out / "i2t.jsonl", i2t)
    _write(
        out / "t2i_mmeb.jsonl",
        [
            {
                "qry_text": r["query"]["text"],
                "qry_img_path": "",
                "tgt_text": ["<|image_1|>"] * len(r["candidates"]),
                # MMEB puts the positive first.
                "tgt_img_path": [c["image"] for c in _positive_first(r["candidates"], r["positive"])],
            }
            for r in t2i
        ],
    )
    captions = [c["text"] for c in i2t[0]["candidates"]]  # the 10 captions, digit order
    _write(
        out / "corpus.jsonl",
        [{"id": f"img{i}", "item": {"image": r["query"]["image"]}} for i, r in enumerate(i2t)],
    )
    _write(out / "queries.jsonl", [{"id": f"digit{d}", "item": {"text": c}} for d, c in enumerate(captions)])
    qrels = ["query_id\tcorpus_id\trelevance"]
    qrels += [f"digit{r['positive']}\timg{i}\t1" for i, r in enumerate(i2t)]
    (out / "qrels.tsv").write_text("\n".join(qrels) + "\n")
    (out / "suite.yaml").write_text(_SUITE)
    return out / "suite.yaml"
