"""Experiment tracking (train.report_to): one real tiny run reports to TensorBoard, wandb
(offline) and MLflow (a local file store), and each tracker's own files are read back."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.helpers import read_wandb_records
from vlm2emb.train.config import ConfigError, load_recipe
from vlm2emb.train.loop import train

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"
STEPS = ["train.max_steps=4", "train.log_steps=2", "train.batch_size=8", "train.gradcache_chunk_size=3"]
LOGGED = ("loss", "lr", "grad_norm", "accuracy", "samples_per_s", "tokens_per_s", "gradcache_chunks")


def _eval_file(folder: Path) -> Path:
    rows = [
        {"query": {"text": f"digit {d}"}, "candidates": [{"text": f"a {d}"}, {"text": f"b {d + 1}"}]}
        for d in range(4)
    ]
    path = folder / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    base = tmp_path_factory.mktemp("tracked")
    mlruns = base / "mlruns"
    env = pytest.MonkeyPatch()
    env.setenv("WANDB_MODE", "offline")
    env.setenv("WANDB_SILENT", "true")
    env.setenv("MLFLOW_TRACKING_URI", mlruns.as_uri())
    env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 refuses a file store otherwise
    try:
        cfg = load_recipe(
            RECIPE,
            [
                f"output_dir={base / 'run'}",
                *STEPS,
                f"data.eval={_eval_file(base)}",
                "train.report_to=[tensorboard, wandb, MLflow]",
                "train.run_name=tiny-tracked",
            ],
        )
        summary = train(cfg, progress=False)
    finally:
        env.undo()
    return base / "run", mlruns, summary


def test_metrics_jsonl_holds_the_new_training_numbers(tracked_run):
    out, _, _ = tracked_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    for record in steps:
        assert set(LOGGED) <= record.keys()
        assert 0.0 <= record["accuracy"] <= 1.0
        assert record["grad_norm"] > 0
        # 8 rows, chunks of 3 items: queries 3+3+2, positives 3+3+2 on one process.
        assert record["gradcache_chunks"] == 6


def test_tensorboard_event_files_hold_the_scalars(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, summary = tracked_run
    events = EventAccumulator(str(out / "logs" / "vlm2emb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert set(LOGGED) <= tags
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    jsonl = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.Scalars("loss")[-1].value == pytest.approx(jsonl[1]["loss"], rel=1e-6)
    # Eval metrics: before training at step 0, after it at the last step.
    assert [e.step for e in events.Scalars("eval/hit_at_1")] == [0, 4]
    assert events.Scalars("eval/hit_at_1")[-1].value == pytest.approx(summary["eval"]["average"]["hit@1"])
    # The recipe as hyper-parameters (accelerate writes them beside the events as YAML too).
    (hparams,) = (out / "logs" / "vlm2emb").glob("*/hparams.yml")
    assert "train.gradcache_chunk_size: 3" in hparams.read_text()


def test_wandb_offline_run_holds_config_and_history(tracked_run):
    out, _, _ = tracked_run
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.display_name == "tiny-tracked"
    assert run.project == "vlm2emb"
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["train.max_steps"] == 4
    assert config["model.name_or_path"] == "tiny:qwen2_vl"
    history = [
        {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    train_rows = [h for h in history if "loss" in h]
    assert [h["_step"] for h in train_rows] == [2, 4]
    assert set(LOGGED) <= train_rows[0].keys()
    assert any("eval/hit_at_1" in h for h in history)


def test_mlflow_file_store_holds_params_and_metrics(tracked_run):
    import mlflow

    _, mlruns, summary = tracked_run
    client = mlflow.MlflowClient(tracking_uri=mlruns.as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "vlm2emb"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "tiny-tracked"
    assert run.data.params["train.batch_size"] == "8"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2, 4]
    assert set(LOGGED) <= run.data.metrics.keys()
    assert run.data.metrics["eval/hit_at_1"] == pytest.approx(summary["eval"]["average"]["hit@1"])


def test_unknown_tracker_is_a_recipe_error():
    with pytest.raises(ConfigError, match=r"train.report_to: 'tensorbord' is not one of"):
        load_recipe(RECIPE, ["train.report_to=tensorbord"])
    assert load_recipe(RECIPE, ["train.report_to=none"]).train.report_to == []
    assert load_recipe(RECIPE, ["train.report_to=wandb"]).train.report_to == ["wandb"]


@pytest.mark.skipif(importlib.util.find_spec("trackio") is not None, reason="trackio is installed here")
def test_missing_tracker_package_fails_before_the_model_loads(tmp_path: Path):
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", "train.report_to=trackio"])
    with pytest.raises(ConfigError, match=r'pip install "vlm2emb\[trackio\]"'):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()  # stopped before anything was written
