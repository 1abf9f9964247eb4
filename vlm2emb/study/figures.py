"""The study's figures, drawn from ``results.json``'s numbers (matplotlib loads on first use).

* ``meta_tasks.png``: one group of bars per meta-task (and overall), one bar per backbone at
  the mean over seeds, the sample standard deviation as an error bar, each seed a dot;
* ``data_efficiency.png``: the data-efficiency metric against training rows (log scale),
  one line per backbone, a band of ± one standard deviation;
* ``data_efficiency_meta_tasks.png`` (``data_efficiency.on_suite``): the suite's score
  against training rows, one panel per meta-task and overall;
* ``projection.png``: PCA and t-SNE of query-target pairs of the first seed, a line joining
  each pair (:func:`vlm2emb.eval.analysis.projection_figure`, one column per backbone);
* ``modality_gap.png``: modality gap and alignment per backbone, mean bars and seed dots.

Each ``*_figure`` function returns the matplotlib Figure, so tests can read the drawn values.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm2emb.eval.analysis import _pyplot, projection_figure

__all__ = [
    "KIND_COLORS",
    "data_efficiency_figure",
    "data_efficiency_meta_task_figure",
    "meta_task_figure",
    "modality_gap_figure",
    "write_figures",
]

# One palette per side of the comparison, so every figure tells AR from diffusion by colour.
KIND_COLORS = {
    "autoregressive": ("tab:blue", "tab:cyan", "tab:purple"),
    "diffusion": ("tab:orange", "tab:red", "tab:brown"),
}


def _colors(results: dict[str, Any]) -> dict[str, str]:
    used = {kind: 0 for kind in KIND_COLORS}
    out = {}
    for name, b in results["backbones"].items():
        palette = KIND_COLORS[b["kind"]]
        out[name] = palette[used[b["kind"]] % len(palette)]
        used[b["kind"]] += 1
    return out


def _seed_values(b: dict[str, Any], get: Any) -> list[float]:
    return [v for v in (get(r) for r in b["runs"].values()) if v is not None]


def meta_task_figure(results: dict[str, Any]) -> Any:
    """Grouped bars: meta-tasks (then overall) on x, one bar per backbone."""
    plt = _pyplot()
    groups = [*results["meta_task_order"], "overall"]
    names = list(results["backbones"])
    colors = _colors(results)
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(groups), 3.8), dpi=100)
    for j, name in enumerate(names):
        b = results["backbones"][name]
        stats = [b["mean"]["overall"] if g == "overall" else b["mean"]["meta_tasks"][g] for g in groups]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(groups))]
        means = [s["mean"] for s in stats]
        errs = [s["std"] or 0.0 for s in stats]
        ax.bar(xs, means, width, yerr=errs, capsize=3, color=colors[name], label=f"{name} ({b['kind']})")
        for x, g in zip(xs, groups):  # each seed's value as a dot on its bar
            vals = _seed_values(b, lambda r, g=g: r["overall"] if g == "overall" else r["meta_tasks"][g])
            ax.scatter([x] * len(vals), vals, s=9, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(f"score ({results['metric']}), mean over seeds")
    ax.set_ylim(0, 1)
    ax.set_title(
        f"{results['suite']}: per meta-task ({len(results['seeds'])} seed(s), bars ± std)", fontsize=10
    )
    ax.legend(fontsize=8, loc="upper right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def data_efficiency_figure(results: dict[str, Any]) -> Any:
    """The data-efficiency metric against training rows, one line per backbone."""
    plt = _pyplot()
    colors = _colors(results)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    for name, b in results["backbones"].items():
        pts = b["mean"]["data_efficiency"]
        rows = [p["rows"] for p in pts]
        mean = [p["mean"] for p in pts]
        std = [p["std"] or 0.0 for p in pts]
        ax.plot(rows, mean, marker="o", color=colors[name], label=f"{name} ({b['kind']})")
        ax.fill_between(
            rows,
            [m - s for m, s in zip(mean, std)],
            [m + s for m, s in zip(mean, std)],
            color=colors[name],
            alpha=0.2,
        )
    ax.set_xscale("log")
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel(f"eval {results['data_efficiency_metric']} (task average)")
    ax.set_title("data efficiency (mean over seeds, band ± std)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def data_efficiency_meta_task_figure(results: dict[str, Any]) -> Any:
    """The suite score against training rows, one panel per meta-task (then overall), one
    line per backbone with a ± std band (``data_efficiency.on_suite``)."""
    plt = _pyplot()
    groups = [*results["meta_task_order"], "overall"]
    colors = _colors(results)
    fig, axes = plt.subplots(1, len(groups), figsize=(1.0 + 2.8 * len(groups), 3.4), dpi=100, squeeze=False)
    for ax, group in zip(axes[0], groups):
        for name, b in results["backbones"].items():
            pts = b["mean"]["data_efficiency"]
            stats = [
                p["suite"]["overall"] if group == "overall" else p["suite"]["meta_tasks"][group] for p in pts
            ]
            rows = [p["rows"] for p in pts]
            mean = [st["mean"] for st in stats]
            std = [st["std"] or 0.0 for st in stats]
            ax.plot(rows, mean, marker="o", color=colors[name], label=f"{name} ({b['kind']})")
            ax.fill_between(
                rows,
                [m - e for m, e in zip(mean, std)],
                [m + e for m, e in zip(mean, std)],
                color=colors[name],
                alpha=0.2,
            )
        ax.set_xscale("log")
        ax.set_xlabel("training rows (log scale)")
        ax.set_title(group, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"score ({results['metric']})")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(f"data efficiency on {results['suite']} (mean over seeds, band ± std)", fontsize=10)
    fig.tight_layout()
    return fig


def modality_gap_figure(results: dict[str, Any]) -> Any:
    """Two panels, modality gap and alignment: a bar per backbone (mean), seeds as dots."""
    plt = _pyplot()
    names = list(results["backbones"])
    colors = _colors(results)
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.5 * len(names) * 2, 3.6), dpi=100, squeeze=False)
    for ax, key, label in (
        (axes[0][0], "modality_gap", "modality gap ||mean(image) - mean(text)||"),
        (axes[0][1], "alignment", "alignment E||q - t||² (lower: pairs closer)"),
    ):
        for i, name in enumerate(names):
            b = results["backbones"][name]
            s = b["mean"][key]
            if s is None:
                continue
            ax.bar(i, s["mean"], 0.6, yerr=s["std"] or 0.0, capsize=3, color=colors[name])
            vals = _seed_values(b, lambda r, key=key: r[key])
            ax.scatter([i] * len(vals), vals, s=9, color="black", zorder=3)
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel(label, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("embedding space (mean over seeds, bars ± std)", fontsize=10)
    fig.tight_layout()
    return fig


def write_figures(
    results: dict[str, Any],
    analyses: Sequence[Any],
    out_dir: str | Path,
    *,
    max_points: int = 200,
    seed: int = 0,
) -> list[Path]:
    """Saves the four figures (the projection only when ``analyses`` is not empty)."""
    out = Path(out_dir)
    plt = _pyplot()
    figures = {
        "meta_tasks.png": meta_task_figure(results),
        "data_efficiency.png": data_efficiency_figure(results),
    }
    first = next(iter(results["backbones"].values()))["mean"]["data_efficiency"]
    if all("suite" in p for p in first):
        figures["data_efficiency_meta_tasks.png"] = data_efficiency_meta_task_figure(results)
    if analyses:
        figures["projection.png"] = projection_figure(
            list(analyses), max_points=max_points, seed=seed, color_by="task"
        )
        figures["modality_gap.png"] = modality_gap_figure(results)
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, bbox_inches="tight")  # the outside legend stays in the image
        plt.close(fig)
        paths.append(out / name)
    return paths
