"""Analysis numbers against plain recomputations, and `vlm2emb analyze` on a tiny demo run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.demo import write_digits
from vlm2emb.eval.analysis import alignment, analyze, modality_gap, uniformity
from vlm2emb.eval.mmeb import load_local_rows

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_metrics_against_plain_loops() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    ua, ub = unit(a), unit(b)
    assert modality_gap(a, b) == pytest.approx(np.linalg.norm(ua.mean(0) - ub.mean(0)))
    assert alignment(a, b) == pytest.approx(np.mean([np.sum((ua[i] - ub[i]) ** 2) for i in range(7)]))
    pairs = [np.exp(-2 * np.sum((ua[i] - ua[j]) ** 2)) for i in range(7) for j in range(i + 1, 7)]
    assert uniformity(a) == pytest.approx(math.log(np.mean(pairs)))
    # Hand cases: antipodal modalities are 2 apart; identical pairs are perfectly aligned;
    # two antipodal points are as uniform as two points can be (log exp(-2 * 4) = -8).
    e = np.eye(3)
    assert modality_gap(e[:1] * 5, -e[:1]) == pytest.approx(2.0)
    assert alignment(a, a * 3) == pytest.approx(0.0, abs=1e-12)
    assert uniformity(np.stack([e[0], -e[0]])) == pytest.approx(-8.0)
    # Sampling kicks in above max_items and stays seeded.
    big = rng.normal(size=(50, 4))
    assert uniformity(big, max_items=20, seed=1) == uniformity(big, max_items=20, seed=1)
    assert uniformity(big, max_items=20, seed=1) != pytest.approx(uniformity(big), abs=1e-9)


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 demo eval rows: 40 image -> caption, 20 caption -> image."""
    root = write_digits(tmp_path_factory.mktemp("digits"))
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    small = [r for r in rows if r["task"] == "digits-i2t"][:40] + [
        r for r in rows if r["task"] == "digits-t2i"
    ][:20]
    path = root / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in small))
    return path


def test_analyze_numbers_match_the_model(eval_file: Path) -> None:
    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    rows = load_local_rows([str(eval_file)])
    result = analyze(model, rows)
    n = result.numbers
    assert n["rows"] == 60 and n["n_items"]["mixed"] == 0
    # Recompute from direct encode calls, row by row.
    pos_sims, hard, q_all, p_all = [], [], [], []
    for row in rows:
        q = model.encode([row["query"]], instruction=row["instruction"])[0]
        c = model.encode(row["candidates"])
        sims = (c @ q).numpy()
        p = row["positive"][0]
        pos_sims.append(sims[p])
        hard.append(np.delete(sims, row["positive"]).max())
        q_all.append(q.numpy())
        p_all.append(c[p].numpy())
    np.testing.assert_allclose(result.positive_sim, pos_sims, atol=1e-5)
    np.testing.assert_allclose(result.hardest_negative_sim, hard, atol=1e-5)
    assert n["alignment"] == pytest.approx(alignment(np.array(q_all), np.array(p_all)), abs=1e-5)
    assert n["margin"]["mean"] == pytest.approx(np.mean(np.array(pos_sims) - np.array(hard)), abs=1e-5)
    assert n["fraction_positive_above_hardest_negative"] == pytest.approx(
        np.mean(np.array(pos_sims) > np.array(hard))
    )
    # Modality gap: distinct image items vs distinct text items, both sides.
    # An image embedded as a query (with its instruction) and as a candidate counts twice.
    images = {(r["instruction"], tuple(r["query"]["images"])) for r in rows if r["query"].get("images")}
    images |= {(None, tuple(c["images"])) for r in rows for c in r["candidates"] if c.get("images")}
    texts = {(r["instruction"], r["query"]["text"]) for r in rows if r["query"].get("text")}
    texts |= {(None, c["text"]) for r in rows for c in r["candidates"] if c.get("text")}
    img_emb = torch.cat(
        [model.encode([{"images": list(i)}], instruction=instr) for instr, i in sorted(images, key=str)]
    )
    txt_emb = torch.cat([model.encode([t], instruction=instr) for instr, t in sorted(texts, key=str)])
    assert n["n_items"] == {"image": len(images), "text": len(texts), "mixed": 0}
    assert n["modality_gap"] == pytest.approx(modality_gap(img_emb, txt_emb), abs=1e-5)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, eval_file: Path) -> Path:
    out = tmp_path_factory.mktemp("demo-run")
    argv = ["train", str(REPO / "recipes" / "demo.yaml"), f"output_dir={out}", f"data.eval={eval_file}"]
    argv += ["train.max_steps=5", "train.batch_size=16", "train.eval_before=false", "--no-progress"]
    assert main(argv) == 0
    return out / "final"


