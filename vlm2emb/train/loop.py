"""The contrastive training loop: 1..N processes (DDP or DeepSpeed ZeRO), GradCache, resume.

Outputs under ``output_dir``:
    recipe.yaml            the resolved recipe (every key, defaults included)
    metrics.jsonl          one JSON record per log step and per evaluation
    checkpoints/step-N/    EmbeddingModel directory + ``state/`` (optimizer, scheduler, RNG)
                           + trainer_state.json, every ``train.save_steps``
    final/                 the trained EmbeddingModel
    eval_before.json       the untrained model's report (when data.eval and eval_before)
    eval.json              the trained model's report (when data.eval is set)
    best/, best.json       the best model by train.metric_for_best (when train.eval_steps > 0)

``train.batch_size`` is the global contrastive batch: every process draws the same global
batch (its order depends on the seed alone), embeds its slice, and the loss gathers the
embeddings of all processes, so the run computes the same thing on any number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from vlm2emb.train.config import ConfigError, RecipeConfig, recipe_to_dict
from vlm2emb.train.state import TRAINER_STATE

_STEP_DIR = re.compile(r"^step-(\d+)$")


class TrainingError(RuntimeError):
    """A run that cannot continue (non-finite losses, non-finite weights)."""


# train.lr_scheduler -> transformers' scheduler name (ours says "constant" for the one with warmup).
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def warmup_steps(cfg: RecipeConfig) -> int:
    """``round(train.warmup_ratio * train.max_steps)``."""
    return round(cfg.train.warmup_ratio * cfg.train.max_steps)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: RecipeConfig) -> Any:
    """transformers' learning-rate schedule for ``train.lr_scheduler`` (a ``LambdaLR``).

    The curve is transformers' own (``get_scheduler``): during warmup step ``s`` (0-based)
    trains at ``s / warmup`` of the peak, so the first step's rate is 0; then linear or
    cosine decay to 0 at ``train.max_steps``, or the peak (``constant``). docs/training.md
    """
    return lr_schedule(optimizer, cfg.train.lr_scheduler, warmup_steps(cfg), cfg.train.max_steps)


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, num_warmup: int, max_steps: int) -> Any:
    """transformers' ``get_scheduler`` for one of our names (``linear``, ``cosine``, ``constant``).

    Shared by the embedder's recipe (:func:`make_scheduler`) and the reranker's trainer, so
    both follow the same curve for the same settings.
    """
    from transformers import get_scheduler

    return get_scheduler(
        LR_SCHEDULERS[kind], optimizer, num_warmup_steps=num_warmup, num_training_steps=max_steps
    )


def _lr_factors(cfg: RecipeConfig, max_steps: int, steps: range) -> list[float]:
    """The schedule's factor of ``train.learning_rate`` at 0-based steps ``steps`` for ``max_steps``."""
    import copy

    other = copy.deepcopy(cfg)
    other.train.max_steps = max_steps
    # A throwaway optimizer: only the schedule's lambda is read.
    sched = make_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), other)
    return [float(sched.lr_lambdas[0](s)) for s in steps]


def schedule_change(cfg: RecipeConfig, old_max_steps: int, start_step: int) -> str:
    """The line a run resumed under another ``train.max_steps`` prints: how its LR moves.

    The schedule is a function of ``train.max_steps`` (the decay ends there, and the warmup
    is a ratio of it), so a resumed run follows the new length's curve from its next step
    on, while the steps it already took followed the old one.

    Args:
        cfg: The resumed run's recipe (the new ``train.max_steps``).
        old_max_steps: ``train.max_steps`` of the run that wrote the checkpoint.
        start_step: The checkpoint's step.
    """
    new_max = cfg.train.max_steps
    peak = cfg.train.learning_rate
    # Step s (1-based) trains at factor(s - 1): the first resumed step at factor(start_step).
    (old_next,) = _lr_factors(cfg, old_max_steps, range(start_step, start_step + 1))
    (new_next,) = _lr_factors(cfg, new_max, range(start_step, start_step + 1))
    done = range(start_step)
    same_past = _lr_factors(cfg, old_max_steps, done) == _lr_factors(cfg, new_max, done)
    old_w, new_w = round(cfg.train.warmup_ratio * old_max_steps), round(cfg.train.warmup_ratio * new_max)
    line = (
        f"train.max_steps {old_max_steps} -> {new_max}: the {cfg.train.lr_scheduler} schedule is recomputed for "
        f"{new_max} steps (warmup {old_w} -> {new_w}); step {start_step + 1} trains at lr {new_next * peak:.3e} "
        f"(the {old_max_steps}-step schedule: {old_next * peak:.3e}) and steps {start_step + 1}..{new_max} follow "
        f"the {new_max}-step curve. "
    )
    if same_past:
        return line + (
            f"Steps 1..{start_step} had the same rates under both lengths, so this continues exactly as a run "
            f"with train.max_steps={new_max} from the start would."
        )
    return line + (
        f"Steps 1..{start_step} followed the {old_max_steps}-step curve, so the result differs from a run with "
        f"train.max_steps={new_max} from the start (start a new run for that one; with lr_scheduler constant "
        "and warmup_ratio 0 the two are the same)."
    )


def _duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day)."""
    import datetime

    return str(datetime.timedelta(seconds=round(seconds)))


def log_line(record: dict[str, Any], max_steps: int, eta_s: float) -> str:
    """The console line of one metrics record (batch jobs and ``--no-progress``).

    Example: ``step 20/150 (13%) | loss 1.8123 | acc 0.531 | lr 1.97e-03 | 85.2 samples/s |
    2,710 tok/s | ETA 0:01:32``.
    """
    step = record["step"]
    loss = record["loss"]
    parts = [
        f"step {step}/{max_steps} ({100 * step // max_steps}%)",
        f"loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss) else "loss nan",
    ]
    if "accuracy" in record and math.isfinite(record["accuracy"]):
        parts.append(f"acc {record['accuracy']:.3f}")
    parts += [
        f"lr {record['lr']:.2e}",
        f"{record['samples_per_s']:.1f} samples/s",
        f"{record['tokens_per_s']:,.0f} tok/s",
        f"ETA {_duration(eta_s)}",
    ]
    if record.get("skipped_steps"):
        parts.append(f"{record['skipped_steps']} skipped")
    return " | ".join(parts)


def _numel(param: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 holds only a partition (``ds_numel``)."""
    return getattr(param, "ds_numel", param.numel())


def uses_deepspeed() -> bool:
    """True when ``accelerate launch`` was given a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(cfg: RecipeConfig) -> Any:
    """Builds the accelerate ``Accelerator`` for this recipe and launcher.

    Precision is the recipe's (``train.precision``), whatever the launch config says, so a
    recipe computes the same thing under every launcher. Without CUDA: DDP needs
    ``cpu=True`` (gloo); DeepSpeed needs an explicit gloo process group instead, because
    ``cpu=True`` would silently turn it into plain DDP.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from vlm2emb.train.tracking import accelerator_kwargs

    precision = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    # Whether DDP searches for unused parameters is decided once the model is loaded
    # (Trainer._ddp_find_unused), before prepare() reads this handler.
    handlers: list[Any] = [DistributedDataParallelKwargs()]
    common = {"mixed_precision": precision, **accelerator_kwargs(cfg.train.report_to, cfg.output_dir)}
    if torch.cuda.is_available():
        return Accelerator(kwargs_handlers=handlers, **common)
    if uses_deepspeed():
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
        return Accelerator(kwargs_handlers=handlers, **common)
    return Accelerator(cpu=True, kwargs_handlers=handlers, **common)


