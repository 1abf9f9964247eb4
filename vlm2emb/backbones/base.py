"""The backbone adapter protocol.

An adapter is the only place that knows a VLM family's quirks: which transformers class
to load, how an item (text and/or images) becomes a prompt with the family's image
placeholders, which special tokens exist, which module is the language model (for
attention switching and LoRA targets). Everything else in vlm2emb talks to backbones
through this class, so adding a family means writing one subclass in one new file and
adding one line to :mod:`vlm2emb.backbones.registry`. Shared LoRA target patterns are in
:mod:`vlm2emb.backbones.lora_targets`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from vlm2emb.backbones.registry import packing_families
from vlm2emb.distributed import is_zero3_partition

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image

ATTENTION_MODES = ("causal", "bidirectional")
# The key of a packed batch's cumulative row lengths [B + 1] (BackboneAdapter.pack_inputs).
CU_SEQLENS = "cu_seqlens"


class AdapterSettings(Protocol):
    """The settings an adapter reads; :class:`vlm2emb.model.EmbeddingConfig` is one."""

    padding_side: str
    attention: str


@dataclass
class StandaloneSettings:
    """An adapter's settings when no EmbeddingModel owns it (tests, data checks)."""

    padding_side: str = "right"
    attention: str = "causal"


class BackboneAdapter:
    """Wraps a loaded transformers VLM and its processor behind one small interface.

    Subclasses set the class attributes and override :meth:`render_prompt` (and, where the
    family needs it, :meth:`load_model`, :meth:`language_model` or :meth:`forward`).

    Attributes:
        family: Registry name of the family (e.g. ``"qwen2_vl"``).
        model_types: transformers ``config.model_type`` values this adapter serves.
        lora_target_modules: Default LoRA targets: a regex over module names that matches
            the language model's attention and MLP projections only (VLM2Vec tunes the LM,
            not the vision tower).
        attention_modes: Attention modes the family supports.
        default_attention: Attention mode used when neither the caller nor a saved config
            chooses one (``"causal"`` here; diffusion backbones say ``"bidirectional"``).
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    lora_target_modules: ClassVar[str | list[str]] = []
    attention_modes: ClassVar[tuple[str, ...]] = ATTENTION_MODES
    # The attention a raw checkpoint of this family gets when neither the call nor a saved
    # vlm2emb_config.json names one: "causal" for AR VLMs, "bidirectional" for diffusion
    # VLMs (they are trained to see the whole sequence). from_pretrained reads it.
    default_attention: ClassVar[str] = "causal"
    embed_token: ClassVar[str] = "<|embed|>"
    image_placeholder: ClassVar[str] = ""  # the prompt text standing for one image ("" = no images)
    # The bare image token VLM2Vec writes for this family (its VLM_IMAGE_TOKENS), for the
    # ``vlm2vec`` prompt style (vlm2emb/prompts.py); None = VLM2Vec does not train the family,
    # and the style is refused.
    vlm2vec_image_token: ClassVar[str | None] = None
    # A batch without images skips the processor and goes to the tokenizer alone: the same
    # ids and mask at less cost (some processors also build a per-token modality map with
    # NumPy, which text needs not). Opt-in per family; tests check the ids and embeddings
    # equal the processor's for every family that sets it.
    tokenize_text_directly: ClassVar[bool] = False
    # With causal attention and right padding every pad comes after every real token, so no
    # real token can attend to one: the padding mask changes nothing a real token computes.
    # A family whose decoder mask is only causal + padding (no prefix or image blocks built
    # from other inputs, as PaliGemma's and Gemma 3's are) sets this, and its forward leaves
    # the mask out: transformers then builds no [B, 1, L, L] mask and SDPA runs its causal
    # kernel (flash on a GPU). Checked by tests/backbones/test_families.py's padding tests.
    padding_mask_optional_when_causal: ClassVar[bool] = False
    # The family can run padding-free language-model batches (``pack_sequences``): it
    # implements pack_inputs and enable_packing. Tests in tests/backbones/test_packing.py
    # check packed embeddings and gradients equal the padded ones for every such family.
    supports_packing: ClassVar[bool] = False
    # The family is a next-token predictor whose LM head can score an answer token, so it can
    # serve as a generative reranker (vlm2emb.rerank). Diffusion families predict masked
    # tokens, not the next one, and set it False.
    generative_head: ClassVar[bool] = True

    def __init__(
        self, processor: Any, *, padding_side: str = "right", settings: AdapterSettings | None = None
    ) -> None:
        # The adapter holds no reference to the model: EmbeddingModel owns it (so that peft,
        # DDP or DeepSpeed wrapping it stays visible) and passes it into each call.
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if settings is None:
            if padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
            settings = StandaloneSettings(padding_side=padding_side)
        # Read, never copied: under an EmbeddingModel this is its EmbeddingConfig, the one
        # owner of padding_side and attention (set_attention writes the attention there).
        self.settings = settings

    @property
    def padding_side(self) -> str:
        """``right`` or ``left``, read from :attr:`settings` (change it there)."""
        return self.settings.padding_side

    @property
    def attention(self) -> str:
        """``causal`` or ``bidirectional``, read from :attr:`settings` (:meth:`set_attention`)."""
        return self.settings.attention

    # ------------------------------------------------------------------ loading
    @classmethod
    def load_model(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        """Loads the bare backbone (no LM head) returning hidden states.

        Uses ``AutoModel``, which for VLM families maps to the base model class; checkpoints
        saved from the ``...ForConditionalGeneration`` class load into it through transformers'
        prefix handling (the unused ``lm_head`` is dropped).
        """
        from transformers import AutoModel

        return AutoModel.from_pretrained(
            str(path), **_load_kwargs(dtype, attn_implementation, trust_remote_code)
        )

    @classmethod
    def load_lm(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
    ) -> nn.Module:
        """Loads the backbone *with* its LM head, for generative scoring (:mod:`vlm2emb.rerank`).

        Uses ``AutoModelForImageTextToText`` (the ``...ForConditionalGeneration`` class of
        every autoregressive family vlm2emb ships). :meth:`lm_backbone` returns the base model
        inside it, on which :meth:`forward` runs unchanged; :meth:`answer_logits` applies the
        head to the hidden states.

        Raises:
            ValueError: The family has no next-token head (:attr:`generative_head`).
        """
        cls.check_generative_head()
        from transformers import AutoModelForImageTextToText

        kwargs = _load_kwargs(dtype, attn_implementation, trust_remote_code)
        return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)

    @classmethod
    def check_generative_head(cls) -> None:
        """Refuses a family without a next-token head (:attr:`generative_head`).

        Raises:
            ValueError: One line naming the family.
        """
        if not cls.generative_head:
            raise ValueError(
                f"backbone {cls.family!r} has no next-token LM head to score answers with "
                "(a diffusion family); a generative reranker needs an autoregressive VLM"
            )

    def lm_backbone(self, lm: nn.Module) -> nn.Module:
        """The base model inside a model from :meth:`load_lm`: what :meth:`forward` runs on.

        transformers' ``...ForConditionalGeneration`` classes hold it as ``.model``.
        """
        return lm.model

    def answer_logits(self, lm: nn.Module, hidden: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits of a few vocabulary entries, from final hidden states.

        Only the head rows of ``token_ids`` are multiplied (a reranker needs two logits, not
        the whole vocabulary). Computed in float32; a text config's
        ``final_logit_softcapping`` is applied as the family's own head does.

        Args:
            lm: The model from :meth:`load_lm` (or a peft wrapper of it).
            hidden: [B, H] the last real token's final hidden state per row.
            token_ids: The vocabulary ids to score.

        Returns:
            [B, len(token_ids)] float32 logits.
        """
        head = lm.get_output_embeddings()
        ids = torch.tensor(list(token_ids), device=head.weight.device)
        if is_zero3_partition(head.weight):
            # A DeepSpeed ZeRO-3 partition: only the head's own forward gathers the whole
            # weight (and returns its gradient to the partitions), so the whole vocabulary is
            # scored and the K columns kept. Same logits; the row slice below would read
            # an empty partition.
            logits = head(hidden.to(head.weight.dtype)).float().index_select(1, ids)  # [B, K]
        else:
            weight = head.weight.index_select(0, ids).float()  # [K, H]
            logits = hidden.float() @ weight.T  # [B, K]
            bias = getattr(head, "bias", None)
            if bias is not None:
                logits = logits + bias.index_select(0, ids).float()
        cfg = lm.config
        cap = getattr(getattr(cfg, "text_config", cfg), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @classmethod
    def load_processor(cls, path: str | Path, *, trust_remote_code: bool = False) -> Any:
        """Loads the family's processor (tokenizer + image processor) from ``path``."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(str(path), trust_remote_code=trust_remote_code)

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        """Writes a tiny random checkpoint of this family into ``path`` (tests and demo)."""
        raise NotImplementedError(f"backbone family {cls.family!r} has no tiny builder yet")

    # ------------------------------------------------------------------ prompts
    def render_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        """Returns the prompt string for one item with the family's image placeholders.

        The default layout follows VLM2Vec (no chat template): one ``image_placeholder`` per
        image, then the instruction and a newline, then the text. Families with another
        convention override this.
        """
        if num_images and not self.image_placeholder:
            raise ValueError(f"backbone {self.family!r} takes no images")
        parts = [self.image_placeholder * num_images]
        if instruction:
            parts.append(instruction.strip() + "\n")
        if text:
            parts.append(text)
        return "".join(parts)

    def render_segments(self, segments: Sequence[tuple[str, int]]) -> str:
        """One prompt interleaving several parts, each ``(text, num_images)`` in order.

        A generative reranker's prompt holds an instruction, a query and a candidate, each
        with its own images (:mod:`vlm2emb.rerank`). The default writes each part's image
        placeholders right before its text, so the images sit where their part does.
        Families whose processor wants images elsewhere override this.
        """
        if any(n for _, n in segments) and not self.image_placeholder:
            raise ValueError(f"backbone {self.family!r} takes no images")
        return "".join(self.image_placeholder * n + text for text, n in segments)

    def check_prompt_style(self, style: str) -> None:
        """Refuses a prompt style this family has no form for (``vlm2vec`` needs
        :attr:`vlm2vec_image_token`).

        Raises:
            ValueError: One line naming the family and the style.
        """
        from vlm2emb.prompts import check_prompt_style

        check_prompt_style(style)
        if style == "vlm2vec" and self.vlm2vec_image_token is None:
            raise ValueError(
                f"prompt_style: backbone {self.family!r} has no 'vlm2vec' prompt form "
                "(VLM2Vec trains qwen2_vl, qwen2_5_vl and llava_next); use 'vlm2emb'"
            )

    def render_vlm2vec_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        """Returns the prompt VLM2Vec builds for one item (the ``vlm2vec`` prompt style).

        With ``<|image_N|>`` markers in ``text`` (MMEB rows), each marker is replaced in
        place by :attr:`vlm2vec_image_token` and the whitespace around it is kept, as
        VLM2Vec's datasets do. Without markers, VLM2Vec-V2's ``process_input_text`` form:
        ``TOKEN + " "`` per image, then instruction and text joined by one space.

        Raises:
            ValueError: The family has no VLM2Vec form, or the markers do not match the
                images in number.
        """
        from vlm2emb.prompts import IMAGE_MARKER, count_image_markers

        self.check_prompt_style("vlm2vec")
        token = self.vlm2vec_image_token
        markers = count_image_markers(text)
        if markers and markers != num_images:
            raise ValueError(
                f"the text holds {markers} <|image_N|> markers for {num_images} images: {text!r}"
            )
        # A lambda: the token holds no regex escapes, but re.sub would read backslashes in it.
        body = IMAGE_MARKER.sub(lambda _: token, text) if markers else (text or "")
        prompt = " ".join(part for part in (instruction, body) if part)
        if not markers:
            prompt = (token + " ") * num_images + prompt
        return prompt

    def special_token(self, kind: str) -> str:
        """Returns the token string appended for ``eos`` or ``embed_token`` pooling."""
        if kind == "eos":
            token = self.tokenizer.eos_token
            if token is None:
                raise ValueError(f"{self.family}: the tokenizer defines no eos_token; use pooling='last'")
            return token
        raise KeyError(kind)

    # ------------------------------------------------------------------ inputs
    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Tokenizes prompts and preprocesses images into one padded batch.

        Args:
            prompts: One prompt per item, already holding the family's image placeholders.
            images: Per item, the list of RGB images in placeholder order.

        Returns:
            The processor's tensors (``input_ids`` [B, L], ``attention_mask`` [B, L], pixel
            tensors ...) as CPU tensors.
        """
        flat = [img for per_item in images for img in per_item]
        self.tokenizer.padding_side = self.padding_side
        if not flat and self.tokenize_text_directly:
            return self.tokenize_text(prompts)
        # Processors that build a per-token modality map do it row by row with NumPy sets;
        # one vectorised pass over the padded ids gives the same map (tested per family).
        modality_map = getattr(type(self.processor), "return_mm_token_type_ids", False) is True
        extra = {"return_mm_token_type_ids": False} if modality_map else {}
        # padding_side is passed too: some processors (InternVL's) pad left otherwise.
        out = _tensors(
            self.processor,
            text=list(prompts),
            images=flat or None,
            padding=True,
            padding_side=self.padding_side,
            **extra,
        )
        if modality_map:
            out["mm_token_type_ids"] = _modality_map(self.processor, out["input_ids"])
        return out

    def tokenize_text(self, prompts: Sequence[str]) -> dict[str, Any]:
        """The tokenizer alone on image-free prompts: ``input_ids`` and ``attention_mask`` [B, L]."""
        self.tokenizer.padding_side = self.padding_side
        return _tensors(self.tokenizer, list(prompts), padding=True)

    # ------------------------------------------------------------------ forward
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder of ``model`` whose attention mode is switched (and where LoRA goes)."""
        return model.language_model

    def vision_tower(self, model: nn.Module) -> nn.Module | None:
        """The vision encoder (frozen by ``model.freeze_vision``), or None if there is none."""
        for name in ("visual", "vision_tower", "vision_model"):
            module = getattr(model, name, None)
            if isinstance(module, nn.Module):
                return module
        return None

    def trim_vision_output(self, output: Any, config: Any) -> Any:
        """The part of a frozen vision tower's output that the backbone's forward reads.

        GradCache keeps the tower's first-pass outputs until the backward
        (:class:`vlm2emb.gradcache.FrozenVisionCache`); a family whose tower returns more
        than its forward uses (every layer's hidden states, pre-merge patches) drops the
        rest here (with :func:`set_output_field`). ``output`` is a shallow copy: replace
        fields, never change tensors. The default keeps everything.
        """
        return output

    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the backbone once and returns ``(hidden [B, L, H], attention_mask [B, L])``.

        Right-padded causal batches of families with ``padding_mask_optional_when_causal``
        run without the padding mask (same real-token states; pooling still uses the mask).
        Right padding is read from the mask itself (every row starts with a real token), not
        from ``padding_side``: a processor may pad its own way.
        """
        mask = inputs["attention_mask"]
        if (
            self.padding_mask_optional_when_causal
            and self.attention == "causal"
            and bool(mask[:, 0].all())  # one host sync, as transformers' own mask check
        ):
            inputs = {key: value for key, value in inputs.items() if key != "attention_mask"}
        out = model(**inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state, mask

    # ------------------------------------------------------------------ packed batches
    def enable_packing(self, model: nn.Module) -> None:
        """Prepares ``model`` for packed batches (``EmbeddingConfig.pack_sequences``).

        Families with ``supports_packing`` override this (typically: switch the language
        model to an attention function that attends within each packed row).

        Raises:
            ValueError: The family cannot run packed batches.
        """
        raise ValueError(
            f"pack_sequences: backbone {self.family!r} does not support packed batches "
            f"(supported: {', '.join(packing_families())})"
        )

    def pack_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Turns a padded batch from :meth:`build_inputs` into one packed row.

        Args:
            inputs: The padded batch (``input_ids`` [B, L], ``attention_mask`` [B, L] ...).

        Returns:
            The batch with every row's real tokens concatenated ([1, T], no padding, no
            ``attention_mask``) and :data:`CU_SEQLENS` [B + 1] marking where rows start.
        """
        raise ValueError(f"pack_sequences: backbone {self.family!r} does not support packed batches")

    def forward_packed(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs a packed batch once: ``(hidden [T, H], cu_seqlens [B + 1])``.

        Row ``i``'s tokens are ``hidden[cu_seqlens[i]:cu_seqlens[i + 1]]``
        (:func:`vlm2emb.pooling.pool_packed` pools them).
        """
        cu_seqlens = inputs[CU_SEQLENS]
        model_inputs = {key: value for key, value in inputs.items() if key != CU_SEQLENS}
        out = model(**model_inputs, use_cache=False, return_dict=True)
        return out.last_hidden_state[0], cu_seqlens  # [T, H], [B + 1]

    def configure_backbone(self, model: nn.Module) -> None:
        """Family-specific runtime settings of a loaded backbone (called once by
        EmbeddingModel). Default: none."""

    def set_attention(self, model: nn.Module, mode: str) -> None:
        """Switches the language model between causal and bidirectional attention.

        Two things must change: the config flag read by transformers' mask builder
        (``is_causal=False`` makes it build a bidirectional padding mask), and each attention
        module's ``is_causal`` attribute, because when no mask is materialised (no padding)
        SDPA falls back to the module flag and would silently stay causal.
        """
        if mode not in self.attention_modes:
            raise ValueError(
                f"attention={mode!r} is not supported by backbone {self.family!r}; "
                f"choose one of {', '.join(self.attention_modes)}"
            )
        causal = mode == "causal"
        lm = self.language_model(model)
        lm.config.is_causal = causal
        for module in lm.modules():
            if hasattr(module, "is_causal") and not isinstance(module, type(lm)):
                module.is_causal = causal
        self.settings.attention = mode

    @staticmethod
    def hidden_size(model: nn.Module) -> int:
        """Width of the language model's hidden states (the embedding dimension)."""
        cfg = model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        return int(text_cfg.hidden_size)


def _modality_map(processor: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' ``mm_token_type_ids`` of a padded batch [B, L]: 0 text, 1 image, 2 video,
    3 audio tokens (by the processor's ``image_token_ids`` / ``video_token_ids`` /
    ``audio_token_ids``)."""
    types = torch.zeros_like(input_ids)
    for code, name in ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids")):
        ids = [i for i in getattr(processor, name, None) or [] if i is not None]
        if ids:
            types[torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype))] = code
    return types


def set_output_field(output: Any, name: str, value: Any) -> None:
    """Sets a field of a transformers ``ModelOutput`` (or any object) to ``value``.

    Plain attribute assignment is not enough: ``ModelOutput.__setattr__`` ignores None for
    its mapping side, so the tensor would stay referenced (and in memory) under its key.
    """
    if isinstance(output, Mapping):
        output[name] = value
    else:
        setattr(output, name, value)


def _same_shape_tensors(value: Any) -> bool:
    """A non-empty list of tensors of one shape and dtype (stacked as "pt" would)."""
    if not isinstance(value, list) or not value or not all(isinstance(v, torch.Tensor) for v in value):
        return False
    return all(v.shape == value[0].shape and v.dtype == value[0].dtype for v in value)


def _tensors(call: Callable[..., Mapping[str, Any]], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """``call(..., return_tensors="pt")``'s output, built faster from its untyped output.

    transformers' own conversion (to "pt" or "np" alike) first walks every nested token list
    in Python to check for emptiness; on the encode benchmark's Qwen2-VL batches that walk
    cost about as much as the Rust tokenizer itself. Asked for no tensor type, the tokenizer
    returns plain padded lists, which NumPy turns into one array in C, and that array
    becomes a CPU tensor without a copy. Integer and boolean lists take this path (the
    dtypes "pt" gives them: int64, bool); arrays and tensors pass through, lists of
    same-shape tensors are stacked; anything else (ragged or float lists) makes it ask for
    tensors after all, which processes the batch a second time. The result is checked
    against ``return_tensors="pt"`` per family, key, dtype and value.
    """
    out = call(*args, **kwargs, return_tensors=None)
    tensors: dict[str, Any] = {}
    for key, value in out.items():
        if isinstance(value, torch.Tensor):
            tensors[key] = value
            continue
        if isinstance(value, np.ndarray) and value.dtype != object:
            tensors[key] = torch.from_numpy(value)
            continue
        if _same_shape_tensors(value):  # per-image pixel tensors (LLaVA, InternVL)
            tensors[key] = torch.stack(value)
            continue
        array = np.asarray(value) if isinstance(value, list) else None
        if array is None or array.size == 0 or array.dtype.kind not in "ib":
            return dict(call(*args, **kwargs, return_tensors="pt"))
        # Python ints become int64 tensors under "pt" (np.asarray gives int32 on Windows).
        tensors[key] = torch.from_numpy(
            array.astype(np.int64, copy=False) if array.dtype.kind == "i" else array
        )
    return tensors


def _load_kwargs(
    dtype: torch.dtype | str | None, attn_implementation: str | None, trust_remote_code: bool
) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments: only what was given, so transformers' defaults hold."""
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return kwargs
