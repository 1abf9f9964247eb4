"""Score pairs with a saved vlm2emb reranker using plain transformers (no vlm2emb import).

A saved reranker folder is a transformers checkpoint of the family's LM class (head
included) plus ``vlm2emb_reranker.json`` (prompt template, default instruction, answers).
The score is ``logit(yes) - logit(no)`` of the next token after the prompt. This example
writes the prompt for the Qwen2-VL family (its image placeholder is
``<|vision_start|><|image_pad|><|vision_end|>``, placed right before the query's text);
other families place their own image tokens (see their adapter's ``render_segments``).

    python examples/load_reranker_transformers.py RERANKER_DIR IMAGE.png "caption one" "caption two"

Prints one ``score<TAB>caption`` line per caption, in the order given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"  # Qwen2-VL's, one image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reranker", type=Path)
    ap.add_argument("image", type=Path, help="the query image")
    ap.add_argument("captions", nargs="+", help="candidate captions")
    ap.add_argument("--query-text", default="", help="text after the query image")
    args = ap.parse_args()

    cfg = json.loads((args.reranker / "vlm2emb_reranker.json").read_text())
    processor = AutoProcessor.from_pretrained(args.reranker)
    model = AutoModelForImageTextToText.from_pretrained(args.reranker).eval()
    tokenizer = processor.tokenizer
    # Each answer counts by its first token, as in vlm2emb.
    yes = tokenizer.encode(cfg["yes_token"], add_special_tokens=False)[0]
    no = tokenizer.encode(cfg["no_token"], add_special_tokens=False)[0]
    image = Image.open(args.image).convert("RGB")
    # The instruction is plain text (braces in it kept), so it is written in last.
    template = cfg["template"].replace("{instruction}", "\0")
    for caption in args.captions:
        prompt = template.format(query=IMAGE_PLACEHOLDER + args.query_text, candidate=caption)
        prompt = prompt.replace("\0", cfg["instruction"])
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].float()  # [vocab] after the last prompt token
        print(f"{float(logits[yes] - logits[no]):.6f}\t{caption}")


if __name__ == "__main__":
    main()
