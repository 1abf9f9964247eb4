"""``vlm2emb export`` for a saved reranker: safetensors, its prompt settings, a model card, verified.

A saved reranker (``Reranker.save_pretrained``, ``vlm2emb rerank train``'s ``final/``) is
already a transformers checkpoint of the family's ``...ForConditionalGeneration`` class plus
``vlm2emb_reranker.json``. The export makes it a folder for people who do not train:

1. load the source in float32 (any ``adapter/`` merged), refuse non-finite weights, and
   score fixed probe pairs (text, image query, image candidate): the reference;
2. write the weights in the requested dtype, the processor, ``vlm2emb_reranker.json``
   (template, instruction, answers) into a temporary sibling folder;
3. reload that folder with :meth:`Reranker.from_pretrained` and compare the probe scores
   (float32: max |diff| <= 1e-4; bf16/fp16: max |diff| <= 0.05 x max(1, max |score|));
   this check must pass. Then two informative checks: the model card's plain-transformers
   snippet on the text probes (same tolerance), and whether the installed
   sentence-transformers' ``CrossEncoder`` loads the folder and reproduces the scores;
4. write ``README.md`` (hub metadata, the score, the template, usage, the evaluation report
   if one is given, the checks) and rename the folder into place. A failure removes the
   temporary folder, so ``OUT_DIR`` is complete and verified, or absent.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm2emb.export import (
    FP32_MAX_ABS,
    UNKNOWN_LICENSE,
    ExportError,
    ExportResult,
    Verification,
    _check_finite,
    _no_pickles,
    _stored_dtype,
    _swap_into_place,
    verification_image,
)
from vlm2emb.model import resolve_dtype
from vlm2emb.rerank.model import ADAPTER_DIR, RERANKER_CONFIG_NAME, Reranker

__all__ = ["HALF_MAX_REL", "export_reranker", "is_reranker_dir", "reranker_card"]

# bf16/fp16 exports: allowed |score difference| relative to max(1, largest |reference score|).
HALF_MAX_REL = 0.05
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Metrics of a pipeline report shown in the card and the hub's model-index.
_CARD_METRICS = ("hit@1", "ndcg@10", "ndcg@5", "mrr")
_TRANSFORMERS_EXAMPLE = "examples/load_reranker_transformers.py"


def is_reranker_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (or its ``final/``) is a saved reranker (holds ``vlm2emb_reranker.json``)."""
    path = Path(path).expanduser()
    return (path / RERANKER_CONFIG_NAME).is_file() or (path / "final" / RERANKER_CONFIG_NAME).is_file()


