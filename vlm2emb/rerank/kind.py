"""``model.kind: reranker``: the generative reranker trained by the embedder's trainer.

The trainer (:mod:`vlm2emb.train.loop`) brings processes (DDP, DeepSpeed ZeRO-2), the
seeded global batch plan, the schedule, checkpoints and exact resume, logging, trackers,
callbacks and the bad-row policy. This kind brings the reranker: it loads a
:class:`~vlm2emb.rerank.model.Reranker`, turns each global batch of rows into groups (the
positive and ``rerank.group_size - 1`` negatives, :func:`~vlm2emb.rerank.train.reranker_groups`)
and scores this process's groups; the loss is
:func:`~vlm2emb.rerank.loss.listwise_softmax_loss`.

Every process builds the groups of the whole global batch with a generator seeded by the
recipe's seed and the batch's content, so all processes (and a resumed run) draw the same
in-batch negatives; each then scores its own rows. A process's loss is the mean over its
rows and DDP averages the gradients, which is the gradient of the global batch's mean.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.checkpoint

from vlm2emb._typed_config import ConfigError
from vlm2emb.distributed import is_zero3_module
from vlm2emb.train.kinds.base import ModelKind, TrainingStep, refuse_non_default

# Recipe keys of the embedder that mean nothing to a reranker: set away from their
# defaults they are an error, so no setting is silently ignored.
_EMBEDDER_KEYS = (
    "model.pooling",
    "model.normalize",
    "model.attention",
    "model.prompt_style",
    "model.pack_sequences",
    "model.multivector_dim",
    "model.dense_head",
    "model.multivector_tokens",
    "data.query_instruction",
    "data.target_instruction",
    "train.loss",
    "train.loss_args",
    "train.temperature",
    "train.learnable_temperature",
    "train.max_logit_scale",
    "train.symmetric_loss",
    "train.matryoshka_dims",
    "train.matryoshka_weights",
    "train.gradcache_reuse_vision",
    "train.length_buckets",
    "train.remine_steps",
    "train.remine",
)
# Embedder keys with a reranker counterpart (the message says which).
_MOVED = {
    "data.query_instruction": "rerank.instruction",
    "train.temperature": "rerank.temperature",
}
_NOT_YET = ("data.streaming",)


@dataclass
class RerankBatch:
    """This process's part of a global batch of reranker groups.

    Attributes:
        chunks: The backbone inputs of the filled slots' (query, candidate) pairs, in pair
            order: one chunk, or chunks of ``train.gradcache_chunk_size`` pairs (each with the
            blank-image pair where it has no image, dropped by ``Reranker.forward``).
        where: [n] each pair's flat slot in ``mask``.
        mask: [q, G] bool, the filled slots of this process's q groups (column 0: positive).
    """

    chunks: list[dict[str, Any]]
    where: torch.Tensor
    mask: torch.Tensor

    def real_tokens(self) -> int:
        """Non-padding tokens over all chunks (for tokens/s)."""
        total = 0
        for chunk in self.chunks:
            mask = chunk.get("attention_mask")
            total += int(mask.sum()) if mask is not None else int(chunk["input_ids"].numel())
        return total


class RerankCollator:
    """Global batch of rows -> this process's :class:`RerankBatch` (media decoded here).

    Holds :attr:`Reranker.inputs` (processor and prompt settings), never the weights.

    Args:
        inputs: ``reranker.inputs`` (:class:`~vlm2emb.rerank.model.PairInputs`).
        group_size: Candidates per query.
        seed: With the batch's content, seeds the in-batch negatives.
        chunk_size: Pairs per forward chunk (0: all of this process's pairs in one).
        rank: This process's rank.
        world_size: Processes sharing the global batch.
        media: How media are decoded (pixel bounds, frames per video).
    """

    def __init__(
        self,
        inputs: Any,
        group_size: int,
        seed: int,
        *,
        chunk_size: int = 0,
        rank: int = 0,
        world_size: int = 1,
        media: Any = None,
    ) -> None:
        self.chunk_size = chunk_size
        self.inputs = inputs
        self.group_size = group_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.media = media

    def generator(self, rows: Sequence[Any]) -> np.random.Generator:
        """The in-batch negatives' generator of this global batch: a function of the seed and
        the rows' content only, so every process and a resumed run draw the same."""
        from vlm2emb.data.keys import content_keys

        keys = content_keys([row.query for row in rows] + [row.positive for row in rows]).tolist()
        return np.random.default_rng([self.seed, *(k & 0xFFFF_FFFF_FFFF_FFFF for k in keys)])

    def __call__(self, rows: Sequence[Any]) -> RerankBatch:
        from vlm2emb.data.media import decode_item
        from vlm2emb.rerank.train import group_pairs, reranker_groups

        if len(rows) % self.world_size:
            raise ValueError(
                f"a global batch of {len(rows)} rows does not split over {self.world_size} processes"
            )
        groups, mask = reranker_groups(rows, self.group_size, self.generator(rows))  # [B] lists, [B, G]
        b = len(rows) // self.world_size
        lo, hi = self.rank * b, (self.rank + 1) * b
        local_mask = mask[lo:hi]  # [b, G]
        pairs, instructions, where = group_pairs(rows[lo:hi], groups[lo:hi], local_mask)
        decoded: dict[int, dict[str, Any]] = {}  # a query repeated over its group decodes once

        def decode(item: Any) -> dict[str, Any]:
            if id(item) not in decoded:
                decoded[id(item)] = decode_item(item, self.media)
            return decoded[id(item)]

        size = self.chunk_size or len(pairs)
        try:
            decoded_pairs = [(decode(q), decode(c)) for q, c in pairs]
            chunks = [
                self.inputs(decoded_pairs[s : s + size], instructions[s : s + size])
                for s in range(0, len(pairs), size)
            ]
        except (OSError, ValueError) as exc:
            sources = ", ".join(row.source for row in rows[lo:hi][:3])
            raise ValueError(f"cannot build a batch from rows {sources}...: {exc}") from exc
        return RerankBatch(chunks=chunks, where=where, mask=local_mask)


class RerankStep(TrainingStep):
    """The listwise softmax loss of this process's groups.

    Plain: every chunk scored with a graph. GradCache (``gradcache``, Gao et al. 2021, as the
    embedder's :class:`~vlm2emb.gradcache.ContrastiveStep`): every chunk scored without a
    graph, the loss backpropagated to the [n] scores only, then each chunk scored again with
    a graph (its first pass's random state replayed, so dropout masks match) and
    backpropagated with its scores' cached gradient. The gradient is the plain step's; only
    one chunk's activations are alive at a time. Under DeepSpeed (``single_backward``) the
    second pass is one backward: every chunk is scored again under activation checkpointing
    (its random state replayed in the forward and in the recompute) and the scores' cached
    gradients are applied to all of them at once, since ZeRO expects one backward per step.

    Args:
        model: The reranker (DDP-wrapped, or bare).
        temperature: ``rerank.temperature``.
        gradcache: Cache the scores' gradients (``train.gradcache_chunk_size`` > 0).
        device: Where the random state to replay lives (CPU, plus the CUDA device if any).
        single_backward: With ``gradcache``, backpropagate all chunks in one backward.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        temperature: float,
        *,
        gradcache: bool = False,
        device: Any = None,
        single_backward: bool = False,
    ) -> None:
        self.model = model
        self.single_backward = single_backward
        self.temperature = temperature
        self.gradcache = gradcache
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.last_accuracy: torch.Tensor | None = None
        self._pending: tuple[list[dict[str, Any]], list[Any], torch.Tensor] | None = None

    def forward_loss(self, batch: RerankBatch, sync_context: Any = None) -> torch.Tensor:
        from vlm2emb.gradcache import RngState
        from vlm2emb.rerank.loss import listwise_softmax_loss
        from vlm2emb.rerank.train import scatter_scores

        self._pending = None
        if self.gradcache:
            states, parts = [], []
            with torch.no_grad():
                for chunk in batch.chunks:
                    states.append(RngState(self.device))
                    parts.append(self.model(chunk))  # [n_c]
            flat = torch.cat(parts).requires_grad_()  # [n] a leaf: the loss's graph ends here
            self._pending = (batch.chunks, states, flat)
        else:
            flat = torch.cat([self.model(chunk) for chunk in batch.chunks])  # [n] filled slots' scores
        scores = scatter_scores(flat, batch.where, batch.mask)  # [q, G]
        mask = batch.mask.to(scores.device)
        with torch.no_grad():  # the positive (column 0) ranked first in its group
            ranked = scores.detach().masked_fill(~mask, float("-inf")).argmax(dim=1)  # [q]
            self.last_accuracy = (ranked == 0).float().mean()
        return listwise_softmax_loss(scores, mask, self.temperature)

    def backward(self, loss: torch.Tensor, backward: Any, sync_context: Any = None) -> None:
        if self._pending is None:
            backward(loss, True)
            return
        chunks, states, flat = self._pending
        self._pending = None
        loss.backward()  # d loss / d scores only: no weight is in this graph
        grads = flat.grad.split(_scored_pairs(chunks))  # per chunk [n_c]
        if self.single_backward:
            # The engine's module (its hooks gather ZeRO-3 partitions for the recompute too).
            module = getattr(self.model, "module", self.model)

            def scored(chunk: dict[str, Any], state: Any) -> torch.Tensor:
                with state.replay():
                    return module(chunk)  # [n_c]

            surrogate = sum(
                (torch.utils.checkpoint.checkpoint(scored, c, s, use_reentrant=False, preserve_rng_state=False)
                 * g.to(self.device)).sum()
                for c, s, g in zip(chunks, states, grads)
            )  # fmt: skip
            backward(surrogate, True)
            return
        for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads)):
            last = i == len(chunks) - 1
            # DDP reduces once, with the last chunk's backward; no_sync must cover the forward too.
            with sync_context(last) if sync_context is not None else contextlib.nullcontext():
                with state.replay():
                    part = self.model(chunk)  # [n_c], with a graph this time
                backward((part * grad.to(part.device)).sum(), last)

    def discard(self) -> None:
        self._pending = None


def _scored_pairs(chunks: list[dict[str, Any]]) -> list[int]:
    """The number of scored pairs of each chunk: its rows less the blank-image pair."""
    from vlm2emb.inputs import DUMMY_ROWS

    return [len(c["input_ids"]) - int(c.get(DUMMY_ROWS, 0)) for c in chunks]


class RerankerKind(ModelKind):
    """``model.kind: reranker`` (docs/rerank.md, "Training with the main trainer")."""

    name = "reranker"

    def check_recipe(self, cfg: Any) -> None:
        from vlm2emb.rerank.model import RerankerConfig

        for key in _EMBEDDER_KEYS:
            moved = f"; use {_MOVED[key]}" if key in _MOVED else ""
            refuse_non_default(
                cfg, [key], f"is an embedder setting; model.kind: reranker does not use it{moved}"
            )
        refuse_non_default(cfg, _NOT_YET, "is not available for model.kind: reranker yet (docs/rerank.md)")
        rr = cfg.rerank
        if rr.group_size < 2:
            raise ConfigError(
                f"rerank.group_size: must be at least 2 (a positive and a negative), got {rr.group_size}"
            )
        if not (np.isfinite(rr.temperature) and rr.temperature > 0):
            raise ConfigError(f"rerank.temperature: must be a positive number, got {rr.temperature}")
        prompt = {k: getattr(rr, k) for k in ("template", "instruction", "yes_token", "no_token")}
        try:  # the prompt settings' own checks, before any data or model loads
            RerankerConfig(family="-", **{k: v for k, v in prompt.items() if v is not None}).validate()
        except ValueError as exc:
            raise ConfigError(f"rerank.{exc}") from None

    def prepare_rows(self, trainer: Any) -> None:
        # Any row can be learnt from (a row without negatives gets in-batch ones).
        trainer.loss_fn = None  # the step holds the objective (RerankStep)

    def load_model(self, trainer: Any, name_or_path: str) -> torch.nn.Module:
        from vlm2emb.rerank.model import Reranker

        cfg = trainer.cfg
        rr = cfg.rerank
        model = Reranker.from_pretrained(
            name_or_path,
            template=rr.template,
            instruction=rr.instruction,
            yes_token=rr.yes_token,
            no_token=rr.no_token,
            padding_side=cfg.model.padding_side,
            torch_dtype=cfg.model.dtype,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            merge_lora=cfg.model.lora is None,  # a saved adapter keeps training as an adapter
            seed=cfg.seed,
        )
        model.config.base_model = cfg.model.name_or_path  # not the shared tiny-backbone copy
        # The blank-image pair on every image-free batch, on one process too: several processes
        # need it (DDP waits for every trainable parameter's gradient), and with it a vision
        # tower gets a zero gradient (AdamW moves it by its momentum) on any number of
        # processes, so one process computes what several do.
        model.inputs.always_run_vision = True
        if cfg.model.freeze_vision:
            tower = model.adapter.vision_tower(model.backbone)
            if tower is None:
                raise ValueError(f"model.freeze_vision: backbone {model.config.family!r} has no vision tower")
            tower.requires_grad_(False)
        if cfg.model.lora is not None and not model.has_lora:
            lora = cfg.model.lora
            model.apply_lora(
                lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_dora, seed=cfg.seed
            )
        if cfg.model.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        return model.to(trainer.accelerator.device)

    def preflight_prepare(self, model: Any) -> Callable[[list[dict[str, Any]], list[str | None]], Any]:
        def prepare(items: list[dict[str, Any]], instructions: list[str | None]) -> Any:
            # Each item as the query of a pair: its media decoded, placed in the prompt and
            # run through the processor, as in a training pair.
            return model.inputs([(item, "") for item in items], instructions)

        return prepare

    def collator(self, trainer: Any, model: Any) -> Callable[[Sequence[Any]], RerankBatch]:
        cfg, acc = trainer.cfg, trainer.accelerator
        return RerankCollator(
            model.inputs,
            cfg.rerank.group_size,
            cfg.seed,
            chunk_size=cfg.train.gradcache_chunk_size,
            rank=acc.process_index,
            world_size=acc.num_processes,
            media=trainer.media,
        )

    def training_step(self, trainer: Any, model: torch.nn.Module, *, probe: bool = False) -> RerankStep:
        # A probe (which weights a step reaches) needs the plain step's graph to the weights.
        gradcache = trainer.cfg.train.gradcache_chunk_size > 0 and not probe
        return RerankStep(
            model,
            trainer.cfg.rerank.temperature,
            gradcache=gradcache,
            device=trainer.accelerator.device,
            # ZeRO's bookkeeping wants one backward per step; the per-chunk form has several.
            single_backward=trainer.deepspeed,
        )

    def evaluate(self, trainer: Any, model: Any, examples: list[Any]) -> dict[str, Any]:
        from vlm2emb.rerank.evaluate import evaluate_reranker

        # The row's own instruction, else the model's (rerank.instruction), as in training.
        rows = [ex.as_row() for ex in examples]
        return evaluate_reranker(model, rows, batch_size=trainer.cfg.train.eval_batch_size)

    def save_model(self, model: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        # The gathered weights only where the live ones are ZeRO-3 partitions: elsewhere the
        # module saves itself, and transformers sees its tied head (a gathered copy no longer
        # shares storage, so the tied head would be written twice). A LoRA run keeps its
        # adapter unmerged in adapter/, as train_reranker does.
        model.save_pretrained(directory, state_dict=state_dict if is_zero3_module(model) else None)


KIND = RerankerKind()
