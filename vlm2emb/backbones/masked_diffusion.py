"""Generic adapter for remote-code masked-diffusion VLMs (LLaDA-V, LaViDa, MMaDA, Dimple style).

These models ship their modelling code with the checkpoint (``trust_remote_code=True``) and
differ in exactly the places an embedder cares about, so the adapter is driven by a small
:class:`MaskedDiffusionSpec` instead of one class per model:

* **attention mask form**: a ``[B, L]`` mask, a ``[B, 1, L, L]`` boolean mask, an additive
  pairwise bias, or none at all (LLaDA's attention ignores padding masks). vlm2emb's
  ``[B, L]`` padding mask is translated into that form; for models that ignore masks, every
  group of equally long rows runs on its own without padding, so padding never leaks.
* **vision type**: vision-tower features that replace image placeholder tokens inside the
  model (SigLIP style), or VQ image codes offset into the LM vocabulary (MMaDA style), which
  the adapter splices into ``input_ids`` itself.
* **special tokens**: the ``[MASK]`` token must never reach a clean forward.

Embeddings come from **one clean forward** of the backbone's plain ``forward``: all tokens
visible, bidirectional, no masking noise, no timestep, no labels. Training entry points of
these models (a forward that reads ``labels``, adds masking noise or samples a timestep) are
never called.

The spec is read, in increasing priority, from :attr:`MaskedDiffusionAdapter.spec` (a
subclass's preset), the checkpoint's ``config.json`` key ``vlm2emb_masked_diffusion``, and
the ``masked_diffusion`` key of ``vlm2emb_config.json`` next to the weights. The merged spec
is stored on ``model.config`` so that :meth:`~vlm2emb.EmbeddingModel.save_pretrained` keeps it.
"""

from __future__ import annotations

import json
import operator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from vlm2emb.backbones.base import BackboneAdapter
from vlm2emb.backbones.lora_targets import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    OLMO_PROJECTIONS,
    named_projections,
)

MASK_FORMS = ("2d", "4d_bool", "additive", "none")
VISION_TYPES = ("features", "vq", "none")
CONFIG_KEY = "vlm2emb_masked_diffusion"  # in the backbone's config.json
VLM2EMB_KEY = "masked_diffusion"  # in vlm2emb_config.json

# Common projection names of the LM blocks (LLaMA/Qwen naming plus LLaDA's OLMo naming:
# attn_out, ff_proj, ff_out). Anchored at the language model so vision towers stay frozen.
_LM_PROJ = named_projections(
    r"(language_model|transformer\.blocks|model\.layers)",
    ATTENTION_PROJECTIONS + MLP_PROJECTIONS + OLMO_PROJECTIONS,
)