def _resolve_source(checkpoint: str | os.PathLike[str]) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"reranker not found: {path}")
    for folder in (path, path / "final"):
        if (folder / RERANKER_CONFIG_NAME).is_file():
            try:
                json.loads((folder / RERANKER_CONFIG_NAME).read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ExportError(f"{folder / RERANKER_CONFIG_NAME}: not valid JSON ({exc})") from None
            if not (folder / "config.json").is_file():
                raise ExportError(
                    f"{folder}: a reranker folder needs config.json next to {RERANKER_CONFIG_NAME}"
                )
            return folder
    raise ExportError(
        f"{path}: not a saved reranker (no {RERANKER_CONFIG_NAME}); pass the folder "
        "Reranker.save_pretrained wrote or a vlm2emb rerank train output_dir"
    )


def probe_pairs(reranker: Reranker) -> list[tuple[Any, Any]]:
    """Text pairs, and an image query / an image candidate where the family takes images."""
    pairs: list[tuple[Any, Any]] = [
        ("the digit seven", "a handwritten digit seven"),
        ("Find a photo of a cat.", "a cat sitting on the red chair"),
    ]
    if reranker.adapter.image_placeholder:
        image = verification_image()
        pairs += [({"text": "which digit is this?", "image": image}, "seven"), ("a yellow square", image)]
    return pairs


def _compare_scores(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, loader: str) -> Verification:
    """ref, got: [n] float64 scores."""
    diff = float((ref - got).abs().max())
    if dtype == torch.float32:
        bound, rule = FP32_MAX_ABS, f"max |diff| <= {FP32_MAX_ABS:g}"
    else:
        bound = HALF_MAX_REL * max(1.0, float(ref.abs().max()))
        rule = f"max |diff| <= {HALF_MAX_REL:g} x max(1, max |score|) = {bound:.3g}"
    # min_cosine has no meaning for scalar scores; 1.0 keeps the Verification form.
    return Verification(loader, len(ref), diff, 1.0, diff <= bound, rule)


def export_reranker(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    license: str | None = None,
    overwrite: bool = False,
    report: str | os.PathLike[str] | dict[str, Any] | None = None,
) -> ExportResult:
    """Exports a saved reranker as a verified folder with a model card.

    Args:
        checkpoint: A saved reranker folder (``vlm2emb_reranker.json`` + weights) or a
            ``vlm2emb rerank train`` output folder (its ``final/`` is used).
        out_dir: Where the export goes; must not exist (or be empty) unless ``overwrite``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` (default: the stored dtype).
        license: License id for the card (default ``unknown``).
        overwrite: Replace an earlier reranker export at ``out_dir``.
        report: A ``vlm2emb rerank eval --out`` report (path or dict) for the card's
            evaluation section and the hub's ``model-index``.

    Returns:
        The :class:`~vlm2emb.export.ExportResult` (mode ``merged``, format ``reranker``);
        its verifications are the blocking vlm2emb reload first, then the informative ones.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ExportError: Not a reranker folder, a bad report, non-finite weights, or a failed
            reload check; nothing is left at ``out_dir`` then.
    """
    source = _resolve_source(checkpoint)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty (use --overwrite)")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ExportError(f"{out}: the export cannot go inside the reranker {source}")
    if out.exists():
        _check_replaceable(out, source)
    eval_report = _read_report(report)
    target = resolve_dtype(dtype) if dtype is not None else _stored_dtype(source)
    if target not in _DTYPE_NAMES:
        raise ExportError(f"--dtype: {dtype!r} is not one of fp32, bf16, fp16")

    reranker = Reranker.from_pretrained(source, torch_dtype=torch.float32)  # adapter/ merged
    _check_finite(reranker.lm.named_parameters(), str(source))
    probes = probe_pairs(reranker)
    reference = reranker.score_pairs(probes).double()  # [n]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        reranker.lm.to(target)
        _check_finite(reranker.lm.named_parameters(), f"{source} in {_DTYPE_NAMES[target]}")
        reranker.save_pretrained(tmp)
        config = json.loads((tmp / RERANKER_CONFIG_NAME).read_text())
        architecture = type(reranker.base_lm).__name__
        del reranker

        reloaded = Reranker.from_pretrained(tmp, torch_dtype=torch.float32)
        check = _compare_scores(reference, reloaded.score_pairs(probes).double(), target, "vlm2emb")
        if not check.passed:
            raise ExportError(
                f"export verification failed (vlm2emb reload): max |score diff| {check.max_abs_diff:.3g}, "
                f"required {check.rule}; nothing written to {out}"
            )
        text = [i for i, (q, c) in enumerate(probes) if isinstance(q, str) and isinstance(c, str)]
        snippet = _check_snippet(tmp, config, [probes[i] for i in text], reference[text], target)
        del reloaded
        cross_encoder = _check_cross_encoder(tmp, [probes[i] for i in text], reference[text], target)
        (tmp / "README.md").write_text(
            reranker_card(
                config,
                architecture=architecture,
                dtype=_DTYPE_NAMES[target],
                license=license,
                verifications=[check, snippet],
                cross_encoder=cross_encoder,
                report=eval_report,
                name=out.name,
            )
        )
        files = _no_pickles(tmp)
        if (tmp / ADAPTER_DIR).exists():  # pragma: no cover - save_pretrained merged it above
            raise ExportError("export would hold an unmerged adapter/; refusing")
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, source, "merged", "reranker", _DTYPE_NAMES[target], files, [check, snippet])


