"""The contrastive training loop (accelerate), checkpoints and the final evaluation.

Outputs under ``output_dir``:
    recipe.yaml            the resolved recipe (every key, defaults included)
    metrics.jsonl          one JSON record per log step and per evaluation
    checkpoints/step-N/    EmbeddingModel directories every ``train.save_steps``
    final/                 the trained EmbeddingModel
    eval_before.json       the untrained model's report (when data.eval and eval_before)
    eval.json              the trained model's report (when data.eval is set)
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from vlm2emb.train.config import RecipeConfig, recipe_to_dict


def _lr_lambda(cfg: RecipeConfig):
    total = cfg.train.max_steps
    warmup = round(cfg.train.warmup_ratio * total)
    kind = cfg.train.lr_scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def make_accelerator(cfg: RecipeConfig) -> Any:
    """Builds the accelerate ``Accelerator`` for this recipe's precision.

    Without CUDA accelerate must be told to use the CPU explicitly, otherwise it may pick
    an unusable backend.
    """
    from accelerate import Accelerator

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    return Accelerator(mixed_precision=precision, cpu=not torch.cuda.is_available())


def _save_atomic(model: Any, target: Path, extra: dict[str, Any] | None = None) -> None:
    """Writes an EmbeddingModel directory under a temporary name, then renames it.

    A run killed while saving leaves a ``.tmp-*`` folder, never a half-written checkpoint
    under the real name.
    """
    tmp = target.parent / f".tmp-{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    if extra is not None:
        (tmp / "trainer_state.json").write_text(json.dumps(extra, indent=2) + "\n")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _count_tokens(batch: dict[str, Any]) -> int:
    total = 0
    for key in ("query", "positive", "negatives"):
        part = batch.get(key)
        if part is not None:
            total += int(part["attention_mask"].sum())
    return total


def _evaluate(model: Any, examples: list[Any], cfg: RecipeConfig) -> dict[str, Any]:
    from vlm2emb.eval import evaluate

    # Same prompts as training: rows without their own instruction get the recipe's default.
    rows = [ex.as_row(default_instruction=cfg.data.query_instruction) for ex in examples]
    return evaluate(
        model,
        rows,
        batch_size=cfg.train.eval_batch_size,
        target_instruction=cfg.data.target_instruction,
    )


def train(cfg: RecipeConfig, *, progress: bool = True) -> dict[str, Any]:
    """Runs a whole recipe: load data and model, train, save, evaluate.

    Args:
        cfg: The validated recipe.
        progress: Show a tqdm progress bar.

    Returns:
        A summary: ``{"output_dir", "steps", "final_loss", "eval_before", "eval"}``.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from vlm2emb.data.collate import ContrastiveCollator, GlobalBatchSampler
    from vlm2emb.data.schema import load_eval_examples, load_train_examples
    from vlm2emb.eval import format_report
    from vlm2emb.losses import InfoNCELoss
    from vlm2emb.model import EmbeddingModel

    accelerator = make_accelerator(cfg)
    if accelerator.num_processes > 1:
        # The loss would only see this process's slice as negatives: refuse rather than
        # silently train a different objective. Cross-device negatives and GradCache come
        # with the scale-out work (docs/index.md, status).
        raise ValueError(
            f"multi-process training ({accelerator.num_processes} processes) is not supported yet; "
            "launch a single process"
        )
    is_main = accelerator.is_main_process
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if is_main:
        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe_to_dict(cfg), sort_keys=False))
    set_seed(cfg.seed)

    # Data first: a bad row should stop the run before a large model is loaded.
    train_examples = load_train_examples(
        cfg.data.train,
        media_root=cfg.data.media_root,
        verify_images=cfg.data.verify_images,
        max_negatives=cfg.data.max_negatives,
        work_dir=out,
    )
    eval_examples = (
        load_eval_examples(
            cfg.data.eval, media_root=cfg.data.media_root, verify_images=cfg.data.verify_images, work_dir=out
        )
        if cfg.data.eval
        else []
    )
    sampler = GlobalBatchSampler(
        len(train_examples),
        cfg.train.batch_size,
        cfg.seed,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
    )

    model = EmbeddingModel.from_pretrained(
        cfg.model.name_or_path,
        pooling=cfg.model.pooling,
        normalize=cfg.model.normalize,
        attention=cfg.model.attention,
        padding_side=cfg.model.padding_side,
        torch_dtype=cfg.model.dtype,
        attn_implementation=cfg.model.attn_implementation,
        trust_remote_code=cfg.model.trust_remote_code,
        seed=cfg.seed,
    )
    model.config.query_instruction = cfg.data.query_instruction
    model.config.target_instruction = cfg.data.target_instruction
    model.config.temperature = cfg.train.temperature
    if cfg.model.lora is not None:
        lora = cfg.model.lora
        model.apply_lora(
            r=lora.r,
            alpha=lora.alpha,
            dropout=lora.dropout,
            target_modules=lora.target_modules,
            use_dora=lora.use_dora,
        )
    if cfg.model.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.model.lora is not None:
            # Frozen embeddings would give checkpointed blocks inputs without grad.
            model.backbone.enable_input_require_grads()
    model.to(accelerator.device)

    report_before = None
    if eval_examples and cfg.train.eval_before:
        report_before = _evaluate(model, eval_examples, cfg)
        if is_main:
            (out / "eval_before.json").write_text(json.dumps(report_before, indent=2) + "\n")
            print("Before training:\n" + format_report(report_before), flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    loss_fn = InfoNCELoss(temperature=cfg.train.temperature, symmetric=cfg.train.symmetric_loss)
    collator = ContrastiveCollator(
        model, query_instruction=cfg.data.query_instruction, target_instruction=cfg.data.target_instruction
    )
    loader = torch.utils.data.DataLoader(
        train_examples,
        batch_sampler=sampler,
        collate_fn=collator,
        num_workers=cfg.data.num_workers,
    )
    prepared, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if is_main:
        print(
            f"Training {cfg.model.name_or_path}: {n_trainable:,} of {n_total:,} parameters trainable, "
            f"{len(train_examples)} rows, batch {cfg.train.batch_size}, {cfg.train.max_steps} steps",
            flush=True,
        )

    # A new run starts a new log: appending would mix two runs' curves in one file.
    metrics_file = (out / "metrics.jsonl").open("w") if is_main else None
    bar = tqdm(
        total=cfg.train.max_steps, desc="train", disable=not (progress and is_main), dynamic_ncols=True
    )
    prepared.train()
    start = time.perf_counter()
    window_start, window_samples, window_tokens = start, 0, 0
    running = torch.zeros((), device=accelerator.device)  # summed on device: no per-step host sync
    running_n = 0
    last_loss = float("nan")
    data_iter = iter(loader)
    for step in range(1, cfg.train.max_steps + 1):
        batch = next(data_iter)
        window_samples += len(batch["positive_keys"])
        window_tokens += _count_tokens(batch)
        with accelerator.autocast():
            q = prepared(batch["query"])  # [B, d]
            p = prepared(batch["positive"])  # [B, d]
            negs = None
            if batch["negatives"] is not None:
                flat = prepared(batch["negatives"])  # [N_real, d]
                mask = batch["negative_mask"].to(flat.device)  # [B, K]
                negs = flat.new_zeros(*mask.shape, flat.shape[-1])  # [B, K, d]
                negs[mask] = flat
            loss = loss_fn(
                q,
                p,
                negs,
                positive_keys=batch["positive_keys"].to(q.device),
                negative_keys=batch["negative_keys"].to(q.device) if negs is not None else None,
                negative_mask=mask if negs is not None else None,
            )
        accelerator.backward(loss)
        if cfg.train.max_grad_norm > 0:
            accelerator.clip_grad_norm_(params, cfg.train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        running += loss.detach()
        running_n += 1
        bar.update(1)

        if step % cfg.train.log_steps == 0 or step == cfg.train.max_steps:
            now = time.perf_counter()
            last_loss = float(running) / running_n  # the one host sync per log window
            record = {
                "step": step,
                "loss": round(last_loss, 6),
                "lr": scheduler.get_last_lr()[0],
                "samples_per_s": round(window_samples * accelerator.num_processes / (now - window_start), 3),
                "tokens_per_s": round(window_tokens * accelerator.num_processes / (now - window_start), 1),
                "elapsed_s": round(now - start, 2),
            }
            bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=record["samples_per_s"])
            if metrics_file is not None:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            running.zero_()
            running_n = 0
            window_start, window_samples, window_tokens = now, 0, 0

        if cfg.train.save_steps and step % cfg.train.save_steps == 0 and step < cfg.train.max_steps:
            accelerator.wait_for_everyone()
            if is_main:
                ckpt_dir = out / "checkpoints"
                ckpt_dir.mkdir(exist_ok=True)
                _save_atomic(accelerator.unwrap_model(prepared), ckpt_dir / f"step-{step}", {"step": step})
    bar.close()
    train_seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    final_model = accelerator.unwrap_model(prepared)
    if is_main:
        _save_atomic(final_model, out / "final", {"step": cfg.train.max_steps})
        print(
            f"Trained {cfg.train.max_steps} steps in {train_seconds:.1f}s; saved {out / 'final'}", flush=True
        )

    report_after = None
    if eval_examples:
        report_after = _evaluate(final_model, eval_examples, cfg)
        if is_main:
            (out / "eval.json").write_text(json.dumps(report_after, indent=2) + "\n")
            if metrics_file is not None:
                metrics_file.write(
                    json.dumps({"step": cfg.train.max_steps, "eval": report_after["average"]}) + "\n"
                )
            print("After training:\n" + format_report(report_after), flush=True)
            if report_before is not None:
                print(_before_after(report_before, report_after), flush=True)
    if metrics_file is not None:
        metrics_file.close()
    return {
        "output_dir": str(out),
        "steps": cfg.train.max_steps,
        "final_loss": last_loss,
        "train_seconds": train_seconds,
        "eval_before": report_before,
        "eval": report_after,
    }


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = ["hit@1 before -> after:"]
    for task, metrics in after["tasks"].items():
        prev = before["tasks"].get(task, {}).get("hit@1", float("nan"))
        lines.append(f"  {task:<24} {prev:.3f} -> {metrics['hit@1']:.3f}")
    return "\n".join(lines)
