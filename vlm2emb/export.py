"""``vlm2emb export``: merged, adapter-only and sentence-transformers exports, verified.

An export turns a training checkpoint (``output_dir/final`` or
``output_dir/checkpoints/step-N``; LoRA, DoRA or full) into a directory meant for people who
do not train: safetensors only, a model card, and a check that it embeds like the source.

Steps of :func:`export_model`:

1. load the source in float32 with any LoRA adapter still separate, and refuse non-finite
   weights (the error names the tensor);
2. embed a few fixed probe items (texts, a generated image, image + text): the reference;
3. merge the adapter (merged export) or keep it alone (adapter export), cast to the
   requested dtype, check again for non-finite values (fp16 can overflow), and write
   everything into a temporary sibling folder ``.tmp-NAME-*``;
4. reload that folder the way a user would (:meth:`EmbeddingModel.from_pretrained`, and
   sentence-transformers for ``format="sentence-transformers"``), embed the probes and
   compare with the reference: float32 within 1e-4 (max abs difference and 1 - cosine),
   bf16/fp16 with cosine >= 0.99;
5. only then rename the folder to ``OUT_DIR``. A failure removes the temporary folder, so
   ``OUT_DIR`` is either complete and verified or absent.

The checkpoint's accelerate state (``state/``: optimizer, RNG; pickles) is never copied:
weights are re-serialised from the loaded model, and the export is asserted to hold no
``.bin``/``.pt``/``.pkl`` files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlm2emb.model import CONFIG_NAME, MULTIVECTOR_HEAD_NAME, EmbeddingModel, first_non_finite, resolve_dtype

EXPORT_MODES = ("merged", "adapter")
EXPORT_FORMATS = ("vlm2emb", "sentence-transformers", "sentence-transformers-multivector")
# The formats that write a sentence-transformers folder (modules.json at the root).
_ST_FORMATS = ("sentence-transformers", "sentence-transformers-multivector")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Allowed deviation of the reloaded export from the source on the probes.
FP32_MAX_ABS = 1e-4
HALF_MIN_COSINE = 0.99
# sentence-transformers' Pooling modes for our pooling rules (eos/embed_token append a
# token that sentence-transformers would not add, so they have no equivalent).
_ST_POOLING = {"last": "lasttoken", "mean": "mean"}
_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


class ExportError(ValueError):
    """A checkpoint that cannot be exported, or an export that failed verification."""


@dataclass
class Verification:
    """How closely the reloaded export reproduces the source on the probe items."""

    loader: str  # "vlm2emb" or "sentence-transformers"
    n_probes: int
    max_abs_diff: float
    min_cosine: float
    passed: bool
    rule: str  # the tolerance applied, in words


@dataclass
class ExportResult:
    """What :func:`export_model` wrote."""

    out_dir: Path
    source: Path
    mode: str
    format: str
    dtype: str
    files: list[str]
    verifications: list[Verification] = field(default_factory=list)


# --------------------------------------------------------------------- helpers
def verification_image() -> Any:
    """The image export verification embeds: a deterministic 48x48 RGB test pattern made in code."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:48, 0:48]
    rgb = np.stack([x * 5, y * 5, (x + y) * 2], axis=-1) % 256  # [48, 48, 3]
    rgb[16:32, 16:32] = (250, 240, 20)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def probe_items(model: EmbeddingModel) -> list[Any]:
    """Texts, an image and an image with text (images only for backbones that take them)."""
    items: list[Any] = ["a handwritten digit seven", "Find a photo of a cat sitting on the red chair."]
    if model.adapter.image_placeholder:
        image = verification_image()
        items += [image, {"text": "which digit is this?", "image": image}]
    return items


def _resolve_checkpoint_dir(checkpoint: str | os.PathLike[str]) -> Path:
    """The model folder of a checkpoint argument: a model dir, or a run dir holding ``final/``."""
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if (path / CONFIG_NAME).is_file() or (path / "config.json").is_file():
        return path
    if (path / "final" / CONFIG_NAME).is_file():
        return path / "final"
    raise ExportError(
        f"{path}: not a model checkpoint (no {CONFIG_NAME} or config.json); "
        "pass OUTPUT_DIR/final or OUTPUT_DIR/checkpoints/step-N"
    )


def find_run_dir(source: Path) -> Path | None:
    """The training run's ``output_dir`` (the folder with ``recipe.yaml``), if any."""
    for parent in (source.parent, source.parent.parent):
        if (parent / "recipe.yaml").is_file():
            return parent
    return None


def _check_finite(named: Any, where: str) -> None:
    name = first_non_finite(named)
    if name is not None:
        raise ExportError(f"{where}: tensor {name!r} has non-finite values (NaN or inf); refusing to export")


def _compare(ref: torch.Tensor, got: torch.Tensor, dtype: torch.dtype, loader: str) -> Verification:
    """ref, got: [n, d]. float32 exports within 1e-4; half precision by cosine."""
    diff = float((ref - got).abs().max())
    cos = float(torch.nn.functional.cosine_similarity(ref.double(), got.double(), dim=-1).min())
    if dtype == torch.float32:
        passed = diff <= FP32_MAX_ABS and 1.0 - cos <= FP32_MAX_ABS
        rule = f"max |diff| <= {FP32_MAX_ABS:g} and 1 - cosine <= {FP32_MAX_ABS:g}"
    else:
        passed = cos >= HALF_MIN_COSINE
        rule = f"cosine >= {HALF_MIN_COSINE}"
    return Verification(loader, int(ref.shape[0]), diff, cos, passed, rule)


