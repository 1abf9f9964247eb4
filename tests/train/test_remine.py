"""Re-mining hard negatives during training (`train.remine_steps`, ANCE-style).

Real tiny-model runs on real digit images (scikit-learn's) and text rows from two sources.
The refreshed negatives are checked against a standalone `mine_negatives` call with the
model of the checkpoint saved at the refresh step; resuming across a refresh must give the
uninterrupted run's weights and losses bit for bit.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from vlm2emb.cli import main
from vlm2emb.mine import MineConfig, mine_negatives
from vlm2emb.train.config import ConfigError, RemineConfig, load_recipe

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FRUIT = ["apple", "banana", "cherry", "grape", "lemon", "mango", "melon", "olive"]
FRUIT += ["peach", "pear", "plum", "kiwi", "fig", "lime", "date"]
# The subprocess runs below are CPU-only (gloo); the in-process reference would use a GPU.
CPU_ONLY = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares CPU subprocesses with an in-process run"
)
MINE = {"num_negatives": 2, "top_k": 4, "max_score_ratio": None, "dedup_threshold": None}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two sources: 40 digit images captioned by their digit, 15 fruit text pairs."""
    from PIL import Image

    from vlm2emb.data.demo import load_digit_scans

    root = tmp_path_factory.mktemp("remine-data")
    scans, labels = load_digit_scans()
    rows = []
    for i in range(40):
        gray = (255 - scans[i] * (255.0 / 16.0)).astype(np.uint8)
        Image.fromarray(gray, mode="L").resize((32, 32)).convert("RGB").save(root / f"d{i}.png")
        caption = f"a handwritten {NAMES[int(labels[i])]}"
        rows.append({"query": {"image": f"d{i}.png"}, "positive": {"text": caption}, "dataset": "digits"})
    (root / "digits.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows = [
        {"query": {"text": f"which fruit is {w}?"}, "positive": {"text": f"the {w}"}, "dataset": "fruit"}
        for w in FRUIT
    ]
    (root / "fruit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {
        "seed": 7,
        "model": {"name_or_path": "tiny:qwen2_vl", "pooling": "last", "attention": "causal", "lora": False},
        "data": {"train": [str(root / "digits.jsonl"), str(root / "fruit.jsonl")]},
        "train": {
            "max_steps": 6,
            "batch_size": 8,
            "learning_rate": 2e-3,
            "warmup_ratio": 0.0,
            "temperature": 0.05,
            "log_steps": 1,
            "save_steps": 2,
            "remine_steps": 2,
            "remine": MINE,
        },
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _train(data: Path, out: Path, *extra: str) -> int:
    return main(["train", str(data / "recipe.yaml"), f"output_dir={out}", "--no-progress", *extra])


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in _records(out) if "loss" in r]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: refreshes after steps 2 and 4, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("remine-ref") / "run"
    assert _train(data, out) == 0
    return out


