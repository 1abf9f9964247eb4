"""Prompt styles and the ``<|image_N|>`` image marker shared by every backbone.

Two prompt styles turn an item (text, images, instruction) into the string a backbone
tokenises:

- ``vlm2emb`` (the default, and what vlm2emb trains with): each backbone adapter places
  its own image placeholders (Qwen2-VL: ``<|vision_start|><|image_pad|><|vision_end|>``),
  then the instruction and a newline, then the text. ``<|image_N|>`` markers in the text
  are removed.
- ``vlm2vec``: the token sequence VLM2Vec feeds its backbones, for checkpoints that
  VLM2Vec trained. An ``<|image_N|>`` marker in the text (MMEB writes them) is replaced in
  place by the backbone's bare image token (Qwen2-VL: ``<|image_pad|>``, LLaVA-NeXT:
  ``<image>``), keeping the whitespace around it; an item with images but no marker gets
  ``TOKEN + " "`` per image in front, and instruction and text are joined by one space
  (VLM2Vec-V2's ``process_input_text``). Only families whose adapter declares a
  ``vlm2vec_image_token`` support it.

The marker stays in item text until the prompt is rendered, because the loaders do not
know which style the model will use.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "IMAGE_MARKER",
    "PROMPT_STYLES",
    "check_prompt_style",
    "count_image_markers",
    "render_prompt",
    "strip_image_markers",
]

PROMPT_STYLES = ("vlm2emb", "vlm2vec")

# VLM2Vec's Phi-3-V image marker, which MMEB-train and MMEB-eval write into their texts.
IMAGE_MARKER = re.compile(r"<\|image_\d+\|>")
# The marker with the whitespace around it, which the vlm2emb style removes with it.
_MARKER_AND_SPACE = re.compile(r"\s*<\|image_\d+\|>\s*")


def check_prompt_style(value: object, key: str = "prompt_style") -> str:
    """Returns ``value`` if it names a prompt style.

    Raises:
        ValueError: One line naming ``key`` and the valid styles.
    """
    if value not in PROMPT_STYLES:
        raise ValueError(f"{key}: unknown prompt style {value!r}; choose one of {', '.join(PROMPT_STYLES)}")
    return str(value)


def count_image_markers(text: str | None) -> int:
    """The number of ``<|image_N|>`` markers in ``text``."""
    return len(IMAGE_MARKER.findall(text)) if text else 0


def strip_image_markers(text: str | None) -> str | None:
    """``text`` without ``<|image_N|>`` markers and outer whitespace; empty becomes None.

    A marker and the whitespace around it become one space, so a marker between two words
    does not glue them together.
    """
    if text is None:
        return None
    cleaned = _MARKER_AND_SPACE.sub(" ", text).strip()
    return cleaned or None


def render_prompt(
    adapter: Any, style: str, text: str | None, num_images: int, instruction: str | None
) -> str:
    """The prompt string for one item in ``style`` (the one rule for training, encode and
    ``vlm2emb data check``).

    ``vlm2emb``: ``<|image_N|>`` markers are removed and the adapter places the images
    (``BackboneAdapter.render_prompt``). ``vlm2vec``: VLM2Vec's form
    (``BackboneAdapter.render_vlm2vec_prompt``).
    """
    if style == "vlm2vec":
        return adapter.render_vlm2vec_prompt(text, num_images, instruction)
    if count_image_markers(text):  # other texts keep their exact characters, spaces included
        text = strip_image_markers(text)
    return adapter.render_prompt(text, num_images, instruction)
