"""From items to backbone inputs, without the weights.

:class:`InputBuilder` renders prompts, decodes media and calls the family adapter's
processor; it holds the adapter (processor and tokenizer) and reads the model's
:class:`~vlm2emb.model.EmbeddingConfig`, never the backbone. The training collator
(:class:`vlm2emb.data.collate.ContrastiveCollator`) and ``EmbeddingModel.encode`` both use
it, so collation runs data -> inputs, and the model's forward takes what it builds.

It also holds the length utilities batching uses (:func:`length_keys`,
:func:`length_sorted_batches`, :func:`token_counts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm2emb.items import Item, VideoRef

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.backbones.base import BackboneAdapter
    from vlm2emb.model import EmbeddingConfig

__all__ = [
    "CONTENT_MASK",
    "DUMMY_ROWS",
    "InputBuilder",
    "RenderedItem",
    "decode_media",
    "length_keys",
    "length_sorted_batches",
    "token_counts",
]

DUMMY_ROWS = "vlm2emb_dummy_rows"  # InputBuilder -> EmbeddingModel.forward: trailing rows to drop
# InputBuilder -> EmbeddingModel.forward: [B, L] bool, the tokens the multi-vector head keeps
# (EmbeddingConfig.multivector_tokens == "content").
CONTENT_MASK = "vlm2emb_content_mask"
# Stands for the item's text while a prompt is rendered a second time, to find where the
# text lands in the prompt (a private-use character no tokenizer or template produces).
_TEXT_SENTINEL = "\ue000vlm2emb-item-text\ue000"


@dataclass
class RenderedItem:
    """One item as the backbone sees it (:meth:`InputBuilder.render`).

    Attributes:
        prompt: The prompt string, before the processor expands image placeholders.
        input_ids: The token ids the model gets (placeholders expanded, no padding).
        tokens: The same ids as token strings.
        prompt_style: The style that rendered it.
    """

    prompt: str
    input_ids: list[int]
    tokens: list[str]
    prompt_style: str


class InputBuilder:
    """Turns items into one padded (or packed) backbone batch of CPU tensors.

    Args:
        adapter: The family adapter (processor, tokenizer, prompt format).
        config: The model's config, read for ``pooling`` (its suffix token),
            ``prompt_style`` and ``pack_sequences``; not copied, so a change there applies.
        always_run_vision: Give a batch without images one blank-image row, dropped after
            the forward. Multi-process runs need it: every process must run the same modules
            in the same order (ZeRO-3 gathers each module's weights collectively).
            :class:`~vlm2emb.model.EmbeddingModel` sets it when it is built inside a process
            group of more than one process.
        base_dir: Folder that relative image paths resolve against (None: the working
            directory).
    """

    def __init__(
        self,
        adapter: BackboneAdapter,
        config: EmbeddingConfig,
        *,
        always_run_vision: bool = False,
        base_dir: str | Path | None = None,
    ) -> None:
        self.adapter = adapter
        self.config = config
        self.always_run_vision = always_run_vision
        self.base_dir = base_dir

    @property
    def tokenizer(self) -> Any:
        return self.adapter.tokenizer

    def __call__(
        self,
        items: Sequence[Any],
        instructions: str | Sequence[str | None] | None = None,
        *,
        base_dir: str | Path | None = None,
    ) -> dict[str, Any]:
        """Builds one batch.

        Args:
            items: Strings, PIL images, item dicts or :class:`~vlm2emb.items.Item`.
            instructions: One instruction for all items, or one per item (None = none).
            base_dir: Overrides :attr:`base_dir` for this call.

        Returns:
            The backbone's input tensors (``input_ids`` [B, L], ``attention_mask`` [B, L], ...);
            with ``config.pack_sequences``, one packed row (``input_ids`` [1, T], no mask)
            and ``cu_seqlens`` [B + 1] (:meth:`BackboneAdapter.pack_inputs`).
        """
        prompts, images, dummy, spans = self._prompts_and_images(items, instructions, base_dir)
        out = self.adapter.build_inputs(prompts, images)
        if self.config.multivector_dim is not None and self.config.multivector_tokens == "content":
            out[CONTENT_MASK] = self._content_mask(prompts, spans, out)
        if self.config.pack_sequences:
            out = self.adapter.pack_inputs(out)
        if dummy:
            out[DUMMY_ROWS] = dummy
        return out

    def render_prompt(self, text: str | None, num_images: int, instruction: str | None) -> str:
        """The prompt string for one item in the config's ``prompt_style``
        (:func:`vlm2emb.prompts.render_prompt`)."""
        from vlm2emb.prompts import render_prompt

        return render_prompt(self.adapter, self.config.prompt_style, text, num_images, instruction)

    def render(self, item: Any, instruction: str | None = None) -> RenderedItem:
        """What the backbone gets for one item: the prompt string and its token ids
        (placeholders expanded, pooling suffix included, padding left out)."""
        prompts, images, _, _ = self._prompts_and_images([item], instruction, None)
        batch = self.adapter.build_inputs(prompts[:1], images[:1])
        mask = batch["attention_mask"][0].bool()
        ids = [int(i) for i in batch["input_ids"][0][mask]]
        tokens = self.adapter.tokenizer.convert_ids_to_tokens(ids)
        return RenderedItem(
            prompt=prompts[0], input_ids=ids, tokens=list(tokens), prompt_style=self.config.prompt_style
        )

    def _suffix(self) -> str:
        # The token the pooling reads, appended to every prompt.
        if self.config.pooling == "eos":
            return self.adapter.special_token("eos")
        if self.config.pooling == "embed_token":
            return self.adapter.embed_token
        return ""

    def _prompts_and_images(
        self,
        items: Sequence[Any],
        instructions: str | Sequence[str | None] | None,
        base_dir: str | Path | None,
    ) -> tuple[list[str], list[list[Any]], int, list[list[tuple[int, int, bool]]]]:
        """Prompt strings and decoded images per item, the dummy row count, and per prompt
        the character spans of the item's own content (:meth:`_content_spans`; empty lists
        unless the content mask is on)."""
        if instructions is None or isinstance(instructions, str):
            instructions = [instructions] * len(items)
        if len(instructions) != len(items):
            raise ValueError(f"got {len(instructions)} instructions for {len(items)} items")
        suffix = self._suffix()
        root = base_dir if base_dir is not None else self.base_dir
        prompts: list[str] = []
        images: list[list[Any]] = []
        spans: list[list[tuple[int, int, bool]]] = []
        want_spans = self.config.multivector_dim is not None and self.config.multivector_tokens == "content"
        for raw, instruction in zip(items, instructions):
            item = Item.parse(raw)
            imgs = decode_media(item, root)
            prompt = self.render_prompt(item.text, len(imgs), instruction)
            spans.append(self._content_spans(prompt, item.text, len(imgs), instruction) if want_spans else [])
            prompts.append(prompt + suffix)
            images.append(imgs)
        dummy = 0
        if self.always_run_vision and not any(images):
            # A batch without images gets one blank-image row: it runs the family's own image
            # path and its embedding is dropped in forward(); the other rows do not depend on it.
            from PIL import Image

            try:
                prompt = self.render_prompt(None, 1, None)
                spans.append(self._content_spans(prompt, None, 1, None) if want_spans else [])
                prompts.append(prompt + suffix)
                images.append([Image.new("RGB", (32, 32), (255, 255, 255))])
                dummy = 1
            except ValueError:  # a text-only backbone has no image path to keep in step
                pass
        return prompts, images, dummy, spans

    def _content_spans(
        self, prompt: str, text: str | None, num_images: int, instruction: str | None
    ) -> list[tuple[int, int, bool]]:
        """Character spans ``(start, end, is_image)`` of ``prompt`` that are the item's own
        content: its text and its image placeholders (the rest is instruction and template).

        The text's place is found by rendering the prompt again with a sentinel for the
        text, so a family's template (however it wraps the text) needs no special case.

        Raises:
            ValueError: The family's prompt does not hold the text verbatim.
        """
        spans: list[tuple[int, int, bool]] = []
        start = end = len(prompt)
        if text:
            probe = self.render_prompt(_TEXT_SENTINEL, num_images, instruction)
            head, sep, tail = probe.partition(_TEXT_SENTINEL)
            if (
                not sep
                or _TEXT_SENTINEL in tail
                or not (
                    prompt.startswith(head) and prompt.endswith(tail) and len(prompt) >= len(head) + len(tail)
                )
            ):
                raise ValueError(
                    f"multivector_tokens='content': backbone {self.adapter.family!r} does not keep the "
                    "item text verbatim in its prompt, so its content tokens cannot be found"
                )
            start, end = len(head), len(prompt) - len(tail)
            spans.append((start, end, False))
        placeholder = self.adapter.image_placeholder
        if placeholder and num_images:
            at = prompt.find(placeholder)
            while at != -1:
                if at + len(placeholder) <= start or at >= end:  # not inside the item's text
                    spans.append((at, at + len(placeholder), True))
                at = prompt.find(placeholder, at + len(placeholder))
        return spans

    def _content_mask(
        self, prompts: Sequence[str], spans: Sequence[Sequence[tuple[int, int, bool]]], batch: dict[str, Any]
    ) -> Any:
        """[B, L] bool: True for the batch's tokens that belong to an item's content.

        The prompt is tokenised again with character offsets (without the processor's image
        expansion). Walking the batch's real tokens in order, a token equal to the next
        unexpanded token takes that token's offsets: content if they overlap the text's
        span. A token with no counterpart was inserted by the processor's image expansion
        and counts as content (it is image). Inside an image placeholder only the tokens
        that the expansion repeats are content: the frame around them (Qwen2-VL's
        ``<|vision_start|>`` and ``<|vision_end|>``) is the same in every document, and
        under causal attention the start token's vector is too, so it would match every
        query token equally well in every document.

        Raises:
            ValueError: The tokenizer gives no offsets, or the two tokenisations disagree.
        """
        import torch

        ids, attention = batch["input_ids"], batch["attention_mask"].bool()  # [B, L], [B, L]
        keep = torch.zeros_like(attention)  # [B, L]
        family = self.adapter.family
        for row, (prompt, row_spans) in enumerate(zip(prompts, spans)):
            try:
                enc = self.tokenizer(prompt, return_offsets_mapping=True)
            except NotImplementedError as exc:  # slow tokenizers have no offsets
                raise ValueError(
                    f"multivector_tokens='content' needs a fast tokenizer (backbone {family!r})"
                ) from exc
            plain_ids, offsets = enc["input_ids"], enc["offset_mapping"]
            positions = attention[row].nonzero().flatten().tolist()
            j = 0
            in_image: list[int] = []  # positions matched inside an image placeholder
            inserted: set[int] = set()  # ids the image expansion repeated
            for pos in positions:
                token = int(ids[row, pos])
                if j < len(plain_ids) and token == plain_ids[j]:
                    a, b = offsets[j]
                    hit = [image for s, e, image in row_spans if a < e and b > s]
                    if hit and all(hit):
                        in_image.append(pos)
                    keep[row, pos] = bool(hit) and not all(hit)  # overlaps the text
                    j += 1
                else:
                    keep[row, pos] = True
                    inserted.add(token)
            for pos in in_image:
                # Without any expansion (one token per image), keep the placeholder whole.
                keep[row, pos] = not inserted or int(ids[row, pos]) in inserted
            if j != len(plain_ids):
                raise ValueError(
                    f"multivector_tokens='content': the tokens of backbone {family!r} do not follow its "
                    "prompt's own tokenisation, so its content tokens cannot be found"
                )
        return keep

    def length_keys(self, items: Sequence[Any]) -> list[tuple[int, int]]:
        """:func:`length_keys` with this builder's tokenizer."""
        return length_keys(items, self.adapter.tokenizer)