def _check_replaceable(out: Path, source: Path) -> None:
    """``--overwrite`` replaces an earlier reranker export only (never the source or the cwd)."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == source.resolve() or resolved in source.resolve().parents:
        raise ExportError(f"{out}: holds the reranker {source}; export to a new folder instead")
    if resolved == cwd or resolved in cwd.parents:
        raise ExportError(f"{out}: holds the current directory; export to a new folder instead")
    if out.is_dir() and any(out.iterdir()) and not (out / RERANKER_CONFIG_NAME).is_file():
        raise ExportError(
            f"{out}: not a reranker export (no {RERANKER_CONFIG_NAME}); --overwrite only replaces an earlier export"
        )


def _read_report(report: str | os.PathLike[str] | dict[str, Any] | None) -> dict[str, Any] | None:
    """A ``vlm2emb rerank eval`` report (rows or suite form), checked for the keys the card reads."""
    if report is None:
        return None
    where = "report"
    if not isinstance(report, dict):
        where = str(report)
        try:
            report = json.loads(Path(report).expanduser().read_text())
        except FileNotFoundError:
            raise ExportError(f"{where}: report file not found") from None
        except (OSError, json.JSONDecodeError) as exc:
            raise ExportError(f"{where}: not a JSON report ({exc})") from None
    if not isinstance(report, dict):
        raise ExportError(f"{where}: expected a vlm2emb rerank eval report (a JSON object)")
    for key in ("tasks", "average"):
        if not isinstance(report.get(key), dict):
            raise ExportError(f"{where}: missing {key!r}; pass the JSON that vlm2emb rerank eval --out wrote")
    for task, entry in report["tasks"].items():
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(s), dict) for s in ("embedder", "reranked")
        ):
            raise ExportError(f"{where}: task {task!r} has no 'embedder' and 'reranked' metrics")
    return report


def snippet_prompt(config: dict[str, Any], query: str, candidate: str) -> str:
    """The card snippet's prompt for a text pair: the template with the default instruction."""
    # The instruction is plain text (braces kept), so it is written in after format().
    template = config["template"].replace("{instruction}", "\0")
    return template.format(query=query, candidate=candidate).replace("\0", config["instruction"])


def _check_snippet(
    folder: Path,
    config: dict[str, Any],
    pairs: list[tuple[Any, Any]],
    reference: torch.Tensor,
    dtype: torch.dtype,
) -> Verification:
    """The card's plain-transformers snippet (same prompt, same answer tokens) on text pairs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(folder)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    except (ValueError, KeyError, OSError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Verification(
            "transformers (card snippet)", 0, float("nan"), 1.0, False, f"did not load: {first}"
        )
    tokenizer = processor.tokenizer
    yes = tokenizer.encode(config["yes_token"], add_special_tokens=False)[0]
    no = tokenizer.encode(config["no_token"], add_special_tokens=False)[0]
    scores = []
    for query, candidate in pairs:
        inputs = processor(text=[snippet_prompt(config, query, candidate)], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].double()  # [vocab] after the last prompt token
        scores.append(float(logits[yes] - logits[no]))
    return _compare_scores(
        reference, torch.tensor(scores, dtype=torch.float64), dtype, "transformers (card snippet, text pairs)"
    )


def _check_cross_encoder(
    folder: Path, pairs: list[tuple[Any, Any]], reference: torch.Tensor, dtype: torch.dtype
) -> str:
    """One line: whether sentence-transformers' CrossEncoder loads the export and scores as vlm2emb."""
    try:
        import sentence_transformers
        from sentence_transformers import CrossEncoder
    except ImportError:
        return "`CrossEncoder` not checked (sentence-transformers was not installed at export)"
    version = sentence_transformers.__version__
    try:
        model = CrossEncoder(str(folder), device="cpu")
        got = torch.as_tensor(model.predict(list(pairs), convert_to_numpy=True)).double().reshape(-1)
    except Exception as exc:  # any failure is the answer the card reports
        # transformers' message goes on to list every supported config class: keep the reason.
        first = (str(exc).splitlines() or [""])[0].split(" Model type should be")[0]
        first = first if len(first) <= 240 else first[:237] + "..."
        return (
            f"the `CrossEncoder` of sentence-transformers {version} does not load this folder "
            f"({type(exc).__name__}: {first or 'no message'})"
        )
    check = _compare_scores(reference, got, dtype, "CrossEncoder")
    if check.passed:
        return f"the `CrossEncoder` of sentence-transformers {version} loads this folder and reproduces the scores"
    return (
        f"the `CrossEncoder` of sentence-transformers {version} loads this folder but its scores differ "
        f"(max |diff| {check.max_abs_diff:.3g}); do not use it for this model"
    )


