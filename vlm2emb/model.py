"""EmbeddingModel: a VLM backbone + prompt rendering + pooling, with encode() and save/load.

The same class serves inference (``encode``) and training (``forward`` on collated
batches), so a trained model is used exactly as it was trained.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from vlm2emb.backbones.base import ATTENTION_MODES, BackboneAdapter
from vlm2emb.distributed import is_zero3_module
from vlm2emb.inputs import CONTENT_MASK, DUMMY_ROWS, InputBuilder, RenderedItem, length_sorted_batches
from vlm2emb.items import resolve_instruction, task_instruction
from vlm2emb.multivector import MultiVectorEmbeddings, MultiVectorHead
from vlm2emb.pooling import POOLING_METHODS, pool, pool_packed

T = TypeVar("T")
R = TypeVar("R")

CONFIG_NAME = "vlm2emb_config.json"
MULTIVECTOR_HEAD_NAME = "multivector_head.safetensors"
# EmbeddingConfig.multivector_tokens: every real token, or the item's own text and images.
MULTIVECTOR_TOKENS = ("all", "content")
ADAPTER_DIR = "adapter"
FORMAT_VERSION = 1
TINY_PREFIX = "tiny:"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class EmbeddingConfig:
    """How a backbone becomes an embedder; saved as ``vlm2emb_config.json``.

    Attributes:
        family: Backbone family (registry name).
        pooling: One of ``last``, ``eos``, ``embed_token``, ``mean``.
        normalize: L2-normalise embeddings.
        attention: ``causal`` or ``bidirectional``.
        padding_side: ``right`` or ``left``; embeddings do not depend on it.
        query_instruction: Default instruction for :meth:`EmbeddingModel.encode_queries`.
        target_instruction: Default instruction for :meth:`EmbeddingModel.encode_targets`.
        temperature: The training temperature (recorded with the model: scores divided by
            it are the logits the model was trained on).
        base_model: Where the backbone originally came from (for model cards and exports);
            an adapter-only export loads its base weights from here.
        truncate_dim: Matryoshka truncation: :meth:`EmbeddingModel.encode` keeps the first
            ``truncate_dim`` dimensions (re-normalised when ``normalize``). None = all.
        matryoshka_dims: The prefix sizes the model was trained with (a record for model
            cards; ``train.matryoshka_dims``).
        prompt_style: How items become prompt strings (:mod:`vlm2emb.prompts`): ``vlm2emb``
            (the default, what vlm2emb trains with) or ``vlm2vec`` (VLM2Vec's exact token
            sequence, for checkpoints VLM2Vec trained).
        pack_sequences: Padding-free language-model batches: :meth:`EmbeddingModel.collate`
            concatenates a batch's rows into one sequence of real tokens and the decoder
            attends within each row only (same embeddings as padded batches; families with
            ``supports_packing``: Qwen2-VL, Qwen2.5-VL, Qwen3-VL). Off by default.
        multivector_dim: Size of the per-token vectors of the multi-vector (late
            interaction) head, or None for no such head (:mod:`vlm2emb.multivector`). Its
            weights are saved as ``multivector_head.safetensors``.
        dense_head: Compute the single pooled embedding. False leaves only the multi-vector
            head (then ``multivector_dim`` is required); with both, one forward gives both.
        instructions: The instructions the training rows were embedded with, per task (the
            rows' ``dataset``): ``{task: {"rows", "query", "query_distinct", "target",
            "target_distinct"}}`` (:func:`vlm2emb.items.instruction_record`); None for a
            model not trained by vlm2emb or a streamed run. ``encode_queries(...,
            task=...)`` uses them. A record written by the trainer, like ``temperature``.
        multivector_tokens: Which real tokens the multi-vector head keeps: ``all`` (every
            real token: instruction, template and pooling-suffix tokens included) or
            ``content`` (only the item's own text and image tokens; the instruction, the
            family's prompt template and special tokens are masked out of the token set,
            though the backbone still reads them). Prompt style ``vlm2emb`` only.
        format_version: Layout version of the saved directory.
    """

    family: str
    pooling: str = "last"
    normalize: bool = True
    attention: str = "causal"
    padding_side: str = "right"
    query_instruction: str | None = None
    target_instruction: str | None = None
    temperature: float = 0.02
    base_model: str | None = None
    truncate_dim: int | None = None
    matryoshka_dims: list[int] | None = None
    prompt_style: str = "vlm2emb"
    pack_sequences: bool = False
    multivector_dim: int | None = None
    dense_head: bool = True
    instructions: dict[str, dict[str, Any]] | None = None
    multivector_tokens: str = "all"
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        if self.pooling not in POOLING_METHODS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLING_METHODS)}")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(
                f"unknown attention {self.attention!r}; choose one of {', '.join(ATTENTION_MODES)}"
            )
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
        if self.truncate_dim is not None and (isinstance(self.truncate_dim, bool) or self.truncate_dim < 1):
            raise ValueError(f"truncate_dim must be a positive integer or None, got {self.truncate_dim!r}")
        from vlm2emb.prompts import check_prompt_style

        check_prompt_style(self.prompt_style)
        if not isinstance(self.pack_sequences, bool):
            raise ValueError(f"pack_sequences must be true or false, got {self.pack_sequences!r}")
        dim = self.multivector_dim
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"multivector_dim must be a positive integer or None, got {dim!r}")
        if not isinstance(self.dense_head, bool):
            raise ValueError(f"dense_head must be true or false, got {self.dense_head!r}")
        if not self.dense_head and dim is None:
            raise ValueError("dense_head=False needs a multi-vector head: set multivector_dim (e.g. 128)")
        if self.instructions is not None and not (
            isinstance(self.instructions, dict)
            and all(isinstance(v, dict) for v in self.instructions.values())
        ):
            raise ValueError("instructions must map task names to their instruction records")
        if self.multivector_tokens not in MULTIVECTOR_TOKENS:
            raise ValueError(
                f"multivector_tokens must be one of {', '.join(MULTIVECTOR_TOKENS)}, "
                f"got {self.multivector_tokens!r}"
            )
        if self.multivector_tokens == "content" and (self.pack_sequences or self.prompt_style != "vlm2emb"):
            # The content mask follows the padded rows and vlm2emb's prompt layout (the
            # vlm2vec style puts the instruction inside the item text).
            raise ValueError(
                "multivector_tokens='content' needs prompt_style 'vlm2emb' and pack_sequences off"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str | None:
    """Maps ``"bf16"``/``"bfloat16"``/... or a torch dtype to a torch dtype.

    ``"auto"`` is passed through: transformers then keeps the checkpoint's stored dtype.
    """
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _looks_like_local_path(name: str) -> bool:
    # Hub ids are "org/name"; anything absolute, relative-dotted or deeper is a local path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def saved_config_and_family(
    path: str | os.PathLike[str], *, trust_remote_code: bool = False, config_name: str = CONFIG_NAME
) -> tuple[dict[str, Any], str]:
    """A model directory's saved ``vlm2emb_config.json`` (empty for a raw VLM) and its
    backbone family (saved, else transformers' ``model_type``).

    Args:
        path: The model directory.
        trust_remote_code: Passed to ``AutoConfig`` for a raw VLM.
        config_name: The vlm2emb config file to read (the reranker saves its own).

    Raises:
        ValueError: The saved config is not valid JSON (the file is named).
    """
    saved: dict[str, Any] = {}
    cfg_file = Path(path) / config_name
    if cfg_file.is_file():
        try:
            saved = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{cfg_file}: invalid JSON ({exc.msg}, line {exc.lineno})") from exc
    if "family" in saved:
        return saved, saved["family"]
    from transformers import AutoConfig

    return saved, AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code).model_type


# Set by the named arguments (whose defaults depend on the saved config) or by loading.
_LOAD_OWNED = (
    "family",
    "format_version",
    "pooling",
    "normalize",
    "attention",
    "padding_side",
    "truncate_dim",
    "prompt_style",
    "pack_sequences",
)


def _checked_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``from_pretrained``'s ``config_overrides``, refusing keys EmbeddingConfig lacks."""
    known = {f.name for f in fields(EmbeddingConfig)} - set(_LOAD_OWNED)
    unknown = sorted(set(overrides or {}) - known)
    if unknown:
        raise ValueError(
            f"config_overrides: unknown key(s) {unknown}; choose from {', '.join(sorted(known))}"
        )
    return dict(overrides or {})


def _grad_free(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Runs an EmbeddingModel method under ``torch.inference_mode``, or ``torch.no_grad`` when
    the weights are DeepSpeed ZeRO-3 partitions: ZeRO-3 gathers them into buffers it keeps
    for later forwards, and buffers made under inference mode are inference tensors that a
    later training step cannot save for its backward (an evaluation before or during
    training broke the next step)."""

    @functools.wraps(fn)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        zero3 = is_zero3_module(self)
        with torch.no_grad() if zero3 else torch.inference_mode():
            return fn(self, *args, **kwargs)

    return wrapper


def check_model_path(name: str) -> str:
    """``name`` as a local folder if it is one, else as a hub id; refuses a mistyped path.

    A name that is neither an existing path nor shaped like a hub id would otherwise go to
    the hub, which retries for about 30 seconds before failing with a network message.

    Raises:
        FileNotFoundError: ``name`` looks local (``./x``, ``a/b/c``, ``x`` without an owner,
            or ``runs/x`` where the folder ``runs`` exists here) and does not exist.
    """
    path = Path(name).expanduser()
    if path.exists():
        return str(path)
    owner = name.split("/", 1)[0]
    if _looks_like_local_path(name) or "/" not in name or Path(owner).expanduser().is_dir():
        raise FileNotFoundError(
            f"model path not found: {name} (no such folder; hub ids are written OWNER/NAME)"
        )
    return name


@contextlib.contextmanager
def model_folder(name: str, seed: int = 0) -> Iterator[tuple[str, bool]]:
    """Where to load ``name`` from, and whether it is a ``tiny:`` model.

    ``tiny:FAMILY`` is built offline into a temporary folder, removed when the block ends
    (everything is in memory once loaded); anything else is :func:`check_model_path`'s
    answer. Both :class:`EmbeddingModel` and :class:`vlm2emb.rerank.Reranker` load this way.

    Raises:
        KeyError: ``tiny:`` with an unknown family (the message lists the families).
        FileNotFoundError: As :func:`check_model_path`.
    """
    if not name.startswith(TINY_PREFIX):
        yield check_model_path(name), False
        return
    from vlm2emb.backbones.registry import get_adapter_class
    from vlm2emb.testing import tiny_backbone

    family = name[len(TINY_PREFIX) :]
    get_adapter_class(family)  # fail early with the list of families
    with tempfile.TemporaryDirectory(prefix="vlm2emb-tiny-") as tmp:
        tiny_backbone(family, tmp, seed=seed)
        yield tmp, True


def apply_saved_lora(module: nn.Module, adapter_dir: Path, merge: bool) -> nn.Module:
    """``module`` with the peft adapter saved in ``adapter_dir`` (unchanged when there is none):
    merged into the weights, or kept a trainable peft module (``merge=False``)."""
    if not (adapter_dir / "adapter_config.json").is_file():
        return module
    from peft import PeftModel

    module = PeftModel.from_pretrained(module, str(adapter_dir), is_trainable=not merge)
    return module.merge_and_unload() if merge else module


def enable_checkpointing(base: nn.Module) -> Any:
    """Non-reentrant activation checkpointing of ``base``'s blocks (a transformers model).

    Shared by :meth:`EmbeddingModel.enable_gradient_checkpointing` and the reranker's. A
    frozen token embedding (LoRA) would give the first checkpointed block inputs without
    grad, so the language model's input embeddings are made to require grad, and only
    those: transformers' own switch hooks every sub-model's input embeddings, the vision
    tower's patch embedding too, which makes a frozen tower build a graph and run a
    backward whose gradients go nowhere.

    Returns:
        The forward hook's handle (remove it to undo), or None when the embeddings train.
    """
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5.17
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.disable_input_require_grads()
    embeddings = base.get_input_embeddings()
    if embeddings.weight.requires_grad:
        return None

    def require_grad(_module: nn.Module, _args: Any, output: torch.Tensor) -> None:
        output.requires_grad_(True)

    return embeddings.register_forward_hook(require_grad)


def disable_checkpointing(base: nn.Module) -> None:
    """Undoes :func:`enable_checkpointing`'s switch (the caller removes the hook)."""
    disable = getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable
    disable()


class EmbeddingModel(nn.Module):
    """A vision-language model used as an embedding model.

    Build one with :meth:`from_pretrained`; embed with :meth:`encode`. Training code calls
    :meth:`collate` on CPU workers and :meth:`forward` on the device.

    Example:
        >>> from vlm2emb import EmbeddingModel
        >>> model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")  # doctest: +SKIP
        >>> emb = model.encode(["a handwritten digit seven"])  # [1, d]  # doctest: +SKIP
    """

    def __init__(self, backbone: nn.Module, adapter: BackboneAdapter, config: EmbeddingConfig) -> None:
        super().__init__()
        config.validate()
        self.backbone = backbone
        self.adapter = adapter
        self.config = config
        # The config owns padding_side and attention; the adapter reads them from it.
        self.adapter.settings = config
        self.adapter.check_prompt_style(config.prompt_style)  # refuses a family VLM2Vec does not train
        self.adapter.configure_backbone(backbone)
        self.adapter.set_attention(backbone, config.attention)
        if config.pack_sequences:
            self.adapter.enable_packing(backbone)  # one-line ValueError for other families
        from vlm2emb.distributed import is_distributed

        # Built inside a process group of several processes (the trainer loads the model after
        # the accelerator starts): keep every process's modules in step (InputBuilder).
        self.inputs = InputBuilder(adapter, config, always_run_vision=is_distributed())
        # Set by enable_learnable_temperature(); a model parameter so that DDP and DeepSpeed
        # (ZeRO-3 only materialises parameters inside forward) treat it like any weight.
        self.logit_scale: nn.Parameter | None = None
        self.max_logit_scale = 100.0
        # The late-interaction projection, built from config.multivector_dim (the one owner
        # of the setting); saved beside the backbone in its own safetensors file.
        self.multivector_head: MultiVectorHead | None = None
        if config.multivector_dim is not None:
            self._build_multivector_head()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        attention: str | None = None,
        padding_side: str | None = None,
        torch_dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        merge_lora: bool = True,
        seed: int = 0,
        truncate_dim: int | None = None,
        base_model: str | os.PathLike[str] | None = None,
        prompt_style: str | None = None,
        pack_sequences: bool | None = None,
        config_overrides: dict[str, Any] | None = None,
    ) -> EmbeddingModel:
        """Loads a raw VLM checkpoint or a saved vlm2emb model.

        Args:
            name_or_path: A local directory, a hub id (needs network), or ``tiny:FAMILY``
                for a tiny random model built offline (tests and the demo).
            pooling: Overrides the saved pooling. Default: the saved value, else ``mean``
                when the attention is bidirectional and ``last`` when it is causal.
            normalize: Overrides the saved normalisation (default True).
            attention: ``causal`` or ``bidirectional`` (default: the saved value, else the
                family's ``default_attention``: causal for AR VLMs).
            padding_side: ``right`` or ``left`` (default: saved, else right).
            torch_dtype: Weight dtype (``"bf16"``, ``torch.float32``, ...).
            attn_implementation: transformers attention backend (``sdpa``, ``eager``, ...).
            device: Device to move the model to.
            trust_remote_code: Allow custom modelling code shipped with the checkpoint.
            merge_lora: Merge a saved LoRA adapter into the weights (faster inference).
                With False the adapter stays a separate trainable peft module.
            seed: Seed for ``tiny:`` models (also a ``tiny:`` base of an adapter-only export).
            truncate_dim: Matryoshka truncation applied by :meth:`encode` (default: saved).
            base_model: For an adapter-only export (``adapter_config.json`` and no weights):
                where the base weights are, overriding the recorded ``base_model``.
            prompt_style: ``vlm2emb`` or ``vlm2vec`` (:mod:`vlm2emb.prompts`). Default: the
                saved value, else ``vlm2emb``. Use ``vlm2vec`` for a checkpoint VLM2Vec
                trained, so it sees the tokens it was trained on; it is saved with the model.
            pack_sequences: Padding-free batches (see :class:`EmbeddingConfig`). Default:
                the saved value, else False. Needs ``attn_implementation`` ``sdpa``.
            config_overrides: Further :class:`EmbeddingConfig` fields to set at load time
                (``query_instruction``, ``target_instruction``, ``temperature``,
                ``matryoshka_dims``, ``base_model``); the trainer records the recipe's here,
                so the config is never rewritten after loading.

        Returns:
            The model in eval mode.

        Raises:
            FileNotFoundError: A local path does not exist.
            KeyError: The checkpoint's model type has no registered adapter.
            ValueError: An unknown key in ``config_overrides``.
        """
        from vlm2emb._quiet import quiet_third_party

        quiet_third_party()
        name = str(name_or_path)
        load = functools.partial(
            cls._load_dir,
            overrides={
                "pooling": pooling,
                "normalize": normalize,
                "attention": attention,
                "padding_side": padding_side,
                "truncate_dim": truncate_dim,
                "prompt_style": prompt_style,
                "pack_sequences": pack_sequences,
            },
            config_overrides=_checked_overrides(config_overrides),
            dtype=resolve_dtype(torch_dtype),
            attn_implementation=attn_implementation,
            merge_lora=merge_lora,
            base_model=name,
            adapter_base=str(base_model) if base_model is not None else None,
            seed=seed,
        )
        with model_folder(name, seed) as (path, tiny):
            model = load(path, trust_remote_code=trust_remote_code and not tiny)
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def _load_dir(
        cls,
        path: str,
        *,
        overrides: dict[str, Any],
        config_overrides: dict[str, Any],
        dtype: torch.dtype | str | None,
        attn_implementation: str | None,
        trust_remote_code: bool,
        merge_lora: bool,
        base_model: str,
        adapter_base: str | None = None,
        seed: int = 0,
    ) -> EmbeddingModel:
        from vlm2emb.backbones.registry import get_adapter_class

        saved, family = saved_config_and_family(path, trust_remote_code=trust_remote_code)
        adapter_cls = get_adapter_class(family)
        adapter_dir = Path(path) / ADAPTER_DIR
        if (Path(path) / "adapter_config.json").is_file() and not (Path(path) / "config.json").is_file():
            # An adapter-only export: the peft adapter sits at the top, the base is elsewhere.
            base = adapter_base or saved.get("base_model")
            if not base:
                raise ValueError(f"{path}: adapter-only export without a base model; pass base_model=")
            with _base_checkpoint(base, seed) as base_path:
                backbone = adapter_cls.load_model(
                    base_path,
                    dtype=dtype,
                    attn_implementation=attn_implementation,
                    trust_remote_code=trust_remote_code,
                )
            adapter_dir = Path(path)
        else:
            backbone = adapter_cls.load_model(
                path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=trust_remote_code,
            )
        backbone = apply_saved_lora(backbone, adapter_dir, merge_lora)
        processor = adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)
        config = EmbeddingConfig.from_dict({**saved, "family": adapter_cls.family})
        if config.base_model is None:
            config.base_model = base_model
        for key, value in config_overrides.items():
            setattr(config, key, value)
        for key, value in overrides.items():
            if value is not None:
                setattr(config, key, value)
        # Neither the call nor a saved config chose: attention follows the family
        # (diffusion and prefix-LM backbones see the whole sequence), and pooling follows
        # the attention: mean for bidirectional (every token saw the whole input), last for
        # causal (only the last token did).
        if overrides.get("attention") is None and "attention" not in saved:
            config.attention = adapter_cls.default_attention
        if overrides.get("pooling") is None and "pooling" not in saved:
            config.pooling = "mean" if config.attention == "bidirectional" else "last"
        adapter = adapter_cls(processor, settings=config)
        model = cls(backbone, adapter, config)
        model._ensure_pool_token()
        model._load_multivector_head(Path(path), saved.get("multivector_dim"))
        return model

    def _build_multivector_head(self, seed: int = 0) -> None:
        """A fresh multi-vector head of ``config.multivector_dim``, its init seeded (the same
        on every process and run, whatever drew random numbers before)."""
        hidden = self.adapter.hidden_size(self.backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head = MultiVectorHead(hidden, int(self.config.multivector_dim))  # type: ignore[arg-type]
        self.multivector_head = head.to(self.device)

    def _load_multivector_head(self, path: Path, saved_dim: int | None) -> None:
        """Loads the saved head's weights; a freshly enabled head (no saved one) keeps its init.

        Raises:
            ValueError: The saved config has a head but its file is missing, or the saved head's
                size differs from the requested ``multivector_dim``.
        """
        file = path / MULTIVECTOR_HEAD_NAME
        if saved_dim is not None and not file.is_file():
            raise ValueError(
                f"{path}: the config has a multi-vector head but {MULTIVECTOR_HEAD_NAME} is missing"
            )
        if self.multivector_head is None or not file.is_file():
            return
        if saved_dim is not None and saved_dim != self.config.multivector_dim:
            raise ValueError(
                f"{path}: the saved multi-vector head has dim {saved_dim}, "
                f"not the requested multivector_dim {self.config.multivector_dim}"
            )
        from safetensors.torch import load_file

        self.multivector_head.proj.load_state_dict(load_file(str(file), device=str(self.device)))

    def enable_multivector(self, dim: int = 128, *, dense: bool = True, seed: int = 0) -> None:
        """Adds a multi-vector (late interaction) head: per-token vectors of size ``dim``.

        The setting lives in the config (``multivector_dim``, ``dense_head``) and the head is
        saved with the model; :meth:`from_pretrained` with
        ``config_overrides={"multivector_dim": 128}`` does the same at load time.

        Args:
            dim: Token vector size (ColPali and jina-embeddings-v4 use 128).
            dense: Keep the single-vector head too (both come from one forward).
            seed: Seed of the head's random init.

        Raises:
            ValueError: ``dim`` is not a positive integer.
        """
        previous = (self.config.multivector_dim, self.config.dense_head)
        self.config.multivector_dim, self.config.dense_head = dim, dense
        try:
            self.config.validate()
        except ValueError:
            self.config.multivector_dim, self.config.dense_head = previous
            raise
        self._build_multivector_head(seed)

    def _ensure_pool_token(self) -> None:
        """For ``embed_token`` pooling, adds the pooling token to the vocabulary if missing."""
        if self.config.pooling != "embed_token":
            return
        tok = self.adapter.tokenizer
        token = self.adapter.embed_token
        if token in tok.get_vocab():
            return
        tok.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
        new_id = tok.convert_tokens_to_ids(token)
        weight = self.backbone.get_input_embeddings().weight
        rows = weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]  # ZeRO-3: partitioned
        if new_id >= rows:
            # Checkpoints often carry spare embedding rows; only grow when there is none.
            self.backbone.resize_token_embeddings(new_id + 1, mean_resizing=True)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def embedding_dim(self) -> int:
        """Size of the embeddings :meth:`encode` returns (``truncate_dim`` applied)."""
        full = self.adapter.hidden_size(self.backbone)
        return min(full, self.config.truncate_dim) if self.config.truncate_dim else full

    @property
    def processor(self) -> Any:
        return self.adapter.processor

    # ------------------------------------------------------------------ inputs
    def collate(
        self,
        items: Sequence[Any],
        instructions: str | Sequence[str | None] | None = None,
        *,
        base_dir: str | Path | None = None,
    ) -> dict[str, Any]:
        """Turns items into one backbone batch (CPU tensors): :attr:`inputs` called.

        Args:
            items: Strings, PIL images or item dicts (see :class:`vlm2emb.items.Item`).
            instructions: One instruction for all items, or one per item (None = none).
            base_dir: Folder that relative image paths resolve against.

        Returns:
            The backbone's input tensors (see :meth:`vlm2emb.inputs.InputBuilder.__call__`).
        """
        return self.inputs(items, instructions, base_dir=base_dir)

    @property
    def base_dir(self) -> str | Path | None:
        """Folder that relative image paths in :meth:`encode` resolve against."""
        return self.inputs.base_dir

    @base_dir.setter
    def base_dir(self, value: str | Path | None) -> None:
        self.inputs.base_dir = value

    def render_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        """The prompt string for one item in the model's ``prompt_style``
        (:func:`vlm2emb.prompts.render_prompt`)."""
        return self.inputs.render_prompt(text, num_images, instruction)

    def set_prompt_style(self, style: str) -> None:
        """Switches the prompt style (saved with the model by :meth:`save_pretrained`).

        Raises:
            ValueError: Unknown style, or a family without that style.
        """
        self.adapter.check_prompt_style(style)
        self.config.prompt_style = style

    def set_attention(self, mode: str) -> None:
        """Switches the backbone between ``causal`` and ``bidirectional`` attention; the
        config (saved with the model) records it.

        Raises:
            ValueError: A mode the family does not support.
        """
        self.adapter.set_attention(self.backbone, mode)  # writes config.attention

    def render(self, item: Any, instruction: str | None = None) -> RenderedItem:
        """What the backbone gets for one item: the prompt string and its token ids.

        The ids are those :meth:`encode` feeds the model (image placeholders expanded to
        one token per image feature, pooling suffix included, padding left out), so a
        user can check them against another implementation's.

        Args:
            item: A string, a PIL image or an item dict (see :class:`vlm2emb.items.Item`).
            instruction: The instruction, as given to :meth:`encode`.

        Returns:
            A :class:`vlm2emb.inputs.RenderedItem`.
        """
        return self.inputs.render(item, instruction)

    # ------------------------------------------------------------------ forward
    def enable_learnable_temperature(self, temperature: float, max_scale: float = 100.0) -> None:
        """Learns the temperature, CLIP-style: a parameter ``logit_scale = log(1 / temperature)``.

        Optimising the log keeps the scale positive and makes multiplicative updates. The
        scale is clamped to ``max_scale`` (CLIP's 100, a temperature of at least 0.01) so the
        logits cannot blow up; while clamped the parameter gets no gradient. It is a model
        parameter so that DDP and DeepSpeed (ZeRO-3 materialises parameters only inside a
        forward) treat it like any weight; :meth:`save_pretrained` records the learned value
        in ``config.temperature``.

        Raises:
            ValueError: ``temperature`` not positive, or ``1 / temperature`` above ``max_scale``.
        """
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
        if 1.0 / temperature > max_scale:
            raise ValueError(
                f"initial scale 1/temperature = {1.0 / temperature:g} exceeds max_scale={max_scale:g}"
            )
        value = torch.tensor(math.log(1.0 / temperature), dtype=torch.float32, device=self.device)
        self.logit_scale = nn.Parameter(value)
        self.max_logit_scale = float(max_scale)

    def learned_temperature(self) -> torch.Tensor:
        """[] the current temperature ``1 / clamp(exp(logit_scale), max=max_scale)``."""
        if self.logit_scale is None:
            raise ValueError("this model has no learnable temperature (enable_learnable_temperature)")
        return _temperature_of(self.logit_scale, self.max_logit_scale)

    def forward(
        self,
        inputs: dict[str, Any] | Sequence[dict[str, Any]],
        with_temperature: bool = False,
        replays: Sequence[Any] | None = None,
        multivector: bool = True,
    ) -> torch.Tensor | list[torch.Tensor] | tuple[Any, torch.Tensor]:
        """Embeds one collated batch, or several in one call.

        Several batches in one call matter under DDP: the query, positive and negative
        passes of a training step must be one forward of the wrapped module, because DDP
        prepares its gradient reduction once per forward.

        Args:
            inputs: Output of :meth:`collate` (moved to the model's device here if needed),
                or a list of such batches.

        Returns:
            [B, d] float32 embeddings (L2-normalised if ``config.normalize``), with grad when
            grad is enabled; a list of those for a list of batches. With a multi-vector head
            (``config.multivector_dim``), a
            :class:`~vlm2emb.multivector.MultiVectorEmbeddings` per batch instead: token
            vectors [B, L, D], their mask [B, L], and the [B, d] embeddings (None when
            ``dense_head`` is off), all from this one forward. With
            ``with_temperature``, a pair ``(embeddings, learned temperature [])``.
            replays: For a list of batches, one :class:`vlm2emb.gradcache.ChunkReplay` per
                batch: each batch runs under activation checkpointing with that random
                state and the frozen outputs it kept (GradCache's one-backward form; see
                :mod:`vlm2emb.gradcache`).
            multivector: False skips the multi-vector head: [B, d] embeddings only. A
                single-vector objective asks for this, so that the head is not part of a
                forward whose outputs the loss ignores (DDP would wait for its gradient).
        """
        if replays is not None:
            from torch.utils.checkpoint import checkpoint

            out = []
            for x, replay in zip(inputs, replays, strict=True):
                # The forward and its recompute both run under the replay's random state and
                # with its kept outputs served. checkpoint's own RNG stashing is off: it saves
                # the CUDA state only for CUDA tensors among the arguments, and a chunk arrives
                # on the CPU, so on a GPU the recompute drew other dropout masks (CUDA test).
                out.append(
                    checkpoint(
                        replay.replayed,
                        self._embed,
                        x,
                        multivector,
                        use_reentrant=False,
                        preserve_rng_state=False,
                    )
                )
        elif isinstance(inputs, (list, tuple)):
            out = [self._embed(x, multivector) for x in inputs]
        else:
            out = self._embed(inputs, multivector)
        if with_temperature:
            return out, self.learned_temperature()
        return out

    def _embed(self, inputs: dict[str, Any], multivector: bool = True) -> torch.Tensor:
        dummy_rows = int(inputs.get(DUMMY_ROWS, 0))
        content = inputs.get(CONTENT_MASK)  # [B, L] bool, or None: every real token counts
        inputs = {k: v for k, v in inputs.items() if k not in (DUMMY_ROWS, CONTENT_MASK)}
        device = self.device
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        head = self.multivector_head if multivector else None
        if self.config.pack_sequences:
            packed, cu_seqlens = self.adapter.forward_packed(self.backbone, inputs)  # [T, H], [B + 1]
            emb = pool_packed(packed, cu_seqlens, self.config.pooling).float()  # [B, H]
            if head is not None:
                hidden, mask = _unpack(packed, cu_seqlens)  # [B, L, H], [B, L]
        else:
            hidden, mask = self.adapter.forward(self.backbone, inputs)  # [B, L, H], [B, L]
            emb = pool(hidden, mask, self.config.pooling).float()  # [B, H]
        if self.config.normalize:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        if head is None:
            return emb[:-dummy_rows] if dummy_rows else emb  # the blank image row added by collate()
        if content is not None:
            if content.shape != mask.shape:
                raise ValueError(
                    f"backbone {self.config.family!r} returned hidden states for {list(mask.shape)} "
                    f"tokens but the content mask covers {list(content.shape)}; "
                    "multivector_tokens='content' is not supported for it"
                )
            # Only the multi-vector set loses the prompt tokens; pooling above saw them all.
            mask = mask.to(torch.bool) & content.to(mask.device)  # [B, L]
        tokens, keep = head(hidden, mask)  # [B, L, D], [B, L]
        multi = MultiVectorEmbeddings(tokens, keep, emb if self.config.dense_head else None)
        return multi.drop_last_rows(dummy_rows)

    # ------------------------------------------------------------------ encode
    @_grad_free
    def encode(
        self,
        items: Any | Sequence[Any],
        instruction: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool = False,
        prefetch: int | None = None,
        *,
        convert_to: str = "torch",
        truncate_dim: int | None = None,
        output: str = "dense",
    ) -> Any:
        """Embeds items.

        An item's embedding does not depend on the other items in its batch: padding is
        masked and pooling finds real tokens through the mask.

        Items are sorted by token count (:func:`length_keys`; similar lengths share a batch,
        so less padding is computed), and the next ``prefetch`` batches are decoded and tokenised in a worker
        thread while the model runs the current one (image decoding, the tokenizer and torch
        kernels all release the GIL).

        Args:
            items: One item or a list of items: str, ``PIL.Image.Image``, or a dict with
                ``text`` and/or ``image`` / ``images`` (paths, bytes or PIL images).
            instruction: Instruction rendered into every item's prompt (None = none).
            batch_size: Items per forward pass.
            show_progress_bar: Show a tqdm bar.
            prefetch: Batches prepared ahead in a worker thread (0 = prepare in the caller's
                thread, one at a time). Default: 2 on an accelerator or when a CPU core is
                free beside torch's threads, else 0.
            convert_to: ``"torch"`` (a tensor) or ``"numpy"`` (an ``np.ndarray``).
            truncate_dim: Keep the first ``truncate_dim`` dimensions (Matryoshka), then
                re-normalise if the model normalises. Default: ``config.truncate_dim``.
                Dense output only.
            output: ``"dense"`` (the pooled embedding) or ``"multivector"`` (per-token
                vectors of the multi-vector head, ``config.multivector_dim``).

        Returns:
            ``dense``: [n, d] float32 tensor (or array) on CPU, in input order; [d] for a
            single item. ``multivector``: a list of n float32 ``[L_i, D]`` tensors (or
            arrays), the real tokens of each item (padding left out); one ``[L, D]`` for a
            single item.

        Raises:
            ValueError: Unknown ``output`` or ``convert_to``, or a head the model lacks.
        """
        if convert_to not in ("torch", "numpy"):
            raise ValueError(f"convert_to must be 'torch' or 'numpy', got {convert_to!r}")
        self._check_output(output)
        if output == "multivector" and truncate_dim is not None:
            raise ValueError("truncate_dim applies to dense embeddings, not output='multivector'")
        single = not isinstance(items, (list, tuple))
        batch_items = [items] if single else list(items)
        if not batch_items:
            if output == "multivector":
                return []
            return self._postprocess(torch.empty(0, self.embedding_dim), convert_to, truncate_dim)
        batches = length_sorted_batches(batch_items, self.adapter.tokenizer, batch_size)
        order = [i for batch in batches for i in batch]
        was_training = self.training
        self.eval()
        chunks: list[torch.Tensor] = []
        token_sets: list[torch.Tensor] = []

        def prepare(idx: list[int]) -> dict[str, Any]:
            return self.collate([batch_items[i] for i in idx], instruction)

        progress = None
        if show_progress_bar:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(batches), desc="encode", unit="batch")
        try:
            if prefetch is None:
                prefetch = _default_prefetch(self.device)
            for inputs in _prefetched(prepare, batches, prefetch):
                out = self(inputs)
                if output == "multivector":
                    token_sets.extend(out.cpu().unpadded())  # [L_i, D] per item
                else:
                    chunks.append((out.dense if isinstance(out, MultiVectorEmbeddings) else out).cpu())
                if progress is not None:
                    progress.update()
        finally:
            self.train(was_training)
            if progress is not None:
                progress.close()
        if output == "multivector":
            sets: list[Any] = [None] * len(order)
            for position, row in enumerate(order):
                sets[row] = token_sets[position]
            if convert_to == "numpy":
                sets = [t.numpy() for t in sets]
            return sets[0] if single else sets
        emb = torch.cat(chunks)  # [n, d] in sorted order
        out = torch.empty_like(emb)
        out[torch.tensor(order)] = emb
        out = self._postprocess(out, convert_to, truncate_dim)
        return out[0] if single else out

    def _check_output(self, output: str) -> None:
        """Refuses an ``encode`` output the model has no head for."""
        if output not in ("dense", "multivector"):
            raise ValueError(f"output must be 'dense' or 'multivector', got {output!r}")
        if output == "multivector" and self.multivector_head is None:
            raise ValueError(
                "output='multivector' needs a multi-vector head: set multivector_dim "
                "(config_overrides={'multivector_dim': 128} or model.enable_multivector())"
            )
        if output == "dense" and not self.config.dense_head:
            raise ValueError(
                "this model has no single-vector head (dense_head=False); use output='multivector'"
            )

    def _postprocess(self, emb: torch.Tensor, convert_to: str, truncate_dim: int | None) -> Any:
        """Matryoshka truncation and output type; kept apart from encode()'s batching."""
        dim = truncate_dim if truncate_dim is not None else self.config.truncate_dim
        if dim is not None:
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ValueError(f"truncate_dim must be a positive integer, got {dim!r}")
            emb = emb[:, :dim]  # [n, dim]
            if self.config.normalize:
                # A prefix of a unit vector is shorter than 1: re-normalise for cosine scores.
                emb = torch.nn.functional.normalize(emb, dim=-1)
        return emb.numpy() if convert_to == "numpy" else emb

    def instruction_for(self, task: str, side: str = "query") -> str | None:
        """The instruction the training rows of ``task`` (their ``dataset``) used on ``side``.

        Args:
            task: A task recorded in ``config.instructions``.
            side: ``"query"`` or ``"target"``.

        Raises:
            ValueError: No record, an unknown task, or one whose rows varied (one line each).
        """
        return task_instruction(self.config.instructions, task, side)

    def encode_queries(
        self, items: Any, instruction: str | None = None, *, task: str | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """:meth:`encode` for queries: ``instruction``, else ``task``'s training instruction
        (:meth:`instruction_for`), else the model's default query instruction."""
        if instruction is None and task is not None:
            instruction = self.instruction_for(task, "query")
        return self.encode(
            items, instruction=resolve_instruction(instruction, self.config.query_instruction), **kwargs
        )

    def encode_targets(
        self, items: Any, instruction: str | None = None, *, task: str | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """:meth:`encode` for targets: ``instruction``, else ``task``'s training instruction
        (:meth:`instruction_for`), else the model's default target instruction."""
        if instruction is None and task is not None:
            instruction = self.instruction_for(task, "target")
        return self.encode(
            items, instruction=resolve_instruction(instruction, self.config.target_instruction), **kwargs
        )

    @staticmethod
    def similarity(a: Any, b: Any) -> torch.Tensor:
        """Cosine similarity matrix [n, m] between two embedding sets [n, d] and [m, d].

        Accepts tensors or numpy arrays; a single [d] vector counts as one row.
        """
        a = torch.nn.functional.normalize(torch.as_tensor(a).float().reshape(-1, a.shape[-1]), dim=-1)
        b = torch.nn.functional.normalize(torch.as_tensor(b).float().reshape(-1, b.shape[-1]), dim=-1)
        return a @ b.T

    def search(
        self,
        queries: Any,
        corpus_embeddings: Any,
        top_k: int = 10,
        *,
        instruction: str | None = None,
        batch_size: int = 32,
        candidates: int | None = None,
        reranker: Any | None = None,
        rerank_top_k: int | None = None,
        corpus: Sequence[Any] | None = None,
        rerank_instruction: str | None = None,
        rerank_batch_size: int = 16,
    ) -> list[list[dict[str, float | int]]]:
        """Exact search of a corpus (sentence-transformers' form): cosine for single
        vectors, MaxSim for token sets; single-vector search can be re-ranked (recall by
        embeddings, then a reranker reads the best hits).

        Args:
            queries: Query items (embedded with :meth:`encode_queries`, as token sets when
                the corpus is multi-vector), or query embeddings: [n, d] as a tensor or numpy
                array, or a list of ``[L_i, D]`` token sets (not with ``reranker``: it reads
                the query items).
            corpus_embeddings: [m, d] corpus embeddings (tensor or numpy array); or a
                multi-vector corpus: a :class:`vlm2emb.index.MultiVectorIndex` or a list of
                ``[L_i, D]`` token sets (``encode(output="multivector")``).
            top_k: Hits per query (at most m).
            instruction: Query instruction when ``queries`` are items.
            batch_size: Encoding batch size when ``queries`` are items.
            candidates: Multi-vector corpora only: documents picked by the index's first
                stage and re-scored exactly (None = score all exactly).
            reranker: A :class:`vlm2emb.rerank.Reranker` (or any object with its
                ``score_pairs(pairs, instructions, batch_size=...)`` returning [n] scores).
                Single-vector corpora only.
            rerank_top_k: How many of each query's best embedding hits the reranker
                re-orders (None: ``top_k``). The embedding search recalls
                ``max(top_k, rerank_top_k)`` hits; the re-ranked ones come first, best
                reranker score first, and hits below ``rerank_top_k`` follow in embedding
                order, untouched.
            corpus: The corpus items, in the order of ``corpus_embeddings`` (needed with
                ``reranker``).
            rerank_instruction: The reranker's instruction (None: its default).
            rerank_batch_size: Pairs per reranker forward; all queries' pairs are scored
                together, sorted by length.

        Returns:
            Per query, ``top_k`` dicts ``{"corpus_id": int, "score": float}``, best first;
            re-ranked hits also hold ``"rerank_score"``. For a large single-vector corpus
            use :class:`vlm2emb.index.FlatIndex` instead.

        Raises:
            ValueError: Mismatched dimensions, ``candidates`` or ``reranker`` with the wrong
                kind of corpus, or a reranker without query items or a ``corpus`` of the
                right length.
        """
        import numpy as np

        from vlm2emb.index import MultiVectorIndex

        if isinstance(corpus_embeddings, MultiVectorIndex) or (
            isinstance(corpus_embeddings, (list, tuple))
            and corpus_embeddings
            and np.ndim(corpus_embeddings[0]) == 2
        ):
            if reranker is not None:
                raise ValueError("search with a reranker takes a single-vector corpus, not token sets")
            return self._search_multivector(
                queries, corpus_embeddings, top_k, instruction, batch_size, candidates
            )
        if candidates is not None:
            raise ValueError("candidates applies to multi-vector corpora (token sets or a MultiVectorIndex)")

        embedded = isinstance(queries, (torch.Tensor, np.ndarray))
        if reranker is not None:
            if embedded:
                raise ValueError("search with a reranker needs the query items, not their embeddings")
            if corpus is None or len(corpus) != len(corpus_embeddings):
                raise ValueError(
                    "search with a reranker needs corpus= (the items, one per row of corpus_embeddings)"
                )
            if rerank_top_k is not None and (isinstance(rerank_top_k, bool) or rerank_top_k < 1):
                raise ValueError(f"rerank_top_k must be a positive integer or None, got {rerank_top_k!r}")
        if embedded:
            q = torch.as_tensor(queries).float()
        else:
            queries = queries if isinstance(queries, (list, tuple)) else [queries]
            q = self.encode_queries(queries, instruction=instruction, batch_size=batch_size)
        q = q.reshape(-1, q.shape[-1])  # [n, d]
        corpus_emb = torch.as_tensor(corpus_embeddings).float()  # [m, d]
        if corpus_emb.shape[-1] != q.shape[-1]:
            raise ValueError(
                f"queries have dimension {q.shape[-1]} but corpus_embeddings have {corpus_emb.shape[-1]}"
            )
        k = min(int(top_k), corpus_emb.shape[0])
        deep = (
            k if reranker is None or rerank_top_k is None else max(k, min(rerank_top_k, corpus_emb.shape[0]))
        )
        scores, idx = self.similarity(q, corpus_emb).topk(deep, dim=1)  # [n, deep]
        hits = [
            [{"corpus_id": int(i), "score": float(s)} for i, s in zip(row_i, row_s)]
            for row_i, row_s in zip(idx.tolist(), scores.tolist())
        ]
        if reranker is not None:
            hits = _rerank_hits(
                reranker, queries, corpus, hits, rerank_top_k or k, rerank_instruction, rerank_batch_size
            )
        return [row[:k] for row in hits]

    def _search_multivector(
        self,
        queries: Any,
        corpus: Any,
        top_k: int,
        instruction: str | None,
        batch_size: int,
        candidates: int | None,
    ) -> list[list[dict[str, float | int]]]:
        """:meth:`search` over token sets, through :class:`vlm2emb.index.MultiVectorIndex`."""
        import numpy as np

        from vlm2emb.index import MultiVectorIndex

        if isinstance(queries, (list, tuple)) and queries and all(hasattr(q, "shape") for q in queries):
            sets = [torch.as_tensor(q).float() for q in queries]  # already token sets
        else:
            items = queries if isinstance(queries, (list, tuple)) else [queries]
            sets = self.encode_queries(
                items, instruction=instruction, batch_size=batch_size, output="multivector"
            )
        index = corpus
        if not isinstance(index, MultiVectorIndex):
            index = MultiVectorIndex(int(np.shape(corpus[0])[1]))
            index.add(corpus)
        scores, ids = index.search(sets, top_k=top_k, candidates=candidates)
        return [
            [{"corpus_id": int(i), "score": float(s)} for i, s in zip(row_i, row_s) if i >= 0]
            for row_i, row_s in zip(ids.tolist(), scores.tolist())
        ]

    # ------------------------------------------------------------------ compilation
    def compile_blocks(self, *, dynamic: bool | None = True, **compile_kwargs: Any) -> int:
        """Compiles each transformer block of the backbone with ``torch.compile``, in place.

        Regional compilation: every decoder and vision-encoder layer (transformers'
        ``GradientCheckpointingLayer`` modules) is compiled on its own, not the whole
        model, so the multimodal glue between them (image merging, masks) stays eager and
        identical layers share one compiled graph. ``dynamic=True`` keeps batch shapes from
        triggering a recompile each. The first forward pays the compilation (about 15 s
        for the tiny Qwen2-VL on 2 CPU cores); it pays on long encode jobs (measured in
        docs/benchmarks.md). The state dict, LoRA and saving are unchanged.

        Args:
            dynamic: Passed to ``torch.compile``.
            **compile_kwargs: Further ``torch.compile`` arguments (``mode``, ``backend``).

        Returns:
            The number of blocks compiled.

        Raises:
            ValueError: If the backbone has no transformers layer modules to compile.
        """
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in self.backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not blocks:
            raise ValueError(f"backbone {self.adapter.family!r} has no transformers layer modules to compile")
        for block in blocks:
            block.compile(dynamic=dynamic, **compile_kwargs)
        return len(blocks)

    # ------------------------------------------------------------------ checkpointing
    def enable_gradient_checkpointing(self) -> None:
        """Recomputes each transformer block's forward in the backward (non-reentrant).

        A frozen token embedding (LoRA) would give the first checkpointed block inputs
        without grad, so the language model's input embeddings are made to require grad,
        and only those: transformers' checkpointing hooks every sub-model's input embeddings,
        the vision tower's patch embedding too, which makes a frozen tower build a graph and
        run a backward whose gradients go nowhere (tested).
        """
        self._remove_embedding_grad_hook()
        self._embedding_grad_hook = enable_checkpointing(self.base_backbone)

    def _remove_embedding_grad_hook(self) -> None:
        hook = getattr(self, "_embedding_grad_hook", None)
        if hook is not None:
            hook.remove()
            self._embedding_grad_hook = None

    def disable_gradient_checkpointing(self) -> None:
        """Undoes :meth:`enable_gradient_checkpointing`."""
        disable_checkpointing(self.base_backbone)
        self._remove_embedding_grad_hook()

    # ------------------------------------------------------------------ LoRA
    def apply_lora(
        self,
        r: int = 16,
        alpha: int = 64,
        dropout: float = 0.05,
        target_modules: str | list[str] | None = None,
        use_dora: bool = False,
        seed: int | None = None,
    ) -> None:
        """Wraps the backbone with a peft LoRA adapter (only adapter weights train).

        Defaults follow VLM2Vec: r 16, alpha 64, over the language model's attention and MLP
        projections (the family adapter's ``lora_target_modules``).

        Args:
            r: Adapter rank.
            alpha: LoRA alpha (the update is scaled by ``alpha / r``).
            dropout: Dropout on the adapter input.
            target_modules: Module names or a regex; default: the family's projections.
            use_dora: Weight-decomposed LoRA (DoRA).
            seed: Seed for the adapter's random init (the A matrices). With a seed the init
                depends on it alone, not on what drew random numbers before (how the
                backbone was loaded, how many processes run); the global RNG is left as it
                was. None draws from the global RNG.
        """
        self.backbone = wrap_lora(
            self.backbone,
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules or self.adapter.lora_target_modules,
            use_dora=use_dora,
            seed=seed,
        )

    @property
    def has_lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    @property
    def base_backbone(self) -> nn.Module:
        """The transformers model under a LoRA wrapper (the backbone itself without one)."""
        return self.backbone.get_base_model() if self.has_lora else self.backbone

    # ------------------------------------------------------------------ saving
    def _save_multivector_head(self, out: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        """Writes the head's weights (from ``state_dict`` when given: ZeRO-3 partitions)."""
        from safetensors.torch import save_file

        assert self.multivector_head is not None
        prefix = "multivector_head.proj."
        if state_dict is not None:
            weights = sub_state(state_dict, prefix)
        else:
            weights = self.multivector_head.proj.state_dict()
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(out / MULTIVECTOR_HEAD_NAME)
        )

    def save_pretrained(
        self,
        save_dir: str | os.PathLike[str],
        *,
        merge_lora: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Writes weights (safetensors), the processor and ``vlm2emb_config.json``.

        The directory is also a plain transformers checkpoint of the backbone. With a LoRA
        adapter and ``merge_lora=False``, the base weights are written unmerged and the
        adapter goes to ``adapter/`` (peft layout); :meth:`from_pretrained` re-attaches it.

        Args:
            save_dir: Output directory (created if missing).
            merge_lora: Write merged weights instead of base + adapter.
            state_dict: This model's full state dict, when the live parameters are not
                (DeepSpeed ZeRO-3 partitions them; the trainer gathers them first).

        Returns:
            The output directory.
        """
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone_state = None
        if state_dict is not None:
            backbone_state = sub_state(state_dict, "backbone.")
            if "logit_scale" in state_dict:
                self.config.temperature = float(
                    _temperature_of(state_dict["logit_scale"], self.max_logit_scale)
                )
        elif self.logit_scale is not None:
            self.config.temperature = float(self.learned_temperature())
        save_lm_weights(
            self.backbone, out, self.config.base_model, merge_lora=merge_lora, state=backbone_state
        )
        self.adapter.processor.save_pretrained(out)
        if self.multivector_head is not None:
            self._save_multivector_head(out, state_dict)
        (out / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        from vlm2emb._files import honour_umask

        # safetensors writes its files 0600; only the files written here are touched.
        honour_umask([*out.glob("*.safetensors"), *(out / ADAPTER_DIR).glob("*.safetensors")])
        return out


def _rerank_hits(
    reranker: Any,
    queries: Sequence[Any],
    corpus: Sequence[Any],
    hits: list[list[dict[str, Any]]],
    depth: int,
    instruction: str | None,
    batch_size: int,
) -> list[list[dict[str, Any]]]:
    """Each query's first ``depth`` hits re-ordered by reranker score (stable for ties), the
    rest after them unchanged; every query's pairs are scored in one batched call."""
    pairs = [(queries[qi], corpus[hit["corpus_id"]]) for qi, row in enumerate(hits) for hit in row[:depth]]
    flat = reranker.score_pairs(pairs, instruction, batch_size=batch_size).tolist()
    out: list[list[dict[str, Any]]] = []
    start = 0
    for row in hits:
        head = [{**hit, "rerank_score": float(s)} for hit, s in zip(row[:depth], flat[start : start + depth])]
        start += len(head)
        head.sort(key=lambda hit: -hit["rerank_score"])  # sort is stable: ties keep recall order
        out.append(head + row[depth:])
    return out


def wrap_lora(
    module: nn.Module,
    *,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: str | list[str],
    use_dora: bool = False,
    seed: int | None = None,
) -> nn.Module:
    """``module`` wrapped in a peft LoRA adapter (shared by the embedder and the reranker).

    With a ``seed`` the adapter's init depends on it alone and the global RNG is left as it
    was (:meth:`EmbeddingModel.apply_lora`).
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, use_dora=use_dora
    )
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with contextlib.nullcontext() if seed is None else torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        return get_peft_model(module, cfg)


def _unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch ``[T, H]`` (rows at ``cu_seqlens`` [B + 1]) -> right-padded
    ``[B, L, H]`` hidden states and their ``[B, L]`` mask."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    rows = list(packed.split(lengths))
    hidden = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)  # [B, L, H]
    positions = torch.arange(hidden.shape[1], device=packed.device)
    mask = positions.unsqueeze(0) < torch.tensor(lengths, device=packed.device).unsqueeze(1)  # [B, L]
    return hidden, mask


def _temperature_of(logit_scale: torch.Tensor, max_scale: float) -> torch.Tensor:
    """[] ``1 / clamp(exp(logit_scale), max=max_scale)``: the one place the clamp is written."""
    return 1.0 / logit_scale.float().exp().clamp(max=max_scale)


def first_non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding NaN or inf, or None.

    Shared by training checkpoints and export, which both refuse to write such weights.

    Args:
        named: ``(name, tensor)`` pairs, e.g. ``state.items()`` or ``named_parameters()``.
    """
    for name, tensor in named:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@contextlib.contextmanager
def _base_checkpoint(base: str, seed: int) -> Iterator[str]:
    """A loadable folder (or hub id) for ``base``; ``tiny:FAMILY`` is built into a temp folder."""
    if not base.startswith(TINY_PREFIX):
        path = Path(base).expanduser()
        if not path.exists() and _looks_like_local_path(base):
            raise FileNotFoundError(f"base model path not found: {base}")
        yield str(path) if path.exists() else base
        return
    from vlm2emb.testing import tiny_backbone

    with tempfile.TemporaryDirectory(prefix="vlm2emb-tiny-") as tmp:
        tiny_backbone(base[len(TINY_PREFIX) :], tmp, seed=seed)
        yield tmp


def save_lm_weights(
    lm: nn.Module,
    out: Path,
    base_model: str,
    *,
    merge_lora: bool = False,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Writes a transformers model's weights to ``out``, a peft-wrapped one as base + ``adapter/``.

    Shared by the embedder's and the reranker's ``save_pretrained``: the folder stays a plain
    transformers checkpoint of the base model, with the adapter (unmerged) beside it.

    Args:
        lm: The transformers model, or a peft ``PeftModel`` around it.
        out: The existing output folder.
        base_model: Recorded as the adapter's ``base_model_name_or_path``.
        merge_lora: Write merged weights instead of base + adapter.
        state: ``lm``'s full state dict (its own key names) when the live parameters are
            DeepSpeed ZeRO-3 partitions (the trainer gathers them first).

    Raises:
        ValueError: ``merge_lora`` with a gathered ``state``.
    """
    with _plain_key_names(lm) if state is not None else contextlib.nullcontext():
        if not hasattr(lm, "peft_config"):
            lm.save_pretrained(out, state_dict=state)
            return
        if merge_lora:
            if state is not None:
                raise ValueError("merge_lora with a gathered state dict is not supported; save unmerged")
            import copy

            copy.deepcopy(lm).merge_and_unload().save_pretrained(out)
            return
        base = lm.get_base_model()
        if state is None:
            base_state = base.state_dict()
        else:  # PeftModel keys carry a "base_model.model." prefix over the base model's
            prefix = "base_model.model."
            base_state = sub_state(state, prefix)
        base.save_pretrained(out, state_dict=_strip_lora(base_state))
        for peft_cfg in lm.peft_config.values():
            # The adapter's base is the folder it is saved next to (a tiny model's build
            # folder, for one, is gone after loading).
            peft_cfg.base_model_name_or_path = base_model
        lm.save_pretrained(str(out / ADAPTER_DIR), state_dict=state)


@contextlib.contextmanager
def _plain_key_names(lm: nn.Module) -> Iterator[None]:
    """Saves under the class's own checkpoint key names, whatever the loading recorded.

    A model loaded inside ``deepspeed.zero.Init`` (ZeRO-3 partitioned loading) records
    transformers' legacy key renamings as well, and ``save_pretrained`` reverses every
    recorded renaming: Qwen2-VL's language-model weights were then written as
    ``model.model.layers...``. Without a record, transformers uses the class's default
    mapping, as for a model built in memory.
    """
    base = lm.get_base_model() if hasattr(lm, "peft_config") else lm
    missing = object()
    saved = base.__dict__.pop("_weight_conversions", missing)
    try:
        yield
    finally:
        if saved is not missing:
            base._weight_conversions = saved


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, keyed without it (a submodule's state dict)."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _strip_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Base-model weights from a LoRA-injected state dict, under the original names."""
    clean: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        clean[key.replace(".base_layer.", ".")] = value
    return clean


def _default_prefetch(device: torch.device) -> int:
    """Batches encode() prepares ahead by default: 2 when the forward runs on an accelerator
    or a CPU core is left beside torch's threads; 0 when torch's threads take every core,
    where the worker's image kernels compete with the forward's (on 2 cores: image-only
    encode 0.35 s with the worker against 0.28 s without, docs/benchmarks.md)."""
    if device.type != "cpu":
        return 2
    return 2 if (os.cpu_count() or 1) > torch.get_num_threads() else 0


def _prefetched(fn: Callable[[T], R], args: Sequence[T], depth: int) -> Iterator[R]:
    """Yields ``fn(a)`` for each ``a`` in order, computing up to ``depth`` results ahead in a thread.

    An exception raised by ``fn`` surfaces at the position of its argument; batches queued
    behind it are cancelled.
    """
    if depth <= 0 or len(args) <= 1:
        yield from (fn(a) for a in args)
        return
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlm2emb-prefetch")
    queue: collections.deque[Any] = collections.deque()
    try:
        for a in args:
            queue.append(pool.submit(fn, a))
            if len(queue) > depth:
                yield queue.popleft().result()
        while queue:
            yield queue.popleft().result()
    finally:
        for future in queue:
            future.cancel()
        pool.shutdown(wait=True)
