"""Reranker: a VLM with its LM head, scoring (query, candidate) pairs by a yes/no answer.

The prompt interleaves an instruction, the query and the candidate, each with its images,
as the config's ``template`` lays them out; the score is the next-token logit of the
``yes_token`` minus that of the ``no_token`` after it. Everything family-specific goes
through the backbone adapter (``load_lm``, ``lm_backbone``, ``answer_logits``,
``render_segments``), found through the registry.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlm2emb.backbones.base import ATTENTION_MODES, BackboneAdapter
from vlm2emb.inputs import DUMMY_ROWS, decode_media, token_counts
from vlm2emb.items import Item
from vlm2emb.model import (
    ADAPTER_DIR,
    TINY_PREFIX,
    _default_prefetch,
    _grad_free,
    _prefetched,
    apply_saved_lora,
    enable_checkpointing,
    model_folder,
    resolve_dtype,
    save_lm_weights,
    saved_config_and_family,
    sub_state,
    wrap_lora,
)
from vlm2emb.pooling import pool
from vlm2emb.prompts import count_image_markers, strip_image_markers

RERANKER_CONFIG_NAME = "vlm2emb_reranker.json"
RERANKER_FORMAT_VERSION = 1

DEFAULT_TEMPLATE = "{instruction}\nQuery: {query}\nCandidate: {candidate}\nAnswer yes or no.\nAnswer:"
DEFAULT_INSTRUCTION = "Does the candidate match the query?"

_FIELD = re.compile(r"\{(\w*)\}")
_TEMPLATE_FIELDS = ("instruction", "query", "candidate")


@dataclass
class RerankerConfig:
    """How a backbone scores pairs; saved as ``vlm2emb_reranker.json`` next to the weights.

    Attributes:
        family: Backbone family (registry name).
        template: The prompt, with ``{query}`` and ``{candidate}`` once each (query first)
            and ``{instruction}`` at most once; other ``{name}`` fields are refused. Each
            part's images are placed where the part stands (the family's
            ``render_segments``).
        instruction: The instruction of pairs that bring none.
        yes_token: The answer meaning "relevant"; its first token's logit counts.
        no_token: The answer meaning "not relevant"; its first token's logit counts.
        attention: ``causal`` (autoregressive families) or the family's own default.
        padding_side: ``right`` or ``left``; scores do not depend on it.
        base_model: Where the backbone came from (model cards, adapter bases).
        format_version: Layout version of the saved directory.
    """

    family: str
    template: str = DEFAULT_TEMPLATE
    instruction: str = DEFAULT_INSTRUCTION
    yes_token: str = " yes"
    no_token: str = " no"
    attention: str = "causal"
    padding_side: str = "right"
    base_model: str | None = None
    format_version: int = RERANKER_FORMAT_VERSION

    def validate(self) -> None:
        """Checks the values the types do not.

        Raises:
            ValueError: One line naming the field.
        """
        names = _FIELD.findall(self.template)
        unknown = sorted(set(names) - set(_TEMPLATE_FIELDS))
        if unknown:
            raise ValueError(
                f"template: unknown field(s) {', '.join('{' + n + '}' for n in unknown)}; "
                "it may hold {instruction}, {query} and {candidate}"
            )
        for name, allowed in (("query", (1,)), ("candidate", (1,)), ("instruction", (0, 1))):
            if names.count(name) not in allowed:
                need = "exactly once" if allowed == (1,) else "at most once"
                raise ValueError(f"template: {{{name}}} must appear {need}, found {names.count(name)}")
        if self.template.index("{query}") > self.template.index("{candidate}"):
            raise ValueError("template: {query} must come before {candidate}")
        if not self.yes_token or not self.no_token:
            raise ValueError("yes_token and no_token must be non-empty strings")
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {self.attention!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = RERANKER_CONFIG_NAME) -> RerankerConfig:
        """Builds the config from a mapping (a saved file); unknown keys are an error.

        Raises:
            ValueError: An unknown key, named with ``where``.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**data)


def _split_template(template: str, instruction: str) -> tuple[str, str, str]:
    """The template's text before ``{query}``, between the two items and after ``{candidate}``,
    with the instruction written in (plain text: braces in it stay as they are)."""
    before, rest = template.split("{query}")
    between, after = rest.split("{candidate}")
    return tuple(part.replace("{instruction}", instruction) for part in (before, between, after))  # type: ignore[return-value]


def _item_text(item: Item) -> str:
    # MMEB texts carry <|image_N|> markers; here images are placed by render_segments.
    text = item.text or ""
    return (strip_image_markers(text) or "") if count_image_markers(text) else text


