"""Data-efficiency study: train one recipe on nested subsets of its data, plot metric vs size.

The subsets are prefixes of one seeded permutation of the training rows, so they are nested:
the 1% subset is inside the 5% one, which is inside the 25% one, and the same seed always
gives the same subsets. Each run is an ordinary training run under
``OUTPUT_DIR/frac-F/`` (with its own ``final/``, ``eval.json``, ``metrics.jsonl``); the study
writes ``OUTPUT_DIR/data_efficiency.json`` and ``OUTPUT_DIR/data_efficiency.png``.

A subset smaller than ``train.batch_size`` trains with a batch of the subset's size (rounded
down to an even number), because a contrastive batch cannot hold more rows than there are;
the batch size used is recorded per point.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from vlm2emb.distributed import main_process_first, rank_and_world
from vlm2emb.eval.metrics import metric_names

__all__ = ["nested_subsets", "parse_fractions", "run_data_efficiency"]


def parse_fractions(text: str) -> list[float]:
    """``"0.01,0.05,1"`` -> sorted distinct fractions in (0, 1]; a bad value is a ValueError."""
    out: list[float] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"--fractions: {part!r} is not a number") from None
        if not 0 < value <= 1:
            raise ValueError(f"--fractions: {value} is not in (0, 1]")
        out.append(value)
    if not out:
        raise ValueError("--fractions: give at least one fraction, e.g. 0.1,1.0")
    return sorted(set(out))


def nested_subsets(n_rows: int, fractions: list[float], seed: int) -> dict[float, list[int]]:
    """Row indices per fraction: prefixes of one seeded permutation, hence nested.

    Each subset holds ``ceil(fraction * n_rows)`` rows (at least 2).
    """
    order = np.random.default_rng(seed).permutation(n_rows)
    return {f: sorted(int(i) for i in order[: max(2, math.ceil(f * n_rows))]) for f in fractions}


def _row(ex: Any) -> dict[str, Any]:
    # Canonical training row with absolute media paths (TrainExample holds them resolved).
    row = {"query": ex.query, "positive": ex.positive, "negatives": ex.negatives, "dataset": ex.dataset}
    if ex.instruction is not None:
        row["instruction"] = ex.instruction
    if ex.target_instruction is not None:
        row["target_instruction"] = ex.target_instruction
    return row


def run_data_efficiency(
    cfg: Any, fractions: list[float], *, metric: str = "hit@1", resume: bool = False
) -> dict[str, Any]:
    """Trains ``cfg`` once per fraction and records the eval ``metric`` (task average).

    Args:
        cfg: A validated :class:`~vlm2emb.train.config.RecipeConfig` with ``data.eval`` set.
        fractions: Fractions of the training rows, in (0, 1].
        metric: A key of the eval report's ``average`` (e.g. ``hit@1``, ``ndcg@10``).
        resume: Continue a study that stopped: a fraction whose folder holds a checkpoint
            resumes from it (``train.resume_from=auto``; a finished run is read back, not
            retrained), one whose run stopped before its first checkpoint starts over.
            Without it, a folder holding a run is an error (as for ``vlm2emb train``).

    Returns:
        ``{"metric", "points": [{"fraction", "rows", "batch_size", "value", "output_dir"}],
        "json": path, "png": path}``.
    """
    from vlm2emb.data.demo import resolve_demo
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.train.config import ConfigError
    from vlm2emb.train.loop import RUN_OUTPUTS, checkpoint_dirs, train

    if metric not in metric_names((1, 5, 10)):
        raise ConfigError(f"--metric: {metric!r} is not one of {', '.join(metric_names((1, 5, 10)))}")
    if not cfg.data.eval:
        raise ConfigError("data.eval: a data-efficiency study needs evaluation data")
    out = Path(cfg.output_dir)
    # Under `accelerate launch` the main process writes demo data and the subset files first;
    # the others read them after it (every process then trains each run together).
    with main_process_first() as is_main:
        out.mkdir(parents=True, exist_ok=True)
        examples = load_train_examples(
            cfg.data.train,
            media_root=cfg.data.media_root,
            verify_images=cfg.data.verify_images,
            max_negatives=cfg.data.max_negatives,
            work_dir=out,
            data_format=cfg.data.format,
            mmeb_negatives=cfg.data.mmeb_negatives,
        )
        # demo: eval data is written once here instead of once per run.
        eval_files = [str(resolve_demo(s, out)) if s.startswith("demo:") else s for s in cfg.data.eval]
        subsets = nested_subsets(len(examples), fractions, cfg.seed)
        for fraction, indices in subsets.items():
            if is_main:
                run_dir = out / f"frac-{fraction:g}"
                run_dir.mkdir(parents=True, exist_ok=True)
                text = "".join(json.dumps(_row(examples[i])) + "\n" for i in indices)
                (run_dir / "train_subset.jsonl").write_text(text)
    points: list[dict[str, Any]] = []
    for fraction, indices in subsets.items():
        run_dir = out / f"frac-{fraction:g}"
        train_file = run_dir / "train_subset.jsonl"
        sub = copy.deepcopy(cfg)
        sub.output_dir = str(run_dir)
        sub.data.train = [str(train_file)]
        sub.data.eval = eval_files
        sub.data.media_root = None  # the subset file holds absolute paths
        sub.train.eval_before = False
        sub.train.batch_size = min(cfg.train.batch_size, len(indices) - len(indices) % 2)
        if resume and checkpoint_dirs(run_dir):
            # The recipe check of a resumed run refuses a different recipe or subset.
            sub.train.resume_from = "auto"
        elif resume and any((run_dir / name).exists() for name in RUN_OUTPUTS):
            # Stopped before its first checkpoint: nothing of it can be continued.
            sub.train.overwrite_output_dir = True
        summary = train(sub, progress=False)
        points.append(
            {
                "fraction": fraction,
                "rows": len(indices),
                "batch_size": sub.train.batch_size,
                "value": float(summary["eval"]["average"][metric]),
                "output_dir": str(run_dir),
            }
        )
    result: dict[str, Any] = {
        "metric": metric,
        "total_rows": len(examples),
        "seed": cfg.seed,
        "points": points,
    }
    if rank_and_world()[0] == 0:
        (out / "data_efficiency.json").write_text(json.dumps(result, indent=2) + "\n")
        _plot(points, metric, out / "data_efficiency.png")
    return {**result, "json": str(out / "data_efficiency.json"), "png": str(out / "data_efficiency.png")}


def _plot(points: list[dict[str, Any]], metric: str, path: Path) -> None:
    from vlm2emb.eval.analysis import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    rows = [p["rows"] for p in points]
    values = [p["value"] for p in points]
    ax.plot(rows, values, marker="o")
    for p in points:
        ax.annotate(
            f"{p['fraction']:g}",
            (p["rows"], p["value"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=7,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel(f"eval {metric} (task average)")
    ax.set_title("data efficiency", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
