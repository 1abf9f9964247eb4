"""Embedding-space analysis: modality gap, alignment, uniformity, similarity margins, plots.

Definitions (all on L2-normalised embeddings):

* modality gap (Liang et al. 2022): ``|| mean(image embeddings) - mean(text embeddings) ||``,
  where image items hold images and no text, and text items text and no image;
* alignment (Wang and Isola 2020): ``E ||f(x) - f(y)||^2`` over positive pairs (query and
  its first positive candidate);
* uniformity (Wang and Isola 2020): ``log E exp(-2 ||f(x) - f(y)||^2)`` over all pairs of
  distinct items (lower is more uniform);
* per row: the cosine similarity of the positive and of the hardest (most similar) negative
  among the row's own candidates, and their difference, the margin.

:func:`analyze` returns the numbers (``analysis.json``) plus the arrays the plots need;
:func:`write_plots` draws ``projection.png`` (PCA and t-SNE of queries and positives with a
line joining each pair) and ``similarities.png`` (histograms). matplotlib and scikit-learn
are imported inside the plotting functions only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vlm2emb.eval.runner import _item_key

__all__ = [
    "Analysis",
    "alignment",
    "analyze",
    "compare_table",
    "modality_gap",
    "save_numbers",
    "uniformity",
    "write_compare_plots",
    "write_plots",
]

# Uniformity is O(n^2) in memory and time; a random sample this large estimates it well.
_UNIFORMITY_SAMPLE = 2000


def _unit(x: Any) -> torch.Tensor:
    return F.normalize(torch.as_tensor(x).double(), dim=-1)


def modality_gap(image_emb: Any, text_emb: Any) -> float:
    """Distance between the centroids of L2-normalised image and text embeddings.

    Args:
        image_emb: ``[n_img, d]`` embeddings of image items.
        text_emb: ``[n_txt, d]`` embeddings of text items.
    """
    return float(torch.linalg.vector_norm(_unit(image_emb).mean(0) - _unit(text_emb).mean(0)))


def alignment(x: Any, y: Any) -> float:
    """``E ||x_i - y_i||^2`` over positive pairs (rows of ``x`` and ``y``, both ``[n, d]``)."""
    return float(((_unit(x) - _unit(y)) ** 2).sum(-1).mean())


def uniformity(x: Any, t: float = 2.0, *, max_items: int = _UNIFORMITY_SAMPLE, seed: int = 0) -> float:
    """``log E exp(-t ||x_i - x_j||^2)`` over pairs ``i < j`` of ``x`` ``[n, d]`` (n >= 2).

    Above ``max_items`` rows, a seeded random sample of that many rows is used.
    """
    u = _unit(x)
    if u.shape[0] < 2:
        raise ValueError("uniformity needs at least two embeddings")
    if u.shape[0] > max_items:
        gen = torch.Generator().manual_seed(seed)
        u = u[torch.randperm(u.shape[0], generator=gen)[:max_items]]
    sq = torch.pdist(u, p=2) ** 2  # [n(n-1)/2]
    # log-mean-exp, computed stably.
    return float(torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel()))


@dataclass
class Analysis:
    """Numbers and arrays from :func:`analyze` for one model."""

    numbers: dict[str, Any]
    query_emb: np.ndarray  # [rows, d] each row's query
    positive_emb: np.ndarray  # [rows, d] each row's first positive
    query_modality: list[str]  # per row: image | text | mixed
    positive_modality: list[str]
    positive_sim: np.ndarray  # [rows]
    hardest_negative_sim: np.ndarray  # [rows with negatives]
    name: str = "model"
    extra: dict[str, Any] = field(default_factory=dict)


def _modality(item: Any) -> str:
    if isinstance(item, Mapping):
        has_img = bool(item.get("images")) or item.get("image") is not None
        has_txt = bool(item.get("text"))
    else:
        has_img, has_txt = not isinstance(item, str), isinstance(item, str)
    return "mixed" if has_img and has_txt else "image" if has_img else "text"


def analyze(
    model: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    batch_size: int = 32,
    target_instruction: str | None = None,
    name: str = "model",
    seed: int = 0,
) -> Analysis:
    """Embeds eval rows (each distinct item once) and computes the analysis numbers.

    Args:
        model: Anything with ``encode`` (an EmbeddingModel or a CachedEncoder).
        rows: Local-candidate rows (``query``, ``candidates``, ``positive``, ``instruction``).
        batch_size: Encoding batch size.
        target_instruction: Instruction for candidates.
        name: Label used in tables and plots.
        seed: Seed of the uniformity sample.

    Returns:
        An :class:`Analysis`; ``numbers`` is what ``analysis.json`` holds.
    """
    if not rows:
        raise ValueError("analyze() needs at least one row")
    # Distinct items per side, as in evaluate(): a shared candidate pool is embedded once.
    q_groups: dict[str | None, dict[Hashable, int]] = {}
    q_items: dict[str | None, list[Any]] = {}
    c_index: dict[Hashable, int] = {}
    c_items: list[Any] = []
    q_ref: list[tuple[str | None, int]] = []
    c_ref: list[list[int]] = []
    for row in rows:
        instr = row.get("instruction")
        pos = q_groups.setdefault(instr, {})
        key = _item_key(row["query"])
        if key not in pos:
            pos[key] = len(q_items.setdefault(instr, []))
            q_items[instr].append(row["query"])
        q_ref.append((instr, pos[key]))
        refs = []
        for cand in row["candidates"]:
            ck = _item_key(cand)
            if ck not in c_index:
                c_index[ck] = len(c_items)
                c_items.append(cand)
            refs.append(c_index[ck])
        c_ref.append(refs)
    q_emb = {
        instr: F.normalize(
            torch.as_tensor(model.encode(items, instruction=instr, batch_size=batch_size)).float(), dim=-1
        )
        for instr, items in q_items.items()
    }
    c_emb = F.normalize(
        torch.as_tensor(model.encode(c_items, instruction=target_instruction, batch_size=batch_size)).float(),
        dim=-1,
    )  # [n_c, d]

    query = torch.stack([q_emb[instr][i] for instr, i in q_ref])  # [rows, d]
    positives = [_first_positive(row) for row in rows]
    positive = torch.stack([c_emb[c_ref[r][p]] for r, p in enumerate(positives)])  # [rows, d]
    pos_sim = (query * positive).sum(-1)  # [rows]
    hardest: list[float] = []
    for r, row in enumerate(rows):
        pos_set = set(_positive_list(row))
        neg = [c for j, c in enumerate(c_ref[r]) if j not in pos_set]
        if neg:
            hardest.append(float((c_emb[torch.tensor(neg)] @ query[r]).max()))
    hard = np.asarray(hardest)
    with_neg = [r for r, row in enumerate(rows) if len(row["candidates"]) > len(set(_positive_list(row)))]
    margins = pos_sim.numpy()[with_neg] - hard if len(hard) else np.zeros(0)

    # Distinct items of each modality, from both sides, for the gap and the uniformity.
    all_items = [it for items in q_items.values() for it in items] + c_items
    all_emb = torch.cat([*q_emb.values(), c_emb])  # [n_distinct, d]
    mods = [_modality(it) for it in all_items]
    img = all_emb[torch.tensor([m == "image" for m in mods])]
    txt = all_emb[torch.tensor([m == "text" for m in mods])]
    numbers: dict[str, Any] = {
        "model": name,
        "rows": len(rows),
        "n_items": {"image": int(img.shape[0]), "text": int(txt.shape[0]), "mixed": mods.count("mixed")},
        "modality_gap": modality_gap(img, txt) if len(img) and len(txt) else None,
        "alignment": alignment(query, positive),
        "uniformity": uniformity(all_emb, seed=seed) if len(all_emb) > 1 else None,
        "uniformity_queries": uniformity(torch.cat(list(q_emb.values())), seed=seed)
        if sum(len(v) for v in q_items.values()) > 1
        else None,
        "uniformity_targets": uniformity(c_emb, seed=seed) if len(c_items) > 1 else None,
        "positive_similarity": _summary(pos_sim.numpy()),
        "hardest_negative_similarity": _summary(hard),
        "margin": _summary(margins),
        "fraction_positive_above_hardest_negative": float((margins > 0).mean()) if len(margins) else None,
    }
    return Analysis(
        numbers=numbers,
        query_emb=query.numpy(),
        positive_emb=positive.numpy(),
        query_modality=[_modality(row["query"]) for row in rows],
        positive_modality=[_modality(row["candidates"][p]) for row, p in zip(rows, positives)],
        positive_sim=pos_sim.numpy(),
        hardest_negative_sim=hard,
        name=name,
    )


def _positive_list(row: Mapping[str, Any]) -> list[int]:
    pos = row.get("positive", 0)
    return [int(pos)] if isinstance(pos, int) else [int(p) for p in pos]


def _first_positive(row: Mapping[str, Any]) -> int:
    return _positive_list(row)[0]


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if len(values) == 0:
        return None
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "min": float(np.min(values)),
        "median": float(np.median(values)),
        "max": float(np.max(values)),
    }


# ------------------------------------------------------------------ tables and files

_TABLE_ROWS = (
    ("modality gap", lambda n: n["modality_gap"]),
    ("alignment", lambda n: n["alignment"]),
    ("uniformity", lambda n: n["uniformity"]),
    ("positive sim (mean)", lambda n: (n["positive_similarity"] or {}).get("mean")),
    ("hardest negative sim (mean)", lambda n: (n["hardest_negative_similarity"] or {}).get("mean")),
    ("margin (mean)", lambda n: (n["margin"] or {}).get("mean")),
    ("positive > hardest negative", lambda n: n["fraction_positive_above_hardest_negative"]),
)


def compare_table(numbers: Sequence[Mapping[str, Any]]) -> str:
    """A text table with one column per model (one column for a single analysis)."""
    names = [str(n.get("model", f"model{i}")) for i, n in enumerate(numbers)]
    width = max(len(label) for label, _ in _TABLE_ROWS)
    cols = [max(10, len(name)) for name in names]
    lines = [f"{'':<{width}}  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols))]
    for label, get in _TABLE_ROWS:
        cells = []
        for n, w in zip(numbers, cols):
            value = get(n)
            cells.append(f"{value:>{w}.4f}" if value is not None else f"{'-':>{w}}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    return "\n".join(lines)


def save_numbers(path: str | Path, numbers: Any) -> Path:
    """Writes ``numbers`` as indented JSON (``analysis.json`` / ``compare.json``)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(numbers, indent=2) + "\n")
    return p


