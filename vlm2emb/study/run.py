"""Runs a study: per backbone and seed, the data-efficiency runs, the suite and the analysis.

Layout of ``output_dir``::

    results.json                    every number (per run and mean/spread over seeds)
    summary.md                      the tables, and the figures linked
    meta_tasks.png                  per-meta-task bars (mean over seeds, spread as error bars)
    data_efficiency.png             data-efficiency curves, one per backbone
    projection.png                  PCA and t-SNE of query-target pairs (lines join a pair)
    modality_gap.png                modality gap and alignment per backbone
    runs/NAME/seed-S/               one data-efficiency study (frac-F/ runs, frac-1/ the full one)
    runs/NAME/seed-S/suite.json     the suite report of frac-1/final
    runs/NAME/seed-S/analysis.json  the analysis numbers of frac-1/final
    runs/NAME/seed-S/frac-F/suite.json  with data_efficiency.on_suite: the suite report of frac-F
    data_efficiency_meta_tasks.png  with data_efficiency.on_suite: the curves per meta-task

Nothing here is specific to a model: a backbone is a set of recipe overrides.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlm2emb.study.config import StudyConfig

__all__ = ["aggregate", "run_study", "spread"]


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (``None`` for one value), min, max and count."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _analysis_rows(suite: Any, loaded: list[Any], max_rows: int) -> list[dict[str, Any]]:
    # The first rows of each local-candidate task (the kinds whose payload is a row list),
    # labelled with their task; corpus-style tasks have no per-row candidates to pair.
    rows: list[dict[str, Any]] = []
    for task, payload in zip(suite.tasks, loaded):
        if (
            isinstance(payload, list)
            and payload
            and isinstance(payload[0], dict)
            and "candidates" in payload[0]
        ):
            rows += [{**r, "task": task.name} for r in payload[:max_rows]]
    return rows


def run_study(
    cfg: StudyConfig, recipe_overrides: Sequence[str] = (), *, resume: bool = False
) -> dict[str, Any]:
    """Runs the study ``cfg`` describes; see the module docstring for the files.

    Args:
        cfg: A loaded study (:func:`~vlm2emb.study.config.load_study`).
        recipe_overrides: ``key=value`` recipe overrides applied to every run, after the
            study's and the backbone's (the command line's).
        resume: Continue a study that stopped: finished runs are read back instead of
            retrained, interrupted ones continue from their last checkpoint
            (:func:`~vlm2emb.train.data_efficiency.run_data_efficiency`'s ``resume``).
            The suite and the analysis are run again on every model (their embeddings come
            from each run's cache when the model is unchanged).

    Returns:
        The content of ``results.json`` plus ``"files"`` (the paths written).

    Raises:
        ConfigError / DataError: A bad recipe, override, suite or data row, before any
            training starts.
    """
    import torch

    from vlm2emb.data.demo import resolve_demo
    from vlm2emb.distributed import main_process_first
    from vlm2emb.eval.analysis import analyze
    from vlm2emb.eval.harness import load_suite_tasks
    from vlm2emb.eval.mmeb import MMEB_LAYOUT
    from vlm2emb.eval.suite import load_suite
    from vlm2emb.items import resolve_instruction
    from vlm2emb.study.figures import write_figures
    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.data_efficiency import run_data_efficiency

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    # Everything is read and checked before the first run trains. Under `accelerate launch`
    # the main process writes demo data first; only it writes the study's files.
    with main_process_first() as is_main:
        out.mkdir(parents=True, exist_ok=True)
        suite_file = resolve_demo(cfg.suite, out) if cfg.suite.startswith("demo:") else cfg.suite
        suite = load_suite(suite_file, data_root=cfg.data_root)
        loaded = load_suite_tasks(suite, work_dir=out)
    analysis_rows = _analysis_rows(suite, loaded, cfg.analysis.max_rows_per_task)
    recipes = {
        (b.name, seed): load_recipe(
            cfg.recipe,
            [
                *cfg.overrides,
                *b.overrides,
                *recipe_overrides,
                f"seed={seed}",
                f"output_dir={out / 'runs' / b.name / f'seed-{seed}'}",
            ],
        )
        for b in cfg.backbones
        for seed in cfg.seeds
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    per_run: dict[str, dict[str, Any]] = {b.name: {} for b in cfg.backbones}
    projections: dict[str, Any] = {}  # backbone -> Analysis of its first seed
    for b in cfg.backbones:
        for seed in cfg.seeds:
            recipe = recipes[(b.name, seed)]
            run_dir = Path(recipe.output_dir)
            eff = run_data_efficiency(recipe, cfg.fractions, metric=cfg.data_efficiency.metric, resume=resume)
            full = next(p for p in eff["points"] if p["fraction"] == 1.0)

            curve_on_suite: list[dict[str, Any]] = []
            if cfg.data_efficiency.on_suite:
                for point in eff["points"]:
                    if point["fraction"] == 1.0:
                        continue  # the full run is evaluated below
                    _, _, sub_report = _evaluate_on_suite(
                        Path(point["output_dir"]) / "final",
                        run_dir,
                        recipe,
                        suite,
                        loaded,
                        cfg.eval_batch_size,
                        device,
                    )
                    if is_main:
                        (Path(point["output_dir"]) / "suite.json").write_text(
                            json.dumps(sub_report, indent=2) + "\n"
                        )
                    curve_on_suite.append(_suite_numbers(sub_report))
            model, encoder, report = _evaluate_on_suite(
                Path(full["output_dir"]) / "final",
                run_dir,
                recipe,
                suite,
                loaded,
                cfg.eval_batch_size,
                device,
            )
            q_instr = resolve_instruction(None, model.config.query_instruction)
            t_instr = resolve_instruction(None, model.config.target_instruction)
            if is_main:
                (run_dir / "suite.json").write_text(json.dumps(report, indent=2) + "\n")
            if cfg.data_efficiency.on_suite:
                curve_on_suite.append(_suite_numbers(report))  # fractions sorted: 1.0 is last
            numbers: dict[str, Any] = {}
            if analysis_rows:
                an = analyze(
                    encoder,
                    # As the suite embeds them: MMEB-layout rows carry their instruction in
                    # their text, other rows without one get the model's default.
                    [
                        {
                            **r,
                            "instruction": r.get("instruction")
                            or (None if r.get("layout") == MMEB_LAYOUT else q_instr),
                        }
                        for r in analysis_rows
                    ],
                    batch_size=cfg.eval_batch_size,
                    target_instruction=t_instr,
                    name=b.name,
                    seed=cfg.analysis.seed,
                )
                numbers = an.numbers
                if is_main:
                    (run_dir / "analysis.json").write_text(json.dumps(numbers, indent=2) + "\n")
                if seed == cfg.seeds[0]:
                    projections[b.name] = an
            per_run[b.name][str(seed)] = {
                "run_dir": str(run_dir),
                "overall": report["average"]["score"],
                "meta_tasks": {m: v["score"] for m, v in report["meta_tasks"].items()},
                "tasks": {t: v["score"] for t, v in report["tasks"].items() if "score" in v},
                "modality_gap": numbers.get("modality_gap"),
                "alignment": numbers.get("alignment"),
                "uniformity": numbers.get("uniformity"),
                "data_efficiency": [
                    {k: p[k] for k in ("fraction", "rows", "batch_size", "value")} for p in eff["points"]
                ],
            }
            if curve_on_suite:
                for point, numbers_on_suite in zip(
                    per_run[b.name][str(seed)]["data_efficiency"], curve_on_suite
                ):
                    point["suite"] = numbers_on_suite
            del model, encoder
    results = {
        "suite": suite.name,
        "metric": suite.metric,
        "data_efficiency_metric": cfg.data_efficiency.metric,
        "seeds": list(cfg.seeds),
        "backbones": {
            b.name: {"kind": b.kind, "overrides": list(b.overrides), **aggregate(per_run[b.name])}
            for b in cfg.backbones
        },
        "meta_task_order": _meta_task_order(suite),
    }
    results["seconds"] = round(time.perf_counter() - start, 1)
    files = [out / "results.json", out / "summary.md"]
    if not is_main:
        return {**results, "files": [str(f) for f in files]}
    files += write_figures(
        results,
        [projections[b.name] for b in cfg.backbones if b.name in projections],
        out,
        max_points=cfg.analysis.max_points,
        seed=cfg.analysis.seed,
    )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "summary.md").write_text(summary_markdown(results, [Path(f).name for f in files[2:]]))
    return {**results, "files": [str(f) for f in files]}


def _evaluate_on_suite(
    final_dir: Path, run_dir: Path, recipe: Any, suite: Any, loaded: list[Any], batch_size: int, device: str
) -> tuple[Any, Any, dict[str, Any]]:
    """Loads a run's saved model and evaluates it on the suite: (model, encoder, report)."""
    from vlm2emb.eval.cache import CachedEncoder
    from vlm2emb.eval.harness import run_suite
    from vlm2emb.items import resolve_instruction
    from vlm2emb.model import EmbeddingModel

    model = EmbeddingModel.from_pretrained(
        final_dir, device=device, trust_remote_code=recipe.model.trust_remote_code
    )
    model.eval()
    # One cache per backbone and seed: the analysis (and --resume) re-use its embeddings.
    encoder = CachedEncoder(model, run_dir / "embedding-cache")
    report = run_suite(
        encoder,
        suite,
        loaded=loaded,
        batch_size=batch_size,
        default_query_instruction=resolve_instruction(None, model.config.query_instruction),
        default_target_instruction=resolve_instruction(None, model.config.target_instruction),
    )
    return model, encoder, report


def _suite_numbers(report: dict[str, Any]) -> dict[str, Any]:
    """A suite report's overall score and per-meta-task scores."""
    return {
        "overall": report["average"]["score"],
        "meta_tasks": {m: v["score"] for m, v in report["meta_tasks"].items()},
    }


def _meta_task_order(suite: Any) -> list[str]:
    order: list[str] = []
    for task in suite.tasks:
        if task.meta_task and task.meta_task not in order:
            order.append(task.meta_task)
    return order


def aggregate(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per-seed results -> ``{"runs": ..., "mean": ...}`` with :func:`spread` per number.

    Data-efficiency points are matched by fraction; their ``rows`` are the same for every
    seed (``ceil(fraction * rows)``).
    """
    seeds = list(runs)
    first = runs[seeds[0]]

    def over(get: Any) -> dict[str, Any] | None:
        values = [get(runs[s]) for s in seeds]
        return spread(values) if all(v is not None for v in values) else None

    mean: dict[str, Any] = {
        "overall": over(lambda r: r["overall"]),
        "meta_tasks": {m: over(lambda r, m=m: r["meta_tasks"][m]) for m in first["meta_tasks"]},
        "tasks": {t: over(lambda r, t=t: r["tasks"][t]) for t in first["tasks"]},
        "modality_gap": over(lambda r: r["modality_gap"]),
        "alignment": over(lambda r: r["alignment"]),
        "uniformity": over(lambda r: r["uniformity"]),
        "data_efficiency": [
            {
                "fraction": p["fraction"],
                "rows": p["rows"],
                **over(lambda r, i=i: r["data_efficiency"][i]["value"]),  # type: ignore[dict-item]
            }
            for i, p in enumerate(first["data_efficiency"])
        ],
    }
    if all("suite" in p for p in first["data_efficiency"]):
        # The curve on the suite (data_efficiency.on_suite): overall and per meta-task.
        for i, point in enumerate(mean["data_efficiency"]):
            point["suite"] = {
                "overall": over(lambda r, i=i: r["data_efficiency"][i]["suite"]["overall"]),
                "meta_tasks": {
                    m: over(lambda r, i=i, m=m: r["data_efficiency"][i]["suite"]["meta_tasks"][m])
                    for m in first["data_efficiency"][i]["suite"]["meta_tasks"]
                },
            }
    return {"runs": runs, "mean": mean}


def _pm(s: dict[str, Any] | None, digits: int = 3) -> str:
    if s is None:
        return "n/a"
    text = f"{s['mean']:.{digits}f}"
    return text + (f" ± {s['std']:.{digits}f}" if s["std"] is not None else "")


def summary_markdown(results: dict[str, Any], figures: Sequence[str]) -> str:
    """The study's ``summary.md``: mean ± sample standard deviation over seeds."""
    names = list(results["backbones"])
    metas = results["meta_task_order"]
    n = len(results["seeds"])
    lines = [
        f"# Study: {' vs '.join(names)} on {results['suite']}",
        "",
        f"Seeds: {', '.join(map(str, results['seeds']))}. Numbers are the mean over the {n} seed(s)"
        + (" ± the sample standard deviation." if n > 1 else " (one seed: no spread)."),
        f"Task scores are each task's headline metric (suite metric: {results['metric']}); a meta-task's "
        "score is the mean of its tasks, overall the mean of all tasks.",
        "",
        "## Per meta-task",
        "",
        "| Backbone | Kind | " + " | ".join(metas) + " | overall |",
        "|---|---|" + "---|" * (len(metas) + 1),
    ]
    for name, b in results["backbones"].items():
        cells = [_pm(b["mean"]["meta_tasks"].get(m)) for m in metas] + [_pm(b["mean"]["overall"])]
        lines.append(f"| {name} | {b['kind']} | " + " | ".join(cells) + " |")
    ar = [x for x, b in results["backbones"].items() if b["kind"] == "autoregressive"]
    dif = [x for x, b in results["backbones"].items() if b["kind"] == "diffusion"]
    if ar and dif:
        lines += [
            "",
            "Difference of the means, autoregressive minus diffusion (positive: the diffusion backbone trails):",
            "",
            "| Pair | " + " | ".join(metas) + " | overall |",
            "|---|" + "---|" * (len(metas) + 1),
        ]
        for a in ar:
            for d in dif:
                ma, md = results["backbones"][a]["mean"], results["backbones"][d]["mean"]
                cells = [f"{ma['meta_tasks'][m]['mean'] - md['meta_tasks'][m]['mean']:+.3f}" for m in metas]
                cells.append(f"{ma['overall']['mean'] - md['overall']['mean']:+.3f}")
                lines.append(f"| {a} - {d} | " + " | ".join(cells) + " |")
    tasks = list(next(iter(results["backbones"].values()))["mean"]["tasks"])
    lines += ["", "## Per task", "", "| Task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for t in tasks:
        lines.append(
            f"| {t} | " + " | ".join(_pm(results["backbones"][x]["mean"]["tasks"][t]) for x in names) + " |"
        )
    metric = results["data_efficiency_metric"]
    first = next(iter(results["backbones"].values()))["mean"]["data_efficiency"]
    lines += [
        "",
        f"## Data efficiency ({metric}, mean over the recipe's data.eval tasks)",
        "",
        "| Fraction | Rows | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for i, p in enumerate(first):
        cells = [_pm(results["backbones"][x]["mean"]["data_efficiency"][i]) for x in names]
        lines.append(f"| {p['fraction']:g} | {p['rows']} | " + " | ".join(cells) + " |")
    if all("suite" in p for p in first):
        lines += [
            "",
            f"## Data efficiency on the suite (score per meta-task, {results['metric']})",
            "",
            "| Backbone | Fraction | Rows | " + " | ".join(metas) + " | overall |",
            "|---|---|---|" + "---|" * (len(metas) + 1),
        ]
        for x in names:
            for p in results["backbones"][x]["mean"]["data_efficiency"]:
                cells = [_pm(p["suite"]["meta_tasks"].get(m)) for m in metas] + [_pm(p["suite"]["overall"])]
                lines.append(f"| {x} | {p['fraction']:g} | {p['rows']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Embedding space",
        "",
        "| Backbone | modality gap | alignment | uniformity |",
        "|---|---|---|---|",
    ]
    for x in names:
        m = results["backbones"][x]["mean"]
        lines.append(f"| {x} | {_pm(m['modality_gap'])} | {_pm(m['alignment'])} | {_pm(m['uniformity'])} |")
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
