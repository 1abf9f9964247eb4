"""The bundled demo data: scikit-learn's handwritten digits (1,797 real 8x8 scans).

scikit-learn ships the images inside its package, so the demo needs no network. Each scan
is rendered as a 32x32 RGB PNG (dark ink on white) and split, per class, into training and
held-out evaluation images. Files are written in the canonical schema (docs/data.md):

- ``train.jsonl``: image -> caption rows (``digits-i2t``) and caption -> image rows
  (``digits-t2i``), each with its instruction.
- ``eval.jsonl``: held-out images; ``digits-i2t`` ranks all ten captions for each image,
  ``digits-t2i`` ranks ten held-out images (one per digit) for each caption.

:func:`write_study` adds the two meta-tasks the seed study needs besides classification and
retrieval, built from the same scans and the same train/held-out split: visual question
answering (``digits-vqa``: an image and a question about its digit, answered by a number
word) and grounding (``digits-grounding``: a 2x2 mosaic of four digits and a description;
the target is the mosaic's tile that shows the digit, as MMEB's grounding tasks rank crops).
"""

from __future__ import annotations

import gzip
import importlib.util
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
VQA_INSTRUCTION = "Answer the question about the image."
GROUNDING_INSTRUCTION = "Select the part of the image that shows the described digit."
# The study's eval tasks and their MMEB meta-tasks, in the order the figures list them.
STUDY_TASKS = {
    "digits-cls": "classification",
    "digits-vqa": "vqa",
    "digits-t2i": "retrieval",
    "digits-grounding": "grounding",
}
# Held-out rows per study task: small, so a tiny-model study evaluates in seconds.
STUDY_EVAL_ROWS = 50
STUDY_GROUNDING_TRAIN_ROWS = 500
# Questions whose answer is a number word derived from the digit: the answer is not the
# digit's own caption, so VQA is not classification under another name.
_QUESTIONS = (
    ("What number comes after the digit in the image?", 1),
    ("What number comes before the digit in the image?", -1),
)


def caption(label: int) -> str:
    """The caption of a digit class, e.g. ``"a handwritten digit seven"``."""
    return f"a handwritten digit {WORDS[label]}"