def _configure_deepspeed(accelerator: Any, cfg: RecipeConfig, local_batch: int) -> None:
    # The recipe decides batch size and clipping; the launch config only the ZeRO layout.
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = local_batch
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = local_batch * accelerator.num_processes
    ds["gradient_clipping"] = cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0 else 0.0
    ds["zero_allow_untested_optimizer"] = True
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # Checkpoints and final/ are ordinary safetensors: gather the partitions on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True


# Keys a resumed run may change: where to resume from, how long to train, where to report.
RESUME_KEYS = (
    "output_dir",
    "train.resume_from",
    "train.overwrite_output_dir",
    "train.max_steps",
    "train.num_epochs",  # the other way to set the length (an override of one clears the other)
    "train.report_to",
    "train.run_name",
    "train.save_final_checkpoint",
    "train.ddp_find_unused_parameters",  # how DDP reduces, not what it computes
)
# What a run leaves in output_dir (demo-data/ and tiny-backbone/ are inputs, not outputs).
RUN_OUTPUTS = (
    "recipe.yaml",
    "metrics.jsonl",
    "final",
    "checkpoints",
    "best",
    "best.json",
    "eval.json",
    "eval_before.json",
    "data_report.json",
    "mined",  # train.remine_steps refreshes
    "logs",  # TensorBoard (train.report_to)
    "wandb",
)


def checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """``checkpoints/step-N`` directories of a run, oldest first."""
    return sorted(
        (int(m.group(1)), p)
        for p in (output_dir / "checkpoints").glob("step-*")
        if (m := _STEP_DIR.match(p.name)) and p.is_dir()
    )


def find_checkpoint(output_dir: Path, resume_from: str, warn: Any = None) -> Path:
    """Resolves ``train.resume_from``: ``auto`` = newest whole checkpoint, or a path.

    Every candidate is verified against its manifest (size and SHA-256 of each file) before
    it is chosen. With ``auto`` a damaged checkpoint is passed over with a one-line warning
    naming the damaged file, and the next older one is tried; a path must be whole.

    Args:
        output_dir: The run's output folder.
        resume_from: ``auto`` or a checkpoint directory.
        warn: Called with each warning line (None: print).

    Raises:
        FileNotFoundError: No checkpoint there.
        CheckpointError: The given checkpoint, or every checkpoint, is damaged.
    """
    from vlm2emb.train.state import CheckpointError, verify_checkpoint

    warn = warn or (lambda line: print(line, flush=True))
    if resume_from != "auto":
        path = Path(resume_from)
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(f"train.resume_from: {path} is not a vlm2emb checkpoint")
        verify_checkpoint(path)
        return path
    found = checkpoint_dirs(output_dir)
    if not found:
        raise FileNotFoundError(f"train.resume_from=auto: no checkpoint in {output_dir / 'checkpoints'}")
    damaged: list[str] = []
    for _, path in reversed(found):
        try:
            verify_checkpoint(path)
        except CheckpointError as exc:
            damaged.append(str(exc))
            warn(f"warning: skipping damaged checkpoint {path.name}: {exc}")
            continue
        return path
    raise CheckpointError(
        f"train.resume_from=auto: no whole checkpoint in {output_dir / 'checkpoints'} ({damaged[0]})"
    )


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out |= _flatten(value, f"{prefix}.{key}" if prefix else str(key))
        return out
    return {prefix: data}


def check_resume_recipe(cfg: RecipeConfig, checkpoint: Path) -> None:
    """Refuses to resume a checkpoint trained under a different recipe.

    Only the keys in ``RESUME_KEYS`` may differ (a longer ``train.max_steps`` continues the run).
    The saved recipe is read through today's recipe loader first: a key added to vlm2emb
    after the checkpoint was written takes its default there, so the checkpoint resumes
    unless this run sets that key to something else.

    Raises:
        CheckpointError: Naming the keys that differ, with both values of the first.
    """
    from vlm2emb._typed_config import build_dataclass
    from vlm2emb.train.state import CheckpointError, read_json

    saved = read_json(checkpoint / TRAINER_STATE).get("recipe")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{checkpoint / TRAINER_STATE}: no recipe (a checkpoint of an older vlm2emb)")
    try:
        then = _flatten(recipe_to_dict(build_dataclass(RecipeConfig, saved)))
    except ConfigError as exc:  # a key this vlm2emb no longer has
        raise CheckpointError(f"{checkpoint / TRAINER_STATE}: its recipe does not load here: {exc}") from None
    now = _flatten(recipe_to_dict(cfg))
    differ = [
        k for k in sorted(now.keys() | then.keys()) if k not in RESUME_KEYS and now.get(k) != then.get(k)
    ]
    if differ:
        first = differ[0]
        raise CheckpointError(
            f"train.resume_from: {checkpoint} was trained with a different recipe: {', '.join(differ)} "
            f"({first}: {then.get(first)!r} there, {now.get(first)!r} now); only "
            f"{', '.join(RESUME_KEYS)} may change on resume"
        )


