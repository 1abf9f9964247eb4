"""``model.kind: embedder`` (the default): an EmbeddingModel trained with a contrastive loss
from the :mod:`vlm2emb.losses` registry, GradCache optional."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from vlm2emb._typed_config import ConfigError
from vlm2emb.train.kinds.base import ModelKind, refuse_non_default, section_keys


class EmbedderKind(ModelKind):
    """The embedder: everything the trainer did before kinds existed, moved here unchanged."""

    name = "embedder"

    def check_recipe(self, cfg: Any) -> None:
        refuse_non_default(
            cfg,
            section_keys(cfg.rerank, "rerank"),
            "is a reranker setting; set model.kind: reranker to use it",
        )

    def prepare_rows(self, trainer: Any) -> None:
        from vlm2emb.losses import build_loss

        cfg = trainer.cfg
        # The objective holds no weights: it can refuse rows it cannot learn from before the
        # model loads.
        trainer.loss_fn = build_loss(cfg.train, normalize=cfg.model.normalize)
        try:
            trainer.loss_fn.check_examples(trainer.train_examples)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def load_model(self, trainer: Any, name_or_path: str) -> torch.nn.Module:
        from vlm2emb.model import EmbeddingModel

        cfg = trainer.cfg
        model = EmbeddingModel.from_pretrained(
            name_or_path,
            pooling=cfg.model.pooling,
            normalize=cfg.model.normalize,
            attention=cfg.model.attention,
            padding_side=cfg.model.padding_side,
            prompt_style=cfg.model.prompt_style,
            pack_sequences=cfg.model.pack_sequences,
            torch_dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            seed=cfg.seed,
            # What the recipe records with the model, set once at load time.
            config_overrides={
                "base_model": cfg.model.name_or_path,
                "query_instruction": cfg.data.query_instruction,
                "target_instruction": cfg.data.target_instruction,
                "temperature": cfg.train.temperature,
                "matryoshka_dims": list(cfg.train.matryoshka_dims) or None,
                "instructions": _instruction_record(trainer),
                # Only when the recipe asks: a saved model's own head setting stays otherwise.
                **(
                    {
                        "multivector_dim": cfg.model.multivector_dim,
                        "dense_head": cfg.model.dense_head,
                        "multivector_tokens": cfg.model.multivector_tokens,
                    }
                    if cfg.model.multivector_dim is not None
                    else {}
                ),
            },
        )
        if cfg.model.freeze_vision:
            tower = model.adapter.vision_tower(model.backbone)
            if tower is None:
                raise ValueError(f"model.freeze_vision: backbone {model.config.family!r} has no vision tower")
            tower.requires_grad_(False)
        if cfg.model.lora is not None:
            lora = cfg.model.lora
            model.apply_lora(
                r=lora.r,
                alpha=lora.alpha,
                dropout=lora.dropout,
                target_modules=lora.target_modules,
                use_dora=lora.use_dora,
                # The adapter's init then depends on the seed alone, not on what drew
                # random numbers before it (how and where the backbone was loaded).
                seed=cfg.seed,
            )
        if cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        if cfg.train.learnable_temperature:
            model.enable_learnable_temperature(cfg.train.temperature, cfg.train.max_logit_scale)
        return model.to(trainer.accelerator.device)

    def preflight_prepare(self, model: Any) -> Callable[[list[dict[str, Any]], list[str | None]], Any]:
        return model.collate

    def collator(self, trainer: Any, model: Any) -> Callable[[Sequence[Any]], Any]:
        from vlm2emb.data.collate import ContrastiveCollator

        cfg, acc = trainer.cfg, trainer.accelerator
        return ContrastiveCollator(
            model.inputs,
            query_instruction=cfg.data.query_instruction,
            target_instruction=cfg.data.target_instruction,
            rank=acc.process_index,
            world_size=acc.num_processes,
            chunk_size=cfg.train.gradcache_chunk_size,
            length_buckets=cfg.train.length_buckets,
            media=trainer.media,
        )

    def training_step(self, trainer: Any, model: Any, *, probe: bool = False) -> Any:
        from vlm2emb.gradcache import ContrastiveStep

        cfg = trainer.cfg
        inner = trainer.accelerator.unwrap_model(model)
        if trainer.loss_fn.takes_multivector and inner.multivector_head is None:
            raise ValueError(
                f"train.loss {cfg.train.loss!r} needs a multi-vector head: set model.multivector_dim (e.g. 128)"
            )
        # A probe (which parameters a step reaches) needs the plain step's graph to the weights.
        return ContrastiveStep(
            model,
            trainer.loss_fn,
            gradcache=cfg.train.gradcache_chunk_size > 0 and not probe,
            device=trainer.accelerator.device,
            single_backward=trainer.deepspeed,
            reuse_frozen_vision=cfg.train.gradcache_reuse_vision,
        )

    def evaluate(self, trainer: Any, model: Any, examples: list[Any]) -> dict[str, Any]:
        from vlm2emb.eval import evaluate

        cfg = trainer.cfg
        # Same prompts as training: rows without their own instruction get the recipe's default.
        rows = [ex.as_row(default_instruction=cfg.data.query_instruction) for ex in examples]
        # A model with only a multi-vector head (dense_head: false) is scored by MaxSim.
        scoring = "cosine" if model.config.dense_head else "maxsim"
        return evaluate(
            model,
            rows,
            batch_size=cfg.train.eval_batch_size,
            target_instruction=cfg.data.target_instruction,
            scoring=scoring,
        )

    def save_model(self, model: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        model.save_pretrained(directory, state_dict=state_dict)


def _instruction_record(trainer: Any) -> dict[str, dict[str, Any]] | None:
    """Per task, the instructions the training rows are embedded with (None when streaming:
    the rows are not read ahead). Rows preflight later drops are still counted."""
    from vlm2emb.items import instruction_record, resolve_instruction

    data = trainer.cfg.data
    if data.streaming:
        return None
    return instruction_record(
        (
            ex.dataset,
            resolve_instruction(ex.instruction, data.query_instruction),
            resolve_instruction(ex.target_instruction, data.target_instruction),
        )
        for ex in trainer.train_examples
    )


KIND = EmbedderKind()