def _no_pickles(folder: Path) -> list[str]:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    pickles = [f for f in files if f.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ExportError(f"export would contain pickle files ({', '.join(pickles)}); refusing")
    return files


# --------------------------------------------------------------------- export
def export_model(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    mode: str = "merged",
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = "5GB",
    format: str = "vlm2emb",
    license: str | None = None,
    overwrite: bool = False,
    base_model: str | None = None,
) -> ExportResult:
    """Exports a checkpoint as a verified, self-describing directory.

    Args:
        checkpoint: ``output_dir/final``, ``output_dir/checkpoints/step-N``, a run's
            ``output_dir`` (its ``final/`` is used) or any saved :class:`EmbeddingModel`.
        out_dir: Where the export goes; must not exist (or be empty) unless ``overwrite``.
        mode: ``"merged"``: a plain transformers model directory with any LoRA/DoRA adapter
            merged in. ``"adapter"``: only the peft adapter (needs a LoRA checkpoint) plus
            the base model id in ``vlm2emb_config.json``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for the written weights (default: the
            checkpoint's stored dtype).
        max_shard_size: Largest safetensors shard (``"5GB"``, ``"200KB"``, bytes); larger
            models get ``model.safetensors.index.json`` and several shards.
        format: ``"vlm2emb"``, ``"sentence-transformers"`` (a merged export that
            ``SentenceTransformer(out_dir)`` also loads: text, and images for families with
            vlm2emb's default prompt layout, through a chat template written with it) or
            ``"sentence-transformers-multivector"`` (the same, as a ``MultiVectorEncoder``
            giving the multi-vector head's token vectors; needs ``multivector_tokens: all``).
        license: License id for the model card (default: the base model's terms apply).
        overwrite: Replace an existing ``out_dir``.
        base_model: Adapter mode: the base id to record (default: the recorded one).

    Returns:
        The :class:`ExportResult`, with the verification numbers.

    Raises:
        FileNotFoundError: The checkpoint does not exist.
        ExportError: Bad arguments, non-finite weights, or a failed verification; nothing
            is left at ``out_dir`` then.
    """
    if mode not in EXPORT_MODES:
        raise ExportError(f"mode must be one of {', '.join(EXPORT_MODES)}, got {mode!r}")
    if format not in EXPORT_FORMATS:
        raise ExportError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
    if format in _ST_FORMATS and mode != "merged":
        raise ExportError(f"--format {format} needs a merged export (not --adapter-only)")
    source = _resolve_checkpoint_dir(checkpoint)
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out}: already exists and is not empty (use --overwrite)")
    if out.resolve() == source.resolve() or source.resolve() in out.resolve().parents:
        raise ExportError(f"{out}: the export cannot go inside the checkpoint {source}")
    if out.exists():
        _check_replaceable(out, source)
    if isinstance(max_shard_size, str):
        from transformers.utils.hub import convert_file_size_to_int

        try:
            convert_file_size_to_int(max_shard_size)
        except (ValueError, TypeError):
            raise ExportError(
                f"--max-shard-size: {max_shard_size!r} is not a size like 5GB or 500MB"
            ) from None

    # 1. The source in float32 with its adapter separate: the reference the export must match.
    model = EmbeddingModel.from_pretrained(source, merge_lora=False, torch_dtype=torch.float32)
    _check_finite(model.backbone.named_parameters(), str(source))
    if mode == "adapter" and not model.has_lora:
        raise ExportError(f"{source}: --adapter-only needs a LoRA/DoRA checkpoint, this one is fully trained")
    if not model.config.dense_head and format == "sentence-transformers":
        # That format is a pooled single-vector pipeline; a multi-vector-only model has none.
        raise ExportError(
            f"{source}: --format sentence-transformers needs the single-vector head; this model has "
            "only a multi-vector head (dense_head: false)"
        )
    if format == "sentence-transformers-multivector":
        if model.multivector_head is None:
            raise ExportError(
                f"{source}: --format {format} needs a multi-vector head (model.multivector_dim)"
            )
        if model.config.multivector_tokens != "all":
            raise ExportError(
                f"{source}: --format {format}: multivector_tokens {model.config.multivector_tokens!r} has no "
                "sentence-transformers equivalent (only 'all')"
            )
    target = resolve_dtype(dtype) if dtype is not None else _stored_dtype(source)
    if target not in _DTYPE_NAMES:
        raise ExportError(f"--dtype: {dtype!r} is not one of fp32, bf16, fp16")
    probes = probe_items(model)
    instruction = model.config.query_instruction
    truncate_dim, model.config.truncate_dim = model.config.truncate_dim, None  # compare full vectors
    reference = model.encode(probes, instruction=instruction) if model.config.dense_head else None  # [n, d]
    # The token vectors are verified too: the head file and the backbone must agree.
    reference_tokens = None
    if model.multivector_head is not None:
        reference_tokens = model.encode(probes, instruction=instruction, output="multivector")  # n x [L_i, D]
    model.config.truncate_dim = truncate_dim

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    try:
        # 2. Write.
        config = dict(asdict(model.config))
        if mode == "adapter":
            config["base_model"] = base_model or model.config.base_model
            _write_adapter(model, tmp, target, config["base_model"])
        else:
            _write_merged(model, tmp, target, max_shard_size)
        config["export"] = {"mode": mode, "dtype": _DTYPE_NAMES[target], "format": format}
        if model.multivector_head is not None:
            model._save_multivector_head(tmp, None)  # float32, whatever the export dtype
        model.adapter.processor.save_pretrained(tmp)
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        st_images = False
        if format in _ST_FORMATS:
            st_images = _write_sentence_transformers(model, tmp)
        del model  # free the source before the reload
        if format == "sentence-transformers-multivector":
            _make_multivector_pipeline(tmp)

        # 3. Verify by reloading what was written.
        verifications = _verify_vlm2emb(
            tmp, source, mode, target, probes, instruction, reference, reference_tokens
        )
        idx = [i for i, p in enumerate(probes) if st_images or isinstance(p, str)]
        if format == "sentence-transformers":
            verifications.append(
                _verify_sentence_transformers(tmp, [probes[i] for i in idx], reference[idx], target)
            )
        if format == "sentence-transformers-multivector":
            verifications.append(
                _verify_multivector_encoder(
                    tmp, [probes[i] for i in idx], [reference_tokens[i] for i in idx], target
                )
            )
        failed = [v for v in verifications if not v.passed]
        if failed:
            v = failed[0]
            raise ExportError(
                f"export verification failed ({v.loader} reload): max |diff| {v.max_abs_diff:.3g}, "
                f"min cosine {v.min_cosine:.6f}, required {v.rule}; nothing written to {out}"
            )
        run_dir = find_run_dir(source)
        (tmp / "README.md").write_text(
            model_card(
                config,
                run_dir=run_dir,
                mode=mode,
                format=format,
                dtype=_DTYPE_NAMES[target],
                license=license,
                verifications=verifications,
                # eval.json scores the run's final weights; an intermediate checkpoint is not them.
                eval_applies=run_dir is not None and source.resolve() == (run_dir / "final").resolve(),
                trainer_state=_read_trainer_state(source),
                name=out.name,
            )
        )
        files = _no_pickles(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, source, mode, format, _DTYPE_NAMES[target], files, verifications)


