"""What the training signal buys on confusable data: in-batch vs mined vs teacher batches vs distillation.

    python benchmarks/negatives_study.py --out-dir runs/study --seeds 3

Data (real images, built here): two handwritten digits from scikit-learn side by side,
captioned "a three followed by an eight". The 100 captions are confusable by design: the
swapped pair ("an eight followed by a three") and every caption sharing one digit in place
are near misses that a random batch rarely contains. Each eval row ranks its image's caption
against its 9 nearest confusers (the swapped caption first, then shared-digit ones).

A warm start first: the tiny Qwen2-VL trained ``--warm-steps`` steps with in-batch negatives
(hard negatives are a fine-tuning signal; from a random initialisation they only slow the
first steps down). It is the teacher, and every arm continues from it for ``--steps`` steps
at the same batch size, once per seed (the seed changes the data order):

* ``in-batch``: plain InfoNCE on the rows;
* ``mined``: the teacher mines ``--negatives`` hard negatives per row (``vlm2emb mine``);
* ``teacher-batches``: the mined rows with ``data.batching: teacher`` (B3-style);
* ``distill``: the mined rows, ``train.loss: distill`` on the teacher's scores;
* ``hardness``: in-batch rows, InfoNCE with ``hardness_alpha`` (no teacher);
* ``remine``: in-batch rows, re-mined by the model being trained every ``--remine-steps``
  steps (``train.remine_steps``, ANCE-style; same window and count as ``mined``).

``--arms in-batch,remine`` runs a subset (the teacher still mines when ``mined``-based arms
are asked for).

Reported: eval hit@1 per arm and seed, mean and sample standard deviation over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
INSTRUCTION = "Represent the given image."


def caption(a: int, b: int) -> str:
    def art(word: str) -> str:
        return "an" if word == "eight" else "a"

    return f"{art(WORDS[a])} {WORDS[a]} followed by {art(WORDS[b])} {WORDS[b]}"


def confusers(a: int, b: int, k: int) -> list[tuple[int, int]]:
    """The k captions nearest to (a, b): swapped first, then one digit changed in place."""
    out = [(b, a)] if a != b else []
    for d in range(10):
        out += [(a, d)] if d != b else []
        out += [(d, b)] if d != a else []
    seen: list[tuple[int, int]] = []
    for pair in out:
        if pair not in seen and pair != (a, b):
            seen.append(pair)
    return seen[:k]


def write_data(root: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    from PIL import Image

    from vlm2emb.data.demo import load_digit_scans

    scans, labels = load_digit_scans()
    rng = np.random.default_rng(seed)
    by_label = {d: rng.permutation(np.flatnonzero(labels == d)).tolist() for d in range(10)}
    # Disjoint digit images for train and eval composites: eval images are never seen.
    held = {d: idx[: len(idx) // 5] for d, idx in by_label.items()}
    seen = {d: idx[len(idx) // 5 :] for d, idx in by_label.items()}
    (root / "images").mkdir(parents=True, exist_ok=True)

    def tile(i: int) -> Image.Image:
        gray = (255 - scans[i] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").resize((28, 28), Image.Resampling.BILINEAR)

    def composite(name: str, pool: dict[int, list[int]]) -> tuple[str, int, int]:
        a, b = int(rng.integers(10)), int(rng.integers(10))
        img = Image.new("L", (56, 28), 255)
        img.paste(tile(int(rng.choice(pool[a]))), (0, 0))
        img.paste(tile(int(rng.choice(pool[b]))), (28, 0))
        rel = f"images/{name}.png"
        img.convert("RGB").save(root / rel)
        return rel, a, b

    train_path, eval_path = root / "train.jsonl", root / "eval.jsonl"
    with train_path.open("w") as fh:
        for i in range(n_train):
            rel, a, b = composite(f"t{i:05d}", seen)
            row = {"query": {"image": rel}, "positive": {"text": caption(a, b)}, "instruction": INSTRUCTION}
            fh.write(json.dumps(row) + "\n")
    with eval_path.open("w") as fh:
        for i in range(n_eval):
            rel, a, b = composite(f"e{i:05d}", held)
            cands = [caption(a, b)] + [caption(*p) for p in confusers(a, b, 9)]
            order = rng.permutation(len(cands)).tolist()
            row = {
                "query": {"image": rel},
                "candidates": [{"text": cands[j]} for j in order],
                "positive": order.index(0),
                "instruction": INSTRUCTION,
                "task": "pairs-i2t",
            }
            fh.write(json.dumps(row) + "\n")
    return train_path, eval_path


def train_arm(
    out: Path, train: Path, evals: Path, seed: int, steps: int, batch: int, extra: list[str]
) -> float:
    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.loop import train as run

    cfg = load_recipe(
        Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml",
        [
            f"output_dir={out}",
            f"seed={seed}",
            f"data.train={train}",
            f"data.eval={evals}",
            f"train.max_steps={steps}",
            f"train.batch_size={batch}",
            "train.eval_before=false",
            "train.overwrite_output_dir=true",
            *extra,
        ],
    )
    run(cfg, progress=False)
    report = json.loads((out / "eval.json").read_text())
    return float(report["average"]["hit@1"]) if "average" in report else float(report["hit@1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out-dir", default="runs/negatives-study")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--warm-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--train-rows", type=int, default=2000)
    ap.add_argument("--eval-rows", type=int, default=300)
    ap.add_argument("--negatives", type=int, default=3)
    ap.add_argument("--remine-steps", type=int, default=50)
    ap.add_argument("--arms", default="all", help="comma-separated arm names, or all")
    args = ap.parse_args()
    root = Path(args.out_dir)
    started = time.perf_counter()
    train, evals = write_data(root / "data", args.train_rows, args.eval_rows)
    common = (args.steps, args.batch_size)
    warm = root / "warm"
    warm_hit = train_arm(warm, train, evals, 0, args.warm_steps, args.batch_size, [])
    start = [f"model.name_or_path={warm / 'final'}", f"train.learning_rate={args.learning_rate}"]

    # The warm model is the teacher: it mines negatives with its scores.
    from vlm2emb import EmbeddingModel
    from vlm2emb.mine import MineConfig, mine_negatives

    mined = root / "data" / "mined.jsonl"
    arms = {
        "in-batch": (train, []),
        "mined": (mined, []),
        "teacher-batches": (mined, ["data.batching=teacher"]),
        "distill": (mined, ["train.loss=distill", "train.loss_args.teacher_temperature=0.05"]),
        "hardness": (train, ["train.loss_args.hardness_alpha=5"]),
        "remine": (
            train,
            [
                f"train.remine_steps={args.remine_steps}",
                f"train.remine.num_negatives={args.negatives}",
                "train.remine.top_k=10",
                "train.remine.batch_size=64",
            ],
        ),
    }
    if args.arms != "all":
        wanted = args.arms.split(",")
        unknown = sorted(set(wanted) - set(arms))
        if unknown:
            ap.error(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(arms)}")
        arms = {name: arms[name] for name in wanted}
    report = None
    if any(data == mined for data, _ in arms.values()):
        teacher = EmbeddingModel.from_pretrained(warm / "final").eval()
        report = mine_negatives(
            teacher,
            str(train),
            mined,
            MineConfig(num_negatives=args.negatives, top_k=10, teacher_scores=True, batch_size=64),
        )
    results: dict[str, list[float]] = {}
    refresh_seconds: list[float] = []
    for name, (data, extra) in arms.items():
        results[name] = [
            train_arm(root / f"{name}-{seed}", data, evals, seed, *common, [*start, *extra])
            for seed in range(args.seeds)
        ]
        if name == "remine":
            for seed in range(args.seeds):
                lines = (root / f"remine-{seed}" / "metrics.jsonl").read_text().splitlines()
                refresh_seconds += [r["remine"]["seconds"] for r in map(json.loads, lines) if "remine" in r]
    summary = {
        name: {
            "hit@1": values,
            "mean": statistics.mean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
        for name, values in results.items()
    }
    out = {
        "settings": vars(args),
        "warm_start_hit@1": warm_hit,
        "mining": None
        if report is None
        else {"negatives": report.negatives, "short_rows": report.short_rows, "filtered": report.filtered},
        "remine_refresh_seconds": refresh_seconds,
        "arms": summary,
        "seconds": time.perf_counter() - started,
    }
    (root / "study.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"warm start (the teacher): hit@1 {warm_hit:.3f}")
    print("| arm | hit@1 mean | std | per seed |\n|---|---|---|---|")
    for name, s in summary.items():
        per = ", ".join(f"{v:.3f}" for v in s["hit@1"])
        print(f"| {name} | {s['mean']:.3f} | {s['std']:.3f} | {per} |")


if __name__ == "__main__":
    main()
