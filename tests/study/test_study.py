"""The seed study (vlm2emb.study): study files, the demo study data, the figures read back,
and a real end-to-end run on two tiny backbones whose summary is checked against the
per-run outputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.backbones.tiny_mdvlm import build_tiny_mdvlm
from vlm2emb.cli import main
from vlm2emb.data.demo import STUDY_TASKS, WORDS, resolve_demo, write_study
from vlm2emb.study import BACKBONE_KINDS, load_study
from vlm2emb.study.figures import data_efficiency_figure, meta_task_figure, modality_gap_figure, write_figures
from vlm2emb.study.run import spread
from vlm2emb.train.config import ConfigError, load_recipe

REPO = Path(__file__).resolve().parents[2]
STUDIES = sorted((REPO / "recipes" / "study").glob("*.yaml"))


@pytest.fixture(scope="module")
def study_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_study(tmp_path_factory.mktemp("study-data"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------ study files


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_bundled_study_files_load_and_every_backbone_recipe_validates(path: Path) -> None:
    cfg = load_study(path)
    assert {b.kind for b in cfg.backbones} == set(BACKBONE_KINDS)  # both sides compared
    assert len(cfg.seeds) >= 3 and 1.0 in cfg.fractions
    names = set()
    for b in cfg.backbones:
        recipe = load_recipe(cfg.recipe, [*cfg.overrides, *b.overrides])
        recipe.validate()
        names.add(recipe.model.name_or_path)
    assert len(names) == len(cfg.backbones)  # each backbone is its own model


def _study_file(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load((REPO / "recipes" / "study" / "tiny.yaml").read_text())
    raw["recipe"] = str(REPO / "recipes" / "demo.yaml")
    raw.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seed": 3}, "unknown key 'seed'"),
        ({"seeds": [1, 1]}, "seeds: .* repeats a seed"),
        ({"seeds": []}, "seeds: give at least one seed"),
        ({"backbones": [{"name": "a", "kind": "masked"}]}, r"backbones\[0\].kind: 'masked'"),
        ({"backbones": [{"name": "a", "kind": "diffusion"}] * 2}, r"backbones\[1\].name: duplicate"),
        ({"backbones": [{"name": "a/b", "kind": "diffusion"}]}, r"backbones\[0\].name"),
        ({"backbones": []}, "list at least one backbone"),
        ({"overrides": ["seed=3"]}, "the study sets seed and output_dir"),
        ({"overrides": ["train.max_steps"]}, "is not key=value"),
        ({"data_efficiency": {"fractions": [0, 1]}}, r"fractions: 0.0 is not in \(0, 1\]"),
        ({"data_efficiency": {"metric": "acc"}}, "data_efficiency.metric: 'acc'"),
        ({"recipe": "missing.yaml"}, "recipe: .*missing.yaml not found"),
    ],
)
def test_bad_study_files_are_one_line_errors_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict, message: str
) -> None:
    path = _study_file(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        load_study(path)
    assert main(["study", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm2emb: error: ") and "\n" not in err and str(path) in err


def test_cli_options_are_validated(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _study_file(tmp_path)
    assert main(["study", str(path), "--seeds", "1,x"]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert main(["study", str(path), "--fractions", "2"]) == 2
    assert "--fractions" in capsys.readouterr().err


def test_spread_against_numpy() -> None:
    values = [0.25, 0.5, 0.125, 0.875]
    s = spread(values)
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    assert (s["min"], s["max"], s["n"]) == (0.125, 0.875, 4)
    assert spread([0.3])["std"] is None  # one seed has no spread


# ------------------------------------------------------------------ the study data


def test_study_data_tasks_answers_and_tiles(study_data: Path) -> None:
    suite = yaml.safe_load((study_data / "study_suite.yaml").read_text())
    assert {t["name"]: t["meta_task"] for t in suite["tasks"]} == STUDY_TASKS
    digits = _rows(study_data / "eval.jsonl")
    label_of = {r["query"]["image"]: r["positive"] for r in digits if r["task"] == "digits-i2t"}
    # VQA: the answer is the number after / before the image's digit.
    for row in _rows(study_data / "task-digits-vqa.jsonl"):
        step = 1 if "after" in row["query"]["text"] else -1
        assert row["positive"] == (label_of[row["query"]["image"]] + step) % 10
        assert [c["text"] for c in row["candidates"]] == list(WORDS)
    # Grounding: the mosaic's quadrants are exactly the candidate tiles, and the positive
    # tile shows the digit the text names.
    for row in _rows(study_data / "task-digits-grounding.jsonl")[:10]:
        mosaic = np.asarray(Image.open(study_data / row["query"]["image"]))
        for k, cand in enumerate(row["candidates"]):
            tile = np.asarray(Image.open(study_data / cand["image"]))
            y, x = (k // 2) * 32, (k % 2) * 32
            assert np.array_equal(mosaic[y : y + 32, x : x + 32], tile)
        target = row["candidates"][row["positive"]]["image"]
        assert row["query"]["text"].endswith(WORDS[label_of[target]])
    # Held-out images only: no eval image (or tile) appears in a training row.
    train_images = set()
    for r in _rows(study_data / "study_train.jsonl"):
        for item in (r["query"], r["positive"], *r.get("negatives", [])):
            if item.get("image", "").startswith("images/"):
                train_images.add(item["image"])
    eval_images = {
        c["image"]
        for r in _rows(study_data / "study_eval.jsonl")
        for c in [r["query"], *r["candidates"]]
        if c.get("image", "").startswith("images/")
    }
    assert eval_images and not eval_images & train_images


def test_demo_study_names_resolve(tmp_path: Path, study_data: Path) -> None:
    # Written once into demo-data/study, like demo:digits/*.
    folder = tmp_path / "demo-data" / "study"
    folder.mkdir(parents=True)
    for name in ("study_suite.yaml", "study_train.jsonl", "study_eval.jsonl"):
        (folder / name).write_text((study_data / name).read_text())
    assert resolve_demo("demo:study/suite", tmp_path) == folder / "study_suite.yaml"
    assert resolve_demo("demo:study/eval", tmp_path) == folder / "study_eval.jsonl"
    assert not (folder / "images").exists()  # the marker file was there: nothing rewritten


# ------------------------------------------------------------------ figures


def _results(seed_values: dict[str, list[float]]) -> dict:
    # A hand-made results.json: two backbones, meta-tasks a and b, per-seed scores.
    backbones = {}
    for name, kind in (("ar", "autoregressive"), ("dm", "diffusion")):
        vals = seed_values[name]
        runs = {
            str(s): {
                "overall": v,
                "meta_tasks": {"a": v, "b": v / 2},
                "modality_gap": v + 0.1,
                "alignment": 1 - v,
            }
            for s, v in enumerate(vals)
        }
        backbones[name] = {
            "kind": kind,
            "runs": runs,
            "mean": {
                "overall": spread(vals),
                "meta_tasks": {"a": spread(vals), "b": spread([v / 2 for v in vals])},
                "modality_gap": spread([v + 0.1 for v in vals]),
                "alignment": spread([1 - v for v in vals]),
                "data_efficiency": [
                    {"fraction": 0.1, "rows": 10, **spread([v / 3 for v in vals])},
                    {"fraction": 1.0, "rows": 100, **spread(vals)},
                ],
            },
        }
    return {
        "suite": "hand",
        "metric": "hit@1",
        "data_efficiency_metric": "hit@1",
        "seeds": [0, 1, 2],
        "meta_task_order": ["a", "b"],
        "backbones": backbones,
    }


def test_figures_draw_the_numbers_and_read_back(tmp_path: Path) -> None:
    from matplotlib.colors import to_rgb

    results = _results({"ar": [0.6, 0.7, 0.8], "dm": [0.2, 0.3, 0.7]})
    fig = meta_task_figure(results)
    ax = fig.axes[0]
    heights = [p.get_height() for p in ax.patches]
    # Bars in backbone order, each over groups a, b, overall.
    assert heights == pytest.approx([0.7, 0.35, 0.7, 0.4, 0.2, 0.4])
    # Error bars: the vertical segments span mean ± sample std.
    segs = [
        seg
        for coll in ax.collections
        if hasattr(coll, "get_segments")
        for seg in coll.get_segments()
        if len(seg) == 2
    ]
    spans = sorted(round(float(abs(s[1][1] - s[0][1])) / 2, 6) for s in segs)
    # AR's a / overall (std 0.1) and b (0.05); diffusion's a (0.2646) and b (0.1323).
    for values in ([0.6, 0.7, 0.8], [0.3, 0.35, 0.4], [0.2, 0.3, 0.7], [0.1, 0.15, 0.35]):
        assert round(float(np.std(values, ddof=1)), 6) in spans
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "overall"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["ar (autoregressive)", "dm (diffusion)"]

    eff = data_efficiency_figure(results).axes[0]
    lines = {ln.get_label(): ln for ln in eff.get_lines()}
    assert list(lines["dm (diffusion)"].get_xdata()) == [10, 100]
    assert lines["dm (diffusion)"].get_ydata() == pytest.approx([0.4 / 3, 0.4])
    gap = modality_gap_figure(results).axes[0]
    assert [p.get_height() for p in gap.patches] == pytest.approx([0.8, 0.5])

    paths = write_figures(results, [], tmp_path)
    assert [p.name for p in paths] == ["meta_tasks.png", "data_efficiency.png"]  # no analyses: no projection
    img = np.asarray(Image.open(tmp_path / "meta_tasks.png").convert("RGB")).astype(int)
    assert img.shape[0] > 200 and img.shape[1] > 400
    # Both sides' colours are on the page (the bars), AR blue and diffusion orange.
    for color in ("tab:blue", "tab:orange"):
        rgb = np.array([round(c * 255) for c in to_rgb(color)])
        assert (np.abs(img - rgb).sum(-1) <= 6).sum() > 500, color


# ------------------------------------------------------------------ end to end


def _small_study(tmp_path: Path, study_data: Path) -> Path:
    """Study data cut to a few rows per task, and a study file of two tiny backbones."""
    train = _rows(study_data / "study_train.jsonl")
    by_set: dict[str, list[dict]] = {}
    for r in train:
        by_set.setdefault(r["dataset"], []).append(r)
    small_train = [r for rows in by_set.values() for r in rows[:6]]
    (study_data / "small_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in small_train))
    suite = "name: small-study\nmetric: hit@1\nks: [1, 5, 10]\ntasks:\n"
    evals = []
    for task, meta in STUDY_TASKS.items():
        rows = _rows(study_data / f"task-{task}.jsonl")[:6]
        evals += rows
        (study_data / f"small-{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        suite += f"  - {{name: {task}, meta_task: {meta}, data: small-{task}.jsonl}}\n"
    (study_data / "small_suite.yaml").write_text(suite)
    (study_data / "small_eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    study = {
        "recipe": str(REPO / "recipes" / "demo.yaml"),
        "overrides": [
            f"data.train={study_data / 'small_train.jsonl'}",
            f"data.eval={study_data / 'small_eval.jsonl'}",
            "train.max_steps=1",
            "train.batch_size=8",
            "train.log_steps=1",
        ],
        "suite": str(study_data / "small_suite.yaml"),
        "seeds": [3, 4],
        "backbones": [
            {"name": "ar", "kind": "autoregressive", "overrides": ["model.name_or_path=tiny:qwen2_vl"]},
            {
                # The remote-code masked-diffusion path (LaViDa / MMaDA's adapter), cheaper on a
                # CPU than the tiny DiffusionGemma, whose vision tower pads every image to its
                # full patch budget; the saved final/ reloads with trust_remote_code.
                "name": "dm",
                "kind": "diffusion",
                "overrides": [
                    f"model.name_or_path={build_tiny_mdvlm(tmp_path / 'mdvlm')}",
                    "model.trust_remote_code=true",
                    "model.pooling=mean",
                    "model.attention=bidirectional",
                ],
            },
        ],
        # Only the full run: four runs keep the test near a minute; the curve's nested
        # subsets are tested in tests/train/test_training_studies.py.
        "data_efficiency": {"fractions": [1.0]},
        "analysis": {"max_rows_per_task": 4},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


def _cell(text: str) -> float:
    return float(text.split("±")[0])


@pytest.mark.slow
def test_study_end_to_end_summary_equals_the_runs(
    tmp_path: Path, study_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["study", str(_small_study(tmp_path, study_data)), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in (
        "results.json",
        "summary.md",
        "meta_tasks.png",
        "data_efficiency.png",
        "projection.png",
        "modality_gap.png",
    ):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        with Image.open(png) as im:
            assert im.format == "PNG" and im.width > 300 and im.height > 200
    results = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    assert summary in printed
    # The rows of the per-meta-task tables (the first section), by their first cell.
    section = summary.split("## Per meta-task")[1].split("## Per task")[0]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in section.splitlines()
        if line.startswith("| ")
    }
    metas = list(STUDY_TASKS.values())
    for name, seeds_dir in (("ar", "ar"), ("dm", "dm")):
        per_seed = {}
        for seed in (3, 4):
            run = out / "runs" / seeds_dir / f"seed-{seed}"
            suite = json.loads((run / "suite.json").read_text())
            eff = json.loads((run / "data_efficiency.json").read_text())
            an = json.loads((run / "analysis.json").read_text())
            # The full run's model is frac-1's.
            assert [p["fraction"] for p in eff["points"]] == [1.0]
            assert (run / "frac-1" / "final").is_dir()
            # Per-task scores recomputed from the suite report's own metric values.
            tasks = {t: v[v["metric"]] for t, v in suite["tasks"].items()}
            per_seed[seed] = {
                "metas": [np.mean([tasks[t] for t, m in STUDY_TASKS.items() if m == meta]) for meta in metas],
                "overall": np.mean(list(tasks.values())),
                "eff": [p["value"] for p in eff["points"]],
                "gap": an["modality_gap"],
            }
            assert results["backbones"][name]["runs"][str(seed)]["overall"] == pytest.approx(
                per_seed[seed]["overall"]
            )
        cells = rows[name]
        assert cells[0] == results["backbones"][name]["kind"]
        for j, meta in enumerate(metas):
            vals = [per_seed[s]["metas"][j] for s in (3, 4)]
            assert _cell(cells[1 + j]) == pytest.approx(np.mean(vals), abs=5e-4), meta
            assert cells[1 + j].endswith(f"± {np.std(vals, ddof=1):.3f}")
        assert _cell(cells[1 + len(metas)]) == pytest.approx(
            np.mean([per_seed[s]["overall"] for s in (3, 4)]), abs=5e-4
        )
        gap = np.mean([per_seed[s]["gap"] for s in (3, 4)])
        assert results["backbones"][name]["mean"]["modality_gap"]["mean"] == pytest.approx(gap)
        eff_mean = results["backbones"][name]["mean"]["data_efficiency"]
        for i in range(1):
            assert eff_mean[i]["mean"] == pytest.approx(np.mean([per_seed[s]["eff"][i] for s in (3, 4)]))
    # The difference row is the difference of the two means.
    diff = rows["ar - dm"]
    for j, meta in enumerate(metas):
        a = results["backbones"]["ar"]["mean"]["meta_tasks"][meta]["mean"]
        d = results["backbones"]["dm"]["mean"]["meta_tasks"][meta]["mean"]
        assert float(diff[j]) == pytest.approx(a - d, abs=5e-4)
    assert re.search(r"!\[projection.png\]\(projection.png\)", summary)


def test_data_efficiency_on_the_suite_gives_curves_per_meta_task(
    tmp_path: Path, study_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = yaml.safe_load(_small_study(tmp_path, study_data).read_text())
    study["backbones"] = study["backbones"][:1]
    study["seeds"] = [3]
    study["data_efficiency"] = {"fractions": [0.5], "on_suite": True}
    path = tmp_path / "on_suite.yaml"
    path.write_text(yaml.safe_dump(study))
    out = tmp_path / "out"
    assert main(["study", str(path), "--out", str(out)]) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    run = out / "runs" / "ar" / "seed-3"
    points = results["backbones"]["ar"]["runs"]["3"]["data_efficiency"]
    assert [p["fraction"] for p in points] == [0.5, 1.0]
    for point, report_file in zip(points, (run / "frac-0.5" / "suite.json", run / "suite.json")):
        report = json.loads(report_file.read_text())
        # Each point is that fraction's model scored on the suite: the mean of its tasks' scores.
        tasks = {t: v[v["metric"]] for t, v in report["tasks"].items()}
        assert point["suite"]["overall"] == pytest.approx(np.mean(list(tasks.values())))
        for meta in set(STUDY_TASKS.values()):
            scores = [tasks[t] for t, m in STUDY_TASKS.items() if m == meta]
            assert point["suite"]["meta_tasks"][meta] == pytest.approx(np.mean(scores))
    # The two models differ (the half run saw other rows), so the curve is not a copy.
    half, full = (json.loads(f.read_text()) for f in (run / "frac-0.5" / "suite.json", run / "suite.json"))
    assert half["tasks"] != full["tasks"]

    from vlm2emb.study.figures import data_efficiency_meta_task_figure

    fig = data_efficiency_meta_task_figure(results)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [*results["meta_task_order"], "overall"]
    overall = fig.axes[-1].get_lines()[0]
    assert list(overall.get_ydata()) == pytest.approx([p["suite"]["overall"] for p in points])
    assert (out / "data_efficiency_meta_tasks.png").is_file()
    summary = (out / "summary.md").read_text()
    assert "## Data efficiency on the suite" in summary
    assert f"| ar | 0.5 | {points[0]['rows']} |" in summary


@pytest.mark.distributed
def test_a_study_under_accelerate_launch_equals_one_process(tmp_path: Path, study_data: Path) -> None:
    import subprocess

    from tests.helpers import accelerate_launch, launch_env

    study = yaml.safe_load(_small_study(tmp_path, study_data).read_text())
    study["backbones"] = study["backbones"][:1]
    study["seeds"] = [3]
    study["data_efficiency"] = {"fractions": [0.5], "on_suite": True}
    path = tmp_path / "launch.yaml"
    path.write_text(yaml.safe_dump(study))
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["study", str(path), "--out", str(one)]) == 0
    proc = subprocess.run(
        [*accelerate_launch("ddp", 2), "-m", "vlm2emb", "study", str(path), "--out", str(two)],
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # only the main process reports
    a, b = (json.loads((d / "results.json").read_text())["backbones"]["ar"]["runs"]["3"] for d in (one, two))
    # Same global batches (2 processes == 1 for training) and the same suite, sharded.
    assert b["overall"] == pytest.approx(a["overall"], abs=1e-6)
    assert b["meta_tasks"] == pytest.approx(a["meta_tasks"], abs=1e-6)
    for pa, pb in zip(a["data_efficiency"], b["data_efficiency"], strict=True):
        assert (pb["rows"], pb["value"]) == (pa["rows"], pytest.approx(pa["value"], abs=1e-6))
        assert pb["suite"]["meta_tasks"] == pytest.approx(pa["suite"]["meta_tasks"], abs=1e-6)
    assert b["modality_gap"] == pytest.approx(a["modality_gap"], abs=1e-4)
    assert (two / "data_efficiency_meta_tasks.png").is_file() and (two / "summary.md").is_file()