# ------------------------------------------------------------------ plots


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _projections(a: Analysis, max_points: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """2-D PCA and t-SNE coordinates of [queries; positives] for a subsample of rows."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    idx = _subsample(len(a.query_emb), max_points, seed)
    points = np.concatenate([a.query_emb[idx], a.positive_emb[idx]])  # [2m, d]
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    return idx, {
        "PCA": PCA(n_components=2, random_state=seed).fit_transform(points),
        "t-SNE": TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
            points
        ),
    }


_COLORS = {"image": "tab:blue", "text": "tab:orange", "mixed": "tab:green"}


def _draw_projection(ax: Any, coords: np.ndarray, a: Analysis, idx: np.ndarray, title: str) -> None:
    m = len(idx)
    q, p = coords[:m], coords[m:]
    # Pair lines first, faint, so the points stay readable.
    for i in range(m):
        ax.plot([q[i, 0], p[i, 0]], [q[i, 1], p[i, 1]], color="0.6", linewidth=0.5, alpha=0.5, zorder=1)
    for side, pts, mods, marker in (
        ("query", q, [a.query_modality[i] for i in idx], "o"),
        ("target", p, [a.positive_modality[i] for i in idx], "^"),
    ):
        for mod in sorted(set(mods)):
            sel = [i for i, m_ in enumerate(mods) if m_ == mod]
            ax.scatter(
                pts[sel, 0],
                pts[sel, 1],
                s=12,
                marker=marker,
                color=_COLORS[mod],
                label=f"{side} ({mod})",
                zorder=2,
            )
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="best")


def _draw_hist(ax: Any, a: Analysis, title: str) -> None:
    values = np.concatenate([a.positive_sim, a.hardest_negative_sim])
    pad = 0.02 + 0.05 * float(np.ptp(values))
    bins = np.linspace(float(values.min()) - pad, float(values.max()) + pad, 41)
    ax.hist(a.positive_sim, bins=bins, alpha=0.6, color="tab:green", label="positive")
    if len(a.hardest_negative_sim):
        ax.hist(a.hardest_negative_sim, bins=bins, alpha=0.6, color="tab:red", label="hardest negative")
    ax.set_xlabel("cosine similarity to the query", fontsize=8)
    ax.set_ylabel("rows", fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def write_plots(a: Analysis, out_dir: str | Path, *, max_points: int = 200, seed: int = 0) -> list[Path]:
    """Writes ``projection.png`` and ``similarities.png`` for one analysis; returns the paths."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    idx, proj = _projections(a, max_points, seed)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2), dpi=80)
    for ax, (method, coords) in zip(axes, proj.items()):
        _draw_projection(ax, coords, a, idx, f"{a.name}: {method} ({len(idx)} pairs)")
    fig.tight_layout()
    fig.savefig(out / "projection.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=80)
    _draw_hist(ax, a, f"{a.name}: positive vs hardest negative")
    fig.tight_layout()
    fig.savefig(out / "similarities.png")
    plt.close(fig)
    return [out / "projection.png", out / "similarities.png"]


def write_compare_plots(
    analyses: Sequence[Analysis], out_dir: str | Path, *, max_points: int = 200, seed: int = 0
) -> list[Path]:
    """Side-by-side plots for several models: ``compare_projection.png``, ``compare_similarities.png``."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = len(analyses)
    fig, axes = plt.subplots(2, n, figsize=(4.5 * n, 8), dpi=80, squeeze=False)
    for col, a in enumerate(analyses):
        idx, proj = _projections(a, max_points, seed)
        for row, (method, coords) in enumerate(proj.items()):
            _draw_projection(axes[row][col], coords, a, idx, f"{a.name}: {method}")
    fig.tight_layout()
    fig.savefig(out / "compare_projection.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), dpi=80, squeeze=False, sharey=True)
    for col, a in enumerate(analyses):
        _draw_hist(axes[0][col], a, a.name)
    fig.tight_layout()
    fig.savefig(out / "compare_similarities.png")
    plt.close(fig)
    return [out / "compare_projection.png", out / "compare_similarities.png"]