def reranker_card(
    config: dict[str, Any],
    *,
    architecture: str,
    dtype: str,
    license: str | None,
    verifications: list[Verification],
    cross_encoder: str,
    report: dict[str, Any] | None = None,
    name: str = "vlm2emb-reranker",
) -> str:
    """The export's README.md: hub metadata, the score and its prompt, usage, results, checks.

    Args:
        config: The export's ``vlm2emb_reranker.json`` contents.
        architecture: The transformers class of the weights.
        dtype: The written weights' dtype name.
        license: A hub license id; None writes ``unknown``.
        verifications: The reload check and the card snippet's check.
        cross_encoder: The CrossEncoder finding, one line.
        report: A ``vlm2emb rerank eval`` report, or None.
        name: The model's name in ``model-index``.
    """
    import yaml

    base = config.get("base_model") or "unknown"
    front: dict[str, Any] = {
        "library_name": "vlm2emb",
        "pipeline_tag": "text-ranking",
        "base_model": base,
        "license": license or UNKNOWN_LICENSE,
        "tags": ["vlm2emb", "reranker", "vision-language", "safetensors"],
    }
    if report is not None:
        index = _model_index(report, name)
        if index:
            front["model-index"] = index
    snippet_ok = len(verifications) > 1 and verifications[1].passed
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines += [
        f"# Generative reranker exported by vlm2emb ({dtype})",
        "",
        f"- **Base model:** `{base}` (family `{config.get('family')}`, weights `{architecture}`)",
        f"- **Weights:** merged, {dtype} safetensors; the folder is a plain transformers checkpoint",
        f"- **Score:** `logit({config['yes_token']!r}) - logit({config['no_token']!r})` of the next token "
        "after the prompt (each answer counts by its first token); `sigmoid(score)` is P(yes) "
        "against no",
        f"- **Default instruction:** `{config['instruction']}`",
        "",
        "The prompt template (`vlm2emb_reranker.json`; `{instruction}` is replaced by the pair's "
        "instruction, else the default; each side's images go right before its text):",
        "",
        "```text",
        config["template"],
        "```",
        "",
        "## Usage with vlm2emb",
        "",
        "```python",
        "from vlm2emb.rerank import Reranker",
        "",
        'reranker = Reranker.from_pretrained("path/to/this/folder")',
        'hits = reranker.rerank("the digit seven", ["a handwritten seven", "a plate of food"])',
        'scores = reranker.score_pairs([({"image": "page.png"}, "a caption")])',
        "```",
        "",
        "After an embedder's search (recall, then re-rank): `EmbeddingModel.search(..., reranker=reranker, "
        "rerank_top_k=100)`.",
        "",
        "## Usage with plain transformers (text pairs)",
        "",
        "```python",
        "import json",
        "",
        "import torch",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        'path = "path/to/this/folder"',
        'cfg = json.load(open(f"{path}/vlm2emb_reranker.json"))',
        "processor = AutoProcessor.from_pretrained(path)",
        "model = AutoModelForImageTextToText.from_pretrained(path).eval()",
        'yes = processor.tokenizer.encode(cfg["yes_token"], add_special_tokens=False)[0]',
        'no = processor.tokenizer.encode(cfg["no_token"], add_special_tokens=False)[0]',
        "",
        "",
        "def score(query, candidate):",
        "    # The instruction is plain text (braces kept): written in after format().",
        '    template = cfg["template"].replace("{instruction}", "\\0")',
        '    prompt = template.format(query=query, candidate=candidate).replace("\\0", cfg["instruction"])',
        '    inputs = processor(text=[prompt], return_tensors="pt")',
        "    with torch.no_grad():",
        "        logits = model(**inputs).logits[0, -1].float()",
        "    return float(logits[yes] - logits[no])",
        "",
        "",
        'print(score("the digit seven", "a handwritten digit seven"))',
        "```",
        "",
    ]
    if snippet_ok:
        lines.append("This snippet reproduced vlm2emb's scores on the export's text probes (below).")
    else:
        lines.append(
            "This snippet did **not** reproduce vlm2emb's scores for this family (it places tokens of "
            "its own; see the checks below): use vlm2emb, or the family's prompt layout."
        )
    lines += [
        f"For image pairs, see `{_TRANSFORMERS_EXAMPLE}` in the vlm2emb repository (written for "
        "Qwen2-VL, whose image placeholder goes right before the query's text; other families "
        "place their own image tokens: their adapter's `render_segments`).",
        "",
        f"**sentence-transformers:** {cross_encoder}. Without vlm2emb, use the plain transformers code "
        "above.",
        "",
        "## Evaluation",
        "",
    ]
    if report is not None:
        lines += _report_lines(report)
    else:
        lines.append("No evaluation report was given at export (`vlm2emb export ... --eval-report FILE`).")
    lines += [
        "",
        "## Verification",
        "",
        "Reloaded after writing and compared with the source on fixed probe pairs:",
        "",
    ]
    for v in verifications:
        lines.append(
            f"- {v.loader}: {v.n_probes} pairs, max |score diff| {v.max_abs_diff:.2e} (required: {v.rule})"
        )
    lines += [
        "",
        "## License",
        "",
        f"{license}."
        if license
        else "Not stated at export (`license: unknown` above). The base model's license and the training "
        "data's terms apply to these weights.",
        "",
    ]
    return "\n".join(lines)


