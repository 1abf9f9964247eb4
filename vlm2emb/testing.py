"""Tiny offline backbones for tests, the demo and examples.

Nothing here touches the network: the tokenizer is a byte-level BPE trained in a few
milliseconds on a small built-in corpus, the image processor is the family's real one with
small patch sizes, and the model is the family's real transformers class with a tiny random
config. :func:`tiny_backbone` writes all of it in the same layout as a downloaded
checkpoint, so :meth:`vlm2emb.EmbeddingModel.from_pretrained` loads it through the normal
code path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# A small corpus written for this project: digit vocabulary (the demo), the instruction
# phrasing used by recipes, and everyday English so that BPE merges cover common words.
# Byte-level BPE can still encode any string, merges only make it shorter.
_CORPUS = """
zero one two three four five six seven eight nine
a handwritten digit zero. a handwritten digit one. a handwritten digit two.
a handwritten digit three. a handwritten digit four. a handwritten digit five.
a handwritten digit six. a handwritten digit seven. a handwritten digit eight.
a handwritten digit nine. an image of the number.
Represent the given image for classification.
Represent the given image with the following question.
Represent the given text for retrieving a matching image.
Find the image that matches the caption. Retrieve the caption of the image.
Find a photo of a cat sitting on the red chair next to the window.
The quick brown fox jumps over the lazy dog while the children watch from the garden.
A person is riding a bicycle down a busy street in the city at night.
What color is the car parked in front of the house? The answer is blue.
This document describes the results of the experiment and the table below lists them.
Two people are playing football on a green field under a clear sky.
A plate of food with rice, vegetables and chicken on a wooden table.
query positive negative instruction dataset text image images video
"""


def tiny_tokenizer(
    special_tokens: Sequence[str],
    *,
    vocab_size: int = 640,
    eos_token: str,
    pad_token: str,
    bos_token: str | None = None,
    extra_special_tokens: dict[str, str] | None = None,
) -> Any:
    """Trains a byte-level BPE tokenizer offline and wraps it as a transformers tokenizer.

    Args:
        special_tokens: Family special tokens (they get the lowest ids, in order).
        vocab_size: Target vocabulary size, special tokens included.
        eos_token: The end-of-sequence token (one of ``special_tokens``).
        pad_token: The padding token (one of ``special_tokens``).
        bos_token: The beginning-of-sequence token, if the family has one (it is not added
            to encodings automatically; prompts that need it write it).
        extra_special_tokens: Named family tokens that processors read as tokenizer
            attributes, e.g. ``{"image_token": "<image_soft_token>"}`` gives
            ``tokenizer.image_token`` and ``tokenizer.image_token_id`` (saved with it).

    Returns:
        A ``PreTrainedTokenizerFast`` that round-trips any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer)
    named = {"eos_token": eos_token, "pad_token": pad_token}
    if bos_token is not None:
        named["bos_token"] = bos_token
    if extra_special_tokens:
        named["extra_special_tokens"] = dict(extra_special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        additional_special_tokens=[t for t in special_tokens if t not in (eos_token, pad_token, bos_token)],
        **named,
    )


def save_tiny_checkpoint(model_cls: Any, config: Any, processor: Any, path: Path, *, seed: int = 0) -> Path:
    """Instantiates ``model_cls(config)`` with seeded random weights and saves it with the processor.

    Shared by the families' ``build_tiny``: the model is the family's real
    ``...ForConditionalGeneration`` class (what a hub download holds), so loading the folder
    exercises the same prefix handling as a real checkpoint.

    Args:
        model_cls: The transformers model class to instantiate.
        config: Its (tiny) config.
        processor: The family's processor (tokenizer + image processor).
        path: Output directory.
        seed: Seed for the random weights.

    Returns:
        ``path``.
    """
    import torch

    from vlm2emb._quiet import quiet_third_party

    quiet_third_party()
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


def tiny_backbone(family: str, path: str | Path, *, seed: int = 0) -> Path:
    """Writes a tiny random checkpoint of ``family`` (model + processor) into ``path``.

    Args:
        family: A registered backbone family, e.g. ``"qwen2_vl"``.
        path: Output directory (created if missing).
        seed: Seed for the random weights; the same seed gives the same checkpoint.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> from vlm2emb.testing import tiny_backbone
        >>> d = tiny_backbone("qwen2_vl", "/tmp/tiny-qwen2-vl")  # doctest: +SKIP
    """
    from vlm2emb.backbones.registry import get_adapter_class

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    return get_adapter_class(family).build_tiny(out, seed=seed)


@contextmanager
def registered_backbone(adapter_cls: type) -> Iterator[type]:
    """Registers an adapter class for the length of a ``with`` block (test fixtures).

    Tests that need a family of their own (a derived adapter with a deliberate bug, a fake
    family) register it here instead of at import, so no test leaves the global registry
    changed for the tests after it.

    Example:
        >>> with registered_backbone(MyAdapter):  # doctest: +SKIP
        ...     model = EmbeddingModel.from_pretrained("tiny:my_family")
    """
    from vlm2emb.backbones.registry import register_backbone, unregister_backbone

    register_backbone(adapter_cls)
    try:
        yield adapter_cls
    finally:
        unregister_backbone(adapter_cls.family)


def tiny_text_config(tok: Any, model_type: str | None, bos_token: str, **overrides: Any) -> dict[str, Any]:
    """A 2-layer, 64-wide decoder config for the tiny builders.

    Args:
        tok: The tiny tokenizer (vocabulary size, eos and pad ids).
        model_type: The decoder's transformers ``model_type`` (None: the family's default).
        bos_token: The token whose id is the decoder's ``bos_token_id``.
        **overrides: Keys added or replaced (head sizes, rope, layer types...).
    """
    config = {} if model_type is None else {"model_type": model_type}
    return (
        config
        | {
            "vocab_size": len(tok),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "bos_token_id": tok.convert_tokens_to_ids(bos_token),
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        }
        | overrides
    )
