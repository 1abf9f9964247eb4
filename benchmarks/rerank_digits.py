"""Recall, then re-rank, on the digits demo: embedder alone vs embedder + reranker.

Trains the demo embedder (recipes/demo.yaml) and a reranker on the same training rows
(tiny random Qwen2-VL each, CPU), then ranks the ten digit captions for each evaluation
image three ways: embedder alone, reranker alone over all ten, and the pipeline (embedder
recalls ``--recall`` captions, the reranker re-orders them). Prints hit@1 and the time of
each stage, and writes them as JSON.

    python benchmarks/rerank_digits.py --out benchmarks/results/rerank_digits_cpu.json

Runs in a few minutes on two CPU cores; docs/rerank.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embed-steps", type=int, default=150)
    ap.add_argument("--rerank-steps", type=int, default=150)
    ap.add_argument("--rerank-lr", type=float, default=3e-4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--recall", type=int, default=3, help="captions the embedder hands to the reranker")
    ap.add_argument("--queries", type=int, default=100, help="evaluation images used (of 300)")
    ap.add_argument("--batch-size", type=int, default=8, help="reranker queries per step")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument(
        "--embedder",
        type=Path,
        default=None,
        help="a trained demo embedder to reuse (trained on this seed's data) instead of training one",
    )
    args = ap.parse_args()

    import vlm2emb
    from vlm2emb import EmbeddingModel
    from vlm2emb.data.demo import write_digits
    from vlm2emb.data.schema import load_eval_examples
    from vlm2emb.rerank import Reranker, train_reranker

    torch.manual_seed(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="rerank-digits-"))
    data = write_digits(work / "data", seed=args.seed)  # the same files for the same seed
    t0 = time.perf_counter()
    if args.embedder is None:
        summary = vlm2emb.train(
            "recipes/demo.yaml",
            output_dir=str(work / "embedder"),
            seed=args.seed,
            data={"train": [str(data / "train.jsonl")], "eval": []},
            train={"max_steps": args.embed_steps},
            progress=False,
        )
        embedder_dir = Path(summary["output_dir"]) / "final"
    else:
        embedder_dir = args.embedder
    embed_train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = train_reranker(
        {
            "model": "tiny:qwen2_vl",
            "output_dir": str(work / "reranker"),
            "seed": args.seed,
            "data": {"train": [str(data / "train.jsonl")]},
            "group_size": args.group_size,
            "batch_size": args.batch_size,
            "max_steps": args.rerank_steps,
            "learning_rate": args.rerank_lr,
            "log_steps": 10,
        }
    )
    rerank_train_s = time.perf_counter() - t0

    embedder = EmbeddingModel.from_pretrained(embedder_dir)
    reranker = Reranker.from_pretrained(result.final_dir)
    rows = [r for r in load_eval_examples([str(data / "eval.jsonl")]) if r.task == "digits-i2t"]
    rows = rows[:: max(1, len(rows) // args.queries)][: args.queries]  # rows come sorted by digit
    captions = rows[0].candidates  # the same ten captions for every image row
    queries = [r.query for r in rows]
    gold = [r.positive[0] for r in rows]
    instruction = rows[0].instruction

    t0 = time.perf_counter()
    corpus_emb = embedder.encode_targets(captions)
    plain = embedder.search(queries, corpus_emb, top_k=args.recall, instruction=instruction)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    piped = embedder.search(
        queries,
        corpus_emb,
        top_k=args.recall,
        instruction=instruction,
        reranker=reranker,
        corpus=captions,
        rerank_instruction=instruction,
    )
    pipeline_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    alone = [reranker.rerank(q, captions, top_k=1, instruction=instruction) for q in queries]
    rerank_all_s = time.perf_counter() - t0

    def hit1(hits: list[list[dict]]) -> float:
        return sum(h[0]["corpus_id"] == g for h, g in zip(hits, gold)) / len(gold)

    def recall(hits: list[list[dict]]) -> float:
        return sum(any(x["corpus_id"] == g for x in h) for h, g in zip(hits, gold)) / len(gold)

    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "seed": args.seed,
        "queries": len(rows),
        "candidates": len(captions),
        "recall_depth": args.recall,
        "embedder_train_steps": args.embed_steps,
        "reranker_train_steps": args.rerank_steps,
        "reranker_batch_size": args.batch_size,
        "reranker_group_size": args.group_size,
        "reranker_lr": args.rerank_lr,
        "reranker_first_last_loss": [result.losses[0], result.losses[-1]],
        "hit@1": {
            "embedder": hit1(plain),
            "reranker_alone_all_10": hit1(alone),
            "embedder_then_reranker": hit1(piped),
        },
        f"embedder_recall@{args.recall}": recall(plain),
        "seconds": {
            "embedder_train": round(embed_train_s, 1) if args.embedder is None else None,
            "reranker_train": round(rerank_train_s, 1),
            "embedder_search": round(embed_s, 2),
            "embedder_search_plus_rerank": round(pipeline_s, 2),
            "reranker_alone_all_10": round(rerank_all_s, 2),
        },
    }
    print(json.dumps(out, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