def _report_lines(report: dict[str, Any]) -> list[str]:
    """The pipeline report as a table: embedder alone vs embedder -> this reranker, and seconds."""
    k = report.get("rerank_top_k", report.get("recall_k"))
    average = report["average"]
    cols = [m for m in ("score", *_CARD_METRICS) if m in average["embedder"]]
    head = "| task | n | " + " | ".join(f"{c} embedder | {c} +rerank@{k}" for c in cols)
    head += " | embed s | search s | rerank s |"
    lines = [
        f"`vlm2emb rerank eval` (suite `{report['suite']}`)"
        if "suite" in report
        else "`vlm2emb rerank eval`",
        f"with the embedder's best {k} candidates per query re-ranked:",
        "",
        head,
        "|---" * (head.count("|") - 1) + "|",
    ]

    def row(name: str, n: Any, entry: dict[str, Any], seconds: dict[str, Any] | None) -> str:
        cells = [name, str(n)]
        for c in cols:
            cells += [_fmt(entry["embedder"].get(c)), _fmt(entry["reranked"].get(c))]
        cells += [_fmt(seconds.get(s), 2) if seconds else "" for s in ("embed", "search", "rerank")]
        return "| " + " | ".join(cells) + " |"

    for task, entry in report["tasks"].items():
        lines.append(row(task, entry.get("n", ""), entry, entry.get("seconds")))
    lines.append(row("**average**", "", average, average.get("seconds")))
    return lines


def _fmt(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else ""


def _model_index(report: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """The hub's ``model-index``: the pipeline's (re-ranked) metrics per task."""
    k = report.get("rerank_top_k", report.get("recall_k"))
    results = []
    for task, entry in report["tasks"].items():
        metrics = [
            {
                "type": c.replace("@", "_at_"),
                "value": round(float(entry["reranked"][c]), 4),
                "name": f"{c} (rerank@{k})",
            }
            for c in _CARD_METRICS
            if isinstance(entry["reranked"].get(c), (int, float))
        ]
        if metrics:
            results.append(
                {
                    "task": {"type": "text-ranking", "name": f"Embedder recall, then re-rank the top {k}"},
                    "dataset": {"type": report.get("suite", "vlm2emb rerank eval"), "name": task},
                    "metrics": metrics,
                }
            )
    return [{"name": name, "results": results}] if results else []
