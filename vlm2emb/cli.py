"""Command line: ``vlm2emb train | eval | analyze | data-efficiency | study | data check | data make-eval | export | mine | demo-data | doctor``.

Also ``python -m vlm2emb``.

User errors (bad recipe key, missing file, malformed row) end with one line on stderr
naming the key, file or line, and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm2emb",
        description="Turn vision-language models into embedding models by contrastive fine-tuning.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    from vlm2emb import __version__

    parser.add_argument("--version", action="version", version=f"vlm2emb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser(
        "train",
        help="train an embedding model from a YAML recipe",
        description="Train from a YAML recipe. Writes OUTPUT_DIR/{final,checkpoints,metrics.jsonl,eval.json}.",
        epilog="example: vlm2emb train recipes/demo.yaml train.max_steps=50 output_dir=runs/try",
    )
    # Optional here so that a bare `vlm2emb train` prints this command's help instead of
    # argparse's "arguments are required" line.
    p_train.add_argument("recipe", nargs="?", help="recipe YAML file (see docs/recipes.md)")
    p_train.set_defaults(command_help=p_train.format_help)
    p_train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=32"
    )
    p_train.add_argument(
        "--no-progress",
        action="store_true",
        help="a log line every train.log_steps steps instead of the progress bar (the default without a terminal)",
    )
    p_train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_eval = sub.add_parser(
        "eval",
        help="evaluate a model on eval rows or an eval suite",
        description="Rank each row's candidates (or a suite's corpora); report hit@k, ndcg@k, mrr per task.",
        epilog="example: vlm2emb eval --model runs/demo/final --suite suite.yaml --out report.json",
    )
    p_eval.add_argument(
        "--model", required=True, help="EmbeddingModel directory, raw VLM directory or tiny:FAMILY"
    )
    source = p_eval.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", nargs="+", help="eval JSONL/Parquet file(s) (docs/data.md)")
    source.add_argument(
        "--suite",
        help="suite YAML, a bundled suite (mmeb-v1, mmeb-v2, vidore-v1, vidore-v2, vidore-v3) or the offline "
        "demo:study/suite (docs/evaluation.md)",
    )
    p_eval.add_argument(
        "--data-root", default=None, help="--suite: the folder its relative paths resolve against"
    )
    p_eval.add_argument(
        "--cache-dir", default=None, help="embedding cache (default ~/.cache/vlm2emb/embeddings)"
    )
    p_eval.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    p_eval.add_argument("--out", help="write the JSON report here")
    p_eval.add_argument(
        "--submission",
        default=None,
        help="--suite mmeb-v1/mmeb-v2: also write the MMEB leaderboard's submission JSON here "
        "(docs/evaluation.md)",
    )
    p_eval.add_argument(
        "--model-name",
        default=None,
        help="--submission: the model's name there (default: the --model folder's)",
    )
    p_eval.add_argument("--batch-size", type=int, default=32)
    p_eval.add_argument(
        "--scoring",
        choices=["cosine", "maxsim"],
        help="with --data: cosine (single vectors) or maxsim (the multi-vector head, docs/multivector.md); "
        "default: cosine, or maxsim for a model without a single-vector head. Suite tasks set their own",
    )
    p_eval.add_argument(
        "--query-instruction", default=None, help="instruction for queries without one (default: the model's)"
    )
    p_eval.add_argument(
        "--target-instruction", default=None, help="instruction for candidates (default: the model's)"
    )
    p_eval.add_argument(
        "--instruction-fallback",
        choices=["auto", "always", "never"],
        default=None,
        help="--suite: when the model's saved (or the flags') instructions apply to rows without "
        "one; auto: not to MMEB rows (default: the suite's, else auto)",
    )
    p_eval.add_argument(
        "--prompt-style",
        default=None,
        help="vlm2emb | vlm2vec: VLM2Vec's exact prompts for a VLM2Vec checkpoint (default: the model's)",
    )
    p_eval.add_argument(
        "--media-root", default=None, help="folder for relative image paths (default: the file's)"
    )
    p_eval.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    p_eval.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p_eval.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_an = sub.add_parser(
        "analyze",
        help="embedding-space analysis: modality gap, alignment, uniformity, plots",
        description="Embed eval rows; write analysis.json, projection.png (PCA, t-SNE) and similarities.png.",
        epilog="example: vlm2emb analyze --model runs/demo/final --data eval.jsonl --out analysis/",
    )
    which = p_an.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="EmbeddingModel directory, raw VLM directory or tiny:FAMILY")
    which.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two models side by side")
    p_an.add_argument("--data", required=True, nargs="+", help="eval JSONL/Parquet file(s) (docs/data.md)")
    p_an.add_argument("--out", required=True, help="output folder")
    p_an.add_argument("--max-points", type=int, default=200, help="pairs drawn in the projections")
    p_an.add_argument(
        "--color-by",
        # vlm2emb.eval.analysis.COLOR_BY, spelled out: importing it would import torch for --help.
        choices=["auto", "modality", "task", "dataset", "class"],
        default="auto",
        help="projection colours: the items' modality, the row's task, its dataset (the --data file), "
        "its class (the positive's text, else the query's); auto: task when there are several, "
        "else class when classes repeat, else modality",
    )
    p_an.add_argument("--seed", type=int, default=0)
    p_an.add_argument("--batch-size", type=int, default=32)
    p_an.add_argument("--media-root", default=None, help="folder for relative image paths")
    p_an.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    p_an.add_argument("--device", default=None, help="e.g. cuda, cpu")
    p_an.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_eff = sub.add_parser(
        "data-efficiency",
        help="train on nested data subsets and plot the metric against data size",
        description="Train RECIPE on nested subsets (seeded; smaller ones inside larger ones); write data_efficiency.{json,png}.",
        epilog="example: vlm2emb data-efficiency recipes/demo.yaml --fractions 0.05,0.25,1.0 train.max_steps=50",
    )
    p_eff.add_argument("recipe", help="recipe YAML file (needs data.eval)")
    p_eff.add_argument("overrides", nargs="*", metavar="key=value", help="dotted recipe overrides")
    p_eff.add_argument(
        "--fractions", default="0.01,0.05,0.25,1.0", help="comma-separated fractions in (0, 1]"
    )
    p_eff.add_argument("--metric", default="hit@1", help="eval metric to plot (averaged over tasks)")
    p_eff.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped study: finished runs are read back, not retrained",
    )
    p_eff.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_study = sub.add_parser(
        "study",
        help="the seed study: one recipe on autoregressive and diffusion backbones, several seeds",
        description="Train the study's recipe per backbone and seed (with data-efficiency runs), evaluate each "
        "on the suite per meta-task, analyse the embedding space; write results.json, summary.md and figures.",
        epilog="example: vlm2emb study recipes/study/tiny.yaml --out runs/study  (docs/study.md)",
    )
    p_study.add_argument("study", help="study YAML file (recipes/study/)")
    p_study.add_argument("overrides", nargs="*", metavar="key=value", help="recipe overrides for every run")
    p_study.add_argument("--out", default=None, help="output folder (default: the study's output_dir)")
    p_study.add_argument("--seeds", default=None, help="comma-separated seeds (default: the study's)")
    p_study.add_argument("--fractions", default=None, help="data-efficiency fractions (default: the study's)")
    p_study.add_argument(
        "--data-root", default=None, help="data folder of a bundled suite (default: the study's)"
    )
    p_study.add_argument(
        "--resume",
        action="store_true",
        help="continue a stopped study: finished runs are read back, not retrained",
    )
    p_study.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_demo = sub.add_parser(
        "demo-data",
        help="write the bundled digits demo data (images + JSONL) to a folder",
        description="Write scikit-learn's digits as PNG images plus train.jsonl and eval.jsonl.",
    )
    p_demo.add_argument("out_dir")
    p_demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_doctor = sub.add_parser(
        "doctor",
        help="self-test a backbone: attention mode, padding invariance, LoRA targets, prompt",
        description=(
            "Load MODEL and check that the attention mode is really the one asked for, that an "
            "embedding does not depend on padding or batch mates, and that outputs are finite; "
            "report parameter counts, the LoRA modules the family's default targets match, and "
            "the prompt rendered for a text + image item. Exit status 1 if a check fails."
        ),
        epilog="example: vlm2emb doctor tiny:qwen2_vl --attention bidirectional",
    )
    p_doctor.add_argument("model", help="EmbeddingModel directory, raw VLM directory, hub id or tiny:FAMILY")
    p_doctor.add_argument("--attention", choices=["causal", "bidirectional"], default=None)
    p_doctor.add_argument(
        "--pooling", default=None, help="last | eos | embed_token | mean (default: the model's)"
    )
    p_doctor.add_argument(
        "--prompt-style", default=None, help="vlm2emb | vlm2vec (default: the model's; docs/evaluation.md)"
    )
    p_doctor.add_argument(
        "--text", default=None, help="text of the item whose prompt and token ids are shown (with an image)"
    )
    p_doctor.add_argument("--instruction", default=None, help="instruction of that item ('' for none)")
    p_doctor.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    p_doctor.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p_doctor.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    p_doctor.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_data_parser(sub)
    _add_mine_parser(sub)
    from vlm2emb.rerank.cli import add_parser as add_rerank_parser  # argparse only

    add_rerank_parser(sub)

    p_export = sub.add_parser(
        "export",
        help="export a checkpoint: merged or adapter-only safetensors, model card, verified",
        description=(
            "Write CHECKPOINT (OUTPUT_DIR/final, OUTPUT_DIR/checkpoints/step-N) to OUT_DIR as merged "
            "weights (default) or the LoRA/DoRA adapter alone, with a model card. The export is reloaded "
            "and compared with the checkpoint before it appears under OUT_DIR (docs/export.md). A saved "
            "reranker folder (vlm2emb_reranker.json) exports as merged safetensors + its prompt settings "
            "+ a model card, verified the same way (docs/rerank.md)."
        ),
        epilog="example: vlm2emb export runs/demo/final exports/demo --dtype bf16",
    )
    p_export.add_argument("checkpoint")
    p_export.add_argument("out_dir")
    mode = p_export.add_mutually_exclusive_group()
    mode.add_argument("--merge-lora", dest="mode", action="store_const", const="merged", default="merged")
    mode.add_argument("--adapter-only", dest="mode", action="store_const", const="adapter")
    p_export.add_argument(
        "--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="default: as stored"
    )
    p_export.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    p_export.add_argument(
        "--format",
        choices=["vlm2emb", "sentence-transformers", "sentence-transformers-multivector"],
        default="vlm2emb",
        help="sentence-transformers: also a SentenceTransformer folder; -multivector: a MultiVectorEncoder one",
    )
    p_export.add_argument("--license", default=None, help="license id for the model card")
    p_export.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p_export.add_argument(
        "--eval-report",
        default=None,
        help="reranker exports: a vlm2emb rerank eval --out JSON for the model card's results",
    )
    p_export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_data_parser(sub: Any) -> None:
    # `vlm2emb data check FILE...`: validate data files before training (docs/data.md).
    p_data = sub.add_parser("data", help="data tools: check files before training, make evaluation rows")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p_check = data_sub.add_parser(
        "check",
        help="validate data files: every row through the training path's decoding and processor",
        description=(
            "Report every bad row as FILE:LINE: REASON and a summary; exit status 1 if any row is bad. "
            "Each row goes through the preprocessing training runs: media decoded fully with the "
            "data.* limits, then the model's processor (its image size and aspect-ratio limits, its "
            "tokenizer)."
        ),
        epilog="example: vlm2emb data check train.jsonl --recipe my.yaml   (model, media root and limits from the recipe)",
    )
    p_check.add_argument("files", nargs="+", help="JSONL / Parquet files, datasets folders or hf: ids")
    p_check.add_argument("--eval", action="store_true", help="the files hold evaluation rows")
    p_check.add_argument("--media-root", default=None, help="folder for relative media paths")
    p_check.add_argument("--format", default="auto", choices=["auto", "canonical", "mmeb"])
    p_check.add_argument("--max-image-pixels", type=int, default=None, help="decompression-bomb limit")
    p_check.add_argument(
        "--recipe",
        default=None,
        help="training recipe: its model's processor, media root, format and data.* limits are used",
    )
    p_check.add_argument(
        "--model",
        default=None,
        help="model whose processor the rows must pass (default: the recipe's, else tiny:qwen2_vl, "
        "a Qwen2-VL processor); 'none' = decode media only",
    )
    p_check.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_make = data_sub.add_parser(
        "make-eval",
        help="hold out training rows as evaluation rows (query + candidate list)",
        description=(
            "Hold out a seeded sample of DATA's rows. Each becomes an evaluation row: its query and a "
            "candidate list of its positive(s) plus positives of other held-out rows (same dataset first), "
            "its task the row's dataset. The other rows go to --train-out, less copies of a held-out "
            "(query, positive) pair, so no evaluation answer is trained on (docs/data.md)."
        ),
        epilog="example: vlm2emb data make-eval my/all.jsonl --eval-out my/eval.jsonl --train-out my/train.jsonl --rows 500",
    )
    p_make.add_argument(
        "data", help="training rows (JSONL, Parquet, datasets folder; canonical or MMEB layout)"
    )
    p_make.add_argument("--eval-out", required=True, help="evaluation rows to write (JSONL)")
    p_make.add_argument("--train-out", required=True, help="the remaining training rows (JSONL)")
    p_make.add_argument("--rows", type=int, default=200, help="rows to hold out (default 200)")
    p_make.add_argument(
        "--candidates",
        type=int,
        default=10,
        help="candidates per evaluation row, positives included (default 10)",
    )
    p_make.add_argument("--seed", type=int, default=0)
    p_make.add_argument("--media-root", default=None, help="folder for DATA's relative media paths")
    p_make.add_argument("--format", default="auto", choices=["auto", "canonical", "mmeb"])
    p_make.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _cmd_make_eval(args: argparse.Namespace) -> int:
    from vlm2emb.data.make_eval import make_eval

    result = make_eval(
        args.data,
        args.eval_out,
        args.train_out,
        rows=args.rows,
        candidates=args.candidates,
        seed=args.seed,
        media_root=args.media_root,
        data_format=args.format,
    )
    tasks = ", ".join(f"{task} {n}" for task, n in result.per_task.items())
    print(f"wrote {result.eval_rows} evaluation rows to {args.eval_out} ({tasks})")
    if result.short_rows:
        print(
            f"note: {result.short_rows} rows have fewer than {args.candidates} candidates "
            "(too few distinct positives among the held-out rows)"
        )
    dropped = (
        f"; left out {result.dropped_train_rows} repeating a held-out pair"
        if result.dropped_train_rows
        else ""
    )
    print(f"wrote {result.train_rows} training rows to {args.train_out}{dropped}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "make-eval":
        return _cmd_make_eval(args)
    import dataclasses
    import warnings

    from vlm2emb.data.check import DataWarning, load_preparer
    from vlm2emb.data.media import media_options
    from vlm2emb.train.config import RecipeConfig, load_recipe

    cfg = load_recipe(args.recipe) if args.recipe else RecipeConfig()
    options = media_options(cfg.data)
    if args.max_image_pixels:
        options = dataclasses.replace(options, max_image_pixels=args.max_image_pixels)
    model = args.model or cfg.model.name_or_path
    prepare = None
    if model.lower() != "none":
        # The recipe's prompt style only when a recipe gave one; else the saved model's.
        style = cfg.model.prompt_style if args.recipe else None
        prepare = load_preparer(model, trust_remote_code=cfg.model.trust_remote_code, prompt_style=style)
    with warnings.catch_warnings():
        # Data warnings are printed below, once, as plain lines.
        warnings.simplefilter("ignore", DataWarning)
        report = _check(args, cfg, options, prepare)
    for warning in report.warnings:
        print(f"warning: {warning}")
    processor = f"; processor of {model}" if prepare is not None else "; no processor (--model none)"
    print(report.summary() + processor)
    return 1 if report.skipped else 0


def _check(args: argparse.Namespace, cfg: Any, options: Any, prepare: Any) -> Any:
    from vlm2emb.data.check import check_files

    return check_files(
        args.files,
        kind="eval" if args.eval else "train",
        media_root=args.media_root or cfg.data.media_root,
        data_format=args.format if args.format != "auto" or not args.recipe else cfg.data.format,
        options=options,
        prepare=prepare,
        query_instruction=cfg.data.query_instruction,
        target_instruction=cfg.data.target_instruction,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.loop import train

    cfg = load_recipe(args.recipe, args.overrides)
    train(cfg, progress=not args.no_progress)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from vlm2emb.eval import evaluate, format_report
    from vlm2emb.eval.cache import CachedEncoder, default_cache_dir
    from vlm2emb.items import resolve_instruction
    from vlm2emb.model import EmbeddingModel

    if args.submission and not args.suite:
        raise SystemExit("vlm2emb eval: --submission needs --suite (a suite whose tasks name a modality)")
    # Read and check all data before the model loads: a bad row fails in seconds.
    if args.suite:
        from vlm2emb.eval.harness import format_suite_report, load_suite_tasks, run_suite
        from vlm2emb.eval.suite import load_suite

        suite = load_suite(args.suite, data_root=args.data_root)
        for task in suite.tasks:  # --media-root is the default of tasks that name none
            task.media_root = task.media_root or args.media_root
        if args.instruction_fallback is not None:  # the flag beats the suite and its tasks
            suite.instruction_fallback = args.instruction_fallback
            for task in suite.tasks:
                task.instruction_fallback = None
        if args.prompt_style is not None:
            suite.prompt_style = args.prompt_style
        if args.submission and not any(t.modality for t in suite.tasks):
            raise SystemExit(
                f"vlm2emb eval: --submission: no task of suite {suite.name!r} names a modality "
                "(image, video or visdoc); the MMEB suites do"
            )
        loaded = load_suite_tasks(suite)
    else:
        from vlm2emb.data.schema import load_eval_examples

        examples = load_eval_examples(args.data, media_root=args.media_root)
    # Load before joining a process group: transformers writes a tiny: build only on rank 0 then.
    model = EmbeddingModel.from_pretrained(args.model, torch_dtype=args.dtype, prompt_style=args.prompt_style)
    state = _distributed_state()
    device = args.device or (str(state.device) if state else "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    query_instruction = resolve_instruction(args.query_instruction, model.config.query_instruction)
    target_instruction = resolve_instruction(args.target_instruction, model.config.target_instruction)
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    encoder = CachedEncoder(model, cache_dir)
    if args.suite:
        report = run_suite(
            encoder,
            suite,
            loaded=loaded,
            batch_size=args.batch_size,
            default_query_instruction=query_instruction,
            default_target_instruction=target_instruction,
        )
        text = format_suite_report(report)
    else:
        rows = [ex.as_row(default_instruction=query_instruction) for ex in examples]
        scoring = args.scoring or ("cosine" if model.config.dense_head else "maxsim")
        report = evaluate(
            encoder, rows, batch_size=args.batch_size, target_instruction=target_instruction, scoring=scoring
        )
        report["cache"] = dict(vars(encoder.stats))
        text = format_report(report)
    if state is None or state.is_main_process:
        print(text)
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=2) + "\n")
        if args.submission:
            from vlm2emb.eval.leaderboard import mmeb_submission

            name = args.model_name or Path(args.model.rstrip("/")).name
            submission = mmeb_submission(
                report, {t.name: t.modality for t in suite.tasks}, {"model_name": name}
            )
            path = Path(args.submission)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(submission, indent=4) + "\n")
            print(f"leaderboard submission: {path}")
    return 0


def _distributed_state() -> Any:
    """accelerate's process state under ``accelerate launch`` (several processes), else None."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import torch
    from accelerate import PartialState

    # Without CUDA the processes talk through gloo (docs/distributed.md).
    return PartialState(cpu=not torch.cuda.is_available())