@dataclass
class MaskedDiffusionSpec:
    """What the adapter must know about one masked-diffusion VLM.

    Attributes:
        mask_form: How the model reads a padding mask: ``"2d"`` ([B, L], nonzero = real),
            ``"4d_bool"`` ([B, 1, L, L], True = may attend), ``"additive"`` ([B, 1, L, L]
            float, 0 or the dtype's minimum, added to the scores) or ``"none"`` (the model
            ignores masks; rows are run in length buckets without padding).
        mask_kwarg: Keyword of the model's forward that receives the mask
            (``attention_mask``; MMaDA-style models take ``attention_bias``).
        vision: ``"features"``, ``"vq"`` or ``"none"`` (text-only backbone).
        image_token: The placeholder string written once per image into the prompt (the
            processor expands it to one token per image feature or code).
        pixel_kwarg: Keyword of the model's forward that receives the images (features).
        vq_encoder: For ``vq``: dotted attribute path, on the model, of a callable mapping
            ``pixel_values`` to integer codes [N_images, tokens_per_image].
        vq_offset: For ``vq``: the vocabulary id of code 0.
        mask_token: The model's ``[MASK]`` token string; inputs holding it are refused.
        submodule: Dotted path of the module whose plain forward returns hidden states, if
            not the loaded model itself (e.g. ``"model"`` under an LM-head wrapper).
        hidden: ``"last_hidden_state"`` or ``"hidden_states"`` (last entry, requested with
            ``output_hidden_states=True``) of the forward's output.
        position_ids: Pass position ids that count real tokens only (left padding safe).
        language_model: Dotted path of the LM (for reports; LoRA targets use the regex).
        lora_target_modules: Overrides the adapter's default LoRA target regex.
        forward_kwargs: Extra constant keywords for the forward call.
    """

    mask_form: str = "4d_bool"
    mask_kwarg: str = "attention_mask"
    vision: str = "features"
    image_token: str = "<image>"
    pixel_kwarg: str = "pixel_values"
    vq_encoder: str | None = None
    vq_offset: int | None = None
    mask_token: str | None = None
    submodule: str | None = None
    hidden: str = "last_hidden_state"
    position_ids: bool = False
    language_model: str = "language_model"
    lora_target_modules: str | list[str] | None = None
    forward_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MaskedDiffusionSpec:
        """Builds and validates a spec; unknown keys and bad values are one-line errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"masked_diffusion spec: unknown key(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        spec = cls(**data)
        spec.validate()
        return spec

    def validate(self) -> None:
        if self.mask_form not in MASK_FORMS:
            raise ValueError(
                f"masked_diffusion spec: mask_form {self.mask_form!r} is not one of {', '.join(MASK_FORMS)}"
            )
        if self.vision not in VISION_TYPES:
            raise ValueError(
                f"masked_diffusion spec: vision {self.vision!r} is not one of {', '.join(VISION_TYPES)}"
            )
        if self.vision == "vq" and (self.vq_encoder is None or self.vq_offset is None):
            raise ValueError("masked_diffusion spec: vision 'vq' needs vq_encoder and vq_offset")
        if self.hidden not in ("last_hidden_state", "hidden_states"):
            raise ValueError(
                f"masked_diffusion spec: hidden {self.hidden!r} is not last_hidden_state or hidden_states"
            )


def _attr(obj: Any, dotted: str) -> Any:
    return operator.attrgetter(dotted)(obj)


def _refuse_untrusted(family: str, path: str | Path, trust_remote_code: bool) -> None:
    if not trust_remote_code:
        raise ValueError(
            f"{family}: {path} runs modelling code shipped with the checkpoint; "
            "pass trust_remote_code=True to load it (only for checkpoints you trust)"
        )


class MaskedDiffusionAdapter(BackboneAdapter):
    """Spec-driven adapter for masked-diffusion VLMs loaded with ``trust_remote_code=True``.

    Subclass it with a preset :attr:`spec` and ``model_types`` to serve a family directly,
    or select it for any checkpoint with ``{"family": "masked_diffusion",
    "masked_diffusion": {...}}`` in ``vlm2emb_config.json``.
    """

    family: ClassVar[str] = "masked_diffusion"
    model_types: ClassVar[tuple[str, ...]] = ()
    lora_target_modules: ClassVar[str | list[str]] = _LM_PROJ
    # Masked-diffusion LMs are trained with full attention only; a causal mask would be a
    # model they never saw.
    attention_modes: ClassVar[tuple[str, ...]] = ("bidirectional",)
    default_attention: ClassVar[str] = "bidirectional"
    generative_head: ClassVar[bool] = False  # predicts masked tokens, not the next one
    spec: ClassVar[dict[str, Any]] = {}

    def __init__(self, processor: Any, **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        self._spec: MaskedDiffusionSpec | None = None

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
        _refuse_untrusted(cls.family, path, trust_remote_code)
        model = super().load_model(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=True
        )
        merged = dict(cls.spec)
        merged.update(getattr(model.config, CONFIG_KEY, None) or {})
        cfg_file = Path(path) / "vlm2emb_config.json"
        if cfg_file.is_file():
            merged.update(json.loads(cfg_file.read_text()).get(VLM2EMB_KEY) or {})
        # Stored on the config: save_pretrained writes it into config.json, so a saved
        # model needs no extra file to be embedded the same way.
        setattr(model.config, CONFIG_KEY, asdict(MaskedDiffusionSpec.from_dict(merged)))
        return model

    @classmethod
    def load_processor(cls, path: str | Path, *, trust_remote_code: bool = False) -> Any:
        _refuse_untrusted(cls.family, path, trust_remote_code)
        return super().load_processor(path, trust_remote_code=True)

    # ------------------------------------------------------------------ spec
    def bind(self, model: nn.Module) -> MaskedDiffusionSpec:
        """Reads the spec from ``model.config`` (done once, when the attention is set)."""
        config = _base(model).config
        self._spec = MaskedDiffusionSpec.from_dict({**self.spec, **(getattr(config, CONFIG_KEY, None) or {})})
        if self._spec.lora_target_modules:
            self.lora_target_modules = self._spec.lora_target_modules
        return self._spec

    @property
    def spec_(self) -> MaskedDiffusionSpec:
        if self._spec is None:
            raise RuntimeError("masked_diffusion adapter used before a model was bound (set_attention)")
        return self._spec

    def set_attention(self, model: nn.Module, mode: str) -> None:
        if mode not in self.attention_modes:
            raise ValueError(
                f"attention={mode!r} is not supported by backbone {self.family!r}: masked-diffusion "
                "models are trained with bidirectional attention only; use attention='bidirectional'"
            )
        self.bind(model)
        self.settings.attention = mode

    def language_model(self, model: nn.Module) -> nn.Module:
        return _attr(_base(model), self.spec_.language_model)

    def special_ids(self) -> dict[str, int | None]:
        """The ``mask``, ``pad``, ``eos`` and ``image`` token ids (None where undefined)."""
        tok = self.tokenizer
        spec = self.spec_

        def tid(token: str | None) -> int | None:
            if token is None:
                return None
            found = tok.convert_tokens_to_ids(token)
            return None if found is None or found == tok.unk_token_id else int(found)

        image = spec.image_token if spec.vision != "none" else None
        return {
            "mask": tid(spec.mask_token),
            "pad": tok.pad_token_id,
            "eos": tok.eos_token_id,
            "image": tid(image),
        }

    # ------------------------------------------------------------------ inputs
    def render_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        if num_images and self.spec_.vision == "none":
            raise ValueError(f"backbone {self.family!r} is text-only (vision 'none'); remove the image(s)")
        parts = [self.spec_.image_token * num_images]
        if instruction:
            parts.append(instruction.strip() + "\n")
        if text:
            parts.append(text)
        return "".join(parts)

    # ------------------------------------------------------------------ forward
    def forward(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """One clean bidirectional forward; returns ``(hidden [B, L, H], mask [B, L])``."""
        spec = self.spec_
        ids = inputs["input_ids"]
        mask = inputs["attention_mask"]
        mask_id = self.special_ids()["mask"]
        if mask_id is not None and bool((ids[mask.bool()] == mask_id).any()):
            raise ValueError(
                f"an input holds the model's mask token {spec.mask_token!r}; embeddings come "
                "from clean (unmasked) inputs"
            )
        pixels = inputs.get("pixel_values")
        if spec.vision == "vq" and pixels is not None:
            ids = self._splice_vq_codes(model, ids, pixels)
            pixels = None
        if spec.mask_form == "none":
            hidden = self._forward_bucketed(model, ids, mask, pixels)
        else:
            hidden = self._call(model, ids, mask, pixels, self._translate_mask(mask, model))
        return hidden, mask

    def _splice_vq_codes(self, model: nn.Module, ids: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        """Replaces image placeholders by VQ codes shifted into the LM vocabulary (MMaDA)."""
        spec = self.spec_
        codes = _attr(_base(model), spec.vq_encoder)(pixels)  # [N_images, T] ints
        slots = ids == self.special_ids()["image"]
        if int(slots.sum()) != codes.numel():
            raise ValueError(f"{int(slots.sum())} image placeholder tokens for {codes.numel()} VQ codes")
        out = ids.clone()
        out[slots] = codes.reshape(-1).to(ids.dtype) + int(spec.vq_offset)
        return out

    def _translate_mask(self, mask: torch.Tensor, model: nn.Module) -> torch.Tensor:
        """vlm2emb's [B, L] padding mask in the model's own form.

        Pairwise forms mask keys only (every query row, padding rows included, sees the
        real tokens) and each position may always attend to itself, so no row is fully
        masked: SDPA returns NaN for such rows, and a NaN at a padding position would reach
        real tokens through the next layer (0 weight times NaN is NaN).
        """
        form = self.spec_.mask_form
        if form == "2d":
            return mask
        real = mask.bool()
        length = mask.shape[1]
        allowed = real[:, None, None, :].expand(-1, 1, length, length)
        allowed = allowed | torch.eye(length, dtype=torch.bool, device=mask.device)
        if form == "4d_bool":
            return allowed
        dtype = _base(model).get_input_embeddings().weight.dtype
        bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
        return bias.masked_fill(~allowed, torch.finfo(dtype).min)

    def _call(
        self,
        model: nn.Module,
        ids: torch.Tensor,
        mask: torch.Tensor,
        pixels: torch.Tensor | None,
        model_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The backbone's plain forward, once: no labels, no noise, no timestep."""
        spec = self.spec_
        target = model if spec.submodule is None else _attr(model, spec.submodule)
        kwargs: dict[str, Any] = {"input_ids": ids, **spec.forward_kwargs}
        if model_mask is not None:
            kwargs[spec.mask_kwarg] = model_mask
        if pixels is not None:
            kwargs[spec.pixel_kwarg] = pixels
        if spec.position_ids:
            kwargs["position_ids"] = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if spec.hidden == "hidden_states":
            return target(**kwargs, output_hidden_states=True, return_dict=True).hidden_states[-1]
        return target(**kwargs, return_dict=True).last_hidden_state

    def _forward_bucketed(
        self, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, pixels: torch.Tensor | None
    ) -> torch.Tensor:
        """For models that ignore masks: one unpadded forward per group of equal lengths."""
        real = mask.bool()
        lengths = real.sum(dim=1)
        image_id = self.special_ids()["image"]
        # Images are laid out in row order; split them by each row's placeholder count.
        img_rows = None
        if pixels is not None and image_id is not None:
            slots = (ids == image_id).sum(dim=1)
            per_image = int(slots.sum()) // pixels.shape[0]
            counts = (slots // max(per_image, 1)).tolist()
            starts = [0, *torch.tensor(counts).cumsum(0).tolist()]
            img_rows = [pixels[starts[i] : starts[i + 1]] for i in range(len(counts))]
        hidden: torch.Tensor | None = None
        for length in lengths.unique().tolist():
            rows = (lengths == length).nonzero().flatten()
            if length == 0:
                continue  # nothing real to embed; the row stays zero and pooling skips it
            sub_ids = ids[rows][real[rows]].view(len(rows), length)
            sub_mask = torch.ones_like(sub_ids)
            sub_pix = None
            if img_rows is not None:
                parts = [img_rows[r] for r in rows.tolist()]
                sub_pix = torch.cat(parts) if sum(p.shape[0] for p in parts) else None
            out = self._call(model, sub_ids, sub_mask, sub_pix, None)  # [n, length, H]
            if hidden is None:
                hidden = out.new_zeros((*ids.shape, out.shape[-1]))
            # Index-put keeps autograd intact for training.
            row_idx = rows[:, None].expand(-1, length)
            col_idx = real[rows].nonzero()[:, 1].view(len(rows), length)
            hidden = hidden.index_put((row_idx, col_idx), out)
        if hidden is None:  # every row empty
            width = _base(model).get_input_embeddings().weight.shape[1]
            hidden = torch.zeros((*ids.shape, width), device=ids.device)
        return hidden


def _base(model: nn.Module) -> nn.Module:
    """The underlying transformers model of a plain or peft-wrapped backbone."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model
