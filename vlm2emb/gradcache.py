"""One contrastive training step, plain or with GradCache (cached embedding gradients).

GradCache (Gao et al. 2021) decouples the contrastive batch size from activation memory:

1. embed every chunk of queries, positives and negatives without building a graph;
2. compute the loss on the whole (gathered) batch from those embeddings, treated as leaf
   tensors, and backpropagate it to the embeddings only: this yields d loss / d embedding;
3. re-embed each chunk with a graph and backpropagate ``sum(embedding * cached_grad)``,
   which by the chain rule adds exactly that chunk's share of d loss / d parameters.

Only one chunk's activations are alive at a time. The re-forward replays the RNG state of
the first forward, so dropout masks match and the gradients equal the plain step's.

One chunk is embedded with a graph in step 1 already and kept: it is backpropagated first
in step 3 and never re-run. That is one chunk's activations, the same peak as any
re-forward, and it saves that chunk's forward: with n equal chunks a step costs
``3 + (n - 1) / n`` forward-equivalents against the plain step's 3 (a backward costs about
two forwards), i.e. 1.25x at four chunks, instead of 4/3. Chunks are not equal in practice
(an image chunk costs far more than a caption chunk), so the kept one is the most expensive
by :func:`chunk_cost`. It is embedded in its place, so that every chunk draws the same random
numbers as in the plain step; the no-grad forwards after it keep no activations, so its
graph plus one layer's transient activations is the peak.

Step 3 comes in two forms:

- per-chunk backward (single process, DDP): the kept chunk is backpropagated, then each
  other chunk is re-embedded and backpropagated on its own; DDP skips gradient
  synchronisation for all but the last backward (``sync_context``; the kept chunk's
  forward runs under it too, because DDP arms its gradient reduction at forward time).
- one backward (DeepSpeed): ZeRO's gradient bookkeeping expects one backward per optimizer
  step, so all chunks are re-embedded in one forward call under activation checkpointing
  (``torch.utils.checkpoint``: nothing but the chunk inputs is kept) and one backward of
  the summed surrogate recomputes them one at a time. Same gradients and memory profile,
  at the price of one more forward (about 5/3 of a plain step).

A frozen vision tower (LoRA on the language model, or ``model.freeze_vision``) is not run
again: its first-pass outputs are kept per chunk (:class:`FrozenVisionCache`) and served to
the re-forward, whose graph starts at them, exactly as the plain step's graph does (no
gradient flows into a frozen tower). The tower of a VLM can be half of an image chunk's
forward, so this removes most of GradCache's extra cost on image chunks. It is exact only
if the tower draws no random numbers; the cache checks that on every call (the random
state before and after) and lets the tower run again where it did.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vlm2emb.items import ContrastiveBatch
from vlm2emb.losses.base import ContrastiveLoss
from vlm2emb.rows import as_leaf, cat_rows, dense_part, grad_dot, grouped, take_rows

BackwardFn = Callable[[torch.Tensor, bool], None]
SyncContext = Callable[[bool], contextlib.AbstractContextManager[Any]]


class RngState:
    """The CPU (and current CUDA device) random state at one moment, for replay."""

    def __init__(self, device: torch.device) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda_device = device if device.type == "cuda" else None
        self.cuda = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        """Runs the block with the captured state; the state outside is left untouched."""
        devices = [self.cuda_device] if self.cuda_device is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.cuda_device)
            yield

    def same_as(self, other: RngState) -> bool:
        """Whether no random number was drawn between ``other`` and this snapshot."""
        if not torch.equal(self.cpu, other.cpu):
            return False
        return self.cuda is None or other.cuda is None or torch.equal(self.cuda, other.cuda)


def _signature(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """The shapes of a call's tensor arguments: replaying an output for another call is a bug."""
    items = [*enumerate(args), *sorted(kwargs.items())]
    return tuple((k, tuple(v.shape)) for k, v in items if isinstance(v, torch.Tensor))


def _embedding_model(model: nn.Module) -> nn.Module | None:
    """The EmbeddingModel inside DDP / DeepSpeed wrappers (None if there is none)."""
    # Unwrap first: DeepSpeed's engine forwards unknown attributes to its module, so it
    # "has" an adapter too, but its ``config`` is DeepSpeed's.
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model if hasattr(model, "adapter") else None


def _shallow_copy(output: Any) -> Any:
    """A new container holding the same tensors (a tensor itself is returned as is)."""
    return output if isinstance(output, torch.Tensor) else copy.copy(output)