def check_png(path: Path, min_size: int = 5000) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    assert min_size < path.stat().st_size < 400_000, path.stat().st_size
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_cli_analyze_writes_numbers_and_real_pngs(
    demo_run: Path, eval_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "an"
    assert main(["analyze", "--model", str(demo_run), "--data", str(eval_file), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "modality gap" in printed and "projection.png" in printed
    numbers = json.loads((out / "analysis.json").read_text())
    for key in (
        "modality_gap",
        "alignment",
        "uniformity",
        "positive_similarity",
        "hardest_negative_similarity",
    ):
        assert numbers[key] is not None, key
    assert 0 <= numbers["modality_gap"] <= 2 and 0 <= numbers["alignment"] <= 4 and numbers["uniformity"] <= 0
    width, height = check_png(out / "projection.png")
    assert width > height  # PCA and t-SNE side by side
    check_png(out / "similarities.png")


def test_cli_analyze_compare_two_models(
    demo_run: Path, eval_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    argv = [
        "analyze",
        "--compare",
        "tiny:qwen2_vl",
        str(demo_run),
        "--data",
        str(eval_file),
        "--out",
        str(out),
    ]
    assert main([*argv, "--max-points", "30", "--color-by", "dataset"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "tiny:qwen2_vl" in table[0] and str(demo_run) in table[0]
    numbers = json.loads((out / "compare.json").read_text())
    assert list(numbers) == ["tiny:qwen2_vl", str(demo_run)]
    # Five steps of training already move the embedding space.
    assert numbers["tiny:qwen2_vl"]["alignment"] != pytest.approx(numbers[str(demo_run)]["alignment"])
    check_png(out / "compare_projection.png")
    check_png(out / "compare_similarities.png")


def test_cli_analyze_user_errors(eval_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "q", "candidates": ["a"], "positive": 3}\n')
    assert main(["analyze", "--model", "tiny:qwen2_vl", "--data", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1" in err[0]


def test_eval_modules_import_no_plotting_or_model_libraries() -> None:
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import vlm2emb.eval, vlm2emb.eval.analysis, vlm2emb.eval.harness, vlm2emb.train.data_efficiency\n"
        "print(','.join(m for m in ('matplotlib', 'sklearn', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


# ------------------------------------------------------------------ plots people can read


def synthetic(
    name: str, classes: list[str], shift: float = 0.0, seed: int = 0, tasks: list[str] | None = None
):
    """An Analysis of random embeddings, one class label per row (no model needed)."""
    from vlm2emb.eval.analysis import Analysis

    rng = np.random.default_rng(seed)
    n = len(classes)
    q = rng.normal(size=(n, 8))
    return Analysis(
        numbers={"model": name},
        query_emb=q,
        positive_emb=q + 0.1 * rng.normal(size=(n, 8)),
        query_modality=["image"] * n,
        positive_modality=["text"] * n,
        positive_sim=rng.uniform(0.2, 0.5, size=n) + shift,
        hardest_negative_sim=rng.uniform(0.0, 0.3, size=n) + shift,
        name=name,
        groups={"task": tasks or ["t"] * n, "dataset": tasks or ["t"] * n, "class": classes},
    )


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def point_colors(ax) -> tuple[np.ndarray, np.ndarray]:
    """Face colours (RGBA) of the query and the target scatter of one panel."""
    queries, targets = ax.collections[-2], ax.collections[-1]
    return queries.get_facecolors(), targets.get_facecolors()


def test_projection_coloured_by_class_with_labelled_axes_and_a_legend() -> None:
    from vlm2emb.eval.analysis import projection_figure

    classes = [f"digit {i % 3}" for i in range(30)]
    fig = projection_figure(synthetic("m", classes), color_by="class", max_points=30)
    pca, tsne = fig.axes
    assert pca.get_xlabel().startswith("PC 1 (") and "% of variance" in pca.get_ylabel()
    assert (tsne.get_xlabel(), tsne.get_ylabel()) == ("t-SNE 1", "t-SNE 2")
    assert legend_texts(fig) == ["query", "target", "digit 0", "digit 1", "digit 2"]
    assert fig.legends[0].get_title().get_text() == "class"
    # Every point of a class has that class's colour; the three classes' colours differ.
    for ax in (pca, tsne):
        q_colors, t_colors = point_colors(ax)
        assert len(q_colors) == len(t_colors) == 30
        by_class: dict[str, set] = {}
        for label, qc, tc in zip(classes, q_colors, t_colors):
            by_class.setdefault(label, set()).update({tuple(qc), tuple(tc)})
        assert all(len(c) == 1 for c in by_class.values())
        assert len({next(iter(c)) for c in by_class.values()}) == 3
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_many_classes_show_the_ten_most_frequent_and_one_grey_entry() -> None:
    from vlm2emb.eval.analysis import projection_figure

    classes = ["big"] * 10 + [f"c{i:02d}" for i in range(14)] + ["c00"] * 3  # 15 labels
    fig = projection_figure(synthetic("m", classes), color_by="class", max_points=100)
    texts = legend_texts(fig)
    assert texts[:2] == ["query", "target"] and texts[-1] == "other (5 class labels)"
    assert "big" in texts and "c00" in texts and len(texts) == 2 + 10 + 1
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_auto_colour_and_bad_choice() -> None:
    from vlm2emb.cli import _parser
    from vlm2emb.eval.analysis import COLOR_BY, resolve_color_by

    analyze_parser = _parser()._subparsers._group_actions[0].choices["analyze"]
    (flag,) = [a for a in analyze_parser._actions if "--color-by" in a.option_strings]
    assert tuple(flag.choices) == COLOR_BY and flag.default == "auto"

    several_tasks = synthetic("m", [f"x{i}" for i in range(6)], tasks=["a", "a", "b", "b", "c", "c"])
    assert resolve_color_by([several_tasks], "auto") == "task"
    assert resolve_color_by([synthetic("m", ["a", "a", "b"])], "auto") == "class"
    assert resolve_color_by([synthetic("m", ["a", "b", "c"])], "auto") == "modality"
    assert resolve_color_by([several_tasks], "dataset") == "dataset"
    with pytest.raises(ValueError, match="--color-by must be one of"):
        resolve_color_by([several_tasks], "colour")
    from vlm2emb.eval.analysis import projection_figure

    several_tasks.groups = {}  # an Analysis built by hand, without row labels
    with pytest.raises(ValueError, match="has no per-row class labels"):
        projection_figure(several_tasks, color_by="class")


def test_modality_colouring_lists_only_what_is_drawn() -> None:
    from vlm2emb.eval.analysis import projection_figure

    fig = projection_figure(synthetic("m", ["a", "b", "c", "d"]), color_by="modality")
    assert legend_texts(fig) == ["query (image)", "target (text)"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_compare_plots_share_colours_bins_and_x_axis() -> None:
    import matplotlib.pyplot as plt

    from vlm2emb.eval.analysis import projection_figure, similarity_figure

    classes = [f"k{i % 4}" for i in range(24)]
    # The second model's similarities lie well to the right of the first's.
    a, b = synthetic("before", classes, seed=1), synthetic("after", classes, shift=0.5, seed=2)
    fig = similarity_figure([a, b])
    left, right = fig.axes
    lo = min(a.hardest_negative_sim.min(), a.positive_sim.min())
    hi = max(b.hardest_negative_sim.max(), b.positive_sim.max())
    assert left.get_xlim() == right.get_xlim()
    assert left.get_xlim()[0] < lo and left.get_xlim()[1] > hi  # both span every value
    edges = [sorted({round(p.get_x(), 9) for p in ax.patches}) for ax in (left, right)]
    assert edges[0] == edges[1] and len(edges[0]) == 40  # the same 40 bins
    # Histogram counts on those bins equal numpy's on the union range.
    bins = np.linspace(*left.get_xlim(), 41)
    counts = [p.get_height() for p in right.patches[:40]]
    assert counts == list(np.histogram(b.positive_sim, bins=bins)[0])
    assert right.get_xlabel() == "cosine similarity to the query"
    plt.close(fig)

    fig = projection_figure([a, b], color_by="class", max_points=24)
    assert len(fig.axes) == 4  # PCA above t-SNE, one column per model
    first = point_colors(fig.axes[0])[0]
    second = point_colors(fig.axes[1])[0]
    # The same class has the same colour in both models' panels.
    assert [tuple(c) for c in first] == [tuple(c) for c in second]
    assert legend_texts(fig) == ["query", "target", "k0", "k1", "k2", "k3"]
    plt.close(fig)


def test_class_and_dataset_labels_from_rows() -> None:
    from vlm2emb.eval.analysis import _row_groups

    rows = [
        {
            "query": {"images": ["x.png"]},
            "candidates": [{"text": "cat"}, {"text": "dog"}],
            "positive": [0],
            "task": "i2t",
        },
        {
            "query": {"text": "a dog"},
            "candidates": [{"images": ["y.png"]}],
            "positive": [0],
            "task": "t2i",
            "dataset": "f",
        },
        {
            "query": {"images": ["z.png"]},
            "candidates": [{"images": ["w.png"]}],
            "positive": [0],
            "task": "i2i",
        },
    ]
    groups = _row_groups(rows)
    assert groups["class"] == ["cat", "a dog", "(no text)"]
    assert groups["task"] == ["i2t", "t2i", "i2i"] and groups["dataset"] == ["i2t", "f", "i2i"]


def test_scikit_learn_pools_follow_torchs_thread_count() -> None:
    """t-SNE's OpenMP pool is not torch's: the command's thread choice is applied to it too."""
    import sklearn.manifold  # noqa: F401  (loads scikit-learn's OpenMP runtime)
    from threadpoolctl import threadpool_info

    from vlm2emb.eval.analysis import _same_threads_as_torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _same_threads_as_torch():
            pools = threadpool_info()
            assert pools and all(pool["num_threads"] == 1 for pool in pools)
    finally:
        torch.set_num_threads(before)
