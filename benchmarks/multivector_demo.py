"""Late-interaction demo: single-vector vs multi-vector vs joint training of a tiny
Qwen2-VL (random init, built offline) on generated page images with text queries.

    PYTHONPATH=. python benchmarks/multivector_demo.py --out runs/mv-demo   # a few minutes on CPU

Each page is a 64x64 white image with two large digits (left and right) and two lines of
small filler text, drawn with PIL's bundled font. A query names one digit ("a page showing
the number seven"); every page that shows it is relevant. Training pairs a query with one
page showing its digit; evaluation uses held-out pages (other digit pairs and renderings).

Four models train with the same recipe, steps and seed:

* ``single``: the pooled embedding, loss ``infonce``;
* ``multi``: the multi-vector head only (``dense_head: false``), loss ``maxsim``, every
  real token in the token set;
* ``multi-content``: the same with ``multivector_tokens: content`` (a page's set is its
  image tokens, without the ``<|vision_start|>``/``<|vision_end|>`` frame);
* ``joint-content``: both heads, loss ``maxsim`` with ``dense_weight: 1``, content tokens
  (scored both ways).

Reported per model and scoring: hit@1 (the best page is relevant) and nDCG@5 (binary
gains, the ViDoRe measure), the stored bytes per page (float32), and for multi-vector
scoring the same with token pooling (``pool_factor`` 2 and 4) and float16 storage through
:class:`vlm2emb.index.MultiVectorIndex`. Writes ``results.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FILLER = ("lorem", "ipsum", "dolor", "sit", "amet", "page", "total", "note", "item", "ref")


def draw_page(left: int, right: int, rng: random.Random) -> object:
    """A 64x64 page: two big digits side by side, filler text lines above and below."""
    from PIL import Image, ImageDraw, ImageFont

    page = Image.new("RGB", (64, 64), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    small, big = ImageFont.load_default(size=8), ImageFont.load_default(size=26)
    draw.text((2, 1), " ".join(rng.sample(FILLER, 2)), fill=(90, 90, 90), font=small)
    for slot, digit in enumerate((left, right)):
        x = 4 + 32 * slot + rng.randint(-2, 2)
        draw.text((x, 16 + rng.randint(-3, 3)), str(digit), fill=(0, 0, 0), font=big)
    draw.text((2, 53), " ".join(rng.sample(FILLER, 2)), fill=(90, 90, 90), font=small)
    return page


def query_text(digit: int) -> str:
    return f"a page showing the number {WORDS[digit]}"


def make_data(root: Path, n_train: int, seed: int) -> tuple[list[dict], list[Path], list[tuple[int, int]]]:
    """Training rows (query -> a page with its digit) and the held-out corpus."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(10) for b in range(10) if a != b]
    rng.shuffle(pairs)
    held_out, seen = pairs[:30], pairs[30:]  # evaluation pages show digit pairs never trained on
    (root / "pages").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train):
        left, right = seen[i % len(seen)]
        path = root / "pages" / f"train-{i}.png"
        draw_page(left, right, rng).save(path)
        rows.append(
            {"query": {"text": query_text(rng.choice((left, right)))}, "positive": {"image": str(path)}}
        )
    corpus = []
    for i, (left, right) in enumerate(held_out):
        path = root / "pages" / f"eval-{i}.png"
        draw_page(left, right, rng).save(path)
        corpus.append(path)
    return rows, corpus, held_out


def metrics(scores: torch.Tensor, relevant: list[set[int]]) -> dict[str, float]:
    """hit@1 and nDCG@5 (binary gains) of a [Nq, Nd] score matrix."""
    hit, ndcg = 0.0, 0.0
    top = scores.topk(5, dim=1).indices.tolist()
    for ranked, rel in zip(top, relevant):
        hit += ranked[0] in rel
        dcg = sum(1 / math.log2(r + 2) for r, d in enumerate(ranked) if d in rel)
        ideal = sum(1 / math.log2(r + 2) for r in range(min(5, len(rel))))
        ndcg += dcg / ideal
    return {"hit@1": hit / len(relevant), "ndcg@5": ndcg / len(relevant)}


