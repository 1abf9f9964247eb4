"""Recall, then re-rank, then distil, on the digits demo: the issue-19 demo, several seeds.

For each seed, on the bundled digits (real 8x8 scans, tiny random Qwen2-VL, CPU):

1. the demo embedder (recipes/demo.yaml);
2. hard negatives for every training row from that embedder (``vlm2emb mine``): the
   captions (or images) it confuses with the positive;
3. a reranker **started from the embedder's weights** (a saved embedder folder loads as a
   reranker), trained listwise on the image -> caption rows' positive + mined negatives
   (defaults: groups of 10, i.e. every caption, 350 steps of 16 queries, peak lr 1e-3,
   10 % warmup, cosine, temperature 0.05: the first setting measured to learn);
4. the reranker's scores of a share of the mined rows as ``teacher_scores``
   (:func:`~vlm2emb.rerank.score_rows`), and the embedder trained further on them with the
   ``distill`` loss (the "distilled embedder"); and, as its control, the embedder trained
   the same number of further steps on the same mined rows with plain InfoNCE.

Each model is then evaluated on the held-out image -> caption rows (ten confusable captions
per image): embedder alone, embedder recall@k -> reranker, reranker alone over all ten,
control, distilled embedder; hit@1, MRR and the seconds of each stage.

    python benchmarks/rerank_demo.py --seeds 0 1 2 --out benchmarks/results/rerank_demo_cpu.json
    # or one process per seed, then: --merge seed0.json seed1.json seed2.json --out all.json

docs/rerank.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _metrics(hits: list[list[dict]], gold: list[int]) -> dict[str, float]:
    """hit@1 and MRR over the returned hits (a gold answer missing from them counts 0)."""
    hit1 = sum(h[0]["corpus_id"] == g for h, g in zip(hits, gold)) / len(gold)
    rr = []
    for h, g in zip(hits, gold):
        ranks = [i for i, x in enumerate(h) if x["corpus_id"] == g]
        rr.append(1.0 / (ranks[0] + 1) if ranks else 0.0)
    return {"hit@1": round(hit1, 4), "mrr": round(sum(rr) / len(rr), 4)}


def run_seed(args: argparse.Namespace, seed: int, work: Path) -> dict:
    import vlm2emb
    from vlm2emb import EmbeddingModel
    from vlm2emb.data.demo import write_digits
    from vlm2emb.data.schema import load_eval_examples
    from vlm2emb.mine import MineConfig, mine_negatives
    from vlm2emb.rerank import Reranker, score_rows, train_reranker

    torch.manual_seed(seed)
    data = write_digits(work / "data", seed=seed)
    seconds: dict[str, float] = {}

    def embed_run(name: str, **over) -> Path:
        t0 = time.perf_counter()
        summary = vlm2emb.train(
            "recipes/demo.yaml", output_dir=str(work / name), seed=seed, progress=False, **over
        )
        seconds[f"train_{name}"] = round(time.perf_counter() - t0, 1)
        return Path(summary["output_dir"]) / "final"

    embedder_dir = embed_run(
        "embedder",
        data={"train": [str(data / "train.jsonl")], "eval": []},
        train={"max_steps": args.embed_steps},
    )
    embedder = EmbeddingModel.from_pretrained(embedder_dir)

    t0 = time.perf_counter()
    mined = data / "mined.jsonl"  # beside train.jsonl: relative image paths resolve the same
    mine_negatives(embedder, str(data / "train.jsonl"), mined, MineConfig(num_negatives=args.group_size - 1))
    seconds["mine"] = round(time.perf_counter() - t0, 1)

    rerank_rows = mined
    if args.rerank_task:  # only the task the reranker is evaluated on (its rows carry mined negatives)
        rerank_rows = data / "mined_task.jsonl"
        keep = [
            line
            for line in mined.read_text().splitlines()
            if json.loads(line).get("dataset") == args.rerank_task
        ]
        rerank_rows.write_text("".join(line + "\n" for line in keep))
    t0 = time.perf_counter()
    result = train_reranker(
        {
            "model": str(embedder_dir),  # the reranker starts from the trained embedder
            "output_dir": str(work / "reranker"),
            "seed": seed,
            "data": {"train": [str(rerank_rows)]},
            "group_size": args.group_size,
            "batch_size": args.batch_size,
            "max_steps": args.rerank_steps,
            "learning_rate": args.rerank_lr,
            "warmup_ratio": 0.1,
            "lr_scheduler": "cosine",
            "temperature": args.rerank_temperature,
            "log_steps": 10,
        }
    )
    seconds["train_reranker"] = round(time.perf_counter() - t0, 1)
    reranker = Reranker.from_pretrained(result.final_dir)

    # Distillation: the reranker scores a share of the mined rows (every pair is a forward,
    # so all of them would cost more than the rest of the run); the embedder trains on.
    lines = mined.read_text().splitlines()
    subset = data / "mined_subset.jsonl"
    subset.write_text("".join(line + "\n" for line in lines[: args.distill_rows]))
    t0 = time.perf_counter()
    scored = data / "scored.jsonl"
    score_rows(reranker, subset, scored, batch_size=32)
    seconds["score_rows"] = round(time.perf_counter() - t0, 1)
    further = {
        "max_steps": args.distill_steps,
        "learning_rate": args.distill_lr,
        "warmup_ratio": 0.1,
    }
    control_dir = embed_run(
        "control",
        model={"name_or_path": str(embedder_dir)},
        data={"train": [str(subset)], "eval": []},
        train=further,
    )
    distilled_dir = embed_run(
        "distilled",
        model={"name_or_path": str(embedder_dir)},
        data={"train": [str(scored)], "eval": []},
        train={
            **further,
            "loss": "distill",
            "loss_args": {"kl_weight": args.kl_weight, "teacher_temperature": 1.0},
        },
    )

    rows = [r for r in load_eval_examples([str(data / "eval.jsonl")]) if r.task == "digits-i2t"]
    rows = rows[:: max(1, len(rows) // args.queries)][: args.queries]  # rows come sorted by digit
    captions = rows[0].candidates  # the same ten captions for every image row
    queries = [r.query for r in rows]
    gold = [r.positive[0] for r in rows]
    instruction = rows[0].instruction
    n = len(captions)

    def search(model: EmbeddingModel, **kw) -> tuple[list[list[dict]], float]:
        t = time.perf_counter()
        corpus_emb = model.encode_targets(captions)
        hits = model.search(queries, corpus_emb, top_k=n, instruction=instruction, **kw)
        return hits, time.perf_counter() - t

    plain, plain_s = search(embedder)
    piped, piped_s = search(
        embedder, reranker=reranker, corpus=captions, rerank_top_k=args.recall, rerank_instruction=instruction
    )
    t0 = time.perf_counter()
    alone = [reranker.rerank(q, captions, instruction=instruction) for q in queries]
    alone_s = time.perf_counter() - t0
    control, control_s = search(EmbeddingModel.from_pretrained(control_dir))
    distilled, distilled_s = search(EmbeddingModel.from_pretrained(distilled_dir))
    recall = sum(any(x["corpus_id"] == g for x in h[: args.recall]) for h, g in zip(plain, gold)) / len(gold)
    return {
        "seed": seed,
        "reranker_loss_first_last": [round(result.losses[0], 4), round(result.losses[-1], 4)],
        f"embedder_recall@{args.recall}": round(recall, 4),
        "metrics": {
            "embedder": _metrics(plain, gold),
            f"embedder@{args.recall}->reranker": _metrics(piped, gold),
            "reranker_alone_all": _metrics(alone, gold),
            "embedder+infonce_control": _metrics(control, gold),
            "embedder+distill": _metrics(distilled, gold),
        },
        "eval_seconds": {
            "embedder": round(plain_s, 2),
            f"embedder@{args.recall}->reranker": round(piped_s, 2),
            "reranker_alone_all": round(alone_s, 2),
            "embedder+infonce_control": round(control_s, 2),
            "embedder+distill": round(distilled_s, 2),
        },
        "train_seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--embed-steps", type=int, default=150)
    ap.add_argument("--rerank-steps", type=int, default=350)
    ap.add_argument("--rerank-lr", type=float, default=1e-3)
    ap.add_argument(
        "--rerank-temperature", type=float, default=0.05, help="listwise softmax temperature of the reranker"
    )
    ap.add_argument("--group-size", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16, help="reranker queries per step")
    ap.add_argument("--recall", type=int, default=3, help="captions the embedder hands to the reranker")
    ap.add_argument("--queries", type=int, default=100, help="evaluation images used (of 300)")
    ap.add_argument(
        "--rerank-task", default="digits-i2t", help="train the reranker on this dataset's rows ('' = all)"
    )
    ap.add_argument("--distill-rows", type=int, default=512, help="mined rows the reranker scores")
    ap.add_argument("--distill-steps", type=int, default=40)
    ap.add_argument("--distill-lr", type=float, default=5e-4)
    ap.add_argument("--kl-weight", type=float, default=1.0)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temporary one)")
    ap.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="summarise the runs of these output files instead"
    )
    args = ap.parse_args()

    runs = []
    settings = {k: v for k, v in vars(args).items() if k not in ("merge", "out", "work")}
    if args.merge:  # seeds run as separate processes (in parallel), summarised together
        files = [json.loads(path.read_text()) for path in args.merge]
        per_run = ("seeds", "merge", "out", "work")  # may differ between the merged files
        settings = {k: v for k, v in files[0]["settings"].items() if k not in per_run}
        for path, data in zip(args.merge, files):
            other = {k: v for k, v in data["settings"].items() if k not in per_run}
            if other != settings:
                raise SystemExit(f"{path}: other settings than {args.merge[0]}; not merged")
            runs.extend(data["runs"])
        settings["seeds"] = [r["seed"] for r in runs]
    else:
        work = args.work or Path(tempfile.mkdtemp(prefix="rerank-demo-"))
        for seed in args.seeds:
            runs.append(run_seed(args, seed, work / f"seed{seed}"))
            print(json.dumps(runs[-1]), flush=True)
    names = list(runs[0]["metrics"])
    summary = {
        name: {
            metric: [round(statistics.mean(r["metrics"][name][metric] for r in runs), 4)]
            + (
                [round(statistics.stdev(r["metrics"][name][metric] for r in runs), 4)]
                if len(runs) > 1
                else []
            )
            for metric in ("hit@1", "mrr")
        }
        for name in names
    }
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "settings": settings,
        "mean_std": summary,
        "runs": runs,
    }
    print(json.dumps(out["mean_std"], indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