def _check_replaceable(out: Path, source: Path) -> None:
    """Refuses an ``OUT_DIR`` that ``--overwrite`` must never delete.

    ``export run/final run --overwrite`` would delete the run (the checkpoint, its
    siblings, the metrics) and ``export final . --overwrite`` the working folder: a folder
    that holds the source or the current directory is never replaced, and neither is a
    non-empty folder that is not an export (no ``vlm2emb_config.json``).

    Raises:
        ExportError: ``out`` is one of those.
    """
    resolved = out.resolve()
    if resolved == source.resolve() or resolved in source.resolve().parents:
        raise ExportError(f"{out}: holds the checkpoint {source}; export to a new folder instead")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ExportError(f"{out}: holds the current directory; export to a new folder instead")
    if out.is_dir() and any(out.iterdir()) and not (out / CONFIG_NAME).is_file():
        raise ExportError(
            f"{out}: not a vlm2emb export (no {CONFIG_NAME}); --overwrite only replaces an earlier export"
        )


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Moves the finished export ``tmp`` to ``out``, replacing an earlier export there.

    The old folder is renamed aside first and deleted only once the new one is in place,
    so an interrupted swap leaves one of the two complete exports, never neither.
    """
    from vlm2emb._files import honour_umask_tree

    honour_umask_tree(tmp)  # mkdtemp made it 0700, safetensors its weights 0600
    if not out.exists() and not out.is_symlink():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
    aside = old / "previous"
    os.replace(out, aside)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(aside, out)  # put the earlier export back
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _stored_dtype(source: Path) -> torch.dtype:
    """The checkpoint's weight dtype from its config.json (float32 when unrecorded)."""
    try:
        cfg = json.loads((source / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return resolve_dtype(name) if name in ("float32", "bfloat16", "float16") else torch.float32


def _write_merged(model: EmbeddingModel, tmp: Path, dtype: torch.dtype, max_shard_size: str | int) -> None:
    if model.has_lora:
        # peft folds B @ A * scale (and DoRA's magnitude) into the base weights, in float32.
        model.backbone = model.backbone.merge_and_unload()
    model.backbone.to(dtype)
    _check_finite(model.backbone.named_parameters(), f"merged weights cast to {_DTYPE_NAMES[dtype]}")
    model.backbone.save_pretrained(tmp, max_shard_size=max_shard_size)


def _write_adapter(model: EmbeddingModel, tmp: Path, dtype: torch.dtype, base_model: str | None) -> None:
    # Only the adapter tensors (lora_A/B, DoRA's lora_magnitude_vector), cast to dtype.
    adapter_state = {k: v.to(dtype) for k, v in model.backbone.state_dict().items() if "lora_" in k}
    _check_finite(adapter_state.items(), f"adapter weights cast to {_DTYPE_NAMES[dtype]}")
    for peft_cfg in model.backbone.peft_config.values():
        peft_cfg.base_model_name_or_path = base_model
    model.backbone.save_pretrained(str(tmp), state_dict=adapter_state)


def _chat_template(model: EmbeddingModel) -> str | None:
    """A chat template that renders sentence-transformers messages as vlm2emb's prompt.

    vlm2emb's default prompt is ``<image placeholder> * n_images + instruction + "\\n" + text``
    (:meth:`BackboneAdapter.render_prompt`). sentence-transformers sends images and texts
    as chat messages (its prompt as a system message) through the processor's chat template,
    so a template that emits the placeholders, then the system text, then the user text,
    gives the same tokens. None for families with their own prompt layout, and for the
    ``vlm2vec`` prompt style (its layout is not this one).
    """
    from vlm2emb.backbones.base import BackboneAdapter

    placeholder = model.adapter.image_placeholder
    if model.config.prompt_style != "vlm2emb":
        return None
    if not placeholder or type(model.adapter).render_prompt is not BackboneAdapter.render_prompt:
        return None

    def texts(where: str) -> str:
        return (
            f"{{%- for m in messages if {where} -%}}"
            "{%- if m.content is string -%}{{ m.content }}{%- else -%}"
            "{%- for c in m.content if c.type == 'text' -%}{{ c.text }}{%- endfor -%}{%- endif -%}"
            "{%- endfor -%}"
        )

    images = (
        "{%- for m in messages if m.role != 'system' and m.content is not string -%}"
        f"{{%- for c in m.content if c.type == 'image' -%}}{placeholder}{{%- endfor -%}}"
        "{%- endfor -%}"
    )
    return images + texts("m.role == 'system'") + texts("m.role != 'system'")


def _write_sentence_transformers(model: EmbeddingModel, tmp: Path) -> bool:
    """Adds the module files that make ``tmp`` a SentenceTransformer folder.

    Returns:
        Whether image inputs are supported (the family's prompt fits a chat template).
    """
    cfg = model.config
    if cfg.pooling not in _ST_POOLING:
        raise ExportError(
            f"--format sentence-transformers: pooling {cfg.pooling!r} has no sentence-transformers "
            f"equivalent (supported: {', '.join(_ST_POOLING)})"
        )
    if cfg.attention != "causal":
        # sentence-transformers loads the backbone with its stock (causal) attention.
        raise ExportError("--format sentence-transformers: only causal-attention models load there unchanged")
    modules = [
        {
            "idx": 0,
            "name": "0",
            "path": "",
            "type": "sentence_transformers.base.modules.transformer.Transformer",
        },
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
        },
    ]
    if cfg.normalize:
        modules.append(
            {
                "idx": 2,
                "name": "2",
                "path": "2_Normalize",
                "type": "sentence_transformers.base.modules.normalize.Normalize",
            }
        )
        (tmp / "2_Normalize").mkdir()
        (tmp / "2_Normalize" / "config.json").write_text("{}\n")
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    output = {"method": "forward", "method_output_name": "last_hidden_state"}
    modality_config: dict[str, Any] = {"text": output}
    template = _chat_template(model)
    if template is not None:
        # Images reach the processor through the chat template only (without it they would
        # come without the placeholder tokens VLM processors need). The export is an embedding
        # model, so the chat template of the base model is replaced, wherever it was saved.
        for name in ("processor_config.json", "tokenizer_config.json"):
            path = tmp / name
            if path.is_file():
                data = json.loads(path.read_text())
                if data.pop("chat_template", None) is not None:
                    path.write_text(json.dumps(data, indent=2) + "\n")
        (tmp / "chat_template.json").unlink(missing_ok=True)
        (tmp / "chat_template.jinja").write_text(template)
        modality_config |= {"image": output, "message": {**output, "format": "structured"}}
    (tmp / "sentence_bert_config.json").write_text(
        json.dumps(
            {
                "transformer_task": "feature-extraction",
                "modality_config": modality_config,
                "module_output_name": "token_embeddings",
            },
            indent=2,
        )
        + "\n"
    )
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {
                "embedding_dimension": model.adapter.hidden_size(model.backbone),
                "pooling_mode": _ST_POOLING[cfg.pooling],
                "include_prompt": True,
            },
            indent=2,
        )
        + "\n"
    )
    # Our text prompt is "instruction\ntext"; as sentence-transformers prompts that is a prefix.
    prompts = {
        "query": cfg.query_instruction.strip() + "\n" if cfg.query_instruction else "",
        "document": cfg.target_instruction.strip() + "\n" if cfg.target_instruction else "",
    }
    # Each training task's instructions as named prompts (encode_query(x, prompt_name=TASK),
    # encode_document(x, prompt_name=TASK-document)): the ones every row of the task shared.
    for task, entry in (cfg.instructions or {}).items():
        for side, prompt_name in (("query", task), ("target", f"{task}-document")):
            text = entry[side][0] if entry[side] and entry.get(f"{side}_distinct", 1) == 1 else None
            if text and prompt_name not in prompts:
                prompts[prompt_name] = text.strip() + "\n"
    st_config = {"prompts": prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"}
    (tmp / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")
    return template is not None


def _verify_vlm2emb(
    tmp: Path,
    source: Path,
    mode: str,
    dtype: torch.dtype,
    probes: list[Any],
    instruction: str | None,
    reference: torch.Tensor | None,
    reference_tokens: list[torch.Tensor] | None,
) -> list[Verification]:
    """The reload's single vectors (when the model has them) and token vectors (when it has a
    multi-vector head) against the source's."""
    # An adapter export's base weights are the checkpoint's (unmerged) weights.
    base = str(source) if mode == "adapter" else None
    reloaded = EmbeddingModel.from_pretrained(tmp, torch_dtype=dtype, base_model=base)
    reloaded.config.truncate_dim = None  # the reference is untruncated
    out = []
    if reference is not None:
        got = reloaded.encode(probes, instruction=instruction)  # [n_probes, d]
        out.append(_compare(reference, got, dtype, "vlm2emb"))
    if reference_tokens is not None:
        got_tokens = reloaded.encode(probes, instruction=instruction, output="multivector")  # n x [L_i, D]
        out.append(_compare_token_sets(reference_tokens, got_tokens, dtype))
    return out


def _compare_token_sets(
    ref: list[torch.Tensor],
    got: list[torch.Tensor],
    dtype: torch.dtype,
    loader: str = "vlm2emb token vectors",
) -> Verification:
    """Every probe's token vectors ``[L_i, D]``, under :func:`_compare`'s rule per token vector;
    a probe whose token count changed fails outright."""
    counts = [(len(r), len(g)) for r, g in zip(ref, got)]
    if len(ref) != len(got) or any(a != b for a, b in counts):
        rule = f"the same token count per probe (source {[a for a, _ in counts]}, reload {[b for _, b in counts]})"
        return Verification(loader, len(ref), float("inf"), -1.0, False, rule)
    check = _compare(torch.cat(ref).float(), torch.cat(got).float(), dtype, loader)  # [sum L_i, D]
    check.n_probes = len(ref)
    return check


def _verify_sentence_transformers(
    tmp: Path, items: list[Any], reference: torch.Tensor, dtype: torch.dtype
) -> Verification:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tmp), device="cpu", model_kwargs={"dtype": dtype}, truncate_dim=None)
    got = st.encode_query(items, convert_to_tensor=True).float().cpu()  # [n, d]
    return _compare(reference, got[:, : reference.shape[1]], dtype, "sentence-transformers")