def _leave_process_group() -> None:
    """Waits for every process, then closes the process group, if a command opened one.

    Without this a process that finishes first exits while gloo's threads still hold the
    group, and the C++ runtime can abort it at exit ("terminate called without an active
    exception"), which ``accelerate launch`` reports as a failed run.
    """
    if "torch" not in sys.modules:  # a light command never opened a group
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _cmd_analyze(args: argparse.Namespace) -> int:
    import torch

    from vlm2emb.data.schema import load_eval_examples
    from vlm2emb.eval import analysis as an
    from vlm2emb.model import EmbeddingModel

    examples = load_eval_examples(args.data, media_root=args.media_root)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in args.compare or [args.model]:
        model = EmbeddingModel.from_pretrained(name, torch_dtype=args.dtype, device=device)
        rows = [ex.as_row(default_instruction=model.config.query_instruction) for ex in examples]
        for row, ex in zip(rows, examples):  # eval rows name no dataset: the file is one
            row["dataset"] = Path(ex.source.rsplit(":", 1)[0]).stem
        results.append(
            an.analyze(
                model,
                rows,
                batch_size=args.batch_size,
                target_instruction=model.config.target_instruction,
                name=name,
            )
        )
        del model
    print(an.compare_table([r.numbers for r in results]))
    if args.compare:
        an.save_numbers(Path(args.out) / "compare.json", {r.name: r.numbers for r in results})
        paths = an.write_compare_plots(
            results, args.out, max_points=args.max_points, seed=args.seed, color_by=args.color_by
        )
    else:
        an.save_numbers(Path(args.out) / "analysis.json", results[0].numbers)
        paths = an.write_plots(
            results[0], args.out, max_points=args.max_points, seed=args.seed, color_by=args.color_by
        )
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _cmd_data_efficiency(args: argparse.Namespace) -> int:
    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.data_efficiency import parse_fractions, run_data_efficiency

    cfg = load_recipe(args.recipe, args.overrides)
    # Under `accelerate launch` every run trains on all processes; the main one writes the files.
    state = _distributed_state()
    result = run_data_efficiency(cfg, parse_fractions(args.fractions), metric=args.metric, resume=args.resume)
    if state is not None and not state.is_main_process:
        return 0
    for point in result["points"]:
        print(f"{point['fraction']:>8.4g}  {point['rows']:>7} rows  {args.metric} {point['value']:.4f}")
    print(f"wrote {result['json']} and {result['png']}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from vlm2emb.study import load_study, run_study
    from vlm2emb.train.data_efficiency import parse_fractions

    cfg = load_study(args.study)
    if args.out is not None:
        cfg.output_dir = args.out
    if args.seeds is not None:
        try:
            cfg.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise ValueError(f"--seeds: {args.seeds!r} is not a comma-separated list of integers") from None
    if args.fractions is not None:
        cfg.data_efficiency.fractions = parse_fractions(args.fractions)
    if args.data_root is not None:
        cfg.data_root = args.data_root
    cfg.validate(args.study)
    state = _distributed_state()  # under `accelerate launch`: every run on all processes
    result = run_study(cfg, args.overrides, resume=args.resume)
    if state is not None and not state.is_main_process:
        return 0
    print(Path(result["files"][1]).read_text())
    print("wrote " + ", ".join(result["files"]))
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from vlm2emb.data.demo import write_digits

    out = write_digits(args.out_dir)
    print(f"wrote {out / 'train.jsonl'}, {out / 'eval.jsonl'} and {out / 'images'}/")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from vlm2emb.doctor import SAMPLE_INSTRUCTION, SAMPLE_TEXT, run_doctor
    from vlm2emb.model import EmbeddingModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EmbeddingModel.from_pretrained(
        args.model,
        attention=args.attention,
        pooling=args.pooling,
        prompt_style=args.prompt_style,
        torch_dtype=args.dtype,
        device=device,
        trust_remote_code=args.trust_remote_code,
    )
    instruction = SAMPLE_INSTRUCTION if args.instruction is None else (args.instruction or None)
    report = run_doctor(model, args.model, text=args.text or SAMPLE_TEXT, instruction=instruction)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from vlm2emb.data.schema import DataError
    from vlm2emb.export import export_model
    from vlm2emb.rerank.export import export_reranker, is_reranker_dir

    if is_reranker_dir(args.checkpoint):
        # A reranker is always written merged, as one transformers checkpoint.
        for given, flag in (
            (args.mode == "adapter", "--adapter-only"),
            (args.format != "vlm2emb", "--format sentence-transformers"),
            (args.max_shard_size != "5GB", "--max-shard-size"),
        ):
            if given:
                raise DataError(f"{args.checkpoint}: {flag} is not supported for a reranker export")
        result = export_reranker(
            args.checkpoint,
            args.out_dir,
            dtype=args.dtype,
            license=args.license,
            overwrite=args.overwrite,
            report=args.eval_report,
        )
        checks = "; ".join(f"{v.loader} max |diff| {v.max_abs_diff:.2e}" for v in result.verifications)
        print(f"exported reranker {result.source} -> {result.out_dir} ({result.dtype}; checks: {checks})")
        return 0
    if args.eval_report is not None:
        raise DataError("--eval-report is for reranker exports; an embedder's card reads its run's eval.json")
    kw = {k: getattr(args, k) for k in ("mode", "dtype", "max_shard_size", "format", "license", "overwrite")}
    result = export_model(args.checkpoint, args.out_dir, **kw)
    checks = "; ".join(f"{v.loader} max |diff| {v.max_abs_diff:.2e}" for v in result.verifications)
    print(f"exported {result.source} -> {result.out_dir} ({result.mode}, {result.dtype}; verified: {checks})")
    return 0


def _add_mine_parser(sub: Any) -> None:
    # `vlm2emb mine`: hard negatives into canonical rows (docs/negatives.md).
    p = sub.add_parser(
        "mine",
        help="mine hard negatives with a model and write them into training rows",
        description=(
            "Embed a corpus (default: the distinct positives of DATA) and every query of DATA, "
            "retrieve each query's best candidates, filter likely positives (score ratio, near "
            "duplicates), and write the rows with mined negatives to --out. Resumable; sharded "
            "under accelerate launch."
        ),
        epilog="example: vlm2emb mine --model runs/demo/final --data train.jsonl --out mined.jsonl --teacher-scores",
    )
    p.add_argument(
        "--model", required=True, help="EmbeddingModel directory, raw VLM directory or tiny:FAMILY"
    )
    p.add_argument("--data", required=True, help="training rows (JSONL, Parquet, datasets folder)")
    p.add_argument("--out", required=True, help="output JSONL (a .report.json is written beside it)")
    p.add_argument(
        "--corpus", default=None, help="corpus rows {id, item} to mine from (default: the positives)"
    )
    p.add_argument("--num-negatives", type=int, default=7)
    p.add_argument("--top-k", type=int, default=30, help="rank window the negatives come from")
    p.add_argument("--skip-top", type=int, default=0, help="skip this many best candidates first")
    p.add_argument(
        "--max-score-ratio",
        type=float,
        default=0.95,
        help="drop candidates scoring above RATIO x the positive's score (negative: off)",
    )
    p.add_argument(
        "--dedup-threshold",
        type=float,
        default=0.98,
        help="drop candidates this close (cosine) to the positive",
    )
    p.add_argument("--sample", choices=["top", "random"], default="top")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-existing", action="store_true", help="keep the rows' own negatives first")
    p.add_argument(
        "--across-datasets",
        action="store_true",
        help="default corpus: mine from every dataset's positives (default: the row's own dataset's)",
    )
    p.add_argument(
        "--teacher-scores", action="store_true", help="write teacher_scores (for train.loss=distill)"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--block-size", type=int, default=4096, help="rows mined and written per block")
    p.add_argument("--query-instruction", default=None)
    p.add_argument("--target-instruction", default=None)
    p.add_argument("--media-root", default=None)
    p.add_argument("--cache-dir", default=None, help="embedding cache (default ~/.cache/vlm2emb/embeddings)")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    p.add_argument("--device", default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _cmd_mine(args: argparse.Namespace) -> int:
    import torch

    from vlm2emb.eval.cache import default_cache_dir
    from vlm2emb.mine import MineConfig, mine_negatives
    from vlm2emb.model import EmbeddingModel

    config = MineConfig(
        num_negatives=args.num_negatives,
        top_k=args.top_k,
        skip_top=args.skip_top,
        max_score_ratio=args.max_score_ratio if args.max_score_ratio >= 0 else None,
        dedup_threshold=args.dedup_threshold,
        sample=args.sample,
        seed=args.seed,
        keep_existing=args.keep_existing,
        teacher_scores=args.teacher_scores,
        batch_size=args.batch_size,
        block_size=args.block_size,
        query_instruction=args.query_instruction,
        target_instruction=args.target_instruction,
    )
    config.validate()  # before the model loads
    model = EmbeddingModel.from_pretrained(args.model, torch_dtype=args.dtype)
    state = _distributed_state()
    device = args.device or (str(state.device) if state else "cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    report = mine_negatives(
        model,
        args.data,
        args.out,
        config,
        corpus=args.corpus,
        media_root=args.media_root,
        cache_dir=None if args.no_cache else (args.cache_dir or default_cache_dir()),
        across_datasets=args.across_datasets,
        progress=not args.no_progress,
    )
    if state is None or state.is_main_process:
        s = report.scores.get("margin", {})
        print(
            f"mined {report.negatives} negatives for {report.rows} rows from {report.corpus} corpus entries "
            f"({report.short_rows} rows short; filtered {report.filtered}); "
            f"median margin {s.get('p50', float('nan')):.3f}; wrote {args.out}"
        )
    return 0


def _cmd_rerank(args: argparse.Namespace) -> int:
    from vlm2emb.rerank.cli import run

    return run(args)


def _user_error_types() -> tuple[type[BaseException], ...]:
    from vlm2emb.data.schema import DataError
    from vlm2emb.train.config import ConfigError
    from vlm2emb.train.loop import TrainingError

    return (ConfigError, DataError, TrainingError, FileNotFoundError, KeyError, ValueError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vlm2emb`` console script."""
    parser = _parser()
    # parse_known_args lets overrides follow options (`train r.yaml --no-progress a=1`),
    # which a plain nargs="*" positional after an option would reject.
    args, extra = parser.parse_known_args(argv)
    if (
        args.command in ("train", "data-efficiency", "study")
        or getattr(args, "rerank_command", None) == "train"
    ):
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    if args.command == "train" and args.recipe is None:
        print(args.command_help(), file=sys.stderr)
        print("vlm2emb train: error: a recipe YAML file is required", file=sys.stderr)
        return EXIT_USER_ERROR
    handlers = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "demo-data": _cmd_demo_data,
        "doctor": _cmd_doctor,
        "export": _cmd_export,
        "data": _cmd_data,
        "mine": _cmd_mine,
    }
    handlers |= {"analyze": _cmd_analyze, "data-efficiency": _cmd_data_efficiency, "rerank": _cmd_rerank}
    handlers["study"] = _cmd_study
    # demo-data only writes files; every other command runs torch.
    restore_threads = _apply_thread_default() if args.command != "demo-data" else (lambda: None)
    try:
        code = handlers[args.command](args)
        _leave_process_group()
        return code
    except KeyboardInterrupt:
        print("vlm2emb: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        first_line = (str(message).strip().splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, _user_error_types()):
            print(f"vlm2emb: error: {first_line}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(
            f"vlm2emb: internal error ({type(exc).__name__}): {first_line} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    finally:
        restore_threads()


def _apply_thread_default() -> Any:
    """Sets torch's thread count for this command (vlm2emb._threads) and returns a function
    that puts the previous count back (``main`` is also called in-process, by tests and
    notebooks, whose threads are not the command's to keep)."""
    from vlm2emb._threads import detect_thread_choice

    choice = detect_thread_choice()
    if choice is None:  # OMP_NUM_THREADS decides
        return lambda: None
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(choice.threads)
    if choice.reduced_for_load and os.environ.get("LOCAL_RANK", "0") == "0":
        print(
            f"vlm2emb: the machine is busy (load {choice.load:.1f} on {choice.cores} cores): torch uses "
            f"{choice.threads} thread(s); set OMP_NUM_THREADS to choose",
            file=sys.stderr,
        )
    return lambda: torch.set_num_threads(before)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
