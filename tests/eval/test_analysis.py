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
    assert main([*argv, "--max-points", "30"]) == 0
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
