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
    "COLOR_BY",
    "Analysis",
    "alignment",
    "analyze",
    "compare_table",
    "modality_gap",
    "projection_figure",
    "resolve_color_by",
    "save_numbers",
    "similarity_figure",
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
    # Per row, the label each --color-by field gives it: task, dataset, class (GROUP_FIELDS).
    groups: dict[str, list[str]] = field(default_factory=dict)


# What a projection can be coloured by: the items' modality, or a per-row label.
COLOR_BY = ("auto", "modality", "task", "dataset", "class")
GROUP_FIELDS = ("task", "dataset", "class")


def _text_of(item: Any) -> str | None:
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping) and item.get("text"):
        return str(item["text"])
    return None


def _class_label(row: Mapping[str, Any]) -> str:
    """The row's class: the text of its first positive (the label of an image -> label
    row), else its query's text (the caption of a caption -> image row)."""
    text = _text_of(row["candidates"][_first_positive(row)]) or _text_of(row["query"])
    return text if text is not None else "(no text)"


def _row_groups(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    return {
        "task": [str(row.get("task", "default")) for row in rows],
        # Eval rows name no dataset; the CLI puts the file each row came from here.
        "dataset": [str(row.get("dataset", row.get("task", "default"))) for row in rows],
        "class": [_class_label(row) for row in rows],
    }


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
        rows: Local-candidate rows (``query``, ``candidates``, ``positive``, ``instruction``;
            ``task`` and ``dataset``, when present, label the rows for the plots).
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
        groups=_row_groups(rows),
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


def _same_threads_as_torch() -> Any:
    """Caps scikit-learn's OpenMP and BLAS pools at torch's thread count for a block.

    They are separate runtimes from torch's, so the thread count the command chose
    (vlm2emb._threads) does not reach them; t-SNE would otherwise start one spinning thread
    per core, which on a busy machine costs what it costs torch (docs/training.md).
    """
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=torch.get_num_threads())


