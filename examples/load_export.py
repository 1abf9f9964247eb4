"""Load a merged vlm2emb export with transformers and torch only, pooling by hand.

This is what research code without vlm2emb needs to reproduce the embeddings of an export
made by ``vlm2emb export RUN/final OUT_DIR``:

    python examples/load_export.py OUT_DIR [--task NAME] [IMAGE ...]

It reads ``vlm2emb_config.json`` for the pooling, normalisation and instructions (those of
the training task ``--task``, recorded under ``instructions``; default: the first task, or
the model's default instructions when none is recorded), renders
prompts the way vlm2emb does for the Qwen2-VL family (no chat template: one
``<|vision_start|><|image_pad|><|vision_end|>`` per image, then ``instruction + "\\n"``,
then the text), runs the bare backbone (``AutoModel``) and pools the last hidden state.
Other families use their own image placeholder (see vlm2emb/backbones/).
"""

from __future__ import annotations

import argparse
import json
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


def instructions_for(config: dict, task: str | None) -> tuple[str | None, str | None]:
    """(query, target) instructions of a training task, as the export recorded them.

    ``task`` None takes the first recorded task. Without a record (a model not trained by
    vlm2emb) the defaults ``query_instruction`` / ``target_instruction`` apply.
    """
    record = config.get("instructions") or {}
    if not record:
        return config.get("query_instruction"), config.get("target_instruction")
    task = task or next(iter(record))
    if task not in record:
        raise SystemExit(f"unknown task {task!r}; the model was trained on: {', '.join(record)}")
    pair = []
    for side, default in (("query", "query_instruction"), ("target", "target_instruction")):
        entry = record[task]
        if entry[f"{side}_distinct"] != 1:  # per-row instructions: no single one to use
            raise SystemExit(f"task {task!r}: {side} instructions vary per row; pass your own")
        pair.append(entry[side][0] or config.get(default))
    return pair[0], pair[1]


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
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export_dir")
    parser.add_argument("images", nargs="*", help="query images (default: the text query 'zero')")
    parser.add_argument("--task", default=None, help="training task whose instructions to use")
    args = parser.parse_args()
    model, processor, config = load(args.export_dir)
    query_instruction, target_instruction = instructions_for(config, args.task)
    print(f"instructions: query {query_instruction!r}, target {target_instruction!r}")
    captions = [f"a handwritten digit {w}" for w in ("zero", "one", "two", "three")]
    targets = embed(model, processor, config, captions, [None] * len(captions), target_instruction)
    if args.images:
        images = [Image.open(p) for p in args.images]
        queries = embed(model, processor, config, [None] * len(images), images, query_instruction)
    else:
        queries = embed(model, processor, config, ["zero"], [None], query_instruction)
    print("embeddings:", tuple(queries.shape), tuple(targets.shape))
    print("cosine similarity (queries x captions):")
    print((queries @ targets.T).numpy().round(3))


if __name__ == "__main__":
    main()