def _json_line(record: dict[str, Any]) -> str:
    """One metrics.jsonl line: strict JSON, a non-finite number written as null."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(record), allow_nan=False) + "\n"


def _trim_metrics(path: Path, last_step: int) -> None:
    """Keeps the records of steps up to ``last_step`` (a resumed run writes the rest again).

    A line cut short by a kill is dropped too. The file is rewritten beside and renamed.
    """
    from vlm2emb.train.state import write_text_atomic

    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= last_step:
            kept.append(_json_line(record))  # also rewrites a bare NaN of an older log
    write_text_atomic(path, "".join(kept))


class _Trainer:
    """Holds the state of one run; ``run()`` does the work."""

    def __init__(self, cfg: RecipeConfig, progress: bool, callbacks: list[Any] | None = None) -> None:
        import copy

        # A copy: train.num_epochs resolves max_steps on it, the caller's recipe stays as given.
        self.cfg = copy.deepcopy(cfg)
        self.progress = progress
        self.callbacks = list(callbacks or [])
        self.steps_per_epoch: int | None = None
        self.out = Path(cfg.output_dir)
        self.accelerator = make_accelerator(cfg)
        self.is_main = self.accelerator.is_main_process
        self.deepspeed = uses_deepspeed()
        self.tracking = False  # train.report_to trackers started
        self.finished = False  # resumed at train.max_steps with final/ in place: nothing to do
        self.last_grad_norm: torch.Tensor | None = None
        from vlm2emb.train.kinds import get_model_kind

        # What is trained (model.kind): the loop calls it where embedder and reranker differ.
        self.kind = get_model_kind(cfg.model.kind)

    # ------------------------------------------------------------------ setup
    def _load_data(self) -> None:
        from vlm2emb.data.check import DataReport
        from vlm2emb.data.media import media_options
        from vlm2emb.data.schema import load_eval_examples, load_train_examples

        cfg = self.cfg
        self.media = media_options(cfg.data)
        report = DataReport()
        # Only the main process writes demo data; the others read it after the barrier.
        if not self.is_main:
            self.accelerator.wait_for_everyone()
        self.train_examples = load_train_examples(
            [] if cfg.data.streaming else cfg.data.train,  # streaming reads data.train lazily later
            media_root=cfg.data.media_root,
            verify_images=cfg.data.verify_images,
            max_negatives=cfg.data.max_negatives,
            work_dir=self.out,
            data_format=cfg.data.format,
            mmeb_negatives=cfg.data.mmeb_negatives,
            on_bad_example=cfg.data.on_bad_example,
            report=report,
            max_rows=cfg.data.max_rows,
            options=self.media,
            allow_empty=cfg.data.streaming,
        )
        self.report = report
        self.eval_examples = (
            load_eval_examples(
                cfg.data.eval,
                media_root=cfg.data.media_root,
                verify_images=cfg.data.verify_images,
                work_dir=self.out,
                on_bad_example=cfg.data.on_bad_example,
                report=report,
                options=self.media,
            )
            if cfg.data.eval
            else []
        )
        if self.is_main:
            if cfg.data.on_bad_example == "skip":
                report.write(self.out / "data_report.json")
                if report.skipped:
                    print(
                        f"Skipped bad rows: {report.summary()}; see {self.out / 'data_report.json'}",
                        flush=True,
                    )
            self.accelerator.wait_for_everyone()

    def _preflight(self, model: Any) -> None:
        """Runs every row through the batch preprocessing once, before the first step.

        The load-time check reads headers only; a JPEG cut inside its data, an image
        whose aspect ratio the processor refuses, or anything else the kind's preprocessing
        raises on would otherwise stop the run in the middle (both policies). The rows
        go through the same decode and preprocessing a batch does, split over the
        processes; with ``skip`` the failing ones are left out and counted.
        """
        from accelerate.utils import gather_object

        from vlm2emb.data.check import preflight_filter

        cfg, acc = self.cfg, self.accelerator
        common: dict[str, Any] = dict(
            on_bad_example=cfg.data.on_bad_example,
            report=self.report,
            media=self.media,
            query_instruction=cfg.data.query_instruction,
            target_instruction=cfg.data.target_instruction,
            rank=acc.process_index,
            world_size=acc.num_processes,
            gather=gather_object,
        )
        before = self.report.skipped
        prepare = self.kind.preflight_prepare(model)
        self.train_examples = preflight_filter(self.train_examples, prepare, **common)
        self.eval_examples = preflight_filter(self.eval_examples, prepare, **common)
        if self.is_main and cfg.data.on_bad_example == "skip" and self.report.skipped > before:
            self.report.write(self.out / "data_report.json")
            print(
                f"Skipped rows that fail preprocessing: {self.report.summary()}; "
                f"see {self.out / 'data_report.json'}",
                flush=True,
            )

    def _zero3_init(self) -> bool:
        """Whether the launch config asks for partitioned loading (ZeRO-3 ``zero3_init_flag``)."""
        if not self.deepspeed:
            return False
        plugin = self.accelerator.state.deepspeed_plugin
        return bool(plugin.zero3_init_flag) and plugin.zero_stage == 3

    @contextlib.contextmanager
    def _whole_model_init(self):
        """Builds and loads models whole inside the block, even under a ZeRO-3 launch config.

        accelerate registers its DeepSpeed config with transformers whatever the launch
        config's ``zero3_init_flag`` says, and transformers then constructs every model inside
        ``deepspeed.zero.Init`` (a collective per layer): building the tiny checkpoint on the
        main process alone would hang, and writing it would save empty partitions.
        """
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

        if not self.deepspeed or not is_deepspeed_zero3_enabled():
            yield  # nothing to switch off (or an enclosing block already did): nest freely
            return
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def _load_model(self) -> Any:
        """The model, loaded partitioned under ZeRO-3 with ``zero3_init_flag: true``.

        Partitioned: every process holds 1/N of each weight from the start (each layer is
        built inside ``deepspeed.zero.Init`` and filled from the checkpoint shard by shard),
        so a model larger than one process's CPU or GPU memory can be trained. Otherwise
        each process loads the whole model and ``accelerator.prepare`` partitions it.
        """
        if self._zero3_init():
            model = self._load_model_whole()
            if self.is_main:
                local = sum(p.ds_tensor.numel() for p in model.parameters() if hasattr(p, "ds_tensor"))
                total = sum(_numel(p) for p in model.parameters())
                print(
                    f"ZeRO-3: model loaded partitioned ({local:,} of {total:,} parameter values "
                    "on this process)",
                    flush=True,
                )
            return model
        with self._whole_model_init():
            return self._load_model_whole()

    def _load_model_whole(self) -> Any:
        cfg = self.cfg
        name = cfg.model.name_or_path
        if name.startswith("tiny:") and (self.accelerator.num_processes > 1 or self.deepspeed):
            # transformers writes checkpoints on rank 0 only once a process group exists, so
            # the main process builds the tiny model once and every process loads that copy.
            from vlm2emb.testing import tiny_backbone

            name = str(self.out / "tiny-backbone")
            if self.is_main:
                with self._whole_model_init():
                    tiny_backbone(cfg.model.name_or_path.removeprefix("tiny:"), name, seed=cfg.seed)
            self.accelerator.wait_for_everyone()
        return self.kind.load_model(self, name)

    # ------------------------------------------------------------------ output_dir
    def _resume_dir(self) -> Path:
        """The checkpoint to resume from, chosen (and verified) once, by the main process.

        Raises:
            FileNotFoundError, CheckpointError: On every process, with the main one's message.
        """
        from accelerate.utils import broadcast_object_list

        from vlm2emb.train.state import CheckpointError

        found: list[Any] = [None]
        if self.is_main:
            try:
                path = find_checkpoint(self.out, self.cfg.train.resume_from or "auto")
                check_resume_recipe(self.cfg, path)
                found[0] = ("ok", str(path))
            except (FileNotFoundError, CheckpointError) as exc:
                found[0] = (type(exc).__name__, str(exc))
        if self.accelerator.num_processes > 1:
            broadcast_object_list(found)
        kind, value = found[0]
        if kind == "FileNotFoundError":
            raise FileNotFoundError(value)
        if kind != "ok":
            raise CheckpointError(value)
        return Path(value)

    def _plan_resume(self) -> None:
        """What a resumed run does once ``train.max_steps`` is known.

        - fewer steps than the checkpoint's: an error (a run cannot be shortened);
        - as many: nothing to train. With ``final/`` of that step in place the run is
          finished (``self.finished``); without it (killed between the last checkpoint and
          ``final/``) the run writes ``final/`` and evaluates, training nothing;
        - more: one line on how the learning-rate schedule changes (:func:`schedule_change`).

        Raises:
            ConfigError: ``train.max_steps`` (or ``train.num_epochs``) below the checkpoint's step.
        """
        if self.resume_dir is None:
            return
        from vlm2emb.train.state import read_json

        train, start = self.cfg.train, self.start_step
        if start > train.max_steps:
            key = (
                f"train.num_epochs: {train.num_epochs} epochs are {train.max_steps} steps"
                if train.num_epochs is not None
                else f"train.max_steps: {train.max_steps}"
            )
            raise ConfigError(
                f"{key}, fewer than the {start} of the checkpoint {self.resume_dir}; a run cannot be shortened "
                f"(its checkpoints/step-N hold the earlier weights; a shorter schedule needs a new run)"
            )
        final_state = self.out / "final" / TRAINER_STATE
        if start == train.max_steps:
            if final_state.is_file() and read_json(final_state).get("step") == start:
                self.finished = True
                if self.is_main:
                    print(
                        f"Nothing to do: {self.resume_dir} is already at train.max_steps={start} and final/ holds "
                        "that step; raise train.max_steps to train further",
                        flush=True,
                    )
            return
        saved = read_json(self.resume_dir / TRAINER_STATE).get("recipe", {})
        old_max = saved.get("train", {}).get("max_steps")
        if isinstance(old_max, int) and old_max != train.max_steps and self.is_main:
            print(schedule_change(self.cfg, old_max, start), flush=True)

    def _finished_summary(self) -> dict[str, Any]:
        """The summary of a run that was already finished, read back from its files."""
        final_loss = float("nan")
        metrics = self.out / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict) and isinstance(record.get("loss"), (int, float)):
                        final_loss = float(record["loss"])

        def report(name: str) -> dict[str, Any] | None:
            path = self.out / name
            return json.loads(path.read_text()) if path.is_file() else None

        steps = self.cfg.train.max_steps
        # Before the rows are loaded, the steps per epoch come from final/'s record.
        per_epoch = self.steps_per_epoch or (report("final/" + TRAINER_STATE) or {}).get("steps_per_epoch")
        return {
            "output_dir": str(self.out),
            "steps": steps,
            "epochs": round(steps / per_epoch, 4) if per_epoch else None,
            "final_loss": final_loss,
            "train_seconds": 0.0,
            "eval_before": report("eval_before.json"),
            "eval": report("eval.json"),
        }

    def _claim_output_dir(self) -> None:
        """Refuses an output_dir holding another run, unless ``train.overwrite_output_dir``.

        A new run would replace the other run's ``final/``, and a later ``resume_from=auto``
        would pick the other run's checkpoints. With the overwrite key, the other run's
        outputs (``RUN_OUTPUTS``) are deleted first, so nothing of it can be resumed.
        """
        present = [name for name in RUN_OUTPUTS if (self.out / name).exists()]
        # Every process looks before the main one deletes anything.
        self.accelerator.wait_for_everyone()
        if present and not self.cfg.train.overwrite_output_dir:
            raise FileExistsError(
                f"output_dir {self.out} holds another run ({', '.join(present)}); "
                "resume it with train.resume_from=auto, replace it with train.overwrite_output_dir=true, "
                "or choose another output_dir"
            )
        if present and self.is_main:
            for name in present:
                path = self.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            print(f"train.overwrite_output_dir: removed the previous run's {', '.join(present)}", flush=True)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ saving
    def _full_state(self) -> dict[str, torch.Tensor] | None:
        """The model's full state dict on the main process (collective under ZeRO-3)."""
        state = self.accelerator.get_state_dict(self.prepared)
        if not self.is_main:
            return None
        from vlm2emb.model import first_non_finite

        bad = first_non_finite(state.items())
        if bad is not None:
            raise TrainingError(f"refusing to save non-finite weights (first: {bad})")
        return state

    def _save(self, target: Path, step: int, *, with_state: bool) -> None:
        """Writes the model's directory (the kind's layout, + training state) atomically under ``target``.

        Every process writes into ``.tmp-NAME`` (each its RNG state; DeepSpeed one optimizer
        shard per process), then the main process writes the manifest and renames it: a run
        killed at any moment leaves either the complete directory or a temporary one, never a
        partial ``target``.
        """
        from vlm2emb._files import honour_umask_tree
        from vlm2emb.train.state import write_manifest

        acc = self.accelerator
        tmp = target.parent / f".tmp-{target.name}"
        if self.is_main:
            target.parent.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        if with_state:
            self._save_state(tmp / "state")
        state = self._full_state()
        acc.wait_for_everyone()  # every process's state files are on disk before the manifest
        if self.is_main:
            self.kind.save_model(acc.unwrap_model(self.prepared), tmp, state)
            from vlm2emb.train.state import library_versions

            trainer_state = {
                "step": step,
                "world_size": acc.num_processes,
                "recipe": recipe_to_dict(self.cfg),
                # For model cards: epochs = step / steps_per_epoch (None when streaming), and
                # the versions that trained the weights.
                "steps_per_epoch": self.steps_per_epoch,
                "versions": library_versions(),
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2) + "\n")
            if with_state:
                write_manifest(tmp)
            honour_umask_tree(tmp)  # safetensors writes 0600 files; the run folder is the user's
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        self._callback("on_save", step, target)

    def _save_state(self, state_dir: Path) -> None:
        """Optimizer, LR scheduler and RNG states, without pickle (see vlm2emb.train.state).

        Under DeepSpeed the engine writes its own (partitioned) model and optimizer files.
        """
        from safetensors.torch import save_model

        from vlm2emb.train.state import rng_file, rng_state, save_tree

        acc = self.accelerator
        if self.is_main:
            state_dir.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        if self.deepspeed:
            self.prepared.save_checkpoint(str(state_dir), tag="deepspeed", save_latest=False)
        elif self.is_main:
            save_model(acc.unwrap_model(self.prepared), str(state_dir / "model.safetensors"))
            scaler = acc.scaler.state_dict() if acc.scaler is not None else None
            save_tree(
                state_dir / "optimizer.safetensors",
                {"optimizer": self.optimizer.state_dict(), "scaler": scaler},
            )
        if self.is_main:
            (state_dir / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()) + "\n")
        save_tree(rng_file(state_dir, acc.process_index), rng_state())

    def _load_state(self, checkpoint: Path) -> dict[str, Any]:
        """Restores model, optimizer and scheduler from ``checkpoint``; returns its RNG state.

        The RNG state is applied by the caller right before the first step, so nothing that
        draws random numbers on the way there (building the data iterator) shifts it.

        Raises:
            CheckpointError: A state file is missing or unreadable (named).
        """
        from safetensors.torch import load_model

        from vlm2emb.train.state import CheckpointError, load_tree, read_json, rng_file

        acc = self.accelerator
        state_dir = checkpoint / "state"
        rng = rng_file(state_dir, acc.process_index)
        if not rng.is_file():
            written = read_json(checkpoint / TRAINER_STATE).get("world_size")
            raise CheckpointError(
                f"{rng}: missing (the checkpoint was written by {written} process(es), "
                f"this run has {acc.num_processes})"
            )
        rng_state = load_tree(rng)
        if self.deepspeed:
            from vlm2emb.train.state import deepspeed_weights_only

            with deepspeed_weights_only(self.prepared):
                loaded, _ = self.prepared.load_checkpoint(
                    str(state_dir), tag="deepspeed", load_lr_scheduler_states=False, load_module_strict=True
                )
            if loaded is None:  # DeepSpeed logs a missing checkpoint and carries on
                raise CheckpointError(f"{state_dir / 'deepspeed'}: no DeepSpeed checkpoint")
        else:
            model_file = state_dir / "model.safetensors"
            try:
                load_model(acc.unwrap_model(self.prepared), str(model_file))
            except Exception as exc:  # damaged after verification, or another model's weights
                raise CheckpointError(
                    f"{model_file}: cannot be loaded ({str(exc).splitlines()[0]})"
                ) from None
            saved = load_tree(state_dir / "optimizer.safetensors")
            try:
                self.optimizer.load_state_dict(saved["optimizer"])
                if acc.scaler is not None and saved["scaler"] is not None:
                    acc.scaler.load_state_dict(saved["scaler"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise CheckpointError(
                    f"{state_dir / 'optimizer.safetensors'}: does not fit this run ({exc})"
                ) from None
        scheduler_file = state_dir / "scheduler.json"
        try:
            self.scheduler.load_state_dict(read_json(scheduler_file))
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{scheduler_file}: not a scheduler state ({exc})") from None
        # The optimizer state holds the rate the checkpoint's schedule set for the next step.
        # Under a new train.max_steps the schedule (its lambda, rebuilt from the recipe) is
        # another one: the next step must train at its rate, not the old one (0 at the end
        # of a finished linear or cosine run). With the same length this is the same number.
        sched = self.scheduler
        for group, base, factor in zip(self.optimizer.param_groups, sched.base_lrs, sched.lr_lambdas):
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        return rng_state

    def _prune_checkpoints(self) -> None:
        limit = self.cfg.train.save_total_limit
        if limit is None:
            return
        for _, path in checkpoint_dirs(self.out)[:-limit]:
            shutil.rmtree(path, ignore_errors=True)

    def _track_best(self, best: Any, step: int, report: dict[str, Any], metrics_file: Any) -> None:
        """Logs an in-training eval; saves ``best/`` and ``best.json`` when it is the best so far."""
        if metrics_file is not None:
            metrics_file.write(_json_line({"step": step, "eval": report["average"]}))
            metrics_file.flush()
        self._report({"eval": report["average"]}, step)
        if step < self.cfg.train.max_steps:  # run() announces the final evaluation itself
            self._callback("on_evaluate", step, report)
        # Every process computed the same report, so all take the same (collective) branch.
        if best.update(step, report):
            self._save(self.out / "best", step, with_state=False)
        if self.is_main:
            best.write()

    # ------------------------------------------------------------------ steps
    def _sync_context(self, sync: bool):
        if sync or self.deepspeed:  # DeepSpeed steps never run more than one backward
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.prepared)

    def _backward(self, loss: torch.Tensor, sync: bool) -> None:
        if self.deepspeed:
            # One backward per optimizer step (GradCache uses its single-backward form here);
            # accelerate's own DeepSpeed backward would also step, so call the engine.
            self.prepared.backward(loss)
        else:
            self.accelerator.backward(loss)

    def _optimizer_step(self) -> bool:
        """Clips and steps; False (nothing changed) when the gradients are not finite.

        A finite loss can still give an infinite gradient (a huge learning rate): stepping
        would write NaN into the weights, so such a step counts as non-finite and is skipped.
        Under DeepSpeed and with fp16's loss scaler the engine or scaler decides instead.
        """
        from vlm2emb.distributed import all_true

        if self.deepspeed:
            self.prepared.step()  # clipping (ds gradient_clipping), optimizer, zero_grad
            self.scheduler.step()
            norm = self.prepared.get_global_grad_norm()  # before clipping; None when not computed
            self.last_grad_norm = torch.as_tensor(float(norm)) if norm is not None else None
            return True
        acc = self.accelerator
        if self.cfg.train.max_grad_norm > 0:
            norm = acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if acc.scaler is None and not all_true(bool(torch.isfinite(norm)), acc.device):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.last_grad_norm = norm.detach()  # the total norm before clipping
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return True

    def _skip_step(self) -> None:
        if self.deepspeed:
            self.prepared.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ phases
    # run() is the recipe: each phase below reads what the earlier ones set on self. The
    # order is part of exact resume (every process, and a resumed run, draws the same random
    # numbers in the same order), so phases are not reordered lightly.

    def _setup_output(self) -> None:
        """Which checkpoint to resume, whether output_dir is ours; writes recipe.yaml; seeds."""
        from accelerate.utils import set_seed

        cfg = self.cfg
        if cfg.train.batch_size % self.accelerator.num_processes:
            raise ValueError(
                f"train.batch_size {cfg.train.batch_size} is not divisible by {self.accelerator.num_processes} processes"
            )
        # Before anything is written or loaded: which checkpoint, and whether output_dir is ours.
        self.resume_dir = self._resume_dir() if cfg.train.resume_from else None
        if self.resume_dir is None:
            self._claim_output_dir()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            from vlm2emb.train.state import write_text_atomic

            write_text_atomic(self.out / "recipe.yaml", yaml.safe_dump(recipe_to_dict(cfg), sort_keys=False))
        self.start_step = (
            json.loads((self.resume_dir / TRAINER_STATE).read_text())["step"] if self.resume_dir else 0
        )
        if cfg.train.num_epochs is None:  # else max_steps is known once the rows are (_resolve_steps)
            self._plan_resume()
        self._start_trackers()  # before seeding: a tracker's start-up may draw random numbers
        set_seed(cfg.seed)

    def _start_trackers(self) -> None:
        """Starts the ``train.report_to`` trackers with the recipe as the run config."""
        from vlm2emb.train.tracking import init_kwargs, project_name, run_config

        report_to = self.cfg.train.report_to
        if not report_to:
            return
        run_name = self.cfg.train.run_name or self.out.resolve().name
        self.accelerator.init_trackers(
            project_name(),
            config=run_config(recipe_to_dict(self.cfg)),
            init_kwargs=init_kwargs(report_to, self.out, run_name),
        )
        self.tracking = True

    def _report(self, record: dict[str, Any], step: int) -> None:
        """Sends a metrics record's numbers to the trackers (main process; none: nothing)."""
        if self.tracking:
            from vlm2emb.train.tracking import scalars

            self.accelerator.log(scalars({k: v for k, v in record.items() if k != "step"}), step=step)

    def _batch_sampler(self, tokenizer: Any = None) -> Any:
        """The global batch order (None when streaming, which draws its own batches)."""
        from vlm2emb.data.sampler import sampler_for

        if self.cfg.data.streaming:
            return None
        return sampler_for(
            self.train_examples,
            self.cfg.data,
            self.cfg.train.batch_size,
            self.cfg.seed,
            start_step=self.start_step,
            tokenizer=tokenizer,
        )

    def _setup_data(self) -> None:
        """Rows checked and loaded; the batch order planned, before the model loads, so that
        a bad row or an impossible batch plan stops the run in seconds."""
        self._load_data()
        # The objective is built here (it holds no weights) so that it can refuse rows it
        # cannot learn from before the model loads.
        self.kind.prepare_rows(self)
        if self.cfg.train.remine_steps:
            self._check_remine()
        self.sampler = self._batch_sampler()  # length keys from characters until the tokenizer is here

    def _check_remine(self) -> None:
        """Refuses, before the model loads, rows or an objective a refresh would break on."""
        from vlm2emb.train.remine import check_remine_rows

        remine = self.cfg.train.remine
        check_remine_rows(self.train_examples, remine.keep_existing)
        # After a refresh every row carries teacher scores exactly when remine.teacher_scores
        # asks for them: the objective must accept that (the distill loss needs them).
        probe = [
            dataclasses.replace(
                ex, teacher_scores=[0.0] * (1 + len(ex.negatives)) if remine.teacher_scores else None
            )
            for ex in self.train_examples[:1]
        ]
        try:
            self.loss_fn.check_examples(probe)
        except ValueError as exc:
            raise ConfigError(f"train.remine: {exc} (set train.remine.teacher_scores=true)") from None

    def _restore_refresh(self) -> None:
        """A resumed run trains on the negatives of the last refresh at or before its step.

        The refresh folders live in the run that wrote the checkpoint.
        """
        from vlm2emb.train.remine import REFRESH_DIR, apply_refresh, last_refresh
        from vlm2emb.train.state import CheckpointError, read_json

        every = self.cfg.train.remine_steps
        if self.resume_dir is None or every == 0:
            return
        # The refreshes the checkpoint's own run made: a finished run's last step (which an
        # extended run resumes from) is followed by none.
        saved = read_json(self.resume_dir / TRAINER_STATE).get("recipe", {}).get("train", {})
        step = last_refresh(self.start_step, every, saved.get("max_steps"))
        if step == 0:
            return
        folder = self.resume_dir.parent.parent / REFRESH_DIR / f"step-{step}"
        if not folder.is_dir():
            raise CheckpointError(
                f"{folder}: missing; the checkpoint of step {self.start_step} trained on the negatives "
                f"re-mined at step {step} (train.remine_steps {every})"
            )
        self.train_examples = apply_refresh(self.base_examples, folder, self.media)
        if self.is_main:
            print(f"Hard negatives from {folder}", flush=True)

    def _refresh(self, step: int, metrics_file: Any) -> Any:
        """Re-mines every row's negatives with the current model; returns the new loader."""
        from vlm2emb.train.remine import REFRESH_DIR, apply_refresh, prune_refreshes, refresh_negatives

        cfg, acc = self.cfg, self.accelerator
        model = acc.unwrap_model(self.prepared)
        stats = refresh_negatives(
            model,
            self.base_examples,
            self.out,
            step,
            cfg.train.remine,
            is_main=self.is_main,
            barrier=acc.wait_for_everyone,
            # ZeRO-3 forwards are collectives: every process must embed every batch.
            shard=not self._zero3(),
        )
        self.train_examples = apply_refresh(
            self.base_examples, self.out / REFRESH_DIR / f"step-{step}", self.media
        )
        record = {"step": step, "remine": stats}
        if metrics_file is not None:
            metrics_file.write(_json_line(record))
            metrics_file.flush()
        self._report(record, step)
        if self.is_main:
            prune_refreshes(self.out, cfg.train.remine_steps, [s for s, _ in checkpoint_dirs(self.out)], step)
            mean = stats["negative_score_mean"]
            print(
                f"step {step}: re-mined {stats['negatives']:,} hard negatives for {stats['rows']:,} rows "
                f"in {stats['seconds']:.1f}s (mean negative score "
                f"{'n/a' if mean is None else f'{mean:.4f}'}; {stats['short_rows']} rows short)",
                flush=True,
            )
        # The same global batch order from step + 1 on: only the rows' negatives changed.
        return self._loader(self.train_examples, self.sampler.starting_at(step))

    def _zero3(self) -> bool:
        """Whether the weights are ZeRO-3 partitions."""
        return self.deepspeed and self.accelerator.state.deepspeed_plugin.zero_stage == 3

    def _setup_model(self) -> Any:
        """The model; every row run through its preprocessing; the final batch order."""
        model = self._load_model()
        n_rows = len(self.train_examples)
        if self.cfg.data.verify_images:
            self._preflight(model)
        if self.sampler is not None and (self.cfg.data.group_by_length or len(self.train_examples) != n_rows):
            # Rows were dropped (the plan changes), or length grouping can use exact token
            # counts now that the tokenizer is loaded.
            self.sampler = self._batch_sampler(model.adapter.tokenizer)
        self._resolve_steps()
        return model

    def _resolve_steps(self) -> None:
        """Batches per epoch (the final plan's), and max_steps from train.num_epochs."""
        train = self.cfg.train
        if self.sampler is not None:
            self.steps_per_epoch = self.sampler.batches_per_epoch
        if train.num_epochs is not None:
            assert self.steps_per_epoch is not None  # validate() refuses num_epochs with streaming
            train.max_steps = max(1, math.ceil(train.num_epochs * self.steps_per_epoch))
            self._plan_resume()

    def _state(self, step: int, **extra: Any) -> Any:
        """What callbacks see at ``step``."""
        from vlm2emb.train.callbacks import TrainerState

        return TrainerState(
            step=step,
            max_steps=self.cfg.train.max_steps,
            steps_per_epoch=self.steps_per_epoch,
            is_main_process=self.is_main,
            model=self.accelerator.unwrap_model(self.prepared),
            output_dir=self.out,
            **extra,
        )

    def _callback(self, hook: str, step: int, *args: Any, **state: Any) -> None:
        if self.callbacks:
            from vlm2emb.train.callbacks import call

            call(self.callbacks, hook, self._state(step, **state), *args)

    def _setup_optimizer(self, model: Any) -> None:
        """AdamW, the LR schedule, and the accelerate/DeepSpeed wrapping (``self.prepared``)."""
        cfg, acc = self.cfg, self.accelerator
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.n_trainable = sum(_numel(p) for p in self.params)
        self.n_total = sum(_numel(p) for p in model.parameters())
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay
        )
        # Stepped by us, not by accelerate, which would hand the LambdaLR to DeepSpeed as a
        # no-op wrapper. Not registered with accelerate, which would pickle it: checkpoints
        # keep its state as JSON (_save_state).
        self.scheduler = make_scheduler(self.optimizer, cfg)
        if self.deepspeed:
            _configure_deepspeed(acc, cfg, cfg.train.batch_size // acc.num_processes)
        elif acc.num_processes > 1:
            acc.ddp_handler.find_unused_parameters = self._ddp_find_unused(model)
        self.prepared, self.optimizer = acc.prepare(model, self.optimizer)

    def _ddp_find_unused(self, model: Any) -> bool:
        """Whether DDP must search every step for trainable parameters the step leaves out.

        DDP waits for a gradient of every trainable parameter unless told to search the
        autograd graph for unused ones, a walk it repeats every step (and, when nothing is
        unused, a warning it prints). ``train.ddp_find_unused_parameters`` decides when set.
        Otherwise one probe step (the real objective on the first rows, no backward, random
        state untouched) finds what a step reaches: a batch without images reaches the
        vision tower too, through the blank-image row of multi-process runs. A streamed
        dataset has no rows to probe before training: the search stays on.
        """
        from vlm2emb.distributed import all_true, reachable_parameters
        from vlm2emb.gradcache import RngState

        cfg, acc = self.cfg, self.accelerator
        if cfg.train.ddp_find_unused_parameters is not None:
            return cfg.train.ddp_find_unused_parameters
        rows = self.train_examples[: acc.num_processes * 2]
        if len(rows) < acc.num_processes * 2:
            return True
        probe = self.kind.training_step(self, model, probe=True)
        with RngState(acc.device).replay(), acc.autocast():
            loss = probe.forward_loss(self.kind.collator(self, model)(rows))
        used = reachable_parameters(loss, self.params)
        probe.discard()
        del loss
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        unused = [name for name, reached in zip(trainable, used) if not reached]
        # Every process must wrap its model alike.
        everything_used = all_true(not unused, acc.device)
        if self.is_main and unused:
            shown = ", ".join(unused[:3]) + (f" and {len(unused) - 3} more" if len(unused) > 3 else "")
            print(f"DDP searches for unused parameters each step: a step leaves out {shown}", flush=True)
        return not everything_used

    def _evaluate_now(self, name: str, title: str) -> dict[str, Any]:
        """Evaluates on data.eval; the main process writes ``name`` and prints the report.

        Every process evaluates (ZeRO-3 forwards are collective: only the engine's hooks
        gather the partitioned weights); the main one reports.
        """
        from vlm2emb.eval import format_report

        report = self.kind.evaluate(self, self.accelerator.unwrap_model(self.prepared), self.eval_examples)
        if self.is_main:
            (self.out / name).write_text(json.dumps(report, indent=2) + "\n")
            print(f"{title}:\n" + format_report(report), flush=True)
        return report

    def _setup_step(self, model: Any) -> tuple[Any, Any]:
        """The kind's collator, the loader and the kind's training step."""
        cfg, acc = self.cfg, self.accelerator
        self.collator = self.kind.collator(self, model)
        if cfg.data.streaming:
            from vlm2emb.data.streaming import streaming_for

            loader = self._loader(
                streaming_for(
                    cfg,
                    self.start_step,
                    self.media,
                    self.report,
                    self.out,
                    self.kind.preflight_prepare(model),
                ),
                None,
            )
        else:
            loader = self._loader(self.train_examples, self.sampler)
        step_fn = self.kind.training_step(self, self.prepared)
        if self.is_main:
            chunks = cfg.train.gradcache_chunk_size
            print(
                f"Training {cfg.model.name_or_path}: {self.n_trainable:,} of {self.n_total:,} parameters trainable, "
                f"{len(self.train_examples) or 'streamed'} rows, global batch {cfg.train.batch_size} "
                f"over {acc.num_processes} process(es)"
                f"{f' ({self.steps_per_epoch} steps per epoch)' if self.steps_per_epoch else ''}"
                f"{', GradCache chunks of ' + str(chunks) if chunks else ''}"
                f", steps {self.start_step + 1}..{cfg.train.max_steps}",
                flush=True,
            )
        return loader, step_fn

    def _loader(self, source: Any, sampler: Any) -> Any:
        """The DataLoader over ``source`` (rows in the sampler's order; None: a stream)."""
        batching: dict[str, Any] = {"batch_size": None} if sampler is None else {"batch_sampler": sampler}
        return torch.utils.data.DataLoader(
            source,
            collate_fn=self.collator,
            num_workers=self.cfg.data.num_workers,
            # iter(loader) draws a worker base seed from this generator; from the global one
            # it would shift the dropout masks of a resumed run against the uninterrupted one.
            generator=torch.Generator().manual_seed(self.cfg.seed),
            **batching,
        )

    def _open_metrics(self) -> Any:
        """metrics.jsonl on the main process: a new run starts a new log; a resumed run
        continues it after the checkpoint's step (records of steps it redoes are dropped)."""
        if not self.is_main:
            return None
        if self.resume_dir is not None:
            _trim_metrics(self.out / "metrics.jsonl", self.start_step)
        return (self.out / "metrics.jsonl").open("a" if self.resume_dir else "w")

    def _step(self, step_fn: Any, batch: Any) -> tuple[torch.Tensor, bool, str]:
        """One optimizer step: the loss, and (when every process's loss is finite) the
        backward and the update. Returns (loss, stepped, why-not)."""
        from vlm2emb.distributed import all_true

        acc = self.accelerator
        with acc.autocast():
            loss = step_fn.forward_loss(batch, self._sync_context)
        # Every process must take the same decision, or collectives would hang.
        if all_true(bool(torch.isfinite(loss.detach())), acc.device):
            with acc.autocast():  # GradCache re-runs forwards in here
                step_fn.backward(loss, self._backward, self._sync_context)
            return loss, self._optimizer_step(), "non-finite gradients"
        step_fn.discard()
        self._skip_step()
        return loss, False, "non-finite loss"

    def _train(
        self, loader: Any, step_fn: Any, resumed_rng: Any, metrics_file: Any, best: Any
    ) -> tuple[float, float]:
        """Steps start_step + 1 .. max_steps with logging, in-training eval and checkpoints.

        Returns:
            (last logged loss, training seconds).
        """
        from tqdm.auto import tqdm

        from vlm2emb.train.remine import refresh_due

        cfg, acc = self.cfg, self.accelerator
        world = acc.num_processes
        # A bar only on a terminal: in a batch job's log file tqdm's redraws pile up as
        # carriage-return garbage, so there (and with --no-progress) a line per record instead.
        show_bar = self.progress and self.is_main and sys.stderr.isatty()
        log_lines = self.is_main and not show_bar
        bar = tqdm(
            total=cfg.train.max_steps,
            initial=self.start_step,
            desc="train",
            disable=not show_bar,
            dynamic_ncols=True,
        )
        self.prepared.train()
        start = time.perf_counter()
        window_start, window_samples, window_tokens = start, 0, 0
        window_step = self.start_step
        # Summed on the device and read once per log window (a read is a device sync):
        # loss, in-batch accuracy and gradient norm of the window's stepped steps.
        running = torch.zeros(3, device=acc.device)
        running_n, skipped, window_chunks, norms_n = 0, 0, 0, 0
        self.bad_in_row = 0
        last_loss = float("nan")
        data_iter = iter(loader)
        if resumed_rng is not None:
            from vlm2emb.train.state import set_rng_state

            # Last, right before the first step: the uninterrupted run drew nothing between
            # its checkpoint and this point, so neither may the resumed one.
            set_rng_state(resumed_rng, self.resume_dir / "state")
        for step in range(self.start_step + 1, cfg.train.max_steps + 1):
            batch = next(data_iter)
            window_samples += cfg.train.batch_size
            window_tokens += batch.real_tokens()
            window_chunks += len(batch.chunks)
            loss, stepped, what = self._step(step_fn, batch)
            if stepped:
                running[0] += loss.detach()
                if step_fn.last_accuracy is not None:
                    running[1] += step_fn.last_accuracy
                if self.last_grad_norm is not None:
                    running[2] += self.last_grad_norm.to(running.device, running.dtype)
                    norms_n += 1
                running_n += 1
                self.bad_in_row = 0
            else:
                self.bad_in_row += 1
                skipped += 1
                if self.is_main:
                    print(f"step {step}: {what}, step skipped ({self.bad_in_row} in a row)", flush=True)
                if self.bad_in_row >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"stopping: {self.bad_in_row} non-finite losses in a row (last at step {step}); "
                        "lower train.learning_rate, check the data, or raise train.max_bad_steps"
                    )
            bar.update(1)
            step_record = None

            if step % cfg.train.log_steps == 0 or step == cfg.train.max_steps:
                now = time.perf_counter()
                # Each process holds the mean over its own queries; the global batch's loss
                # and accuracy are their means (one collective per log window, on every
                # process). The gradient norm is already global, so its mean is itself.
                total = acc.reduce(running.clone(), reduction="mean") if world > 1 else running
                sums = total.tolist()
                n = running_n or float("nan")
                last_loss = sums[0] / n
                record = {
                    "step": step,
                    "loss": round(last_loss, 6),
                    "lr": self.scheduler.get_last_lr()[0],
                    "accuracy": round(sums[1] / n, 4),
                    "samples_per_s": round(window_samples / (now - window_start), 3),
                    "tokens_per_s": round(window_tokens * world / (now - window_start), 1),
                    "elapsed_s": round(now - start, 2),
                }
                if norms_n:  # DeepSpeed may not report one
                    record["grad_norm"] = round(sums[2] / norms_n, 6)
                if cfg.train.gradcache_chunk_size:
                    # Forward chunks per step on this process (queries, positives, negatives).
                    record["gradcache_chunks"] = round(window_chunks / (step - window_step), 2)
                if cfg.train.learnable_temperature:
                    record["temperature"] = round(
                        float(acc.unwrap_model(self.prepared).learned_temperature().detach()), 6
                    )
                if skipped:
                    record["skipped_steps"] = skipped
                bar.set_postfix(loss=f"{last_loss:.4f}", samples_s=record["samples_per_s"])
                if log_lines:
                    per_step = (now - start) / (step - self.start_step)
                    eta = per_step * (cfg.train.max_steps - step)
                    print(log_line(record, cfg.train.max_steps, eta), flush=True)
                if metrics_file is not None:
                    metrics_file.write(_json_line(record))
                    metrics_file.flush()
                self._report(record, step)
                step_record = record
                running.zero_()
                running_n, window_chunks, window_step, norms_n = 0, 0, step, 0
                window_start, window_samples, window_tokens = now, 0, 0

            if self.callbacks:  # float(loss) waits for the device: only when someone listens
                self._callback(
                    "on_step_end", step, loss=float(loss.detach()) if stepped else None, record=step_record
                )
            if best is not None and step % cfg.train.eval_steps == 0 and step < cfg.train.max_steps:
                report = self.kind.evaluate(self, acc.unwrap_model(self.prepared), self.eval_examples)
                self._track_best(best, step, report, metrics_file)
            if refresh_due(step, cfg.train.remine_steps, cfg.train.max_steps):
                # Before the checkpoint of this step: resuming from it then trains on the
                # refreshed negatives without mining again.
                refresh_started = time.perf_counter()
                data_iter = iter(self._refresh(step, metrics_file))
                window_start += time.perf_counter() - refresh_started  # not training throughput
            if cfg.train.save_steps and step % cfg.train.save_steps == 0 and step < cfg.train.max_steps:
                self._save_checkpoint(step)
        bar.close()
        return last_loss, time.perf_counter() - start

    def _save_checkpoint(self, step: int) -> None:
        """A resumable checkpoint, unless the last steps were non-finite."""
        if self.bad_in_row:
            # Finite weights can still give NaN embeddings (a huge learning rate): a
            # checkpoint taken inside a non-finite streak would resume into it.
            if self.is_main:
                print(
                    f"step {step}: checkpoint not saved: the last {self.bad_in_row} step(s) had "
                    "non-finite losses",
                    flush=True,
                )
            return
        self._save(self.out / "checkpoints" / f"step-{step}", step, with_state=True)

    def _save_final(self, train_seconds: float) -> None:
        cfg = self.cfg
        if cfg.data.streaming and cfg.data.on_bad_example == "skip" and self.is_main:
            self.report.write(self.out / "data_report.json")  # the rows streamed so far
        if self.bad_in_row:
            raise TrainingError(
                f"the last {self.bad_in_row} step(s) had non-finite losses; final/ not written "
                "(lower train.learning_rate, check the data, or resume from an earlier checkpoint)"
            )
        last = self.out / "checkpoints" / f"step-{cfg.train.max_steps}"
        # Before final/: a run killed in between resumes from it and only writes final/.
        # A resumed run that trained nothing already has it.
        if cfg.train.save_final_checkpoint and self.start_step < cfg.train.max_steps:
            self._save_checkpoint(cfg.train.max_steps)
        self._save(self.out / "final", cfg.train.max_steps, with_state=False)
        if self.is_main:
            resumable = f" and {last} (resumable)" if last.is_dir() else ""
            print(
                f"Trained to step {cfg.train.max_steps} in {train_seconds:.1f}s; saved {self.out / 'final'}{resumable}",
                flush=True,
            )

    # ------------------------------------------------------------------ run
    def run(self) -> dict[str, Any]:
        try:
            return self._run()
        finally:
            if self.tracking:
                # Closes the tracker runs (flushes event files, ends the wandb and mlflow runs).
                self.accelerator.end_training()

    def _run(self) -> dict[str, Any]:
        cfg = self.cfg
        self._setup_output()
        if self.finished:
            return self._finished_summary()
        self._setup_data()  # a bad row stops the run before a large model is loaded
        model = self._setup_model()
        if self.finished:  # train.num_epochs: max_steps is known only now
            return self._finished_summary()
        # The rows as loaded: every refresh mines them again (their own negatives, not the
        # last refresh's), and the batch order is planned from them once.
        self.base_examples = self.train_examples
        self._restore_refresh()
        self._setup_optimizer(model)
        report_before = None
        if self.eval_examples and cfg.train.eval_before and self.resume_dir is None:
            # After prepare: under ZeRO-3 the loaded weights are partitioned.
            report_before = self._evaluate_now("eval_before.json", "Before training")
            self._report({"eval": report_before["average"]}, 0)
            self._callback("on_evaluate", 0, report_before)
        resumed_rng = None
        if self.resume_dir is not None:
            resumed_rng = self._load_state(self.resume_dir)
            if self.is_main:
                print(f"Resumed from {self.resume_dir} at step {self.start_step}", flush=True)
        loader, step_fn = self._setup_step(model)
        metrics_file = self._open_metrics()
        best = None
        if cfg.train.eval_steps and self.eval_examples:
            from vlm2emb.train.best import BestTracker

            best = BestTracker(self.out, cfg.train.metric_for_best, resume=self.resume_dir is not None)

        last_loss, train_seconds = self._train(loader, step_fn, resumed_rng, metrics_file, best)
        self._save_final(train_seconds)

        report_after = None
        if self.eval_examples:
            report_after = self._evaluate_now("eval.json", "After training")
            self._callback("on_evaluate", cfg.train.max_steps, report_after)
            if metrics_file is not None:
                metrics_file.write(_json_line({"step": cfg.train.max_steps, "eval": report_after["average"]}))
            if best is None:  # _track_best reports it otherwise
                self._report({"eval": report_after["average"]}, cfg.train.max_steps)
            if self.is_main and report_before is not None:
                print(_before_after(report_before, report_after), flush=True)
            if best is not None:
                self._track_best(best, cfg.train.max_steps, report_after, None)
        if metrics_file is not None:
            metrics_file.close()
        self.accelerator.wait_for_everyone()
        return {
            "output_dir": str(self.out),
            "steps": cfg.train.max_steps,
            # Passes over the training rows (None when streaming: the row count is unknown).
            "epochs": round(cfg.train.max_steps / self.steps_per_epoch, 4) if self.steps_per_epoch else None,
            "final_loss": last_loss,
            "train_seconds": train_seconds,
            "eval_before": report_before,
            "eval": report_after,
        }


