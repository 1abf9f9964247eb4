"""``vlm2emb rerank train | eval | score``: the reranker's commands (docs/rerank.md).

Kept apart from :mod:`vlm2emb.cli`, which adds the ``rerank`` parser and calls
:func:`run`; nothing here is imported until the command runs, except argparse.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any) -> None:
    """Adds ``rerank`` and its sub-commands to the top-level sub-parsers."""
    p = sub.add_parser(
        "rerank",
        help="generative reranker: train, evaluate embedder + reranker, score rows for distillation",
        description="The same VLM as a generative reranker (docs/rerank.md).",
    )
    rsub = p.add_subparsers(dest="rerank_command", metavar="RERANK_COMMAND", required=True)
    debug = {"action": "store_true", "default": argparse.SUPPRESS, "help": argparse.SUPPRESS}

    p_train = rsub.add_parser(
        "train",
        help="train a reranker from a YAML recipe (RerankTrainConfig keys)",
        description="Train a reranker: listwise softmax over each query's positive and negatives. "
        "Writes OUTPUT_DIR/{final,metrics.jsonl,recipe.json}.",
        epilog="example: vlm2emb rerank train my_reranker.yaml max_steps=200 output_dir=runs/rr",
    )
    p_train.add_argument("recipe", help="recipe YAML file (keys: docs/rerank.md#training)")
    p_train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. group_size=8"
    )
    p_train.add_argument("--debug", **debug)

    p_eval = rsub.add_parser(
        "eval",
        help="embedder alone vs embedder recall -> reranker, side by side, with timings",
        description="Rank each row's candidates with the embedder alone and with the reranker "
        "re-ordering the embedder's best --recall-k; print both metric sets per task and the "
        "seconds of each stage.",
        epilog="example: vlm2emb rerank eval --embedder runs/demo/final --reranker runs/rr/final "
        "--data eval.jsonl --recall-k 3",
    )
    p_eval.add_argument("--embedder", required=True, help="EmbeddingModel directory or tiny:FAMILY")
    p_eval.add_argument("--reranker", required=True, help="reranker directory, raw VLM or tiny:FAMILY")
    p_eval.add_argument("--data", required=True, nargs="+", help="local-candidate evaluation rows")
    p_eval.add_argument("--recall-k", type=int, default=10, help="candidates the reranker re-orders")
    p_eval.add_argument("--batch-size", type=int, default=32)
    p_eval.add_argument("--rerank-batch-size", type=int, default=16)
    p_eval.add_argument("--out", default=None, help="write the report as JSON")
    p_eval.add_argument("--debug", **debug)

    p_score = rsub.add_parser(
        "score",
        help="write a reranker's scores into training rows as teacher_scores (train.loss=distill)",
        description="Score every row's [positive, *negatives] with the reranker and write the "
        "rows with teacher_scores to --out (atomically).",
        epilog="example: vlm2emb rerank score --reranker runs/rr/final --data mined.jsonl --out scored.jsonl",
    )
    p_score.add_argument("--reranker", required=True, help="reranker directory, raw VLM or tiny:FAMILY")
    p_score.add_argument("--data", required=True, help="training rows (JSONL, Parquet, datasets folder)")
    p_score.add_argument("--out", required=True, help="output JSONL")
    p_score.add_argument("--batch-size", type=int, default=16)
    p_score.add_argument("--media-root", default=None)
    p_score.add_argument("--debug", **debug)


def run(args: argparse.Namespace) -> int:
    """Runs the ``rerank`` sub-command in ``args``; returns the exit status."""
    return {"train": _train, "eval": _eval, "score": _score}[args.rerank_command](args)


def _train(args: argparse.Namespace) -> int:
    from vlm2emb.rerank.train import RerankTrainConfig, train_reranker
    from vlm2emb.train.config import apply_override, read_recipe_file

    data = read_recipe_file(args.recipe)
    for override in args.overrides:
        apply_override(data, override)
    result = train_reranker(RerankTrainConfig.from_mapping(data))
    print(
        f"trained {len(result.losses)} steps in {result.seconds:.1f}s "
        f"(loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}); saved {result.final_dir}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlm2emb.data.schema import load_eval_examples
    from vlm2emb.model import EmbeddingModel
    from vlm2emb.rerank.evaluate import evaluate_pipeline
    from vlm2emb.rerank.model import Reranker

    rows = [ex.as_row() for ex in load_eval_examples(list(args.data))]  # data before models
    embedder = EmbeddingModel.from_pretrained(args.embedder)
    reranker = Reranker.from_pretrained(args.reranker)
    report = evaluate_pipeline(
        embedder,
        reranker,
        rows,
        recall_k=args.recall_k,
        batch_size=args.batch_size,
        rerank_batch_size=args.rerank_batch_size,
    )
    print(format_pipeline_report(report))
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def format_pipeline_report(
    report: dict[str, Any], metrics: tuple[str, ...] = ("hit@1", "ndcg@10", "mrr")
) -> str:
    """A text table: per task, the embedder's and the pipeline's metrics and stage seconds."""
    k = report["recall_k"]
    head = ["task", "n"] + [f"{m} emb" for m in metrics] + [f"{m} +rr@{k}" for m in metrics]
    head += ["embed s", "rerank s"]
    lines = ["  ".join(f"{h:>12}" for h in head)]
    for task, r in report["tasks"].items():
        cells = [task[:12], str(r["n"])]
        cells += [f"{r['embedder'][m]:.3f}" for m in metrics] + [f"{r['reranked'][m]:.3f}" for m in metrics]
        cells += [f"{r['seconds']['embed']:.2f}", f"{r['seconds']['rerank']:.2f}"]
        lines.append("  ".join(f"{c:>12}" for c in cells))
    avg = report["average"]
    cells = ["average", str(avg["n_tasks"])]
    cells += [f"{avg['embedder'][m]:.3f}" for m in metrics] + [f"{avg['reranked'][m]:.3f}" for m in metrics]
    lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def _score(args: argparse.Namespace) -> int:
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.rerank.model import Reranker
    from vlm2emb.rerank.score import score_rows

    load_train_examples([args.data], media_root=args.media_root)  # bad rows stop before the model loads
    reranker = Reranker.from_pretrained(args.reranker)
    n = score_rows(reranker, args.data, args.out, batch_size=args.batch_size, media_root=args.media_root)
    print(f"scored {n} rows; wrote {args.out}")
    return 0