class PairInputs:
    """(query, candidate) pairs -> backbone tensors, without the weights.

    What a DataLoader worker holds to collate reranker batches (the processor and the
    prompt settings, never the LM). :attr:`Reranker.inputs` is one.

    Args:
        adapter: The family adapter (processor, prompt format).
        config: The reranker's config (template, instruction); read, not copied.
        always_run_vision: Give a batch without images one blank-image pair, dropped after
            the forward (:meth:`Reranker.forward`). Multi-process runs need it: every process
            must run the same modules in the same order (DDP's gradient buckets, ZeRO's
            collective weight gathers), as for the embedder's
            :class:`~vlm2emb.inputs.InputBuilder`.
        base_dir: Folder that relative media paths resolve against (None: the working directory).
    """

    def __init__(
        self,
        adapter: BackboneAdapter,
        config: RerankerConfig,
        *,
        always_run_vision: bool = False,
        base_dir: str | Path | None = None,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.always_run_vision = always_run_vision
        self.base_dir = base_dir

    def render(
        self, query: Item, candidate: Item, instruction: str | None, decoded: dict[int, list[Any]]
    ) -> tuple[str, list[Any]]:
        """The prompt and images (prompt order) of one pair; media decoded into ``decoded``."""
        # ``decoded`` caches media by item identity: a query scored against n candidates is
        # decoded once, not n times. The caller keeps those items alive while it uses it.
        images = []
        for item in (query, candidate):
            if id(item) not in decoded:
                decoded[id(item)] = decode_media(item, self.base_dir)
            images.append(decoded[id(item)])
        before, between, after = _split_template(
            self.config.template, instruction if instruction is not None else self.config.instruction
        )
        segments = [
            (before, 0),
            (_item_text(query), len(images[0])),
            (between, 0),
            (_item_text(candidate), len(images[1])),
            (after, 0),
        ]
        return self.adapter.render_segments(segments), [*images[0], *images[1]]

    def __call__(
        self,
        pairs: Sequence[tuple[Any, Any]],
        instructions: str | Sequence[str | None] | None = None,
        *,
        _decoded: dict[int, list[Any]] | None = None,
    ) -> dict[str, Any]:
        """One padded backbone batch of ``pairs`` (see :meth:`Reranker.collate_pairs`)."""
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(pairs)
        if len(instructions) != len(pairs):
            raise ValueError(f"got {len(instructions)} instructions for {len(pairs)} pairs")
        decoded = {} if _decoded is None else _decoded
        # Media are cached by the identity of parsed items, so every Item must stay alive for
        # the whole call (a freed one's id can be reused by the next); one Item per distinct
        # raw object, so a query repeated over its group is decoded once.
        parsed: dict[int, Item] = {}

        def parse(raw: Any) -> Item:
            if isinstance(raw, Item):
                return raw
            if id(raw) not in parsed:
                parsed[id(raw)] = Item.parse(raw)
            return parsed[id(raw)]

        items = [(parse(q), parse(c)) for q, c in pairs]  # `pairs` keeps the raw objects alive
        prompts, images = [], []
        for (q, c), instruction in zip(items, instructions):
            prompt, imgs = self.render(q, c, instruction, decoded)
            prompts.append(prompt)
            images.append(imgs)
        dummy = 0
        if self.always_run_vision and not any(images):
            # One blank-image pair runs the family's image path; its score is dropped in
            # Reranker.forward, and the other rows do not depend on it (padding is masked).
            from PIL import Image

            blank = Item.parse(Image.new("RGB", (32, 32), (255, 255, 255)))
            prompt, imgs = self.render(blank, Item.parse(""), None, decoded)
            prompts.append(prompt)
            images.append(imgs)
            dummy = 1
        out = self.adapter.build_inputs(prompts, images)
        if dummy:
            out[DUMMY_ROWS] = dummy
        return out


class Reranker(nn.Module):
    """A generative reranker: ``score = logit(yes) - logit(no)`` after a pair prompt.

    Build one with :meth:`from_pretrained`; score with :meth:`score_pairs` or :meth:`rerank`.
    Training code calls :meth:`collate_pairs` and :meth:`forward`.

    Example:
        >>> from vlm2emb.rerank import Reranker
        >>> rr = Reranker.from_pretrained("tiny:qwen2_vl")  # doctest: +SKIP
        >>> rr.rerank("a digit seven", ["seven", "one", "two"], top_k=2)  # doctest: +SKIP
        [{'corpus_id': 0, 'score': ...}, {'corpus_id': 2, 'score': ...}]
    """

    def __init__(self, lm: nn.Module, adapter: BackboneAdapter, config: RerankerConfig) -> None:
        super().__init__()
        config.validate()
        self.lm = lm
        self.adapter = adapter
        self.config = config
        # The config owns padding_side and attention; the adapter reads them from it.
        self.adapter.settings = config
        self.adapter.configure_backbone(self.backbone)
        self.adapter.set_attention(self.backbone, config.attention)
        self.answer_ids = self._answer_ids()
        from vlm2emb.distributed import is_distributed

        # Built inside a process group of several processes: the blank-image pair keeps them in step.
        self.inputs = PairInputs(adapter, config, always_run_vision=is_distributed())

    @property
    def base_dir(self) -> str | Path | None:
        """Where relative media paths resolve (None: the working directory)."""
        return self.inputs.base_dir

    @base_dir.setter
    def base_dir(self, value: str | Path | None) -> None:
        self.inputs.base_dir = value

    def _answer_ids(self) -> tuple[int, int]:
        """The first token ids of ``yes_token`` and ``no_token`` (they must differ)."""
        ids = []
        for key in ("yes_token", "no_token"):
            text = getattr(self.config, key)
            tokens = self.adapter.tokenizer.encode(text, add_special_tokens=False)
            if not tokens:
                raise ValueError(f"{key}: {text!r} encodes to no token")
            ids.append(int(tokens[0]))
        if ids[0] == ids[1]:
            raise ValueError(
                f"yes_token {self.config.yes_token!r} and no_token {self.config.no_token!r} start with "
                "the same token; choose answers whose first tokens differ"
            )
        return ids[0], ids[1]

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        template: str | None = None,
        instruction: str | None = None,
        yes_token: str | None = None,
        no_token: str | None = None,
        padding_side: str | None = None,
        torch_dtype: str | torch.dtype | None = None,
        attn_implementation: str | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
        merge_lora: bool = True,
        seed: int = 0,
    ) -> Reranker:
        """Loads a raw VLM checkpoint (with its LM head) or a saved reranker.

        Args:
            name_or_path: A local directory, a hub id, or ``tiny:FAMILY`` (a tiny random
                model built offline).
            template: Overrides the saved prompt template (see :class:`RerankerConfig`).
            instruction: Overrides the saved default instruction.
            yes_token: Overrides the saved "relevant" answer.
            no_token: Overrides the saved "not relevant" answer.
            padding_side: ``right`` or ``left`` (default: saved, else right).
            torch_dtype: Weight dtype (``"bf16"``, ``torch.float32``, ...).
            attn_implementation: transformers attention backend.
            device: Device to move the model to.
            trust_remote_code: Allow custom modelling code shipped with the checkpoint.
            merge_lora: Merge a saved LoRA adapter (``adapter/``) into the weights; False
                keeps it a trainable peft module.
            seed: Seed of a ``tiny:`` model's weights.

        Returns:
            The reranker in eval mode.

        Raises:
            FileNotFoundError: A local path does not exist.
            KeyError: The checkpoint's model type has no registered adapter.
            ValueError: A family without a next-token head, a bad template or answers.
        """
        from vlm2emb._quiet import quiet_third_party
        from vlm2emb.backbones.registry import get_adapter_class

        quiet_third_party()
        name = str(name_or_path)
        overrides = {
            "template": template,
            "instruction": instruction,
            "yes_token": yes_token,
            "no_token": no_token,
            "padding_side": padding_side,
        }
        kwargs = {
            "overrides": overrides,
            "dtype": resolve_dtype(torch_dtype),
            "attn_implementation": attn_implementation,
            "merge_lora": merge_lora,
            "base_model": name,
        }
        if name.startswith(TINY_PREFIX):
            get_adapter_class(name[len(TINY_PREFIX) :]).check_generative_head()  # before building anything
        with model_folder(name, seed) as (path, tiny):
            model = cls._load_dir(path, trust_remote_code=trust_remote_code and not tiny, **kwargs)
        if device is not None:
            model.to(device)
        return model.eval()

    @classmethod
    def _load_dir(
        cls,
        path: str,
        *,
        overrides: dict[str, Any],
        dtype: torch.dtype | str | None,
        attn_implementation: str | None,
        trust_remote_code: bool,
        merge_lora: bool,
        base_model: str,
    ) -> Reranker:
        from vlm2emb.backbones.registry import get_adapter_class

        saved, family = saved_config_and_family(
            path, trust_remote_code=trust_remote_code, config_name=RERANKER_CONFIG_NAME
        )
        if not saved:  # not a saved reranker: a raw VLM, or a saved embedder (its family)
            _, family = saved_config_and_family(path, trust_remote_code=trust_remote_code)
        adapter_cls = get_adapter_class(family)
        lm = adapter_cls.load_lm(
            path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
        lm = apply_saved_lora(lm, Path(path) / ADAPTER_DIR, merge_lora)
        processor = adapter_cls.load_processor(path, trust_remote_code=trust_remote_code)
        data = {**saved, "family": adapter_cls.family}
        data.setdefault("attention", adapter_cls.default_attention)
        data.setdefault("base_model", base_model)
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = RerankerConfig.from_dict(data, where=str(Path(path) / RERANKER_CONFIG_NAME))
        adapter = adapter_cls(processor, settings=config)
        return cls(lm, adapter, config)

    # ------------------------------------------------------------------ properties
    @property
    def has_lora(self) -> bool:
        return hasattr(self.lm, "peft_config")

    @property
    def base_lm(self) -> nn.Module:
        """The transformers LM under a LoRA wrapper (the LM itself without one)."""
        return self.lm.get_base_model() if self.has_lora else self.lm

    @property
    def backbone(self) -> nn.Module:
        """The base model inside the LM (LoRA layers, if any, are injected in place)."""
        return self.adapter.lm_backbone(self.base_lm)

    @property
    def device(self) -> torch.device:
        return next(self.lm.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.lm.parameters()).dtype

    # ------------------------------------------------------------------ prompts
    def render_pair(
        self, query: Any, candidate: Any, instruction: str | None = None
    ) -> tuple[str, list[Any]]:
        """The prompt string and the images of one pair, in prompt order.

        Args:
            query: A string, a PIL image or an item dict.
            candidate: The same forms.
            instruction: The pair's instruction (None: ``config.instruction``).
        """
        return self._render(Item.parse(query), Item.parse(candidate), instruction, {})

    def _render(
        self, query: Item, candidate: Item, instruction: str | None, decoded: dict[int, list[Any]]
    ) -> tuple[str, list[Any]]:
        return self.inputs.render(query, candidate, instruction, decoded)

    def collate_pairs(
        self,
        pairs: Sequence[tuple[Any, Any]],
        instructions: str | Sequence[str | None] | None = None,
        *,
        _decoded: dict[int, list[Any]] | None = None,
    ) -> dict[str, Any]:
        """Turns (query, candidate) pairs into one padded backbone batch (CPU tensors).

        Args:
            pairs: ``(query, candidate)`` items (str, PIL image or item dict each).
            instructions: One instruction for all pairs, or one per pair (None: the config's).

        Returns:
            The backbone's input tensors (``input_ids`` [B, L], ``attention_mask`` [B, L], ...).
        """
        return self.inputs(pairs, instructions, _decoded=_decoded)

    # ------------------------------------------------------------------ scoring
    def forward(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Scores one collated batch.

        Args:
            inputs: Output of :meth:`collate_pairs` (moved to the model's device here).

        Returns:
            [B] float32 ``logit(yes) - logit(no)``, with grad when grad is enabled.
        """
        device = self.device
        dummy_rows = int(inputs.get(DUMMY_ROWS, 0))  # the blank-image pair of PairInputs
        inputs = {
            k: v.to(device) if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()
            if k != DUMMY_ROWS
        }
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        hidden, mask = self.adapter.forward(self.backbone, inputs)  # [B, L, H], [B, L]
        # The last real token predicts the answer; found through the mask, so the score does
        # not depend on padding side or batch mates.
        last = pool(hidden, mask, "last")  # [B, H]
        logits = self.adapter.answer_logits(self.base_lm, last, self.answer_ids)  # [B, 2]
        scores = logits[:, 0] - logits[:, 1]  # [B]
        # A slice keeps the dropped row in the graph: the vision tower gets a (zero) gradient
        # on every process, as DDP expects.
        return scores[:-dummy_rows] if dummy_rows else scores

    @_grad_free
    def score_pairs(
        self,
        pairs: Sequence[tuple[Any, Any]],
        instructions: str | Sequence[str | None] | None = None,
        batch_size: int = 16,
        prefetch: int | None = None,
    ) -> torch.Tensor:
        """Scores (query, candidate) pairs, batched by length.

        Pairs are sorted by (image count, text tokens), so similar lengths share a batch, and
        the next batches are prepared in a worker thread while the model runs. A pair's
        score does not depend on its batch mates (padding is masked).

        Args:
            pairs: ``(query, candidate)`` items.
            instructions: One instruction for all pairs, or one per pair (None: the config's).
            batch_size: Pairs per forward pass.
            prefetch: Batches prepared ahead (None: as :meth:`EmbeddingModel.encode`).

        Returns:
            [n] float32 scores on the CPU, in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not pairs:
            return torch.empty(0)
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(pairs)
        if len(instructions) != len(pairs):
            raise ValueError(f"got {len(instructions)} instructions for {len(pairs)} pairs")
        parsed: dict[int, Item] = {}  # one Item per distinct object, so media decode once

        def parse(x: Any) -> Item:
            if id(x) not in parsed:
                parsed[id(x)] = Item.parse(x)
            return parsed[id(x)]

        items = [(parse(q), parse(c)) for q, c in pairs]
        texts = [_item_text(q) + _item_text(c) for q, c in items]
        counts = token_counts(texts, self.adapter.tokenizer)
        keys = [(len(q.media) + len(c.media), n) for (q, c), n in zip(items, counts)]
        order = sorted(range(len(items)), key=keys.__getitem__, reverse=True)  # longest first
        batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
        decoded: dict[int, list[Any]] = {}

        def prepare(idx: list[int]) -> dict[str, Any]:
            return self.collate_pairs(
                [items[i] for i in idx], [instructions[i] for i in idx], _decoded=decoded
            )

        was_training = self.training
        self.eval()
        chunks = []
        try:
            depth = _default_prefetch(self.device) if prefetch is None else prefetch
            for inputs in _prefetched(prepare, batches, depth):
                chunks.append(self(inputs).float().cpu())
        finally:
            self.train(was_training)
        scores = torch.empty(len(items))
        scores[torch.tensor(order)] = torch.cat(chunks)
        return scores

    def rerank(
        self,
        query: Any,
        candidates: Sequence[Any],
        top_k: int | None = None,
        *,
        instruction: str | None = None,
        batch_size: int = 16,
    ) -> list[dict[str, float | int]]:
        """Orders candidates by their score against ``query`` (sentence-transformers'
        ``CrossEncoder.rank`` form).

        Args:
            query: The query item.
            candidates: Candidate items.
            top_k: Hits to return (None: all).
            instruction: The instruction (None: ``config.instruction``).
            batch_size: Pairs per forward pass.

        Returns:
            Dicts ``{"corpus_id": index into candidates, "score": float}``, best first; ties
            keep the candidates' order.
        """
        scores = self.score_pairs([(query, c) for c in candidates], instruction, batch_size=batch_size)
        order = torch.sort(scores, descending=True, stable=True).indices.tolist()
        if top_k is not None:
            order = order[: max(int(top_k), 0)]
        return [{"corpus_id": int(i), "score": float(scores[i])} for i in order]

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
        """Wraps the LM with a peft LoRA adapter, as :meth:`EmbeddingModel.apply_lora`.

        Defaults: the family's ``lora_target_modules`` (the language model's attention and MLP
        projections); the LM head stays frozen.
        """
        self.lm = wrap_lora(
            self.lm,
            r=r,
            alpha=alpha,
            dropout=dropout,
            target_modules=target_modules or self.adapter.lora_target_modules,
            use_dora=use_dora,
            seed=seed,
        )

    def enable_gradient_checkpointing(self) -> None:
        """Recomputes each transformer block's forward in the backward (non-reentrant), as
        :meth:`EmbeddingModel.enable_gradient_checkpointing` does (same gradients, less memory)."""
        if getattr(self, "_embedding_grad_hook", None) is not None:
            self._embedding_grad_hook.remove()
        # The base model inside the LM class (LoRA layers are injected in place).
        self._embedding_grad_hook = enable_checkpointing(self.backbone)

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_dir: str | os.PathLike[str],
        *,
        merge_lora: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> Path:
        """Writes the LM (safetensors, with its head), the processor and ``vlm2emb_reranker.json``.

        The folder is also a plain transformers checkpoint of the family's
        ``...ForConditionalGeneration`` class. With LoRA and ``merge_lora=False`` the base
        weights are written unmerged and the adapter goes to ``adapter/`` (peft layout).

        Args:
            save_dir: Output directory (created if missing).
            merge_lora: Write merged weights instead of base + adapter.
            state_dict: This module's full state dict (``lm.``-prefixed keys), when the live
                parameters are not (DeepSpeed ZeRO-3 partitions them; the trainer gathers
                them first).

        Returns:
            The output directory.
        """
        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        lm_state = None if state_dict is None else sub_state(state_dict, "lm.")
        save_lm_weights(self.lm, out, self.config.base_model, merge_lora=merge_lora, state=lm_state)
        self.adapter.processor.save_pretrained(out)
        (out / RERANKER_CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        from vlm2emb._files import honour_umask

        honour_umask([*out.glob("*.safetensors"), *(out / ADAPTER_DIR).glob("*.safetensors")])
        return out