def train(cfg: RecipeConfig, *, progress: bool = True, callbacks: list[Any] | None = None) -> dict[str, Any]:
    """Runs a whole recipe: load data and model, train, save, evaluate.

    Works single-process and under ``accelerate launch`` (DDP or DeepSpeed ZeRO-2/3).

    Args:
        cfg: The validated recipe.
        progress: Show a tqdm progress bar when stderr is a terminal (main process only);
            otherwise, and when False, print a log line every ``train.log_steps`` steps.
        callbacks: Objects with some of :class:`vlm2emb.train.callbacks.TrainerCallback`'s
            hooks (``on_step_end``, ``on_evaluate``, ``on_save``).

    Returns:
        A summary: ``{"output_dir", "steps", "epochs", "final_loss", "train_seconds",
        "eval_before", "eval"}``.
    """
    # A RecipeConfig built in Python skipped load_recipe's checks: bad values stop here,
    # before any model is loaded.
    cfg.validate()
    from vlm2emb.train.tracking import check_installed

    check_installed(cfg.train.report_to)  # a missing tracker fails now, not after the model loads
    return _Trainer(cfg, progress, callbacks).run()


def _before_after(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = ["hit@1 before -> after:"]
    for task, metrics in after["tasks"].items():
        prev = before["tasks"].get(task, {}).get("hit@1", float("nan"))
        lines.append(f"  {task:<24} {prev:.3f} -> {metrics['hit@1']:.3f}")
    return "\n".join(lines)
