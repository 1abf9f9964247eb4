"""Command line: ``vlm2emb train | eval | demo-data | doctor | data check | export`` (also ``python -m vlm2emb``).

User errors (bad recipe key, missing file, malformed row) end with one line on stderr
naming the key, file or line, and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
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
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p_train = sub.add_parser(
        "train",
        help="train an embedding model from a YAML recipe",
        description="Train from a YAML recipe. Writes OUTPUT_DIR/{final,checkpoints,metrics.jsonl,eval.json}.",
        epilog="example: vlm2emb train recipes/demo.yaml train.max_steps=50 output_dir=runs/try",
    )
    p_train.add_argument("recipe", help="recipe YAML file (see docs/recipes.md)")
    p_train.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.batch_size=32"
    )
    p_train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p_train.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    p_eval = sub.add_parser(
        "eval",
        help="evaluate a model on local-candidate eval rows",
        description="Rank each row's candidates for its query; report hit@k, ndcg@k, mrr per task.",
    )
    p_eval.add_argument(
        "--model", required=True, help="EmbeddingModel directory, raw VLM directory or tiny:FAMILY"
    )
    p_eval.add_argument("--data", required=True, nargs="+", help="eval JSONL/Parquet file(s) (docs/data.md)")
    p_eval.add_argument("--out", help="write the JSON report here")
    p_eval.add_argument("--batch-size", type=int, default=32)
    p_eval.add_argument(
        "--query-instruction", default=None, help="instruction for queries without one (default: the model's)"
    )
    p_eval.add_argument(
        "--target-instruction", default=None, help="instruction for candidates (default: the model's)"
    )
    p_eval.add_argument(
        "--media-root", default=None, help="folder for relative image paths (default: the file's)"
    )
    p_eval.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    p_eval.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p_eval.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

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
    p_doctor.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16")
    p_doctor.add_argument("--device", default=None, help="e.g. cuda, cpu (default: cuda when available)")
    p_doctor.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own code")
    p_doctor.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    _add_data_parser(sub)

    p_export = sub.add_parser(
        "export",
        help="export a checkpoint: merged or adapter-only safetensors, model card, verified",
        description=(
            "Write CHECKPOINT (OUTPUT_DIR/final, OUTPUT_DIR/checkpoints/step-N) to OUT_DIR as merged "
            "weights (default) or the LoRA/DoRA adapter alone, with a model card. The export is reloaded "
            "and compared with the checkpoint before it appears under OUT_DIR (docs/export.md)."
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
    p_export.add_argument("--format", choices=["vlm2emb", "sentence-transformers"], default="vlm2emb")
    p_export.add_argument("--license", default=None, help="license id for the model card")
    p_export.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p_export.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _add_data_parser(sub: Any) -> None:
    # `vlm2emb data check FILE...`: validate data files before training (docs/data.md).
    p_data = sub.add_parser("data", help="data tools: check files before training")
    data_sub = p_data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p_check = data_sub.add_parser(
        "check",
        help="validate data files, decoding every image, video and PDF page",
        description="Report every bad row as FILE:LINE: REASON and a summary; exit status 1 if any row is bad.",
        epilog="example: vlm2emb data check train.jsonl --media-root /data/images",
    )
    p_check.add_argument("files", nargs="+", help="JSONL / Parquet files, datasets folders or hf: ids")
    p_check.add_argument("--eval", action="store_true", help="the files hold evaluation rows")
    p_check.add_argument("--media-root", default=None, help="folder for relative media paths")
    p_check.add_argument("--format", default="auto", choices=["auto", "canonical", "mmeb"])
    p_check.add_argument("--max-image-pixels", type=int, default=None, help="decompression-bomb limit")
    p_check.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def _cmd_data(args: argparse.Namespace) -> int:
    from vlm2emb.data.check import check_files
    from vlm2emb.data.media import MediaOptions

    options = MediaOptions(**({"max_image_pixels": args.max_image_pixels} if args.max_image_pixels else {}))
    report = check_files(
        args.files,
        kind="eval" if args.eval else "train",
        media_root=args.media_root,
        data_format=args.format,
        options=options,
    )
    print(report.summary())
    return 1 if report.skipped else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.loop import train

    cfg = load_recipe(args.recipe, args.overrides)
    train(cfg, progress=not args.no_progress)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from vlm2emb.data.schema import load_eval_examples
    from vlm2emb.eval import evaluate, format_report
    from vlm2emb.model import EmbeddingModel

    examples = load_eval_examples(args.data, media_root=args.media_root)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EmbeddingModel.from_pretrained(args.model, torch_dtype=args.dtype, device=device)
    query_instruction = args.query_instruction or model.config.query_instruction
    report = evaluate(
        model,
        [ex.as_row(default_instruction=query_instruction) for ex in examples],
        batch_size=args.batch_size,
        target_instruction=args.target_instruction or model.config.target_instruction,
    )
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _cmd_demo_data(args: argparse.Namespace) -> int:
    from vlm2emb.data.demo import write_digits

    out = write_digits(args.out_dir)
    print(f"wrote {out / 'train.jsonl'}, {out / 'eval.jsonl'} and {out / 'images'}/")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from vlm2emb.doctor import run_doctor
    from vlm2emb.model import EmbeddingModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = EmbeddingModel.from_pretrained(
        args.model,
        attention=args.attention,
        pooling=args.pooling,
        torch_dtype=args.dtype,
        device=device,
        trust_remote_code=args.trust_remote_code,
    )
    report = run_doctor(model, args.model)
    print(report.format())
    return 0 if report.ok else 1


def _cmd_export(args: argparse.Namespace) -> int:
    from vlm2emb.export import export_model

    kw = {k: getattr(args, k) for k in ("mode", "dtype", "max_shard_size", "format", "license", "overwrite")}
    result = export_model(args.checkpoint, args.out_dir, **kw)
    checks = "; ".join(f"{v.loader} max |diff| {v.max_abs_diff:.2e}" for v in result.verifications)
    print(f"exported {result.source} -> {result.out_dir} ({result.mode}, {result.dtype}; verified: {checks})")
    return 0


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
    if args.command == "train":
        args.overrides += [x for x in extra if "=" in x and not x.startswith("-")]
        extra = [x for x in extra if not ("=" in x and not x.startswith("-"))]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    handlers = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "demo-data": _cmd_demo_data,
        "doctor": _cmd_doctor,
        "export": _cmd_export,
        "data": _cmd_data,
    }
    try:
        return handlers[args.command](args)
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
