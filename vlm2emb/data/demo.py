"""The bundled demo data: scikit-learn's handwritten digits (1,797 real 8x8 scans).

scikit-learn ships the images inside its package, so the demo needs no network. Each scan
is rendered as a 32x32 RGB PNG (dark ink on white) and split, per class, into training and
held-out evaluation images. Files are written in the canonical schema (docs/data.md):

- ``train.jsonl``: image -> caption rows (``digits-i2t``) and caption -> image rows
  (``digits-t2i``), each with its instruction.
- ``eval.jsonl``: held-out images; ``digits-i2t`` ranks all ten captions for each image,
  ``digits-t2i`` ranks ten held-out images (one per digit) for each caption.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from vlm2emb.data.errors import DataError

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
I2T_INSTRUCTION = "Represent the given image for classification."
T2I_INSTRUCTION = "Find the image that matches the caption."
IMAGE_SIZE = 32
EVAL_PER_CLASS = 30
T2I_EVAL_ROWS = 100


def caption(label: int) -> str:
    """The caption of a digit class, e.g. ``"a handwritten digit seven"``."""
    return f"a handwritten digit {WORDS[label]}"


def write_digits(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Writes the digits demo (images, train.jsonl, eval.jsonl) into ``out_dir``.

    The split and the evaluation candidates depend on ``seed`` alone.

    Returns:
        ``out_dir`` as a Path.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    digits = load_digits()
    rng = np.random.default_rng(seed)
    paths: list[str] = []
    for i, pixels in enumerate(digits.images):  # [8, 8] values 0..16
        gray = (255 - pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(gray, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        rel = f"images/{i:04d}.png"
        img.convert("RGB").save(out / rel)
        paths.append(rel)
    labels = digits.target.astype(int)
    eval_idx: dict[int, list[int]] = {}
    train_idx: list[int] = []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(labels == label)).tolist()
        eval_idx[label] = idx[:EVAL_PER_CLASS]
        train_idx.extend(idx[EVAL_PER_CLASS:])
    train_idx = rng.permutation(train_idx).tolist()

    train_rows = []
    for i in train_idx:
        label = int(labels[i])
        train_rows.append(
            {
                "query": {"image": paths[i]},
                "positive": {"text": caption(label)},
                "instruction": I2T_INSTRUCTION,
                "dataset": "digits-i2t",
            }
        )
        train_rows.append(
            {
                "query": {"text": caption(label)},
                "positive": {"image": paths[i]},
                "instruction": T2I_INSTRUCTION,
                "dataset": "digits-t2i",
            }
        )
    eval_rows = []
    captions = [{"text": caption(label)} for label in range(10)]
    for label in range(10):
        for i in eval_idx[label]:
            eval_rows.append(
                {
                    "query": {"image": paths[i]},
                    "candidates": captions,
                    "positive": label,
                    "task": "digits-i2t",
                    "instruction": I2T_INSTRUCTION,
                }
            )
    for r in range(T2I_EVAL_ROWS):
        label = r % 10
        picks = [int(rng.choice(eval_idx[c])) for c in range(10)]
        eval_rows.append(
            {
                "query": {"text": caption(label)},
                "candidates": [{"image": paths[i]} for i in picks],
                "positive": label,
                "task": "digits-t2i",
                "instruction": T2I_INSTRUCTION,
            }
        )
    _write_jsonl(out / "train.jsonl", train_rows)
    _write_jsonl(out / "eval.jsonl", eval_rows)
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def resolve_demo(spec: str, work_dir: str | Path | None = None) -> Path:
    """Maps ``demo:digits/train`` or ``demo:digits/eval`` to a JSONL file, writing it once.

    Args:
        spec: ``demo:digits/train`` or ``demo:digits/eval``.
        work_dir: Parent folder for the files (default: a vlm2emb cache folder).
    """
    name = spec.removeprefix("demo:")
    if name not in ("digits/train", "digits/eval"):
        raise DataError(f"unknown demo data {spec!r}; use demo:digits/train or demo:digits/eval")
    base = Path(work_dir) if work_dir is not None else _cache_dir()
    root = base / "demo-data" / "digits"
    if not (root / "eval.jsonl").is_file():
        write_digits(root)
    return root / f"{name.split('/')[1]}.jsonl"


def _cache_dir() -> Path:
    env = os.environ.get("VLM2EMB_CACHE")
    if env:
        return Path(env)
    home = Path.home() / ".cache" / "vlm2emb"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / "vlm2emb"