def evaluate(model_dir: Path, corpus: list[Path], pairs: list[tuple[int, int]]) -> dict[str, dict]:
    """Scores of one trained model: cosine and/or MaxSim (plain, fp16, pooled)."""
    from vlm2emb import EmbeddingModel
    from vlm2emb.index import MultiVectorIndex

    model = EmbeddingModel.from_pretrained(model_dir)
    queries = [query_text(d) for d in range(10)]
    relevant = [{i for i, p in enumerate(pairs) if d in p} for d in range(10)]
    pages = [{"image": str(p)} for p in corpus]
    out: dict[str, dict] = {}
    if model.config.dense_head:
        q, d = model.encode(queries), model.encode(pages)  # [10, e], [N, e]
        out["cosine"] = {**metrics(q @ d.T, relevant), "bytes_per_page": d.shape[1] * 4}
    if model.config.multivector_dim is not None:
        q_sets = model.encode(queries, output="multivector")
        d_sets = model.encode(pages, output="multivector")
        for pool_factor in (1, 2, 4):
            for dtype in ("float32", "float16") if pool_factor == 1 else ("float32",):
                index = MultiVectorIndex(model.config.multivector_dim, pool_factor=pool_factor, dtype=dtype)
                index.add(d_sets)
                scores, ids = index.search(q_sets, top_k=len(corpus))
                full = torch.empty(len(queries), len(corpus))
                full.scatter_(1, torch.from_numpy(ids), torch.from_numpy(scores))
                name = (
                    "maxsim"
                    + (f" pool {pool_factor}" if pool_factor > 1 else "")
                    + (" fp16" if dtype == "float16" else "")
                )
                out[name] = {
                    **metrics(full, relevant),
                    "bytes_per_page": index.nbytes / len(corpus),
                    "vectors_per_page": index.num_tokens / len(corpus),
                }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/mv-demo")
    parser.add_argument("--train-rows", type=int, default=480)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=32, help="multi-vector token size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import vlm2emb

    root = Path(args.out)
    rows, corpus, pairs = make_data(root / "data", args.train_rows, args.seed)
    multi = {"multivector_dim": args.dim, "dense_head": False}
    variants = {
        "single": ({}, {"loss": "infonce"}),
        "multi": (multi, {"loss": "maxsim"}),
        "multi-content": ({**multi, "multivector_tokens": "content"}, {"loss": "maxsim"}),
        "joint-content": (
            {"multivector_dim": args.dim, "dense_head": True, "multivector_tokens": "content"},
            {"loss": "maxsim", "loss_args": {"dense_weight": 1.0}},
        ),
    }
    results: dict = {"args": vars(args), "corpus_pages": len(corpus), "queries": 10, "models": {}}
    for name, (model_keys, train_keys) in variants.items():
        start = time.perf_counter()
        summary = vlm2emb.train(
            output_dir=str(root / name),
            seed=args.seed,
            model={"name_or_path": "tiny:qwen2_vl", "lora": False, **model_keys},
            train={
                "max_steps": args.steps,
                "batch_size": args.batch_size,
                "learning_rate": 2e-3,
                "warmup_ratio": 0.1,
                "lr_scheduler": "cosine",
                "temperature": 0.05,
                "precision": "fp32",
                "save_steps": 0,
                "log_steps": 20,
                **train_keys,
            },
            train_data=rows,
            progress=False,
        )
        results["models"][name] = {
            "train_seconds": round(time.perf_counter() - start, 1),
            "final_loss": summary["final_loss"],
            "scores": evaluate(root / name / "final", corpus, pairs),
        }
        print(json.dumps({name: results["models"][name]}), flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
