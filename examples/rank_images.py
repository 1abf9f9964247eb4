"""Rank the ten digit captions for a few held-out handwritten-digit images.

    python examples/rank_images.py                   # tiny random model: about chance level
    python examples/rank_images.py runs/demo/final   # after `vlm2emb train recipes/demo.yaml`

Runs offline on CPU. The images come from the demo data (scikit-learn's digits), written to
a temporary folder with the same split as the demo, so none of them was seen in training.
"""

from __future__ import annotations

import json
import sys
import tempfile

from PIL import Image

from vlm2emb import EmbeddingModel
from vlm2emb.data.demo import I2T_INSTRUCTION, WORDS, caption, write_digits

PER_CLASS = 2  # images per digit to rank


def main(model_name: str = "tiny:qwen2_vl") -> None:
    model = EmbeddingModel.from_pretrained(model_name)
    captions = [caption(label) for label in range(10)]

    with tempfile.TemporaryDirectory() as tmp:
        root = write_digits(tmp)  # images/*.png, train.jsonl, eval.jsonl
        rows = [json.loads(line) for line in (root / "eval.jsonl").open()]
        rows = sorted((row for row in rows if row["task"] == "digits-i2t"), key=lambda row: row["positive"])
        picked = rows[:: len(rows) // (10 * PER_CLASS)]  # 30 images per digit -> PER_CLASS each
        names = [row["query"]["image"] for row in picked]
        labels = [row["positive"] for row in picked]  # the candidates are the captions in digit order
        images = [Image.open(root / name).convert("RGB") for name in names]

        # Queries carry the instruction the demo trained with; captions are encoded without one.
        image_emb = model.encode_queries(images, instruction=I2T_INSTRUCTION)  # [n, d]
        caption_emb = model.encode_targets(captions)  # [10, d]

    scores = model.similarity(image_emb, caption_emb)  # [n, 10] cosine similarities
    top = scores.argmax(dim=1).tolist()
    for name, label, pred, row in zip(names, labels, top, scores):
        mark = "ok" if pred == label else "--"
        print(f"{mark} {name}  digit {WORDS[label]:<5}  top caption: {captions[pred]!r} ({row[pred]:.3f})")
    accuracy = sum(p == y for p, y in zip(top, labels)) / len(labels)
    print(f"accuracy: {accuracy:.2f} on {len(labels)} images (chance 0.10), model {model_name}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
