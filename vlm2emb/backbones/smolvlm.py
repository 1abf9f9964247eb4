"""SmolVLM family (``model_type`` ``smolvlm``), e.g. ``HuggingFaceTB/SmolVLM2-2.2B-Instruct``
and ``HuggingFaceTB/SmolVLM-256M-Instruct``.

SmolVLM is Idefics3's architecture with a smaller encoder and decoder, so prompt format
(``<image>`` per image), decoder location (``model.text_model``) and LoRA targets come from
:class:`~vlm2emb.backbones.idefics3.Idefics3Adapter`. Its processor differs: it groups
images per prompt only when they arrive nested per item (a flat list is read as one item's
images), so :meth:`SmolVLMAdapter.build_inputs` nests them. The processor needs the
``num2words`` package (for video prompts, but it checks at construction).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from vlm2emb.backbones.idefics3 import IDEFICS_SPECIALS, Idefics3Adapter, tiny_idefics_configs

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


class SmolVLMAdapter(Idefics3Adapter):
    """Adapter for SmolVLM and SmolVLM2 checkpoints."""

    family: ClassVar[str] = "smolvlm"
    model_types: ClassVar[tuple[str, ...]] = ("smolvlm",)

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Processor call with the images nested per item (see the module docstring)."""
        if self.tokenize_text_directly and not any(images):
            return self.tokenize_text(prompts)
        self.tokenizer.padding_side = self.padding_side
        nested = [list(per_item) for per_item in images]
        out = self.processor(
            text=list(prompts),
            images=nested if any(nested) else None,
            padding=True,
            return_tensors="pt",
        )
        return dict(out)

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
        from transformers.models.smolvlm.image_processing_smolvlm import SmolVLMImageProcessor
        from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

        from vlm2emb.testing import save_tiny_checkpoint, tiny_tokenizer

        tok = tiny_tokenizer(IDEFICS_SPECIALS, eos_token="<end_of_utterance>", pad_token="<|endoftext|>")
        # Splitting off: each image is resized to 32 px and encoded once -> 16 image tokens.
        sizes = {"size": {"longest_edge": 32}, "max_image_size": {"longest_edge": 32}}
        image_processor = SmolVLMImageProcessor(**sizes, do_image_splitting=False)
        video_processor = SmolVLMVideoProcessor(**sizes)
        processor = SmolVLMProcessor(
            image_processor=image_processor, tokenizer=tok, video_processor=video_processor, image_seq_len=16
        )
        config = SmolVLMConfig(**tiny_idefics_configs(tok))
        return save_tiny_checkpoint(SmolVLMForConditionalGeneration, config, processor, path, seed=seed)