def _make_multivector_pipeline(tmp: Path) -> None:
    """Turns the sentence-transformers folder ``tmp`` (the pooled pipeline) into a
    ``MultiVectorEncoder`` folder: the same backbone files at the root (written once), then
    the head as ``Dense``, ``Normalize`` and ``MultiVectorMask`` (:func:`multivector_encoder`)."""
    encoder = multivector_encoder(tmp)
    for name in ("1_Pooling", "2_Normalize"):
        shutil.rmtree(tmp / name, ignore_errors=True)
    modules = []
    for idx, module in enumerate(encoder):
        kind = type(module)
        path = "" if idx == 0 else f"{idx}_{kind.__name__}"
        if idx > 0:  # the root's Transformer files are vlm2emb's merged weights already
            (tmp / path).mkdir()
            module.save(str(tmp / path))
        modules.append(
            {"idx": idx, "name": str(idx), "path": path, "type": f"{kind.__module__}.{kind.__name__}"}
        )
    (tmp / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
    st_config = json.loads((tmp / "config_sentence_transformers.json").read_text())
    st_config |= {"model_type": "MultiVectorEncoder", "similarity_fn_name": None}
    (tmp / "config_sentence_transformers.json").write_text(json.dumps(st_config, indent=2) + "\n")


def _verify_multivector_encoder(
    tmp: Path, items: list[Any], reference: list[torch.Tensor], dtype: torch.dtype
) -> Verification:
    from sentence_transformers import MultiVectorEncoder

    encoder = MultiVectorEncoder(str(tmp), device="cpu", model_kwargs={"dtype": dtype})
    got = encoder.encode_query(items)  # n x [L_i, D]
    return _compare_token_sets(
        reference, [g.float().cpu() for g in got], dtype, "sentence-transformers MultiVectorEncoder"
    )


def multivector_encoder(export_dir: str | os.PathLike[str], device: str = "cpu") -> Any:
    """A sentence-transformers ``MultiVectorEncoder`` over a ``--format sentence-transformers``
    export of a model with a multi-vector head.

    The export's own ``Transformer`` module (the backbone, its processor, the chat template
    and the query/document prompts) is followed by the head as a ``Dense`` (H -> D, with bias,
    no activation) on ``token_embeddings``, a token-level ``Normalize`` and a
    ``MultiVectorMask`` without skiplist: ``encode_query`` / ``encode_document`` then give the
    token vectors of ``EmbeddingModel.encode(output="multivector")`` with the matching
    instruction. Only ``multivector_tokens: all`` is reproduced (``content`` masks tokens that
    ``MultiVectorMask`` cannot find). Call ``.save(dir)`` on the result for a folder that
    ``MultiVectorEncoder(dir)`` loads.

    Args:
        export_dir: The export folder (``vlm2emb export CKPT DIR --format sentence-transformers``).
        device: Where sentence-transformers puts the model.

    Returns:
        The ``sentence_transformers.MultiVectorEncoder``.

    Raises:
        ExportError: The folder is not such an export, or its model has no multi-vector head
            or masks content tokens.
    """
    from safetensors.torch import load_file
    from sentence_transformers import MultiVectorEncoder, SentenceTransformer
    from sentence_transformers.base.modules import Normalize
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules.multi_vector_mask import MultiVectorMask

    folder = Path(export_dir)
    head_file = folder / MULTIVECTOR_HEAD_NAME
    if not (folder / "modules.json").is_file():
        raise ExportError(f"{folder}: not a --format sentence-transformers export (no modules.json)")
    if not head_file.is_file():
        raise ExportError(f"{folder}: the model has no multi-vector head ({MULTIVECTOR_HEAD_NAME} missing)")
    config = json.loads((folder / CONFIG_NAME).read_text())
    if config.get("multivector_tokens", "all") != "all":
        raise ExportError(
            f"{folder}: multivector_tokens {config['multivector_tokens']!r} has no sentence-transformers "
            "equivalent (only 'all')"
        )
    single = SentenceTransformer(str(folder), device=device)
    head = load_file(head_file)  # weight [D, H], bias [D]
    dim, hidden = head["weight"].shape
    dense = Dense(hidden, dim, bias=True, activation_function=None, module_input_name="token_embeddings")
    with torch.no_grad():
        dense.linear.weight.copy_(head["weight"])
        dense.linear.bias.copy_(head["bias"])
    modules = [single[0], dense, Normalize(module_input_name="token_embeddings"), MultiVectorMask()]
    return MultiVectorEncoder(modules=modules, device=device, prompts=single.prompts)


# --------------------------------------------------------------------- model card
# eval.json metrics in the card's table and the hub's model-index, in this order.
CARD_METRICS = ("hit@1", "hit@5", "ndcg@5", "mrr")
# Without --license the card says "unknown" (a license id the hub accepts): the terms of the
# base model and of the training data are not something vlm2emb can know.
UNKNOWN_LICENSE = "unknown"
# Tasks shown with their own line in the card's usage snippet.
_USAGE_TASKS = 3


def _read_trainer_state(source: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.json ({} for a model not saved by the trainer)."""
    try:
        state = json.loads((source / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def training_summary(run_dir: Path, trainer_state: dict[str, Any]) -> dict[str, Any]:
    """What the run's log says about the checkpoint's training.

    Args:
        run_dir: The run's ``output_dir`` (with ``metrics.jsonl``).
        trainer_state: The checkpoint's ``trainer_state.json``: its ``step`` limits the log
            to the records up to it, ``steps_per_epoch`` gives the epochs.

    Returns:
        ``{"steps", "epochs", "final_loss", "final_accuracy", "train_seconds", "resumes"}``
        (None where the log or the state lacks it). ``elapsed_s`` restarts when a run is
        resumed, so the time is summed over the log's segments.
    """
    step = trainer_state.get("step")
    records: list[dict[str, Any]] = []
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "loss" in record and (step is None or record["step"] <= step):
                records.append(record)
    seconds, segment_end, resumes, previous = 0.0, 0.0, 0, -1.0
    for record in records:
        elapsed = float(record.get("elapsed_s") or 0.0)
        if elapsed < previous:  # a resumed run's clock starts again
            seconds, resumes = seconds + segment_end, resumes + 1
        segment_end = previous = elapsed
    steps = step if step is not None else (records[-1]["step"] if records else None)
    per_epoch = trainer_state.get("steps_per_epoch")
    return {
        "steps": steps,
        "epochs": round(steps / per_epoch, 2) if steps and per_epoch else None,
        "final_loss": records[-1].get("loss") if records else None,
        "final_accuracy": records[-1].get("accuracy") if records else None,
        "train_seconds": round(seconds + segment_end, 1) if records else None,
        "resumes": resumes,
    }


def model_index(report: dict[str, Any], name: str, eval_sources: list[str]) -> list[dict[str, Any]]:
    """The hub's ``model-index`` front matter: one result per task of ``eval.json``.

    Each result names the task (``dataset.name``), the eval data it came from
    (``dataset.type``: the recipe's ``data.eval``, hub ids without ``hf:``) and the metrics
    (``type`` without ``@``, e.g. ``hit_at_1``; ``name`` as vlm2emb writes it).
    """
    source = "; ".join(s.removeprefix("hf:") for s in eval_sources) or "unknown"
    results = []
    for task, metrics in report.get("tasks", {}).items():
        results.append(
            {
                "task": {"type": "feature-extraction", "name": "Retrieval among candidates (vlm2emb eval)"},
                "dataset": {"type": source, "name": task},
                "metrics": [
                    {"type": c.replace("@", "_at_"), "value": round(float(metrics[c]), 4), "name": c}
                    for c in CARD_METRICS
                    if c in metrics
                ],
            }
        )
    return [{"name": name, "results": results}] if results else []


def _metrics_table(report: dict[str, Any]) -> list[str]:
    cols = [c for c in CARD_METRICS if c in report.get("average", {})]
    lines = ["| task | " + " | ".join(cols) + " | n |", "|---" * (len(cols) + 2) + "|"]
    for task, m in report.get("tasks", {}).items():
        lines.append(f"| {task} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + f" | {m.get('n', '')} |")
    avg = report.get("average", {})
    if avg:
        lines.append("| **average** | " + " | ".join(f"{avg[c]:.4f}" for c in cols) + " | |")
    return lines


def _instruction_cell(entry: dict[str, Any], side: str) -> str:
    """One side of a task's record: the instruction, or how many per-row ones and the top 3."""
    texts = entry.get(side) or [None]
    distinct = entry.get(f"{side}_distinct", len(texts))
    if distinct <= 1:
        return _quote(texts[0])
    return f"per row, {distinct} distinct; most used: " + ", ".join(_quote(t) for t in texts[:3])


def _instruction_lines(config: dict[str, Any]) -> list[str]:
    record = config.get("instructions")
    lines = ["", "## Instructions", ""]
    if record:
        lines += [
            "Embed with the instructions the model was trained with: the table lists them per "
            "training dataset (`instructions` in `vlm2emb_config.json`), and "
            '`encode_queries(..., task="NAME")` / `encode_targets(..., task="NAME")` apply them. '
            'An instruction is prepended to the item\'s text as `instruction + "\\n" + text`.',
            "",
            "| task | rows | query instruction | target instruction |",
            "|---|---|---|---|",
        ]
        for task, entry in record.items():
            lines.append(
                f"| {task} | {entry.get('rows', '')} | {_instruction_cell(entry, 'query')} | "
                f"{_instruction_cell(entry, 'target')} |"
            )
        lines.append("")
    else:
        lines += [
            "No per-task record of the training instructions (a model not trained by vlm2emb, or a "
            "streamed run).",
            "",
        ]
    lines.append(
        f"Defaults (without `task=`): query {_quote(config.get('query_instruction'))}, "
        f"target {_quote(config.get('target_instruction'))}."
    )
    return lines


def _usage_lines(config: dict[str, Any], mode: str, base: str) -> list[str]:
    lines = ["", "## Usage", "", "With vlm2emb:", "", "```python", "from vlm2emb import EmbeddingModel", ""]
    if mode == "adapter":
        lines.append(f'model = EmbeddingModel.from_pretrained("path/to/this/folder", base_model="{base}")')
    else:
        lines.append('model = EmbeddingModel.from_pretrained("path/to/this/folder")')
    record = config.get("instructions") or {}
    if config.get("dense_head", True) is False:
        record = {}  # no single vectors: only the token-vector lines below apply
    elif not record:
        lines += [
            'queries = model.encode_queries(["a handwritten digit seven"])  # [1, d]',
            'docs = model.encode_targets([{"image": "digit.png"}, "a caption"])  # [2, d]',
            "print(model.similarity(queries, docs))",
        ]
    for task, entry in list(record.items())[:_USAGE_TASKS]:
        args = []
        lines.append(
            f"# {task}: query instruction {_instruction_cell(entry, 'query')}, "
            f"target instruction {_instruction_cell(entry, 'target')}"
        )
        for side in ("query", "target"):
            if entry.get(f"{side}_distinct", 1) <= 1:
                args.append(f'task="{task}"')
            else:  # per-row instructions: the caller supplies each item's own
                args.append('instruction="..."')
                lines.append(f"# its {side} instructions varied per row in training: pass the one that fits")
        lines += [
            f'queries = model.encode_queries([{{"image": "query.png"}}, "a query text"], {args[0]})  # [2, d]',
            f'targets = model.encode_targets(["a candidate text", {{"image": "doc.png"}}], {args[1]})  # [2, d]',
            "print(model.similarity(queries, targets))",
        ]
    if len(record) > _USAGE_TASKS:
        lines.append(f"# ... and task= for the other {len(record) - _USAGE_TASKS} tasks of the table above")
    if config.get("multivector_dim"):
        lines += [
            "# token vectors of the multi-vector head, scored by MaxSim (late interaction):",
            "from vlm2emb.multivector import maxsim_lists",
            "",
            'query_sets = model.encode(["a query text"], output="multivector")  # [L_i, D] per item',
            'doc_sets = model.encode([{"image": "doc.png"}], output="multivector")',
            "print(maxsim_lists(query_sets, doc_sets))  # [1, 1]",
        ]
    lines.append("```")
    return lines


def _versions_lines(trainer_state: dict[str, Any]) -> list[str]:
    from vlm2emb.train.state import library_versions

    trained, now = trainer_state.get("versions") or {}, library_versions()
    lines = ["", "## Framework versions", "", "| package | trained with | exported with |", "|---|---|---|"]
    for name in dict.fromkeys([*trained, *now]):
        lines.append(f"| {name} | {trained.get(name, 'not recorded')} | {now.get(name, 'not installed')} |")
    return lines


def _summary_lines(summary: dict[str, Any]) -> list[str]:
    def num(value: Any, fmt: str) -> str:
        return format(value, fmt) if isinstance(value, (int, float)) else "not logged"

    epochs = f" ({summary['epochs']} epochs over the training rows)" if summary["epochs"] is not None else ""
    resumed = f", resumed {summary['resumes']} time(s)" if summary["resumes"] else ""
    return [
        "",
        "## Training summary",
        "",
        "From the run's `metrics.jsonl` (the last log window) and the checkpoint's `trainer_state.json`:",
        "",
        f"- Steps: {summary['steps']}{epochs}",
        f"- Final loss: {num(summary['final_loss'], '.4f')}, in-batch accuracy: "
        f"{num(summary['final_accuracy'], '.3f')}",
        f"- Training time: {num(summary['train_seconds'], '.1f')} s{resumed}",
    ]


def model_card(
    config: dict[str, Any],
    *,
    run_dir: Path | None,
    mode: str,
    format: str,
    dtype: str,
    license: str | None,
    verifications: list[Verification],
    eval_applies: bool = True,
    trainer_state: dict[str, Any] | None = None,
    name: str = "vlm2emb-model",
) -> str:
    """The export's README.md: hub metadata, instructions, data, training, results, usage.

    Args:
        config: The export's ``vlm2emb_config.json`` contents.
        run_dir: The training run's ``output_dir`` (recipe, metrics, eval), or None.
        mode: ``merged`` or ``adapter``.
        format: ``vlm2emb`` or ``sentence-transformers``.
        dtype: The written weights' dtype name.
        license: A hub license id; None writes ``unknown``.
        verifications: The export's reload checks.
        eval_applies: Whether ``eval.json`` scores these weights (``final/``).
        trainer_state: The checkpoint's ``trainer_state.json`` (step, versions).
        name: The model's name in ``model-index``.
    """
    import yaml

    trainer_state = trainer_state or {}
    recipe = None
    if run_dir is not None:
        recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    report = None
    if run_dir is not None and eval_applies and (run_dir / "eval.json").is_file():
        report = json.loads((run_dir / "eval.json").read_text())
    data = (recipe or {}).get("data", {})
    base = config.get("base_model") or "unknown"
    front: dict[str, Any] = {
        "library_name": "vlm2emb",
        "pipeline_tag": "feature-extraction",
        "base_model": base,
        "license": license or UNKNOWN_LICENSE,
        "tags": ["vlm2emb", "embeddings", "vision-language", "safetensors"],
    }
    if format in _ST_FORMATS:
        front["tags"].append("sentence-transformers")
    # The hub's datasets field holds hub ids: the hf: sources (local files are listed below).
    hub_sources = [s.removeprefix("hf:").split(":")[0] for s in data.get("train", []) if s.startswith("hf:")]
    if hub_sources:
        front["datasets"] = list(dict.fromkeys(hub_sources))
    if report is not None:
        front["model-index"] = model_index(report, name, list(data.get("eval", [])))
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", ""]
    lines += [
        f"# Embedding model exported by vlm2emb ({mode}, {dtype})",
        "",
        f"- **Base model:** `{base}` (family `{config.get('family')}`)",
        f"- **Export:** {'LoRA/DoRA adapter only' if mode == 'adapter' else 'merged weights'}, "
        f"{dtype} safetensors, format `{format}`",
        f"- **Pooling:** `{config.get('pooling')}`, normalised: {config.get('normalize')}, "
        f"attention: `{config.get('attention')}`",
        f"- **Query instruction:** {_quote(config.get('query_instruction'))} (default; per task below)",
        f"- **Target instruction:** {_quote(config.get('target_instruction'))} (default; per task below)",
        f"- **Training temperature:** {config.get('temperature')}",
    ]
    if config.get("matryoshka_dims"):
        lines.append(
            f"- **Matryoshka dimensions:** {config['matryoshka_dims']} (pass `truncate_dim=` to encode)"
        )
    lines += _instruction_lines(config)
    lines += ["", "## Training data", ""]
    if recipe is not None:
        train = recipe.get("train", {})
        lora = recipe.get("model", {}).get("lora")
        tuning = (
            "full fine-tuning"
            if not lora
            else ("DoRA" if lora.get("use_dora") else "LoRA")
            + (f" (r {lora.get('r')}, alpha {lora.get('alpha')})")
        )
        lines += [
            f"- Training sources: {', '.join(f'`{s}`' for s in data.get('train', [])) or 'none recorded'}",
            f"- Evaluation sources: {', '.join(f'`{s}`' for s in data.get('eval', [])) or 'none'}",
            f"- {train.get('max_steps')} steps at global batch {train.get('batch_size')}, learning rate "
            f"{train.get('learning_rate')}, {tuning}, precision {train.get('precision')}",
        ]
        lines += _summary_lines(training_summary(run_dir, trainer_state))
    else:
        lines.append("No training recipe was found next to the checkpoint.")
    lines += ["", "## Evaluation", ""]
    if report is not None:
        lines += ["Results of `vlm2emb train`'s final evaluation (`eval.json`):", "", *_metrics_table(report)]
    elif not eval_applies and run_dir is not None and (run_dir / "eval.json").is_file():
        lines.append(
            "This is an intermediate checkpoint; the run's `eval.json` scores `final/`, not these weights."
        )
    else:
        lines.append("No evaluation report (`eval.json`) was found next to the checkpoint.")
    lines += _usage_lines(config, mode, base)
    if format == "sentence-transformers":
        lines += [
            "",
            "With sentence-transformers (the prompts hold the instructions; a task's own ones are "
            'named after it, where its rows shared one: `prompt_name="TASK"` for queries, '
            '`"TASK-document"` for targets):',
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            'model = SentenceTransformer("path/to/this/folder")',
            'queries = model.encode_query(["a handwritten digit seven"])',
            'docs = model.encode_document(["a caption"])',
            "print(model.similarity(queries, docs))",
            "```",
        ]
    elif format == "sentence-transformers-multivector":
        lines += [
            "",
            "With sentence-transformers' `MultiVectorEncoder` (token vectors, late interaction; the "
            "prompts hold the instructions):",
            "",
            "```python",
            "from sentence_transformers import MultiVectorEncoder",
            "",
            'model = MultiVectorEncoder("path/to/this/folder")',
            'queries = model.encode_query(["a handwritten digit seven"])',
            'docs = model.encode_document(["a caption"])',
            "print(model.similarity(queries, docs))  # MaxSim",
            "```",
        ]
    elif mode == "merged":
        lines += [
            "",
            "The weights also load with plain transformers (`AutoModel.from_pretrained`); pool the last "
            "hidden state as stated above and prepend the task's instruction. See "
            "`examples/load_export.py` in the vlm2emb repository (`--task NAME` picks the instructions).",
        ]
    lines += [
        "",
        "## Verification",
        "",
        "Reloaded after writing and compared with the checkpoint on fixed probes:",
        "",
    ]
    for v in verifications:
        lines.append(
            f"- {v.loader}: {v.n_probes} probes, max |diff| {v.max_abs_diff:.2e}, min cosine "
            f"{v.min_cosine:.6f} (required: {v.rule})"
        )
    lines += _versions_lines(trainer_state)
    if recipe is not None:
        lines += ["", "## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).strip(), "```"]
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


def _quote(value: str | None) -> str:
    return f"`{value}`" if value else "none"