def load_digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digit scans and their labels, as scikit-learn's ``load_digits`` returns them.

    The scans are read from the CSV file scikit-learn ships (``datasets/data/digits.csv.gz``)
    without importing scikit-learn: the import takes about 3 s on 2 cores, longer than
    everything else the demo data costs, and every training process on ``demo:`` data paid
    it. Falls back to ``load_digits`` where the file is not found (another layout).

    Returns:
        ``images`` [1797, 8, 8] float64 (values 0..16) and ``labels`` [1797] int64.
    """
    spec = importlib.util.find_spec("sklearn")  # locates the package without running it
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    csv = next((p for r in roots if (p := Path(r) / "datasets" / "data" / "digits.csv.gz").is_file()), None)
    if csv is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target.astype(np.int64)
    with gzip.open(csv, "rt") as f:
        table = np.loadtxt(f, delimiter=",")  # [1797, 65]: 64 pixels, then the label
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def write_digits(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Writes the digits demo (images, train.jsonl, eval.jsonl) into ``out_dir``.

    The split and the evaluation candidates depend on ``seed`` alone.

    Returns:
        ``out_dir`` as a Path.
    """
    from PIL import Image

    out = Path(out_dir)
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    scans, labels = load_digit_scans()
    rng = np.random.default_rng(seed)
    paths: list[str] = []
    for i, pixels in enumerate(scans):  # [8, 8] values 0..16
        gray = (255 - pixels * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(gray, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
        rel = f"images/{i:04d}.png"
        img.convert("RGB").save(out / rel)
        paths.append(rel)
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


def _labelled_images(path: Path, task: str) -> list[tuple[str, int]]:
    # (image path, digit) of every image -> caption row of ``task`` in a digits file.
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("dataset", row.get("task")) != task:
            continue
        label = (
            row["positive"] if "candidates" in row else WORDS.index(row["positive"]["text"].rsplit(" ", 1)[1])
        )
        out.append((row["query"]["image"], int(label)))
    return out


def _vqa_row(path: str, label: int, rng: np.random.Generator, *, eval_row: bool) -> dict:
    question, step = _QUESTIONS[int(rng.integers(len(_QUESTIONS)))]
    answer = (label + step) % 10
    row: dict = {"query": {"image": path, "text": question}, "instruction": VQA_INSTRUCTION}
    if eval_row:
        return {**row, "candidates": [{"text": w} for w in WORDS], "positive": answer, "task": "digits-vqa"}
    return {**row, "positive": {"text": WORDS[answer]}, "dataset": "digits-vqa"}


def _grounding_row(
    out: Path, name: str, pool: list[tuple[str, int]], rng: np.random.Generator, *, eval_row: bool
) -> dict:
    from PIL import Image

    by_label: dict[int, list[str]] = {}
    for path, label in pool:
        by_label.setdefault(label, []).append(path)
    labels = [int(x) for x in rng.choice(10, size=4, replace=False)]
    tiles = [by_label[lab][int(rng.integers(len(by_label[lab])))] for lab in labels]
    mosaic = Image.new("RGB", (2 * IMAGE_SIZE, 2 * IMAGE_SIZE), "white")
    for k, tile in enumerate(tiles):  # row-major 2x2 grid
        with Image.open(out / tile) as im:
            mosaic.paste(im.convert("RGB"), ((k % 2) * IMAGE_SIZE, (k // 2) * IMAGE_SIZE))
    rel = f"grounding/{name}.png"
    mosaic.save(out / rel)
    target = int(rng.integers(4))
    query = {"image": rel, "text": f"the handwritten digit {WORDS[labels[target]]}"}
    row: dict = {"query": query, "instruction": GROUNDING_INSTRUCTION}
    if eval_row:  # the tiles are the mosaic's crops, exactly
        candidates = [{"image": t} for t in tiles]
        return {**row, "candidates": candidates, "positive": target, "task": "digits-grounding"}
    negatives = [{"image": t} for k, t in enumerate(tiles) if k != target]
    return {
        **row,
        "positive": {"image": tiles[target]},
        "negatives": negatives,
        "dataset": "digits-grounding",
    }


_STUDY_SUITE = """\
# The seed study's demo suite (vlm2emb.data.demo.write_study): one task per MMEB meta-task,
# all from held-out digit scans. Paths are relative to this file.
name: digits-study
metric: hit@1
ks: [1, 5, 10]
tasks:
"""


def write_study(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Writes the seed study's demo data: the digits demo plus VQA and grounding rows.

    Files (besides :func:`write_digits`'s): ``study_train.jsonl`` (the digits training rows
    plus ``digits-vqa`` and ``digits-grounding`` rows from training images, grounding rows
    with the mosaic's other three tiles as hard negatives), ``study_eval.jsonl`` (held-out
    rows of the four :data:`STUDY_TASKS`), one ``task-TASK.jsonl`` per task and
    ``study_suite.yaml`` listing them with their meta-tasks. Written last, the suite file
    marks the folder complete.

    Returns:
        ``out_dir`` as a Path.
    """
    out = write_digits(out_dir, seed=seed)
    rng = np.random.default_rng(seed + 1)
    (out / "grounding").mkdir(exist_ok=True)
    train_images = _labelled_images(out / "train.jsonl", "digits-i2t")
    eval_images = _labelled_images(out / "eval.jsonl", "digits-i2t")
    # Ten held-out images per digit in turn, so every task's rows are class-balanced.
    per_label = {lab: [p for p, q in eval_images if q == lab] for lab in range(10)}
    balanced = [(per_label[r % 10][r // 10], r % 10) for r in range(10 * EVAL_PER_CLASS)]

    train_rows = [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]
    train_rows += [_vqa_row(p, lab, rng, eval_row=False) for p, lab in train_images]
    train_rows += [
        _grounding_row(out, f"train-{k:04d}", train_images, rng, eval_row=False)
        for k in range(STUDY_GROUNDING_TRAIN_ROWS)
    ]
    digits_eval = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    i2t_by_path = {r["query"]["image"]: r for r in digits_eval if r["task"] == "digits-i2t"}
    tasks = {
        "digits-cls": [{**i2t_by_path[p], "task": "digits-cls"} for p, _ in balanced[:STUDY_EVAL_ROWS]],
        "digits-vqa": [_vqa_row(p, lab, rng, eval_row=True) for p, lab in balanced[:STUDY_EVAL_ROWS]],
        "digits-t2i": [r for r in digits_eval if r["task"] == "digits-t2i"][:STUDY_EVAL_ROWS],
        "digits-grounding": [
            _grounding_row(out, f"eval-{k:04d}", eval_images, rng, eval_row=True)
            for k in range(STUDY_EVAL_ROWS)
        ],
    }
    suite = _STUDY_SUITE
    for name, rows in tasks.items():
        _write_jsonl(out / f"task-{name}.jsonl", rows)
        suite += f"  - name: {name}\n    meta_task: {STUDY_TASKS[name]}\n    data: task-{name}.jsonl\n"
    _write_jsonl(out / "study_train.jsonl", train_rows)
    _write_jsonl(out / "study_eval.jsonl", [r for rows in tasks.values() for r in rows])
    (out / "study_suite.yaml").write_text(suite, encoding="utf-8")
    return out


# demo:NAME -> (folder under demo-data/, writer, file); the writer runs once per folder.
_DEMO_FILES = {
    "digits/train": ("digits", write_digits, "train.jsonl"),
    "digits/eval": ("digits", write_digits, "eval.jsonl"),
    "study/train": ("study", write_study, "study_train.jsonl"),
    "study/eval": ("study", write_study, "study_eval.jsonl"),
    "study/suite": ("study", write_study, "study_suite.yaml"),
}
# The file each writer writes last: its presence means the folder is complete.
_LAST_WRITTEN = {write_digits: "eval.jsonl", write_study: "study_suite.yaml"}


def resolve_demo(spec: str, work_dir: str | Path | None = None) -> Path:
    """Maps a ``demo:`` name to its file, writing the demo data once.

    Args:
        spec: ``demo:digits/train``, ``demo:digits/eval``, or the seed study's
            ``demo:study/train``, ``demo:study/eval``, ``demo:study/suite`` (a suite file).
        work_dir: Parent folder for the files (default: a vlm2emb cache folder).
    """
    name = spec.removeprefix("demo:")
    if name not in _DEMO_FILES:
        known = ", ".join(f"demo:{n}" for n in _DEMO_FILES)
        raise DataError(f"unknown demo data {spec!r}; use one of {known}")
    folder, writer, file = _DEMO_FILES[name]
    base = Path(work_dir) if work_dir is not None else _cache_dir()
    root = base / "demo-data" / folder
    if not (root / _LAST_WRITTEN[writer]).is_file():
        writer(root)
    return root / file


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
