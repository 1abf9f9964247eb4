"""Load a merged vlm2emb export with transformers and torch only, pooling by hand.

This is what research code without vlm2emb needs to reproduce the embeddings of an export
made by ``vlm2emb export RUN/final OUT_DIR``:

    python examples/load_export.py OUT_DIR [IMAGE ...]

It reads ``vlm2emb_config.json`` for the pooling, normalisation and instructions, renders
prompts the way vlm2emb does for the Qwen2-VL family (no chat template: one
``<|vision_start|><|image_pad|><|vision_end|>`` per image, then ``instruction + "\\n"``,
then the text), runs the bare backbone (``AutoModel``) and pools the last hidden state.
Other families use their own image placeholder (see vlm2emb/backbones/).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # Qwen2-VL / Qwen2.5-VL


def load(export_dir: str | Path) -> tuple[torch.nn.Module, object, dict]:
    """The backbone, its processor and the embedding config of an export."""
    export_dir = Path(export_dir)
    config = json.loads((export_dir / "vlm2emb_config.json").read_text())
    if config.get("attention") != "causal":
        raise SystemExit("this example covers causal-attention exports only")
    model = AutoModel.from_pretrained(export_dir).eval()
    processor = AutoProcessor.from_pretrained(export_dir)
    return model, processor, config


def embed(
    model: torch.nn.Module,
    processor: object,
    config: dict,
    texts: list[str | None],
    images: list[Image.Image | None],
    instruction: str | None = None,
) -> torch.Tensor:
    """Embeds items (text and/or one image each) as vlm2emb would: [n, d] float32."""
    prompts = []
    for text, image in zip(texts, images):
        prompt = IMAGE_PLACEHOLDER if image is not None else ""
        if instruction:
            prompt += instruction.strip() + "\n"
        prompt += text or ""
        if config["pooling"] == "eos":  # eos pooling appends the end-of-sequence token
            prompt += processor.tokenizer.eos_token
        prompts.append(prompt)
    flat_images = [img.convert("RGB") for img in images if img is not None]
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=prompts, images=flat_images or None, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**inputs, use_cache=False).last_hidden_state  # [B, L, H]
    mask = inputs["attention_mask"]  # [B, L], 1 = real token
    if config["pooling"] in ("last", "eos"):
        last = mask.sum(dim=1) - 1  # right padding: index of the last real token
        emb = hidden[torch.arange(hidden.shape[0]), last]  # [B, H]
    elif config["pooling"] == "mean":
        emb = (hidden * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True)  # [B, H]
    else:
        raise SystemExit(f"pooling {config['pooling']!r} is not covered by this example")
    emb = emb.float()
    if config.get("truncate_dim"):
        emb = emb[:, : config["truncate_dim"]]
    if config.get("normalize", True):
        emb = torch.nn.functional.normalize(emb, dim=-1)
    return emb


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    model, processor, config = load(sys.argv[1])
    captions = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")]
    targets = embed(
        model, processor, config, captions, [None] * len(captions), config.get("target_instruction")
    )
    if len(sys.argv) > 2:
        images = [Image.open(p) for p in sys.argv[2:]]
        queries = embed(
            model, processor, config, [None] * len(images), images, config.get("query_instruction")
        )
    else:
        queries = embed(model, processor, config, ["zero"], [None], config.get("query_instruction"))
    print("embeddings:", tuple(queries.shape), tuple(targets.shape))
    print("cosine similarity (queries x captions):")
    print((queries @ targets.T).numpy().round(3))


if __name__ == "__main__":
    main()