def _projections(
    a: Analysis, max_points: int, seed: int
) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """2-D PCA and t-SNE coordinates of [queries; positives] for a subsample of rows, and
    the axis names (PCA's with the share of variance each component explains)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    idx = _subsample(len(a.query_emb), max_points, seed)
    points = np.concatenate([a.query_emb[idx], a.positive_emb[idx]])  # [2m, d]
    perplexity = float(min(30.0, max(2.0, (len(points) - 1) / 3)))
    pca = PCA(n_components=2, random_state=seed)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with _same_threads_as_torch():
        coords = {"PCA": pca.fit_transform(points), "t-SNE": tsne.fit_transform(points)}
    share = pca.explained_variance_ratio_
    names = [f"PC 1 ({share[0]:.0%} of variance)", f"PC 2 ({share[1]:.0%} of variance)"]
    return idx, coords, names


_MODALITY_COLORS = {"image": "tab:blue", "text": "tab:orange", "mixed": "tab:green"}
_SIDE_MARKERS = {"query": "o", "target": "^"}
# Ten distinct colours; more groups than that are drawn grey as one "other" entry, since a
# legend of hundreds of near-identical colours is unreadable.
_MAX_GROUPS = 10
_OTHER_COLOR = "0.75"


def resolve_color_by(analyses: Sequence[Analysis], color_by: str) -> str:
    """The field ``auto`` stands for: ``task`` when the rows span several tasks, else
    ``class`` when some class holds more than one row, else ``modality``."""
    if color_by not in COLOR_BY:
        raise ValueError(f"--color-by must be one of {', '.join(COLOR_BY)}, got {color_by!r}")
    if color_by != "auto":
        return color_by
    groups = analyses[0].groups
    if len(set(groups.get("task", []))) > 1:
        return "task"
    classes = groups.get("class", [])
    if classes and len(set(classes)) < len(classes):
        return "class"
    return "modality"


@dataclass
class _Palette:
    """One colour per group label (shared by every panel and model of a figure)."""

    colors: dict[str, str]
    others: int  # labels drawn grey

    @classmethod
    def of(cls, labels: Sequence[str]) -> _Palette:
        counts: dict[str, int] = {}
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
        # Most frequent first, then by name, so the colours do not depend on row order.
        ranked = sorted(counts, key=lambda label: (-counts[label], label))
        shown = sorted(ranked[:_MAX_GROUPS])
        return cls({label: f"C{i}" for i, label in enumerate(shown)}, len(ranked) - len(shown))

    def color(self, label: str) -> str:
        return self.colors.get(label, _OTHER_COLOR)


def _legend_handles(color_by: str, palette: _Palette | None, present: set[tuple[str, str]]) -> list[Any]:
    from matplotlib.lines import Line2D

    def marker(label: str, color: str, shape: str) -> Any:
        return Line2D([], [], linestyle="", marker=shape, markersize=7, color=color, label=label)

    if palette is None:  # modality: colour = modality, shape = side
        return [
            marker(f"{side} ({mod})", color, shape)
            for side, shape in _SIDE_MARKERS.items()
            for mod, color in _MODALITY_COLORS.items()
            if (side, mod) in present
        ]
    handles = [marker(side, "0.2", shape) for side, shape in _SIDE_MARKERS.items()]
    handles += [marker(_short(label), color, "s") for label, color in palette.colors.items()]
    if palette.others:
        handles.append(marker(f"other ({palette.others} {color_by} labels)", _OTHER_COLOR, "s"))
    return handles


def _short(label: str, width: int = 40) -> str:
    return label if len(label) <= width else label[: width - 1] + "\u2026"


def _draw_projection(
    ax: Any,
    coords: np.ndarray,
    a: Analysis,
    idx: np.ndarray,
    title: str,
    axis_names: Sequence[str],
    color_by: str,
    palette: _Palette | None,
) -> None:
    m = len(idx)
    q, p = coords[:m], coords[m:]
    # Pair lines first, faint, so the points stay readable.
    for i in range(m):
        ax.plot([q[i, 0], p[i, 0]], [q[i, 1], p[i, 1]], color="0.6", linewidth=0.5, alpha=0.5, zorder=1)
    for side, pts, mods in (
        ("query", q, [a.query_modality[i] for i in idx]),
        ("target", p, [a.positive_modality[i] for i in idx]),
    ):
        if palette is None:
            colors = [_MODALITY_COLORS[mod] for mod in mods]
        else:
            colors = [palette.color(a.groups[color_by][i]) for i in idx]
        ax.scatter(pts[:, 0], pts[:, 1], s=16, marker=_SIDE_MARKERS[side], c=colors, zorder=2, linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(axis_names[0], fontsize=9)
    ax.set_ylabel(axis_names[1], fontsize=9)
    ax.tick_params(labelsize=7)


def _projection_figure(analyses: Sequence[Analysis], max_points: int, seed: int, color_by: str) -> Any:
    """PCA above t-SNE, one column per analysis, one legend for the whole figure."""
    plt = _pyplot()
    field_ = resolve_color_by(analyses, color_by)
    palette = None
    if field_ != "modality":
        missing = [a.name for a in analyses if len(a.groups.get(field_, [])) != len(a.query_emb)]
        if missing:
            raise ValueError(f"--color-by {field_}: analysis {missing[0]!r} has no per-row {field_} labels")
        # Labels of the rows drawn in any panel, so a label has one colour in every panel.
        drawn = [
            a.groups[field_][i] for a in analyses for i in _subsample(len(a.query_emb), max_points, seed)
        ]
        palette = _Palette.of(drawn)
    present = set()  # (side, modality) pairs drawn, for the modality legend
    for a in analyses:
        for i in _subsample(len(a.query_emb), max_points, seed):
            present |= {("query", a.query_modality[i]), ("target", a.positive_modality[i])}
    n = len(analyses)
    single = n == 1
    rows_, cols = (1, 2) if single else (2, n)
    fig, axes = plt.subplots(rows_, cols, figsize=(5.2 * cols, 4.6 * rows_), dpi=100, squeeze=False)
    for col, a in enumerate(analyses):
        idx, proj, pca_names = _projections(a, max_points, seed)
        for k, (method, coords) in enumerate(proj.items()):
            ax = axes[0][k] if single else axes[k][col]
            names = pca_names if method == "PCA" else ["t-SNE 1", "t-SNE 2"]
            _draw_projection(
                ax, coords, a, idx, f"{a.name}: {method} ({len(idx)} pairs)", names, field_, palette
            )
    fig.suptitle(f"queries and their positives, coloured by {field_}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    handles = _legend_handles(field_, palette, present)
    # Outside the axes, right of the panels: the points stay uncovered and the labels legible.
    fig.legend(
        handles=handles,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        fontsize=9,
        frameon=False,
        title=field_ if palette is not None else "side (modality)",
        title_fontsize=9,
    )
    return fig


def _similarity_bins(analyses: Sequence[Analysis]) -> np.ndarray:
    """One set of 40 bins spanning every analysis' values, so histograms compare by eye."""
    values = np.concatenate([np.concatenate([a.positive_sim, a.hardest_negative_sim]) for a in analyses])
    pad = 0.02 + 0.05 * float(np.ptp(values))
    return np.linspace(float(values.min()) - pad, float(values.max()) + pad, 41)


