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
        description="Rank each query's candidates with the embedder alone and with the reranker "
        "re-ordering the embedder's best --rerank-top-k; print both metric sets per task (and "
        "averaged) with the seconds of each stage (embed, search, rerank). Takes local-candidate "
        "rows (--data) or any eval suite (--suite: local, MMEB, corpus + qrels, BEIR, video).",
        epilog="examples: vlm2emb rerank eval --embedder runs/demo/final --reranker runs/rr/final "
        "--data eval.jsonl --rerank-top-k 3;  vlm2emb rerank eval --embedder E --reranker R "
        "--suite vidore-v2 --data-root DIR --rerank-top-k 20 --out pipeline.json",
    )
    p_eval.add_argument("--embedder", required=True, help="EmbeddingModel directory or tiny:FAMILY")
    p_eval.add_argument("--reranker", required=True, help="reranker directory, raw VLM or tiny:FAMILY")
    source = p_eval.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="local-candidate evaluation rows")
    source.add_argument(
        "--suite",
        help="suite YAML, a bundled suite (mmeb-v1, mmeb-v2, vidore-v1, vidore-v2, vidore-v3) or demo:study/suite "
        "(docs/evaluation.md)",
    )
    p_eval.add_argument(
        "--data-root", default=None, help="--suite: the folder its relative paths resolve against"
    )
    p_eval.add_argument("--media-root", default=None, help="folder for relative image paths")
    p_eval.add_argument(
        "--rerank-top-k",
        "--recall-k",
        dest="rerank_top_k",
        type=int,
        default=10,
        help="candidates per query the reranker re-orders (0: the embedder's order); default 10",
    )
    p_eval.add_argument("--batch-size", type=int, default=32)
    p_eval.add_argument("--rerank-batch-size", type=int, default=16)
    p_eval.add_argument(
        "--cache-dir",
        default=None,
        help="--suite: embedding cache (default $VLM2EMB_CACHE, else ~/.cache/vlm2emb/embeddings)",
    )
    p_eval.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    p_eval.add_argument(
        "--out", default=None, help="write the report as JSON (and the table beside it, .txt)"
    )
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
    from pathlib import Path

    from vlm2emb.data.schema import DataError
    from vlm2emb.eval.cache import default_cache_dir
    from vlm2emb.model import EmbeddingModel
    from vlm2emb.rerank.evaluate import evaluate_pipeline, evaluate_suite_pipeline, format_pipeline_report
    from vlm2emb.rerank.model import Reranker

    if args.rerank_top_k < 0:
        raise DataError(f"--rerank-top-k must be 0 or more, got {args.rerank_top_k}")
    if args.data_root is not None and not args.suite:
        raise DataError("--data-root needs --suite")
    # Every file is read and checked before a model loads: a bad row fails in seconds.
    if args.suite:
        from vlm2emb.eval.harness import load_suite_tasks
        from vlm2emb.eval.suite import load_suite

        suite = load_suite(args.suite, data_root=args.data_root)
        for task in suite.tasks:  # --media-root is the default of tasks that name none
            task.media_root = task.media_root or args.media_root
        loaded = load_suite_tasks(suite)
    else:
        from vlm2emb.data.schema import load_eval_examples

        rows = [ex.as_row() for ex in load_eval_examples(list(args.data), media_root=args.media_root)]
    embedder = EmbeddingModel.from_pretrained(args.embedder)
    reranker = Reranker.from_pretrained(args.reranker)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    if args.suite:
        report = evaluate_suite_pipeline(
            embedder,
            reranker,
            suite,
            loaded=loaded,
            rerank_top_k=args.rerank_top_k,
            batch_size=args.batch_size,
            rerank_batch_size=args.rerank_batch_size,
            cache_dir=cache_dir,
            default_query_instruction=embedder.config.query_instruction,
            default_target_instruction=embedder.config.target_instruction,
        )
    else:
        report = evaluate_pipeline(
            embedder,
            reranker,
            rows,
            recall_k=args.rerank_top_k,
            batch_size=args.batch_size,
            rerank_batch_size=args.rerank_batch_size,
            cache_dir=cache_dir,
        )
    text = format_pipeline_report(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".txt").write_text(text + "\n")
    return 0


def _score(args: argparse.Namespace) -> int:
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.rerank.model import Reranker
    from vlm2emb.rerank.score import score_rows

    load_train_examples([args.data], media_root=args.media_root)  # bad rows stop before the model loads
    reranker = Reranker.from_pretrained(args.reranker)
    n = score_rows(reranker, args.data, args.out, batch_size=args.batch_size, media_root=args.media_root)
    print(f"scored {n} rows; wrote {args.out}")
    return 0
