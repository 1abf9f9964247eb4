"""Training a reranker on the canonical training rows: listwise softmax over each query's group.

Each step takes ``batch_size`` rows. A row's group is its positive followed by up to
``group_size - 1`` negatives: its own ``negatives`` first (hard negatives, and mined ones,
which ``vlm2emb mine`` writes into the same key), then the positives of other rows in the
batch of the same dataset whose content differs from this row's positive (in-batch
negatives). The loss is
:func:`~vlm2emb.rerank.loss.listwise_softmax_loss` of the reranker's scores.

:func:`train_reranker` is the older standalone loop: one process, its own flat recipe and
checkpoint layout (``vlm2emb rerank train`` and the benchmarks use it). The embedder's
trainer (:mod:`vlm2emb.train.loop`) trains the same objective over the same groups with
``model.kind: reranker`` (:mod:`vlm2emb.rerank.kind`, which shares :func:`reranker_groups`,
:func:`group_pairs` and :func:`scatter_scores` with this module), on 1..N processes. Both
read rows with the embedder's loader, so the same files, checks and bad-row policy
(``data.on_bad_example``) apply.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlm2emb._typed_config import ConfigError, build_dataclass
from vlm2emb.data.keys import content_keys
from vlm2emb.data.schema import TrainExample
from vlm2emb.rerank.loss import listwise_softmax_loss
from vlm2emb.train.config import LoraConfig

_BAD_EXAMPLE = ("error", "skip")
_SCHEDULES = ("linear", "cosine", "constant")  # the embedder's train.lr_scheduler names


@dataclass
class RerankDataConfig:
    """Where the training rows come from (the embedder's ``data.*`` keys of the same names).

    Attributes:
        train: Sources: ``.jsonl`` / ``.parquet`` files, ``datasets`` folders, ``demo:...``.
        media_root: Folder for relative media paths (default: each file's folder).
        verify_images: Open every media header before training.
        format: ``auto``, ``canonical`` or ``mmeb``.
        on_bad_example: ``error`` stops at the first bad row; ``skip`` leaves it out.
        max_rows: Keep at most this many rows per source (one value for all; 0 = all).
    """

    train: list[str] = field(default_factory=list)
    media_root: str | None = None
    verify_images: bool = True
    format: str = "auto"
    on_bad_example: str = "error"
    max_rows: list[int] = field(default_factory=list)


@dataclass
class RerankTrainConfig:
    """A reranker training run (the recipe's keys; unknown keys are an error).

    Attributes:
        model: A raw VLM, a saved reranker, or ``tiny:FAMILY``.
        output_dir: Gets ``metrics.jsonl``, ``recipe.json`` and ``final/``.
        data: :class:`RerankDataConfig`.
        group_size: Candidates per query: the positive and ``group_size - 1`` negatives.
        batch_size: Queries per optimizer step.
        queries_per_forward: Queries whose groups run in one forward (0 = the whole batch);
            the gradient is the same, memory is lower.
        max_steps: Optimizer steps.
        learning_rate: AdamW peak learning rate.
        warmup_ratio: Share of ``max_steps`` spent warming up from 0 (``round(ratio * max_steps)``
            steps), as the embedder's ``train.warmup_ratio``.
        lr_scheduler: ``linear``, ``cosine`` or ``constant`` after the warmup: transformers'
            curves, as the embedder's ``train.lr_scheduler``.
        weight_decay: AdamW weight decay.
        max_grad_norm: Gradient clipping (0 = off).
        temperature: Scores are divided by it in the softmax.
        seed: Seeds the row order, the in-batch negatives and the LoRA init.
        log_steps: Write a ``metrics.jsonl`` record every this many steps.
        dtype: Weight dtype (``fp32``, ``bf16``, ...).
        lora: LoRA settings (None: full fine-tuning).
        template: Prompt template (None: the model's; see :class:`RerankerConfig`).
        instruction: Instruction of rows without one (None: the model's).
        yes_token: "Relevant" answer (None: the model's).
        no_token: "Not relevant" answer (None: the model's).
        max_bad_steps: Stop after this many non-finite losses in a row (each is skipped).
        save_steps: Write ``checkpoints/step-N`` every this many steps (0 = none); a run
            resumed from one continues bit for bit as the run without the stop.
        resume_from_checkpoint: A ``checkpoints/step-N`` folder to continue from (the same
            recipe; ``max_steps`` may be larger).
        overwrite_output_dir: Replace an existing ``final/``.
    """

    model: str = "tiny:qwen2_vl"
    output_dir: str = "runs/reranker"
    data: RerankDataConfig = field(default_factory=RerankDataConfig)
    group_size: int = 4
    batch_size: int = 8
    queries_per_forward: int = 0
    max_steps: int = 100
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    lr_scheduler: str = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    log_steps: int = 10
    dtype: str = "fp32"
    lora: LoraConfig | None = None
    template: str | None = None
    instruction: str | None = None
    yes_token: str | None = None
    no_token: str | None = None
    max_bad_steps: int = 5
    save_steps: int = 0
    resume_from_checkpoint: str | None = None
    overwrite_output_dir: bool = False

    def validate(self) -> None:
        """Value checks the types do not express.

        Raises:
            ConfigError: One line naming the key.
        """
        if not self.data.train:
            raise ConfigError("data.train: no training data given")
        if self.data.on_bad_example not in _BAD_EXAMPLE:
            raise ConfigError(f"data.on_bad_example must be one of {', '.join(_BAD_EXAMPLE)}")
        for key in ("group_size", "batch_size", "max_steps", "log_steps", "max_bad_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.group_size < 2:
            raise ConfigError(
                f"group_size must be at least 2 (a positive and a negative), got {self.group_size}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_scheduler not in _SCHEDULES:
            raise ConfigError(
                f"lr_scheduler must be one of {', '.join(_SCHEDULES)}, got {self.lr_scheduler!r}"
            )
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be 0 (none) or positive, got {self.save_steps}")
        if self.queries_per_forward < 0:
            raise ConfigError(
                f"queries_per_forward must be 0 (all) or positive, got {self.queries_per_forward}"
            )
        for key in ("learning_rate", "temperature"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{key} must be a positive number, got {value}")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> RerankTrainConfig:
        """Builds and validates a config from a mapping (a YAML recipe).

        ``lora: true`` means LoRA with the defaults.

        Raises:
            ConfigError: Unknown key, wrong type or bad value; the message names the key.
        """
        data = dict(data)
        if data.get("lora") is True:
            data["lora"] = {}
        elif data.get("lora") is False:
            data["lora"] = None
        cfg = build_dataclass(cls, data)
        cfg.validate()
        return cfg


def reranker_groups(
    rows: Sequence[TrainExample], group_size: int, rng: np.random.Generator
) -> tuple[list[list[dict[str, Any]]], torch.Tensor]:
    """Each row's candidates (positive first) and which slots are filled.

    A row's own negatives come first (at most ``group_size - 1``); missing slots are filled
    with positives of other rows of the same ``dataset``, drawn with ``rng``, whose content
    differs from this row's positive (equal content would be a false negative). Slots that
    stay empty (a small batch) are masked.

    Args:
        rows: The batch's rows.
        group_size: Candidates per row.
        rng: Draws the in-batch negatives.

    Returns:
        Per row a list of ``group_size`` candidate items (empty slots repeat the positive),
        and the [Q, G] bool mask of filled slots.
    """
    keys = content_keys([row.positive for row in rows]).tolist()  # [Q] ids of positives
    groups: list[list[dict[str, Any]]] = []
    mask = torch.zeros(len(rows), group_size, dtype=torch.bool)
    for q, row in enumerate(rows):
        group = [row.positive, *row.negatives[: group_size - 1]]
        need = group_size - len(group)
        if need > 0:
            # Only the same dataset's positives: another task's candidates are often another
            # modality (a digit image among captions), which the reranker learns to reject
            # without reading the query (measured on the digits demo, docs/rerank.md).
            others = [j for j in range(len(rows)) if keys[j] != keys[q] and rows[j].dataset == row.dataset]
            picks = rng.permutation(others)[:need].tolist() if others else []
            group.extend(rows[j].positive for j in picks)
        mask[q, : len(group)] = True
        groups.append(group + [row.positive] * (group_size - len(group)))
    return groups, mask


def group_pairs(
    rows: Sequence[TrainExample], groups: list[list[Any]], mask: torch.Tensor
) -> tuple[list[tuple[Any, Any]], list[str | None], torch.Tensor]:
    """The (query, candidate) pairs of the filled slots, in row-major slot order.

    Returns:
        The pairs, each pair's instruction (the row's own; None: the model's), and [n] the
        flat index of each pair's slot in the [Q, G] group matrix.
    """
    pairs, instructions, where = [], [], []
    for q, (row, group) in enumerate(zip(rows, groups)):
        for g, candidate in enumerate(group):
            if mask[q, g]:
                pairs.append((row.query, candidate))
                instructions.append(row.instruction)
                where.append(q * mask.shape[1] + g)
    return pairs, instructions, torch.tensor(where, dtype=torch.int64)


def scatter_scores(flat: torch.Tensor, where: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[n] pair scores into the [Q, G] group matrix (empty slots 0, masked by the loss)."""
    scores = flat.new_zeros(mask.numel())
    scores = scores.index_put((where.to(flat.device),), flat)
    return scores.view(mask.shape)  # [Q, G]


def group_scores(
    model: Any, rows: Sequence[TrainExample], groups: list[list[Any]], mask: torch.Tensor
) -> torch.Tensor:
    """The reranker's [Q, G] scores of the filled slots (empty slots 0, masked by the loss)."""
    pairs, instructions, where = group_pairs(rows, groups, mask)
    flat = model(model.collate_pairs(pairs, instructions))  # [n filled]
    return scatter_scores(flat, where, mask)


@dataclass
class RerankTrainResult:
    """What :func:`train_reranker` returns.

    Attributes:
        final_dir: The saved reranker (``output_dir/final``).
        losses: The loss of every step (NaN for a skipped non-finite step).
        seconds: Wall time of the optimisation steps.
    """

    final_dir: Path
    losses: list[float]
    seconds: float


def train_reranker(config: RerankTrainConfig | Mapping[str, Any]) -> RerankTrainResult:
    """Trains a generative reranker and saves it to ``output_dir/final``.

    The rows are read and checked before the model loads; ``final/`` is written under a
    temporary name and renamed once complete, so a failed run leaves no half-written model.

    Args:
        config: A :class:`RerankTrainConfig` or a mapping of its keys.

    Returns:
        A :class:`RerankTrainResult`.

    Raises:
        ConfigError: A bad key or value; an existing ``final/`` without
            ``overwrite_output_dir``.
        DataError: A bad row (one line naming file and line) with ``on_bad_example: error``.
        FloatingPointError: ``max_bad_steps`` non-finite losses in a row.
    """
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.rerank.model import Reranker
    from vlm2emb.train.loop import lr_schedule

    cfg = config if isinstance(config, RerankTrainConfig) else RerankTrainConfig.from_mapping(config)
    cfg.validate()
    out = Path(cfg.output_dir)
    final = out / "final"
    if final.exists() and not cfg.overwrite_output_dir:
        raise ConfigError(f"output_dir: {final} exists; set overwrite_output_dir: true to replace it")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    rows = load_train_examples(  # data before model: a bad row stops the run here
        cfg.data.train,
        media_root=cfg.data.media_root,
        verify_images=cfg.data.verify_images,
        work_dir=out,
        data_format=cfg.data.format,
        on_bad_example=cfg.data.on_bad_example,
        max_rows=cfg.data.max_rows or None,
    )
    model = Reranker.from_pretrained(
        cfg.model,
        template=cfg.template,
        instruction=cfg.instruction,
        yes_token=cfg.yes_token,
        no_token=cfg.no_token,
        torch_dtype=cfg.dtype,
        seed=cfg.seed,
        merge_lora=cfg.lora is None,  # a saved adapter keeps training as an adapter
    )
    if cfg.lora is not None and not model.has_lora:
        lora = cfg.lora
        model.apply_lora(lora.r, lora.alpha, lora.dropout, lora.target_modules, lora.use_dora, seed=cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = lr_schedule(
        optimizer, cfg.lr_scheduler, round(cfg.warmup_ratio * cfg.max_steps), cfg.max_steps
    )
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)  # dropout (LoRA's, the backbone's) draws from the global RNG
    order: list[int] = []
    losses: list[float] = []
    bad_streak = 0
    first = 1
    records: list[str] = []
    if cfg.resume_from_checkpoint:
        loop = _load_checkpoint(
            Path(cfg.resume_from_checkpoint), params, model, optimizer, scheduler, rng, cfg
        )
        first, order, losses, bad_streak = loop["step"] + 1, loop["order"], loop["losses"], loop["bad_streak"]
        old = out / "metrics.jsonl"  # keep the records up to the checkpoint, drop any written after it
        if old.is_file():
            records = [
                line + "\n" for line in old.read_text().splitlines() if json.loads(line)["step"] < first
            ]
    model.train()
    start = time.perf_counter()
    with (out / "metrics.jsonl").open("w") as log:
        log.writelines(records)
        for step in range(first, cfg.max_steps + 1):
            while len(order) < cfg.batch_size:  # epochs of seeded permutations
                order.extend(rng.permutation(len(rows)).tolist())
            batch = [rows[i] for i in order[: cfg.batch_size]]
            del order[: cfg.batch_size]
            groups, mask = reranker_groups(batch, cfg.group_size, rng)
            loss = _step_backward(model, batch, groups, mask, cfg)
            lr = optimizer.param_groups[0]["lr"]  # this step's rate (the schedule's factor of the peak)
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)  # skipped: the schedule waits, as in loop.py
                losses.append(float("nan"))
                bad_streak += 1
                if bad_streak >= cfg.max_bad_steps:
                    raise FloatingPointError(
                        f"step {step}: {bad_streak} non-finite losses in a row; stopping"
                    )
                continue
            bad_streak = 0
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if step % cfg.log_steps == 0 or step == cfg.max_steps:
                record = {"step": step, "loss": loss, "lr": lr}
                log.write(json.dumps(record) + "\n")
                log.flush()
            if cfg.save_steps and step % cfg.save_steps == 0:
                loop = {"step": step, "order": order, "losses": losses, "bad_streak": bad_streak}
                _save_checkpoint(out / "checkpoints" / f"step-{step}", model, optimizer, scheduler, rng, loop)
    seconds = time.perf_counter() - start
    model.eval()
    tmp = out / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return RerankTrainResult(final_dir=final, losses=losses, seconds=seconds)


def _step_backward(
    model: Any, batch: list[TrainExample], groups: list[list[Any]], mask: torch.Tensor, cfg: RerankTrainConfig
) -> float:
    """Backward of one step's mean loss, ``queries_per_forward`` queries per forward.

    The loss is a mean over queries, so each chunk's loss is weighted by its share of the
    batch: the gradient equals one forward over the whole batch.
    """
    size = cfg.queries_per_forward or len(batch)
    total = 0.0
    for s in range(0, len(batch), size):
        part = slice(s, s + size)
        scores = group_scores(model, batch[part], groups[part], mask[part])  # [q, G]
        loss = listwise_softmax_loss(scores, mask[part].to(scores.device), cfg.temperature)
        weight = scores.shape[0] / len(batch)
        if torch.isfinite(loss):
            (loss * weight).backward()
        total += float(loss.detach()) * weight
    return total


_LOOP_STATE = "reranker_state.json"


def _save_checkpoint(
    path: Path, model: Any, optimizer: Any, scheduler: Any, rng: np.random.Generator, loop: dict[str, Any]
) -> None:
    """Everything the next step depends on, without pickle, renamed into place once complete.

    ``state/model.safetensors`` holds the trainable tensors only: the frozen ones are rebuilt
    by loading ``model`` again (the recipe's), as the run did at its start.
    """
    from vlm2emb.train.state import rng_file, rng_state, save_tree, write_manifest

    tmp = path.with_name(f".tmp-{path.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    state = tmp / "state"
    state.mkdir(parents=True)
    save_tree(
        state / "model.safetensors", {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    )
    save_tree(state / "optimizer.safetensors", optimizer.state_dict())
    (state / "scheduler.json").write_text(json.dumps(scheduler.state_dict()) + "\n")
    save_tree(rng_file(state, 0), rng_state())
    # The generator's state holds 128-bit integers: JSON keeps them exact.
    (state / _LOOP_STATE).write_text(json.dumps({**loop, "generator": rng.bit_generator.state}) + "\n")
    write_manifest(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)


def _load_checkpoint(
    path: Path,
    params: list[torch.nn.Parameter],
    model: Any,
    optimizer: Any,
    scheduler: Any,
    rng: np.random.Generator,
    cfg: RerankTrainConfig,
) -> dict[str, Any]:
    """Restores what :func:`_save_checkpoint` wrote; returns the loop's state.

    Raises:
        CheckpointError: A missing, damaged or foreign checkpoint (one line naming the file).
    """
    from vlm2emb.train.state import (
        CheckpointError,
        load_tree,
        read_json,
        rng_file,
        set_rng_state,
        verify_checkpoint,
    )

    verify_checkpoint(path)  # a truncated or altered file is found before anything loads
    state = path / "state"
    saved = load_tree(state / "model.safetensors")
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(trainable):
        raise CheckpointError(
            f"{state / 'model.safetensors'}: its trainable tensors differ from this recipe's model "
            f"({len(saved)} saved, {len(trainable)} here; same model and lora settings?)"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    optimizer.load_state_dict(load_tree(state / "optimizer.safetensors"))
    scheduler.load_state_dict(read_json(state / "scheduler.json"))
    set_rng_state(load_tree(rng_file(state, 0)), rng_file(state, 0))
    loop = read_json(state / _LOOP_STATE)
    rng.bit_generator.state = loop.pop("generator")
    if loop["step"] >= cfg.max_steps:
        raise CheckpointError(f"{path}: already at step {loop['step']}; max_steps is {cfg.max_steps}")
    return loop