def frozen_vision_tower(model: nn.Module) -> nn.Module | None:
    """The vision tower of ``model`` (an EmbeddingModel, possibly DDP- or DeepSpeed-wrapped)
    if it has one and none of its parameters trains; else None."""
    inner = _embedding_model(model)
    tower = inner.adapter.vision_tower(inner.backbone) if inner is not None else None
    if tower is None or any(p.requires_grad for p in tower.parameters()):
        return None
    return tower


class FrozenVisionCache:
    """Outputs of a frozen vision tower in GradCache's first pass, served to its re-forward.

    ``recording(key)`` wraps the first-pass forward of chunk ``key`` and keeps every output
    of the tower (in call order, with the shapes of the call's tensors) if no call drew a
    random number. ``serving(key)`` replaces the tower's ``forward`` with one that returns
    those outputs in the same order; where nothing was kept the tower runs as usual. Outputs
    are shallow-copied on the way in and out, because transformers' callers rebind fields
    of the output object (Qwen2-VL splits ``pooler_output`` per image in place).

    Memory: the kept outputs of every chunk of the local batch live until the step's
    backward ends, trimmed to what the backbone reads (for Qwen2-VL the merged image
    tokens: 0.8 MB per 448x448 image in bf16 at the 2B size).

    Args:
        tower: The vision module (all parameters frozen).
        device: Where the random state to check lives (CPU, plus the CUDA device if any).
        trim: Drops the parts of a (copied) output that the backbone does not read
            (``BackboneAdapter.trim_vision_output``); None keeps all.
    """

    def __init__(
        self, tower: nn.Module, device: torch.device, trim: Callable[[Any], Any] | None = None
    ) -> None:
        self.tower = tower
        self.device = device
        self.trim = trim or (lambda output: output)
        self.outputs: dict[int, list[tuple[tuple[Any, ...], Any]]] = {}

    @classmethod
    def for_model(cls, model: nn.Module, device: torch.device) -> FrozenVisionCache | None:
        """A cache for ``model``'s vision tower if it is frozen, trimmed by its adapter."""
        inner = _embedding_model(model)
        tower = frozen_vision_tower(inner) if inner is not None else None
        if tower is None:
            return None
        config = inner.backbone.config
        return cls(tower, device, lambda output: inner.adapter.trim_vision_output(output, config))

    @contextlib.contextmanager
    def recording(self, key: int) -> Iterator[None]:
        """Keeps the tower's outputs during the block (chunk ``key``'s first-pass forward)."""
        calls: list[tuple[tuple[Any, ...], Any]] = []
        before: list[RngState] = []
        deterministic = True

        def pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
            before.append(RngState(self.device))

        def post(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            nonlocal deterministic
            deterministic = deterministic and RngState(self.device).same_as(before.pop())
            calls.append((_signature(args, kwargs), self.trim(_shallow_copy(output))))

        handles = [
            self.tower.register_forward_pre_hook(pre),
            self.tower.register_forward_hook(post, with_kwargs=True),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
        if calls and deterministic:
            self.outputs[key] = calls

    @contextlib.contextmanager
    def serving(self, key: int) -> Iterator[None]:
        """Makes the tower return chunk ``key``'s kept outputs during the block (if any)."""
        calls = self.outputs.get(key)
        if calls is None:
            yield
            return
        tower, pending = self.tower, iter(calls)
        patched_before = "forward" in tower.__dict__  # e.g. an accelerate device-map hook
        previous = tower.__dict__.get("forward")

        def forward(*args: Any, **kwargs: Any) -> Any:
            signature, output = next(pending, (None, None))
            if signature != _signature(args, kwargs):
                raise RuntimeError(
                    f"GradCache re-forward called the frozen vision tower differently from the "
                    f"first pass (chunk {key}): {_signature(args, kwargs)} vs {signature}"
                )
            return _shallow_copy(output)

        tower.forward = forward
        try:
            yield
        finally:
            if patched_before:
                tower.forward = previous
            else:
                del tower.forward


class ChunkReplay:
    """What GradCache's re-forward of one chunk reproduces from the first pass: the random
    state, and the frozen vision tower's outputs if they were kept.

    ``random_state()`` wraps the re-forward; ``call(fn, x)`` runs ``fn(x)`` with the kept
    outputs served, so that under activation checkpointing both the forward and its
    recomputation in the backward get them.
    """

    def __init__(self, rng: RngState, vision: FrozenVisionCache | None = None, key: int = 0) -> None:
        self.rng, self.vision, self.key = rng, vision, key

    def random_state(self) -> contextlib.AbstractContextManager[None]:
        return self.rng.replay()

    def frozen_outputs(self) -> contextlib.AbstractContextManager[None]:
        return self.vision.serving(self.key) if self.vision is not None else contextlib.nullcontext()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self.frozen_outputs():
            return fn(*args)

    def replayed(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``call`` under the captured random state (the state outside is left untouched)."""
        with self.random_state():
            return self.call(fn, *args)


def _in_row_order(emb: Any, order: torch.Tensor | None) -> Any:
    """Embeddings [b, ...] in chunk order -> row order (``order[j]`` = row of position j).

    ``emb`` is what the model's forward returns: a [b, d] tensor, or per-token embeddings
    (:mod:`vlm2emb.rows` holds the operations both support).
    """
    if order is None:
        return emb
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    return take_rows(emb, inverse)


def chunk_cost(chunk: dict[str, Any]) -> int:
    """A work proxy for one collated chunk: the elements of its input tensors.

    Image patches (``pixel_values``) dominate, then padded tokens; it only has to rank
    chunks, to pick the one GradCache keeps instead of re-running.
    """
    return sum(v.numel() for v in chunk.values() if isinstance(v, torch.Tensor))


def _no_context(_sync: bool) -> contextlib.AbstractContextManager[Any]:
    return contextlib.nullcontext()


def _scatter_negatives(flat: Any, local_mask: torch.Tensor | None, padded: bool) -> Any:
    """Negatives in row order -> [b, K, ...] (:func:`vlm2emb.rows.grouped`).

    ``flat`` holds either only the real negatives ([n_real, ...], placed by ``local_mask``
    [b, K]) or, when ``padded``, all b * K slots ([b * K, ...]).
    """
    if local_mask is None:
        return None
    b, k = local_mask.shape
    if flat is None:  # this process's rows have no real negatives, other processes' do
        return torch.zeros(b, k, 1)  # never read: all masked, only the shape matters
    return grouped(flat, local_mask, padded)


@torch.no_grad()
def in_batch_accuracy(
    query: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor | None, batch: ContrastiveBatch
) -> torch.Tensor:
    """Fraction of this process's queries whose own positive scores highest.

    The candidates are the global batch's positives (gathered from every process) and the
    query's own hard negatives: what the contrastive loss asks the query to rank first. A
    positive with the same content as the query's own (same false-negative key) counts as a
    hit. Independent of the loss, the temperature and Matryoshka prefixes (full embeddings).

    Args:
        query: [b, d] this process's query embeddings, in row order.
        positive: [b, d] this process's positive embeddings, in row order.
        negatives: [b, K, d] this process's hard negatives, or None.
        batch: The batch (``positive_keys`` of the global batch, ``local_negative_mask``).

    Returns:
        A [] float tensor on the embeddings' device.
    """
    from vlm2emb.distributed import gather_with_grad, rank_and_world

    q, p = query.detach().float(), positive.detach().float()
    all_pos = gather_with_grad(p)  # [B, d]; a collective: every process calls it each step
    rank, _ = rank_and_world()
    b = q.shape[0]
    keys = batch.positive_keys.to(q.device)  # [B]
    own_keys = keys[rank * b : rank * b + b]  # [b]
    scores = q @ all_pos.T  # [b, B]
    best_pos, best_idx = scores.max(dim=1)  # [b], [b]
    hit = keys[best_idx] == own_keys  # [b]
    if negatives is not None and batch.local_negative_mask is not None and negatives.shape[-1] == q.shape[-1]:
        neg_scores = torch.einsum("bd,bkd->bk", q, negatives.detach().float())  # [b, K]
        neg_scores = neg_scores.masked_fill(~batch.local_negative_mask.to(q.device), float("-inf"))
        hit &= best_pos >= neg_scores.max(dim=1).values
    return hit.float().mean()


class ContrastiveStep:
    """Computes the loss of one collated batch and backpropagates it.

    Split in two so the caller can inspect the loss (skip a non-finite step on every
    process) before any gradient is produced.

    Args:
        model: The (possibly DDP- or DeepSpeed-wrapped) EmbeddingModel. It owns the
            temperature: its recorded ``config.temperature``, or the learnable logit scale
            (``enable_learnable_temperature``), which its forward returns.
        loss_fn: The objective (:class:`vlm2emb.losses.ContrastiveLoss`); its
            ``training_loss`` spans all processes.
        gradcache: Use cached embedding gradients (chunks come from the collator).
        device: Where embeddings live.
        single_backward: Re-embed all chunks in one checkpointed forward and backpropagate
            once (needed under DeepSpeed), instead of one backward per chunk.
        reuse_frozen_vision: Serve a frozen vision tower's first-pass outputs to the
            re-forward instead of running it again (:class:`FrozenVisionCache`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: ContrastiveLoss,
        *,
        gradcache: bool,
        device: torch.device,
        single_backward: bool = False,
        reuse_frozen_vision: bool = True,
    ) -> None:
        self.single_backward = single_backward
        self.reuse_frozen_vision = reuse_frozen_vision
        self.model = model
        self.loss_fn = loss_fn
        self.gradcache = gradcache
        self.device = device
        inner = _embedding_model(model)
        if inner is None:
            raise ValueError("ContrastiveStep needs an EmbeddingModel (possibly DDP- or DeepSpeed-wrapped)")
        self.learnable_temperature = inner.logit_scale is not None
        self.fixed_temperature = float(inner.config.temperature)
        standalone = getattr(loss_fn, "temperature", None)
        if not self.learnable_temperature and standalone is not None and standalone != self.fixed_temperature:
            # The model owns the training temperature; a loss built with another one would
            # be silently overridden.
            raise ValueError(
                f"the loss's temperature {standalone:g} differs from the model's config.temperature "
                f"{self.fixed_temperature:g}; the model owns the training temperature (set model.config.temperature)"
            )
        # A single-vector objective leaves the multi-vector head out of the forward.
        self.multivector = loss_fn.takes_multivector
        self._pending: dict[str, Any] | None = None
        # Of the last forward_loss: a [] tensor on the device (read once per log window).
        self.last_accuracy: torch.Tensor | None = None

    def _forward(self, chunks: Sequence[dict[str, Any]], **kwargs: Any) -> Any:
        """The (possibly wrapped) model on ``chunks``, with the head the objective uses."""
        return self.model(chunks, multivector=self.multivector, **kwargs)

    def _loss(
        self,
        batch: ContrastiveBatch,
        q: Any,
        p: Any,
        flat_neg: Any,
        temperature: torch.Tensor | None,
    ) -> torch.Tensor:
        negs = _scatter_negatives(flat_neg, batch.local_negative_mask, batch.negatives_padded)  # [b, K, ...]
        if not self.loss_fn.takes_multivector:
            # A single-vector loss on a model with a multi-vector head reads the dense part.
            q, p, negs = dense_part(q), dense_part(p), dense_part(negs)
        t = temperature if temperature is not None else self.fixed_temperature
        if getattr(q, "dense", q) is not None:
            # Accuracy ranks single vectors; a multi-vector-only model reports none.
            self.last_accuracy = in_batch_accuracy(dense_part(q), dense_part(p), dense_part(negs), batch)
        else:
            self.last_accuracy = None
        return self.loss_fn.training_loss(q, p, negs, batch, t)

    def forward_loss(self, batch: ContrastiveBatch, sync_context: SyncContext | None = None) -> torch.Tensor:
        """Phase 1: the loss (a graph to the parameters, or to cached embeddings).

        Args:
            batch: A collated batch (:class:`vlm2emb.data.collate.ContrastiveCollator`).
            sync_context: As in :meth:`backward`; wraps the forward of the chunk whose graph
                is kept (GradCache), so that DDP does not arm a reduction for it.
        """
        chunks = batch.chunks
        nq, np_ = len(batch.query), len(batch.positive)
        if not self.gradcache:
            out = self._forward(chunks, with_temperature=self.learnable_temperature)
            embs, temperature = out if self.learnable_temperature else (out, None)
            self._pending = None
            return self._loss(batch, *self._split(embs, nq, np_, batch), temperature)
        # The per-chunk form keeps one chunk's graph (see the module doc). The one-backward
        # form does not: the kept graph would be alive while the others are re-embedded, which
        # doubles the activation peak to save two chunk forwards (its re-run and recompute).
        keep = self.kept_chunk(chunks)
        vision = FrozenVisionCache.for_model(self.model, self.device) if self.reuse_frozen_vision else None
        replays: list[ChunkReplay | None] = [None] * len(chunks)
        embs: list[Any] = [None] * len(chunks)
        kept = None
        for i, chunk in enumerate(chunks):
            if i == keep:
                with (sync_context or _no_context)(False):
                    kept = self._forward([chunk])[0]  # [n, d], with a graph
                embs[i] = kept
                continue
            replays[i] = ChunkReplay(RngState(self.device), vision, i)
            with torch.no_grad(), vision.recording(i) if vision is not None else contextlib.nullcontext():
                embs[i] = self._forward([chunk])[0]  # [n, d]
        with torch.no_grad():
            temperature = self._forward([], with_temperature=True)[1] if self.learnable_temperature else None
        leaves = [as_leaf(e) for e in embs]
        t_leaf = temperature.detach().requires_grad_() if temperature is not None else None
        loss = self._loss(batch, *self._split(leaves, nq, np_, batch), t_leaf)
        self._pending = {
            "chunks": chunks,
            "replays": replays,
            "leaves": leaves,
            "t_leaf": t_leaf,
            "kept": kept,
            "keep": keep,
        }
        return loss

    def kept_chunk(self, chunks: Sequence[dict[str, Any]]) -> int | None:
        """Index of the chunk whose first-pass graph is kept instead of re-run (None: none).

        The costliest by :func:`chunk_cost` (ties: the later one). The one-backward form
        keeps none (see :meth:`forward_loss`).
        """
        if self.single_backward or len(chunks) < 2:
            return None
        return max(range(len(chunks)), key=lambda i: (chunk_cost(chunks[i]), i))

    def discard(self) -> None:
        """Drops the cached state of a step that will not be backpropagated."""
        self._pending = None

    @staticmethod
    def _split(embs: Sequence[Any], nq: int, np_: int, batch: ContrastiveBatch) -> tuple[Any, Any, Any]:
        q = _in_row_order(cat_rows(embs[:nq]), batch.query_order)  # [b, d] (or [b, L, D] tokens)
        p = _in_row_order(cat_rows(embs[nq : nq + np_]), batch.positive_order)  # [b, ...]
        rest = list(embs[nq + np_ :])
        flat = cat_rows(rest) if rest else None  # [n_real_negatives, ...]
        return q, p, flat

    def backward(
        self, loss: torch.Tensor, backward: BackwardFn, sync_context: SyncContext | None = None
    ) -> None:
        """Phase 2: gradients into the parameters (synchronised once, at the end).

        Args:
            loss: The loss from :meth:`forward_loss`.
            backward: ``backward(tensor, sync)`` backpropagates ``tensor``; ``sync`` is True
                only for the last backward of the step.
            sync_context: ``sync_context(sync)`` wraps each re-forward and its backward
                (DDP's ``no_sync`` must cover the forward too). Default: no context.
        """
        if sync_context is None:
            sync_context = _no_context
        if self._pending is None:
            backward(loss, True)
            return
        pending, self._pending = self._pending, None
        # d loss / d embeddings only: no parameter is in this graph (the gather's backward
        # is a collective, so every process runs it).
        loss.backward()
        t_leaf = pending["t_leaf"]
        kept = pending["kept"]
        if kept is not None:
            # The kept chunk first: its graph is freed before any re-forward builds another.
            with sync_context(False):
                backward(grad_dot(kept, pending["leaves"][pending["keep"]]), False)
        work = [
            (chunk, replay, leaf)
            for i, (chunk, replay, leaf) in enumerate(
                zip(pending["chunks"], pending["replays"], pending["leaves"])
            )
            if i != pending["keep"]
        ]
        if self.single_backward:
            out = self._forward(
                pending["chunks"], with_temperature=t_leaf is not None, replays=pending["replays"]
            )
            embs, temperature = out if t_leaf is not None else (out, None)
            surrogate = sum(grad_dot(emb, leaf) for emb, (_, _, leaf) in zip(embs, work))
            if temperature is not None:
                surrogate = surrogate + temperature * t_leaf.grad
            backward(surrogate, True)
            return
        for i, (chunk, replay, leaf) in enumerate(work):
            last = i == len(work) - 1 and t_leaf is None
            with sync_context(last):
                with replay.random_state(), replay.frozen_outputs():
                    emb = self._forward([chunk])[0]  # [n, d], with a graph this time
                backward(grad_dot(emb, leaf), last)
        if t_leaf is not None:
            with sync_context(True):
                temperature = self._forward([], with_temperature=True)[1]
                backward(temperature * t_leaf.grad, True)