def test_refreshes_happen_at_their_steps_and_are_logged(reference: Path) -> None:
    mined = reference / "mined"
    # Every 2 steps, never after the last (6); no temporary folder left behind.
    assert sorted(p.name for p in mined.iterdir()) == ["step-2", "step-4"]
    for step in (2, 4):
        assert sorted(p.name for p in (mined / f"step-{step}").iterdir()) == [
            "0.jsonl",
            "0.jsonl.report.json",
            "1.jsonl",
            "1.jsonl.report.json",
        ]
    records = [r for r in _records(reference) if "remine" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        stats = r["remine"]
        assert stats["rows"] == 55 and stats["negatives"] == 2 * 55 and stats["short_rows"] == 0
        assert stats["seconds"] > 0
        # The logged mean is the mean of the negatives' scores in the reports.
        reports = [
            json.loads((mined / f"step-{r['step']}" / f"{i}.jsonl.report.json").read_text()) for i in (0, 1)
        ]
        want = sum(rep["scores"]["negative"]["mean"] * rep["negatives"] for rep in reports) / 110
        assert stats["negative_score_mean"] == pytest.approx(want, abs=1e-6)
    # The rows of each source keep their order and get new negatives at each refresh.
    digits2, digits4 = _rows(mined / "step-2" / "0.jsonl"), _rows(mined / "step-4" / "0.jsonl")
    assert [r["query"]["images"][0].endswith(f"d{i}.png") for i, r in enumerate(digits2)] == [True] * 40
    assert all(len(r["negatives"]) == 2 for r in digits2 + digits4)
    assert [r["negatives"] for r in digits2] != [r["negatives"] for r in digits4]


@pytest.mark.parametrize("step", [2, 4])
def test_refreshed_negatives_equal_a_standalone_mine_with_that_steps_model(
    reference: Path, data: Path, tmp_path: Path, step: int
) -> None:
    from vlm2emb import EmbeddingModel

    # The checkpoint of step N holds the weights the refresh after step N mined with.
    model = EmbeddingModel.from_pretrained(reference / "checkpoints" / f"step-{step}")
    for source, name in enumerate(("digits", "fruit")):
        want = tmp_path / f"{name}.jsonl"
        mine_negatives(model, str(data / f"{name}.jsonl"), want, MineConfig(**MINE))
        assert _rows(reference / "mined" / f"step-{step}" / f"{source}.jsonl") == _rows(want)


def test_training_uses_the_refreshed_negatives(reference: Path, data: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    assert _train(data, plain, "train.remine_steps=0") == 0
    ref, got = _losses(reference), _losses(plain)
    # The refresh neither moves the weights nor draws random numbers: the same first two
    # steps; from step 3 on the batches hold mined negatives, so the losses differ.
    assert got[:2] == ref[:2]
    assert got[2][1] != ref[2][1]
    assert not (plain / "mined").exists()


def test_loader_workers_get_the_refreshed_rows(reference: Path, data: Path, tmp_path: Path) -> None:
    # A worker prefetches batches ahead; after a refresh none built from the old rows may be used.
    out = tmp_path / "workers"
    assert _train(data, out, "data.num_workers=1") == 0
    assert _losses(out) == _losses(reference)


def _assert_same_run(ref: Path, got: Path) -> None:
    a, b = _final(ref), _final(got)
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    assert _losses(got) == _losses(ref)
    assert [r["step"] for r in _records(got)] == [r["step"] for r in _records(ref)]  # nothing twice


def test_resume_after_a_refresh_loads_it_and_is_exact(
    reference: Path, data: Path, tmp_path: Path, capsys
) -> None:
    # A kill after step 5: checkpoints 2 and 4, refreshes 2 and 4, no final/.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("final", "checkpoints/step-6"):
        shutil.rmtree(out / name)
    capsys.readouterr()
    assert _train(data, out, "train.resume_from=auto") == 0
    log = capsys.readouterr().out
    assert f"Hard negatives from {out / 'mined' / 'step-4'}" in log
    assert "re-mined" not in log  # step 4's refresh is loaded, not mined again
    _assert_same_run(reference, out)


def test_resume_before_a_refresh_redoes_it_and_is_exact(reference: Path, data: Path, tmp_path: Path) -> None:
    # A kill while the refresh after step 4 was mining: checkpoint 4 not written, a
    # half-written temporary folder of the refresh left behind.
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("final", "checkpoints/step-6", "checkpoints/step-4", "mined/step-4"):
        shutil.rmtree(out / name)
    half = out / "mined" / ".tmp-step-4"
    half.mkdir()
    (half / "0.jsonl.partial").write_text('{"query": {"text": "cut sh')
    assert _train(data, out, "train.resume_from=auto") == 0
    _assert_same_run(reference, out)
    assert not half.exists()
    for source in (0, 1):
        name = f"step-4/{source}.jsonl"
        assert _rows(out / "mined" / name) == _rows(reference / "mined" / name)


def test_resume_without_the_refresh_it_needs_is_a_one_line_error(
    reference: Path, data: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for name in ("final", "checkpoints/step-6", "mined/step-4"):
        shutil.rmtree(out / name)
    capsys.readouterr()
    assert _train(data, out, "train.resume_from=auto") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mined/step-4: missing" in err[0] and "step 4" in err[0], err


def test_remine_settings_mirror_mine_config() -> None:
    # One set of mining settings: every remine key is a MineConfig field with its default
    # (across_datasets is mine_negatives' keyword of the same name and default).
    import dataclasses
    import inspect

    mine = {f.name: f.default for f in dataclasses.fields(MineConfig)}
    mine["across_datasets"] = inspect.signature(mine_negatives).parameters["across_datasets"].default
    for f in dataclasses.fields(RemineConfig):
        assert f.name in mine and f.default == mine[f.name], f.name
    assert RemineConfig(top_k=9).mine_config() == MineConfig(top_k=9)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.remine_steps=-1", "train.remine_steps: must be >= 0"),
        ("train.remine.num_negatives=0", "train.remine: num_negatives must be >= 1"),
        ("train.remine.sample=best", "train.remine: sample must be one of top, random"),
        ("train.remine.topk=3", "topk"),
        ("data.streaming=true", "train.remine_steps: not available with data.streaming"),
    ],
)
def test_bad_remine_recipes_are_refused_at_load(data: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_recipe(data / "recipe.yaml", [override])


def test_distill_without_refreshed_teacher_scores_is_refused_before_the_model_loads(
    data: Path, tmp_path: Path, capsys
) -> None:
    rows = [json.loads(line) for line in (data / "fruit.jsonl").read_text().splitlines()]
    for r in rows:
        r["teacher_scores"] = [0.5]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [f"data.train=[{scored}]", "train.loss=distill"]
    assert _train(data, tmp_path / "run", *args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "train.remine:" in err[0] and "teacher_scores=true" in err[0], err
    assert "Training " not in captured.out  # stopped before the model was loaded

    # With refreshed teacher scores, the current model's, the same recipe trains (self-distillation).
    out = tmp_path / "ok"
    assert _train(data, out, *args, "train.remine.teacher_scores=true", "train.max_steps=3") == 0
    mined = _rows(out / "mined" / "step-2" / "0.jsonl")
    assert [len(r["teacher_scores"]) for r in mined] == [1 + len(r["negatives"]) for r in mined] == [3] * 15
    # Score 0 is the positive's: the model's own query . positive (normalised, so at most 1).
    assert all(-1 <= r["teacher_scores"][0] <= 1 for r in mined)


def test_in_memory_images_are_refused_with_the_row(digit_images, tmp_path: Path) -> None:
    from vlm2emb.data.errors import DataError
    from vlm2emb.train.api import train

    rows = [
        {"query": {"image": img}, "positive": {"text": f"digit {i}"}} for i, img in enumerate(digit_images)
    ]
    with pytest.raises(DataError, match=r"train.remine_steps: cannot write an item with media"):
        train(
            train_data=rows,
            output_dir=str(tmp_path / "run"),
            train={"max_steps": 2, "batch_size": 4, "remine_steps": 1},
            progress=False,
        )


@pytest.mark.slow
@CPU_ONLY
def test_killed_run_resumes_across_a_refresh_bit_exact(reference: Path, data: Path, tmp_path: Path) -> None:
    # A real SIGKILL once checkpoint 2 (written after the refresh of step 2) is in place; the
    # kill lands wherever the run is then (step 3 or 4, mining after step 4, writing
    # checkpoint 4): resuming must give the uninterrupted run.
    import os
    import signal
    import time

    out = tmp_path / "killed"
    repo = Path(__file__).resolve().parents[2]
    cmd = [
        sys.executable,
        "-m",
        "vlm2emb",
        "train",
        str(data / "recipe.yaml"),
        f"output_dir={out}",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    for _attempt in range(3):  # the tiny model trains fast: make sure the kill lands before final/
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=repo)
        deadline = time.time() + 300
        while (
            not (out / "checkpoints" / "step-2").exists() and proc.poll() is None and time.time() < deadline
        ):
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (out / "final").exists():
            break
    assert not (out / "final").exists(), "the run finished before it could be killed"
    args = ["train.resume_from=auto"]
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Resumed from" in proc.stdout and "Hard negatives from" in proc.stdout
    _assert_same_run(reference, out)


@pytest.mark.slow
@pytest.mark.distributed
@CPU_ONLY
# DDP splits each embedding pass across the processes; under ZeRO-3 every process embeds
# everything (each forward gathers the partitioned weights, a collective).
@pytest.mark.parametrize("config", ["ddp", "zero3"])
def test_two_processes_refresh_like_one(reference: Path, data: Path, tmp_path: Path, config: str) -> None:
    import os

    out = tmp_path / config
    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    cmd += [str(repo / "recipes" / "accelerate" / f"{config}.yaml"), "--num_processes", "2"]
    cmd += ["-m", "vlm2emb", "train", str(data / "recipe.yaml"), f"output_dir={out}", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("step-2/0.jsonl", "step-2/1.jsonl", "step-4/0.jsonl", "step-4/1.jsonl"):
        assert _rows(out / "mined" / name) == _rows(reference / "mined" / name), name
    assert [loss for _, loss, _ in _losses(out)] == pytest.approx(
        [loss for _, loss, _ in _losses(reference)], abs=1e-5
    )
    ref, got = _final(reference), _final(out)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 2e-5


def test_refresh_folders_no_checkpoint_needs_are_pruned(tmp_path: Path) -> None:
    from vlm2emb.train.remine import last_refresh, prune_refreshes, refresh_due

    assert [s for s in range(1, 11) if refresh_due(s, 3, 9)] == [3, 6]  # never at the last step
    assert [last_refresh(s, 3) for s in (0, 2, 3, 5, 6, 8)] == [0, 0, 3, 3, 6, 6]
    for step in (2, 4, 6, 8):
        (tmp_path / "mined" / f"step-{step}").mkdir(parents=True)
    (tmp_path / "mined" / ".tmp-step-10").mkdir()
    # Checkpoints at 5 (trained on refresh 4) and 7 (refresh 6); 8 is the newest refresh.
    prune_refreshes(tmp_path, 2, [5, 7], newest=8)
    assert sorted(p.name for p in (tmp_path / "mined").iterdir()) == [
        ".tmp-step-10",
        "step-4",
        "step-6",
        "step-8",
    ]