def _draw_hist(ax: Any, a: Analysis, title: str, bins: np.ndarray) -> None:
    ax.hist(a.positive_sim, bins=bins, alpha=0.6, color="tab:green", label="positive")
    if len(a.hardest_negative_sim):
        ax.hist(a.hardest_negative_sim, bins=bins, alpha=0.6, color="tab:red", label="hardest negative")
    ax.set_xlim(bins[0], bins[-1])
    ax.set_xlabel("cosine similarity to the query", fontsize=9)
    ax.set_ylabel("rows", fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8)


def _similarity_figure(analyses: Sequence[Analysis], title: str | None = None) -> Any:
    plt = _pyplot()
    n = len(analyses)
    # sharex + the same bins: a shift of the distributions between models is a shift on the page.
    fig, axes = plt.subplots(1, n, figsize=(5.2 * n, 3.8), dpi=100, squeeze=False, sharex=True, sharey=True)
    bins = _similarity_bins(analyses)
    for col, a in enumerate(analyses):
        _draw_hist(axes[0][col], a, title or a.name, bins)
    fig.tight_layout()
    return fig


def projection_figure(
    analyses: Analysis | Sequence[Analysis], *, max_points: int = 200, seed: int = 0, color_by: str = "auto"
) -> Any:
    """The projection figure (matplotlib ``Figure``) that :func:`write_plots` and
    :func:`write_compare_plots` save.

    Args:
        analyses: One analysis (PCA and t-SNE side by side) or several (one column each,
            PCA above t-SNE).
        max_points: Rows drawn (a seeded sample, the same rows for every analysis).
        seed: Seed of that sample and of t-SNE.
        color_by: ``modality`` (of each point's item), ``task``, ``dataset``, ``class`` (the
            positive's text, else the query's), or ``auto`` (:func:`resolve_color_by`).
            Colours are shared by all panels; labels beyond the ten most frequent are grey.
    """
    items = [analyses] if isinstance(analyses, Analysis) else list(analyses)
    return _projection_figure(items, max_points, seed, color_by)


def similarity_figure(analyses: Analysis | Sequence[Analysis]) -> Any:
    """Histograms of positive and hardest-negative similarity, one panel per analysis, on
    shared bins and a shared x-axis (matplotlib ``Figure``)."""
    items = [analyses] if isinstance(analyses, Analysis) else list(analyses)
    title = f"{items[0].name}: positive vs hardest negative" if len(items) == 1 else None
    return _similarity_figure(items, title)


def _save(fig: Any, path: Path) -> Path:
    # bbox_inches="tight" keeps the legend placed outside the axes inside the image.
    fig.savefig(path, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def write_plots(
    a: Analysis, out_dir: str | Path, *, max_points: int = 200, seed: int = 0, color_by: str = "auto"
) -> list[Path]:
    """Writes ``projection.png`` and ``similarities.png`` for one analysis; returns the paths.

    ``color_by``: see :func:`projection_figure`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [
        _save(
            projection_figure(a, max_points=max_points, seed=seed, color_by=color_by), out / "projection.png"
        ),
        _save(similarity_figure(a), out / "similarities.png"),
    ]


def write_compare_plots(
    analyses: Sequence[Analysis],
    out_dir: str | Path,
    *,
    max_points: int = 200,
    seed: int = 0,
    color_by: str = "auto",
) -> list[Path]:
    """Side-by-side plots for several models: ``compare_projection.png`` (one colour per
    label across models) and ``compare_similarities.png`` (shared bins and x-axis)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig = projection_figure(analyses, max_points=max_points, seed=seed, color_by=color_by)
    return [
        _save(fig, out / "compare_projection.png"),
        _save(similarity_figure(analyses), out / "compare_similarities.png"),
    ]