def decode_media(item: Item, root: str | Path | None) -> list[Any]:
    """An item's media decoded into RGB images, in order (a video gives its frames).

    Args:
        item: The parsed item.
        root: Folder that relative paths resolve against (None: the working directory).
    """
    from vlm2emb.data.media import load_image, load_video_frames

    images: list[Any] = []
    for ref in item.media:
        if isinstance(ref, VideoRef):  # several frames, given as several images
            path = Path(ref.path)
            images.extend(
                load_video_frames(path if path.is_absolute() or root is None else Path(root) / path)
            )
        else:
            images.append(load_image(ref, base_dir=root))
    return images


def length_sorted_batches(items: Sequence[Any], tokenizer: Any, batch_size: int) -> list[list[int]]:
    """encode()'s batches: item indices sorted by :func:`length_keys`, longest first, in
    groups of ``batch_size`` (similar lengths share a batch, so less padding is computed,
    and an out-of-memory batch shows up first)."""
    keys = length_keys(items, tokenizer)
    order = sorted(range(len(items)), key=keys.__getitem__, reverse=True)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def length_keys(items: Sequence[Any], tokenizer: Any) -> list[tuple[int, int]]:
    """Sort keys that follow items' token counts: (media count, text tokens).

    One tokenizer call for all texts (a fast tokenizer takes about 50 ms for a thousand
    passages); the instruction adds the same tokens to every item and is left out. Sorting
    by these keys gives batches of near-equal lengths, so little padding is computed.

    Args:
        items: Anything :meth:`vlm2emb.items.Item.parse` accepts.
        tokenizer: The backbone's tokenizer.
    """
    parsed = [Item.parse(x) for x in items]
    counts = token_counts([item.text or "" for item in parsed], tokenizer)
    return [(len(item.media), n) for item, n in zip(parsed, counts)]


def token_counts(texts: Sequence[str], tokenizer: Any) -> list[int]:
    """Each text's token count without special tokens, for sorting by length.

    A fast tokenizer's Rust backend is asked directly, without character offsets:
    transformers' call converts every encoding into Python lists and offsets, which took
    about as long as the tokenisation itself (tested equal to the tokenizer's own call).
    The backend keeps the padding and truncation of the tokenizer's last call; both are
    switched off first (transformers sets its own again on every call).
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    encode = getattr(backend, "encode_batch_fast", None) or getattr(backend, "encode_batch", None)
    if encode is not None:
        if backend.padding is not None:
            backend.no_padding()
        if backend.truncation is not None:
            backend.no_truncation()
    out: list[int] = []
    for start in range(0, len(texts), 4096):
        part = list(texts[start : start + 4096])
        if encode is not None:
            out.extend(len(e) for e in encode(part, add_special_tokens=False))
        else:
            out.extend(len(ids) for ids in tokenizer(part, add_special_tokens=False)["input_ids"])
    return out
