"""Typed recipe configuration: dataclasses filled from YAML plus ``key=value`` overrides.

Every key a recipe may hold is a dataclass field below (docs/recipes.md lists them all),
filled by :func:`vlm2emb._typed_config.build_dataclass` (the mechanism eval suites use too).
Unknown keys are an error that names the key and lists the valid ones, so a typo never
silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2emb._typed_config import ConfigError, build_dataclass  # ConfigError: public here too


@dataclass
class LoraConfig:
    """LoRA settings (VLM2Vec defaults: r 16, alpha 64 over the LM projections)."""

    r: int = 16
    alpha: int = 64
    dropout: float = 0.05
    # None = the backbone family's default. A string is a regex matched against whole
    # module names; a list names module-name suffixes (peft's two forms).
    target_modules: str | list[str] | None = None
    use_dora: bool = False


@dataclass
class ModelConfig:
    """Which backbone to load and how it embeds."""

    # What is trained: embedder | reranker (vlm2emb.train.kinds registry; docs/rerank.md).
    kind: str = "embedder"
    name_or_path: str = "tiny:qwen2_vl"
    pooling: str | None = None  # None = the family's default (mean if bidirectional, else last)
    normalize: bool = True
    attention: str | None = None  # None = the family's default (causal for AR, bidirectional for diffusion)
    padding_side: str = "right"
    # vlm2emb | vlm2vec: how items become prompt strings (vlm2emb/prompts.py); saved with the
    # model. vlm2vec reproduces VLM2Vec's token sequence (qwen2_vl, qwen2_5_vl, llava_next).
    prompt_style: str = "vlm2emb"
    # Padding-free language-model batches (EmbeddingConfig.pack_sequences; Qwen-VL families,
    # attn_implementation sdpa); saved with the model.
    pack_sequences: bool = False
    # Late interaction (docs/multivector.md): per-token vectors of this size from a
    # multi-vector head (None = none, or the saved model's); dense_head: false keeps only it.
    multivector_dim: int | None = None
    dense_head: bool = True
    # all | content: content masks the instruction and template tokens out of the token set.
    multivector_tokens: str = "all"
    dtype: str = "fp32"  # weight dtype (auto = as stored); mixed precision is train.precision
    attn_implementation: str | None = None
    lora: LoraConfig | None = None  # YAML: false/true or a mapping of LoraConfig keys
    gradient_checkpointing: bool = False
    freeze_vision: bool = False  # full fine-tune of the language model only (LoRA never touches vision)
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    """Training and evaluation data (canonical JSONL/Parquet schema, see docs/data.md)."""

    train: list[str] = field(default_factory=list)  # paths, or demo:digits/train
    eval: list[str] = field(default_factory=list)
    query_instruction: str | None = None  # used when a row has no "instruction"
    target_instruction: str | None = None
    media_root: str | None = None  # relative media paths resolve here instead of the file's folder
    verify_images: bool = True  # open every image header before training starts
    max_negatives: int | None = None  # cap hard negatives per row (None = all)
    num_workers: int = 0
    format: str = "auto"  # auto | canonical | mmeb (VLM2Vec's qry/pos_text/... columns)
    # Train on MMEB-train rows' neg_text/neg_image_path as hard negatives. VLM2Vec reads
    # them but its collators drop them: false reproduces VLM2Vec. Canonical rows' negatives
    # are not affected (data.max_negatives caps those).
    mmeb_negatives: bool = True
    weights: list[float] = field(default_factory=list)  # mixing weight per data.train entry ([] = sizes)
    max_rows: list[int] = field(default_factory=list)  # cap per data.train entry (one value = all; 0 = none)
    homogeneous: bool = False  # every global batch from one dataset (VLM2Vec's same-task batches)
    group_by_length: bool = False  # sort rows by length inside windows of mega_batch global batches
    mega_batch: int = 50  # global batches per length-sorting window
    dedup_positives: bool = False  # no positive twice in a global batch (drop and replace)
    # random: shuffled rows; teacher: batch-sized clusters of rows linked by mined hard
    # negatives (vlm2emb.data.teacher_batches, B3-style), cut by batch_partitioner.
    batching: str = "random"
    batch_partitioner: str = "greedy"  # greedy | metis (pip install 'vlm2emb[metis]')
    on_bad_example: str = "error"  # error: stop at the first bad row; skip: count it in data_report.json
    min_pixels: int | None = None  # upscale smaller images (aspect kept) before the processor
    max_pixels: int | None = None  # downscale larger images (aspect kept) before the processor
    max_image_pixels: int | None = 89_478_485  # refuse larger images undecoded (decompression bombs)
    video_frames: int = 8  # frames sampled uniformly per video (VLM2Vec: 8)
    pdf_dpi: int = 144  # resolution PDF pages render at
    # Item texts longer than this many characters are cut when rows load (None = no cap):
    # one huge text pads its whole batch to its length.
    max_text_chars: int | None = None
    streaming: bool = False  # read data.train lazily (corpora larger than memory)
    shuffle_buffer: int = 10_000  # rows held for shuffling when streaming


@dataclass
class RemineConfig:
    """How ``train.remine_steps`` refreshes the hard negatives (docs/negatives.md).

    The settings of ``vlm2emb mine`` (:class:`vlm2emb.mine.MineConfig`, same names, same
    defaults) that a refresh uses. The instructions are not here: a refresh embeds with the
    recipe's ``data.query_instruction`` / ``data.target_instruction``, as training does.
    The corpus is the distinct positives of each dataset of the training rows (all datasets
    with ``across_datasets``), so every mined negative is a row that already passed the
    preflight check.
    """

    num_negatives: int = 7
    top_k: int = 30
    skip_top: int = 0
    max_score_ratio: float | None = 0.95
    dedup_threshold: float | None = 0.98
    sample: str = "top"
    seed: int = 0
    keep_existing: bool = False  # keep the rows' own (data.train) negatives first
    teacher_scores: bool = False  # write the current model's scores (the distill loss's targets)
    batch_size: int = 32
    block_size: int = 4096
    across_datasets: bool = False

    def mine_config(self) -> Any:
        """The :class:`vlm2emb.mine.MineConfig` of these settings."""
        from vlm2emb.mine import MineConfig

        settings = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "across_datasets"
        }
        return MineConfig(**settings)


@dataclass
class TrainConfig:
    """Optimisation settings."""

    # Optimizer steps; null when num_epochs decides them (a recipe giving num_epochs alone
    # gets null here, see normalise_recipe_data).
    max_steps: int | None = 100
    # Train this many passes over data.train instead (fractions allowed): max_steps becomes
    # ceil(num_epochs * batches per epoch), known once the rows are loaded. Not with streaming.
    num_epochs: float | None = None
    batch_size: int = 32  # the global contrastive batch (all processes together)
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    lr_scheduler: str = "linear"  # linear | cosine | constant
    # The objective (vlm2emb.losses registry: infonce, or one added with register_loss) and
    # its own settings, passed to its factory.
    loss: str = "infonce"
    loss_args: dict[str, Any] = field(default_factory=dict)
    temperature: float = 0.02
    learnable_temperature: bool = False  # CLIP-style logit scale, clamped to max_logit_scale
    max_logit_scale: float = 100.0
    symmetric_loss: bool = False
    # Matryoshka prefixes, e.g. [64, 128] (the full size is always trained too); [] = off.
    matryoshka_dims: list[int] = field(default_factory=list)
    matryoshka_weights: list[float] = field(default_factory=list)  # one per dim (default 1 each)
    gradcache_chunk_size: int = 0  # 0 = off; else items per forward chunk (GradCache)
    # GradCache's re-forward reuses a frozen vision tower's first-pass outputs instead of
    # running it again (exact; costs memory for the kept outputs). docs/distributed.md
    gradcache_reuse_vision: bool = True
    # Without GradCache: split each side of the local batch into this many length-sorted
    # sub-batches (less padding, more forward calls). GradCache chunks are always sorted.
    length_buckets: int = 1
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    max_grad_norm: float = 1.0
    save_steps: int = 0  # 0 = only final/
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None = all)
    # The last step also writes checkpoints/step-MAX_STEPS with the training state, so a
    # finished run can be extended (a larger train.max_steps + train.resume_from=auto).
    # false saves its disk (the weights twice + AdamW's two moments of the trainable ones)
    # but the run can then not be continued. save_total_limit applies to it as to the others.
    save_final_checkpoint: bool = True
    # DDP's per-step search for trainable parameters a step leaves out (HF Trainer's key of
    # the same name). None: decided by one probe step on the first rows (docs/distributed.md).
    ddp_find_unused_parameters: bool | None = None
    resume_from: str | None = None  # auto = newest whole checkpoint in output_dir, or a path
    # A new (not resumed) run refuses an output_dir holding another run unless this is true;
    # then the other run's outputs are deleted first, so resume_from=auto cannot pick them.
    overwrite_output_dir: bool = False
    max_bad_steps: int = 5  # stop after this many non-finite losses in a row (each is skipped)
    log_steps: int = 10
    # Experiment trackers, through accelerate: tensorboard, wandb, mlflow, trackio (each an
    # optional extra); a name or a list; [] or none = metrics.jsonl only. docs/training.md
    report_to: list[str] = field(default_factory=list)
    run_name: str | None = None  # the trackers' run name (None = output_dir's folder name)
    eval_batch_size: int = 64
    eval_before: bool = True  # evaluate the untrained model too (before/after table)
    eval_steps: int = 0  # 0 = off; else evaluate every N steps and keep the best model in best/
    # 0 = off; else every N steps (not at the last) the current model mines new hard negatives
    # for every training row (ANCE-style), written to output_dir/mined/step-N/. docs/negatives.md
    remine_steps: int = 0
    remine: RemineConfig = field(default_factory=RemineConfig)
    metric_for_best: str = "hit@1"  # eval average (mean over tasks) that picks best/; higher is better


@dataclass
class RerankConfig:
    """The reranker's settings (``model.kind: reranker``; docs/rerank.md).

    The prompt settings are saved with the model; None keeps the loaded model's own (a raw
    VLM: the defaults of :class:`vlm2emb.rerank.RerankerConfig`).
    """

    group_size: int = 4  # candidates per query: the positive and group_size - 1 negatives
    temperature: float = 1.0  # listwise softmax temperature (scores are logits already)
    template: str | None = None
    instruction: str | None = None  # instruction of rows without their own
    yes_token: str | None = None
    no_token: str | None = None


@dataclass
class RecipeConfig:
    """A whole training recipe."""

    output_dir: str = "runs/demo"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    rerank: RerankConfig = field(default_factory=RerankConfig)

    def _validate_kind(self) -> None:
        from vlm2emb.train.kinds import get_model_kind

        try:
            kind = get_model_kind(self.model.kind)
        except ValueError as exc:
            raise ConfigError(f"model.kind: {exc}") from None
        kind.check_recipe(self)

    def _validate_data(self) -> None:
        _validate_data_config(self.data)

    def _validate_loss_args(self) -> None:
        # Building the objective is cheap (no weights): a misspelt or out-of-range
        # train.loss_args entry then stops the recipe at load time, not at step 1.
        from vlm2emb.losses import get_loss

        try:
            get_loss(self.train.loss)(self.train)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"train.loss_args for loss {self.train.loss!r}: {exc}") from None

    def _validate_remine(self) -> None:
        if self.train.remine_steps < 0:
            raise ConfigError(f"train.remine_steps: must be >= 0, got {self.train.remine_steps}")
        try:
            self.train.remine.mine_config().validate()
        except ValueError as exc:
            raise ConfigError(f"train.remine: {exc}") from None
        if self.train.remine_steps and self.data.streaming:
            raise ConfigError(
                "train.remine_steps: not available with data.streaming (a refresh mines every "
                "training row, so the rows must be in memory)"
            )

    def validate(self) -> None:
        """Checks values that the types alone do not constrain."""
        # NaN passes every "<= 0" check below, so non-finite numbers are refused first.
        sections = [("train", self.train)] + ([("model.lora", self.model.lora)] if self.model.lora else [])
        for prefix, section in sections:
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                values = value if isinstance(value, list) else [value]
                if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                    raise ConfigError(f"{prefix}.{f.name}: must be a finite number, got {value}")
        if self.train.learning_rate <= 0:
            raise ConfigError(f"train.learning_rate: must be > 0, got {self.train.learning_rate}")
        if self.train.weight_decay < 0:
            raise ConfigError(f"train.weight_decay: must be >= 0, got {self.train.weight_decay}")
        if self.model.multivector_dim is not None and self.model.multivector_dim < 1:
            raise ConfigError(
                f"model.multivector_dim: must be a positive integer, got {self.model.multivector_dim}"
            )
        if not self.model.dense_head and self.model.multivector_dim is None:
            raise ConfigError("model.dense_head: false needs model.multivector_dim (e.g. 128)")
        from vlm2emb.model import MULTIVECTOR_TOKENS

        if self.model.multivector_tokens not in MULTIVECTOR_TOKENS:
            raise ConfigError(
                f"model.multivector_tokens: must be one of {', '.join(MULTIVECTOR_TOKENS)}, "
                f"got {self.model.multivector_tokens!r}"
            )
        from vlm2emb.losses import available_losses

        if self.train.loss not in available_losses():
            raise ConfigError(
                f"train.loss: unknown loss {self.train.loss!r}; choose one of {', '.join(available_losses())}"
            )
        from vlm2emb.backbones.base import ATTENTION_MODES
        from vlm2emb.pooling import POOLING_METHODS
        from vlm2emb.prompts import PROMPT_STYLES

        checks = [
            ("model.pooling", self.model.pooling, POOLING_METHODS),
            ("model.attention", self.model.attention, ATTENTION_MODES),
            ("model.padding_side", self.model.padding_side, ("left", "right")),
            ("model.prompt_style", self.model.prompt_style, PROMPT_STYLES),
            (
                "model.dtype",
                self.model.dtype,
                ("fp32", "bf16", "fp16", "float32", "bfloat16", "float16", "auto"),
            ),
            ("train.precision", self.train.precision, ("fp32", "bf16", "fp16")),
            ("train.lr_scheduler", self.train.lr_scheduler, ("linear", "cosine", "constant")),
        ]
        for key, value, allowed in checks:
            if value is None and key in ("model.pooling", "model.attention"):
                continue  # chosen by the backbone family
            if value not in allowed:
                raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
        if (self.train.max_steps is None) == (self.train.num_epochs is None):
            raise ConfigError(
                "train.num_epochs: give train.max_steps or train.num_epochs, not both"
                if self.train.max_steps is not None
                else "train.max_steps: give train.max_steps or train.num_epochs"
            )
        if self.train.num_epochs is not None:
            if self.train.num_epochs <= 0:
                raise ConfigError(f"train.num_epochs: must be > 0, got {self.train.num_epochs}")
            if self.data.streaming:
                raise ConfigError(
                    "train.num_epochs: not available with data.streaming (the row count is unknown)"
                )
        positives = [
            ("train.max_steps", self.train.max_steps or 1),
            ("train.batch_size", self.train.batch_size),
            ("train.temperature", self.train.temperature),
            ("train.eval_batch_size", self.train.eval_batch_size),
            ("train.log_steps", self.train.log_steps),
            ("train.max_bad_steps", self.train.max_bad_steps),
            ("train.max_logit_scale", self.train.max_logit_scale),
        ]
        if self.model.lora is not None:
            positives += [("model.lora.r", self.model.lora.r), ("model.lora.alpha", self.model.lora.alpha)]
            if not 0 <= self.model.lora.dropout < 1:
                raise ConfigError(f"model.lora.dropout: must be in [0, 1), got {self.model.lora.dropout}")
        if self.data.max_negatives is not None and self.data.max_negatives < 0:
            raise ConfigError(f"data.max_negatives: must be >= 0, got {self.data.max_negatives}")
        if self.train.length_buckets < 1:
            raise ConfigError(f"train.length_buckets: must be >= 1, got {self.train.length_buckets}")
        if self.train.gradcache_chunk_size < 0:
            raise ConfigError(
                f"train.gradcache_chunk_size: must be >= 0, got {self.train.gradcache_chunk_size}"
            )
        if self.train.save_total_limit is not None and self.train.save_total_limit < 1:
            raise ConfigError(f"train.save_total_limit: must be >= 1, got {self.train.save_total_limit}")
        if self.train.learnable_temperature and 1.0 / self.train.temperature > self.train.max_logit_scale:
            raise ConfigError(
                f"train.temperature: 1/{self.train.temperature} exceeds train.max_logit_scale "
                f"{self.train.max_logit_scale} for a learnable temperature"
            )
        self._validate_data()
        from vlm2emb.train.tracking import normalize_report_to

        self.train.report_to = normalize_report_to(self.train.report_to)
        if any(m <= 0 for m in self.train.matryoshka_dims):
            raise ConfigError(f"train.matryoshka_dims: must be positive, got {self.train.matryoshka_dims}")
        n_weights, n_dims = len(self.train.matryoshka_weights), len(self.train.matryoshka_dims)
        if n_weights and n_weights != n_dims:
            raise ConfigError("train.matryoshka_weights: needs one weight per entry of train.matryoshka_dims")
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.data.num_workers}")
        for key, value in positives:
            if value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value}")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size: contrastive training needs at least 2 examples per batch")
        if not 0 <= self.train.warmup_ratio < 1:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {self.train.warmup_ratio}")
        from vlm2emb.eval.metrics import metric_names

        if self.train.eval_steps < 0:
            raise ConfigError(f"train.eval_steps: must be >= 0, got {self.train.eval_steps}")
        if self.train.metric_for_best not in metric_names((1, 5, 10)):
            raise ConfigError(
                f"train.metric_for_best: {self.train.metric_for_best!r} is not one of "
                f"{', '.join(metric_names((1, 5, 10)))}"
            )
        if self.train.save_steps < 0:
            raise ConfigError(f"train.save_steps: must be >= 0, got {self.train.save_steps}")
        self._validate_remine()
        if not self.data.train:
            raise ConfigError(
                "data.train: no training data given (a path, a list of paths or demo:digits/train)"
            )
        self._validate_loss_args()  # the objective's factory reads the values checked above
        self._validate_kind()


def _validate_data_config(data: DataConfig) -> None:
    """Checks the data.* values (media bounds, batching, bad-input policy)."""
    for key, value, allowed in (
        ("data.format", data.format, ("auto", "canonical", "mmeb")),
        ("data.on_bad_example", data.on_bad_example, ("error", "skip")),
        ("data.batching", data.batching, ("random", "teacher")),
        ("data.batch_partitioner", data.batch_partitioner, ("greedy", "metis")),
    ):
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    for key, value in (
        ("data.min_pixels", data.min_pixels),
        ("data.max_pixels", data.max_pixels),
        ("data.max_image_pixels", data.max_image_pixels),
        ("data.video_frames", data.video_frames),
        ("data.pdf_dpi", data.pdf_dpi),
        ("data.max_text_chars", data.max_text_chars),
        ("data.mega_batch", data.mega_batch),
        ("data.shuffle_buffer", data.shuffle_buffer),
    ):
        if value is not None and value <= 0:
            raise ConfigError(f"{key}: must be > 0, got {value}")
    if data.min_pixels and data.max_pixels and data.min_pixels > data.max_pixels:
        raise ConfigError(
            f"data.min_pixels: {data.min_pixels} is larger than data.max_pixels {data.max_pixels}"
        )
    if data.streaming and (data.group_by_length or data.dedup_positives):
        key = "data.group_by_length" if data.group_by_length else "data.dedup_positives"
        raise ConfigError(f"{key}: not available with data.streaming (it needs the whole epoch in memory)")
    if data.batching == "teacher":
        # Each of these orders rows by its own rule; the teacher's clusters would be undone.
        clash = [
            key
            for key, on in (
                ("data.streaming", data.streaming),
                ("data.weights", bool(data.weights)),
                ("data.group_by_length", data.group_by_length),
            )
            if on
        ]
        if clash:
            raise ConfigError(f"data.batching: teacher cannot be combined with {', '.join(clash)}")
    n = len(data.train)
    if data.weights:
        if len(data.weights) != n:
            raise ConfigError(f"data.weights: {len(data.weights)} values for {n} data.train entries")
        if any(w < 0 for w in data.weights) or not sum(data.weights):
            raise ConfigError("data.weights: must be >= 0 and not all 0")
    if data.max_rows:
        if len(data.max_rows) not in (1, n):
            raise ConfigError(
                f"data.max_rows: give one value or one per data.train entry ({n}), got {len(data.max_rows)}"
            )
        if any(m < 0 for m in data.max_rows):
            raise ConfigError("data.max_rows: must be >= 0 (0 = no cap)")


def _to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    return obj


def recipe_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    """The recipe as plain data (what ``output_dir/recipe.yaml`` holds)."""
    return _to_dict(cfg)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Applies one ``dotted.key=value`` override to raw recipe data in place."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} is not of the form key=value")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r} has an empty key")
    # YAML parsing gives numbers, booleans, null and [lists]; typed coercion follows.
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        if raw.lstrip().startswith(("[", "{")):
            # "[a.jsonl" is a list with its bracket left open, not a file named so.
            problem = getattr(exc, "problem", None) or "not valid YAML"
            raise ConfigError(
                f"override {override!r}: {key}: {raw.strip()!r} is not a valid list or mapping "
                f"({problem}); write lists as [a, b]"
            ) from None
        value = raw
    if isinstance(value, dict):
        # "Find: the image" is a sentence, not a mapping; nested keys use dotted names.
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            # e.g. model.lora.r=8 with "lora: true" or absent: start a mapping.
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def normalise_recipe_data(data: dict[str, Any]) -> None:
    """Fills in what a raw recipe implies: ``train.num_epochs`` alone sets ``max_steps`` null.

    Without this, the default ``max_steps`` would clash with every ``num_epochs`` recipe.
    """
    train = data.get("train")
    if isinstance(train, dict) and train.get("num_epochs") is not None and "max_steps" not in train:
        train["max_steps"] = None


def override_steps(data: dict[str, Any], key: str) -> None:
    """After an override of ``key``: ``train.num_epochs`` and ``train.max_steps`` exclude each
    other, so overriding one clears the other (the override beats the file)."""
    other = {"train.num_epochs": "max_steps", "train.max_steps": "num_epochs"}.get(key)
    train = data.get("train")
    if other and isinstance(train, dict) and train.get(key.split(".")[1]) is not None:
        train[other] = None


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """A recipe file's raw mapping.

    Raises:
        ConfigError: Missing or unreadable file, not a mapping.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe not found: {p}")
    try:
        loaded = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: invalid YAML: {str(exc).splitlines()[0]}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{p}: a recipe must be a YAML mapping, got {type(loaded).__name__}")
    return loaded


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Loads a YAML recipe and applies ``key=value`` overrides.

    Args:
        path: The recipe file (None = all defaults).
        overrides: Dotted ``key=value`` strings, applied in order.

    Returns:
        The validated :class:`RecipeConfig`.

    Raises:
        ConfigError: Missing or unreadable file, unknown key, bad value; the message names
            the file or key.
    """
    data: dict[str, Any] = read_recipe_file(path) if path is not None else {}
    # Normalise "lora: true" and similar before overrides descend into them.
    for override in overrides:
        _expand_bool_section(data, override)
        apply_override(data, override)
        override_steps(data, override.split("=", 1)[0].strip())
    normalise_recipe_data(data)
    cfg = build_dataclass(RecipeConfig, data)
    cfg.validate()
    return cfg


def _expand_bool_section(data: dict[str, Any], override: str) -> None:
    # "model.lora.r=8" when the recipe says "lora: true" must keep LoRA on with r=8.
    key = override.split("=", 1)[0].strip()
    parts = key.split(".")
    node: Any = data
    for part in parts[:-1]:
        if not isinstance(node, dict):
            return
        if node.get(part) is True:
            node[part] = {}
        node = node.get(part)
