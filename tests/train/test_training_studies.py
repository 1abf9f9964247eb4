"""In-training evaluation with best-model tracking, and the data-efficiency study (tiny runs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.demo import write_digits
from vlm2emb.eval import evaluate
from vlm2emb.eval.mmeb import load_local_rows
from vlm2emb.train.best import BestTracker
from vlm2emb.train.config import ConfigError, load_recipe
from vlm2emb.train.data_efficiency import nested_subsets, parse_fractions
from vlm2emb.train.loop import train

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"


@pytest.fixture(scope="module")
def small_eval(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_digits(tmp_path_factory.mktemp("digits"))
    rows = [json.loads(line) for line in (root / "eval.jsonl").read_text().splitlines()]
    small = [r for r in rows if r["task"] == "digits-i2t"][:30] + [
        r for r in rows if r["task"] == "digits-t2i"
    ][:10]
    path = root / "small.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in small))
    return path


def test_best_tracker_keeps_the_first_of_equal_scores(tmp_path: Path) -> None:
    t = BestTracker(tmp_path, "mrr")
    assert t.update(10, {"average": {"mrr": 0.5}})
    assert not t.update(20, {"average": {"mrr": 0.5}})  # a tie keeps the earlier step
    assert t.update(30, {"average": {"mrr": 0.7}})
    assert not t.update(40, {"average": {"mrr": 0.6}})
    t.write()
    again = BestTracker(tmp_path, "mrr", resume=True)
    assert (again.best_step, again.best_value) == (30, 0.7)
    assert not again.update(50, {"average": {"mrr": 0.65}})
    assert BestTracker(tmp_path, "mrr").best_value is None  # a fresh run starts over
    with pytest.raises(KeyError, match="hit@3"):
        BestTracker(tmp_path, "hit@3").update(1, {"average": {"mrr": 0.1}})


def test_eval_steps_track_the_best_model(tmp_path: Path, small_eval: Path) -> None:
    overrides = [
        f"output_dir={tmp_path}",
        f"data.eval={small_eval}",
        "train.max_steps=6",
        "train.batch_size=16",
    ]
    overrides += ["train.eval_steps=2", "train.metric_for_best=mrr", "train.eval_before=false"]
    summary = train(load_recipe(RECIPE, overrides), progress=False)
    best = json.loads((tmp_path / "best.json").read_text())
    history = best["history"]
    assert [h["step"] for h in history] == [2, 4, 6]
    assert history[-1]["value"] == summary["eval"]["average"]["mrr"]
    values = [h["value"] for h in history]
    assert best["value"] == max(values)
    assert best["step"] == history[values.index(max(values))]["step"]
    assert best["path"] == "best"
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" in r] == [2, 4, 6]
    # best/ holds the model that scored best.value: evaluating it again reproduces the number.
    model = EmbeddingModel.from_pretrained(tmp_path / "best")
    rows = load_local_rows([str(small_eval)])
    for row in rows:
        row["task"] = "digits-i2t" if row["query"].get("images") else "digits-t2i"
    assert evaluate(model, rows)["average"]["mrr"] == pytest.approx(best["value"], abs=1e-6)
    assert json.loads((tmp_path / "best" / "trainer_state.json").read_text())["step"] == best["step"]


def test_metric_for_best_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"train\.metric_for_best: 'acc' is not one of"):
        load_recipe(RECIPE, ["train.metric_for_best=acc"])
    with pytest.raises(ConfigError, match=r"train\.eval_steps: must be >= 0"):
        load_recipe(RECIPE, ["train.eval_steps=-1"])


def test_nested_subsets_are_nested_and_seeded() -> None:
    subsets = nested_subsets(1000, [0.01, 0.05, 0.25, 1.0], seed=3)
    sizes = [len(subsets[f]) for f in (0.01, 0.05, 0.25, 1.0)]
    assert sizes == [10, 50, 250, 1000]
    assert set(subsets[0.01]) <= set(subsets[0.05]) <= set(subsets[0.25]) <= set(subsets[1.0])
    assert nested_subsets(1000, [0.05], seed=3)[0.05] == subsets[0.05]
    assert nested_subsets(1000, [0.05], seed=4)[0.05] != subsets[0.05]
    assert parse_fractions("1.0, 0.05,0.05") == [0.05, 1.0]
    with pytest.raises(ValueError, match="not in"):
        parse_fractions("0,0.5")


def test_cli_data_efficiency_on_the_demo_recipe(
    tmp_path: Path, small_eval: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["data-efficiency", str(RECIPE), "--fractions", "0.005,0.02", f"output_dir={tmp_path}"]
    argv += [f"data.eval={small_eval}", "train.max_steps=2", "train.batch_size=8", "train.log_steps=1"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "data_efficiency.json").read_text())
    points = result["points"]
    assert [p["fraction"] for p in points] == [0.005, 0.02]
    assert [p["rows"] for p in points] == [15, 60]  # ceil(f * 2994)
    assert [p["batch_size"] for p in points] == [8, 8]
    small, large = (
        (tmp_path / f"frac-{f}" / "train_subset.jsonl").read_text().splitlines() for f in (0.005, 0.02)
    )
    assert set(small) <= set(large)  # nested
    for p in points:  # each point is its run's own eval average
        run_eval = json.loads((Path(p["output_dir"]) / "eval.json").read_text())
        assert p["value"] == run_eval["average"]["hit@1"]
    png = (tmp_path / "data_efficiency.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main(["data-efficiency", str(RECIPE), "--metric", "acc", f"output_dir={tmp_path}"]) == 2


def test_data_efficiency_resume_continues_a_stopped_study_to_the_same_result(
    tmp_path: Path, small_eval: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from safetensors.torch import load_file

    argv = ["data-efficiency", str(RECIPE), "--fractions", "0.005,0.02", f"output_dir={tmp_path}"]
    argv += [f"data.eval={small_eval}", "train.max_steps=2", "train.batch_size=8", "train.save_steps=1"]
    assert main(argv) == 0, capsys.readouterr().err
    first = json.loads((tmp_path / "data_efficiency.json").read_text())["points"]
    small, large = (tmp_path / f"frac-{f}" for f in (0.005, 0.02))
    weights = {d: load_file(next((d / "final").glob("*.safetensors"))) for d in (small, large)}
    capsys.readouterr()

    # Without --resume a folder holding a run is refused, as for `vlm2emb train`.
    assert main(argv) != 0
    assert "resume" in capsys.readouterr().err

    # `small` stopped before its first checkpoint; `large` after step 1 of 2.
    for name in ("checkpoints", "final", "eval.json"):
        path = small / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(large / "checkpoints" / "step-2")
    shutil.rmtree(large / "final")
    (large / "eval.json").unlink()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    second = json.loads((tmp_path / "data_efficiency.json").read_text())["points"]
    assert [p["value"] for p in second] == [p["value"] for p in first]
    for d in (small, large):  # the same weights as the uninterrupted runs
        again = load_file(next((d / "final").glob("*.safetensors")))
        assert again.keys() == weights[d].keys()
        assert all(torch.equal(again[k], weights[d][k]) for k in again)

    # Finished runs are read back, not trained or saved again.
    stamp = {d: next((d / "final").glob("*.safetensors")).stat().st_mtime_ns for d in (small, large)}
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0
    assert capsys.readouterr().out.count("Nothing to do") == 2
    assert json.loads((tmp_path / "data_efficiency.json").read_text())["points"] == second
    assert all(
        next((d / "final").glob("*.safetensors")).stat().st_mtime_ns == stamp[d] for d in (small, large)
    )
