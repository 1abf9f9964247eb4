"""Extending a finished run: the last step's checkpoint, a larger train.max_steps, the schedule.

Real tiny-model runs through ``vlm2emb train`` (in process): a 4-step run, extended to 5 and
8 steps with ``train.resume_from=auto``, against an 8-step run trained from the start.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm2emb.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")
# The demo's cosine schedule with warmup_ratio 0.1: 4 steps have no warmup, 8 steps one.
# 64 rows (8 batches per epoch) keep the per-run data check short.
COMMON = ["train.batch_size=8", "train.log_steps=1", "data.eval=[]", "data.max_rows=[64]", "--no-progress"]
# The 4-step run's checkpointing keys (a resumed run keeps its recipe).
SAVES = ["train.save_steps=2", "train.save_total_limit=1"]


def _train(out: Path, *extra: str) -> int:
    return main(["train", RECIPE, f"output_dir={out}", *COMMON, *extra])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _records(out: Path) -> dict[int, dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A finished 4-step run (save_steps 2, save_total_limit 1) and an 8-step run from the start."""
    base = tmp_path_factory.mktemp("extend")
    four, eight = base / "four", base / "eight"
    assert _train(four, "train.max_steps=4", *SAVES) == 0
    assert _train(eight, "train.max_steps=8") == 0
    return {"four": four, "eight": eight}


def test_last_step_writes_a_resumable_checkpoint_within_save_total_limit(runs: dict[str, Path]) -> None:
    four = runs["four"]
    # step-2 was pruned by save_total_limit=1; the last step's checkpoint is the one kept.
    assert [p.name for p in (four / "checkpoints").iterdir()] == ["step-4"]
    last = four / "checkpoints" / "step-4"
    assert (last / "state" / "optimizer.safetensors").is_file() and (last / "manifest.json").is_file()
    assert json.loads((last / "trainer_state.json").read_text())["step"] == 4
    assert _same(_weights(last), _weights(four / "final"))  # the same step's weights
    # An 8-step run without save_steps still gets its last step's checkpoint.
    assert [p.name for p in (runs["eight"] / "checkpoints").iterdir()] == ["step-8"]


def test_save_final_checkpoint_false_writes_none(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert _train(out, "train.max_steps=2", "train.save_final_checkpoint=false") == 0
    assert (out / "final" / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()


def test_extension_follows_the_longer_schedule_from_the_resumed_step(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "four"
    shutil.copytree(runs["four"], out)
    eight = _records(runs["eight"])
    capsys.readouterr()
    assert _train(out, "train.max_steps=8", "train.resume_from=auto", *SAVES) == 0
    printed = capsys.readouterr().out
    (line,) = [x for x in printed.splitlines() if x.startswith("train.max_steps 4 -> 8")]
    # Step 5 trains at the 8-step schedule's rate: the lr the 8-step run logged at step 4.
    assert f"step 5 trains at lr {eight[4]['lr']:.3e}" in line
    assert "(the 4-step schedule: 0.000e+00)" in line  # cosine ends at 0
    assert "differs from a run with train.max_steps=8 from the start" in line
    got = _records(out)
    assert sorted(got) == list(range(1, 9))
    # From the resumed step on the rates are the 8-step run's; before it, the 4-step run's.
    assert [got[s]["lr"] for s in range(5, 9)] == [eight[s]["lr"] for s in range(5, 9)]
    assert all(got[s]["lr"] != eight[s]["lr"] for s in range(1, 5))
    assert "Resumed from" in printed and (out / "checkpoints" / "step-8").is_dir()
    assert json.loads((out / "final" / "trainer_state.json").read_text())["step"] == 8


def test_first_resumed_step_trains_at_the_new_rate(runs: dict[str, Path], tmp_path: Path) -> None:
    # The optimizer state of step 4 holds the 4-step schedule's next rate, 0. Had the
    # resumed step used it, the weights of step 5 would be those of step 4.
    out = tmp_path / "four"
    shutil.copytree(runs["four"], out)
    assert _train(out, "train.max_steps=5", "train.resume_from=auto", *SAVES) == 0
    assert not _same(_weights(out / "final"), _weights(runs["four"] / "final"))


def test_length_free_schedule_extends_to_exactly_the_longer_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flat = ["train.lr_scheduler=constant", "train.warmup_ratio=0"]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert _train(ref, "train.max_steps=6", *flat) == 0
    assert _train(out, "train.max_steps=3", *flat) == 0
    capsys.readouterr()
    assert _train(out, "train.max_steps=6", "train.resume_from=auto", *flat) == 0
    assert "continues exactly as a run with train.max_steps=6 from the start" in capsys.readouterr().out
    assert _same(_weights(out / "final"), _weights(ref / "final"))
    a, b = _records(ref), _records(out)
    assert [(a[s]["loss"], a[s]["lr"]) for s in a] == [(b[s]["loss"], b[s]["lr"]) for s in a]


def test_same_max_steps_is_a_no_op_and_fewer_is_an_error(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "four"
    shutil.copytree(runs["four"], out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _train(out, "train.max_steps=4", "train.resume_from=auto", *SAVES) == 0
    printed = capsys.readouterr()
    assert "Nothing to do" in printed.out and "raise train.max_steps" in printed.out, printed
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() - {out / "recipe.yaml"} == before.keys() - {out / "recipe.yaml"}
    assert all(after[p] == before[p] for p in before if p.name != "recipe.yaml")  # nothing rewritten

    # From Python: the finished run's summary, read back from its files.
    import vlm2emb

    train = {"batch_size": 8, "log_steps": 1, "max_steps": 4, "save_steps": 2, "save_total_limit": 1}
    summary = vlm2emb.train(
        RECIPE,
        output_dir=str(out),
        train={**train, "resume_from": "auto"},
        data={"eval": [], "max_rows": [64]},
        progress=False,
    )
    assert summary["steps"] == 4 and summary["epochs"] == 0.5 and summary["train_seconds"] == 0.0
    assert summary["final_loss"] == _records(out)[4]["loss"]

    code = _train(out, "train.max_steps=3", "train.resume_from=auto", *SAVES)
    printed = capsys.readouterr()
    assert code == 2 and "Traceback" not in printed.err
    (line,) = printed.err.strip().splitlines()
    assert "train.max_steps: 3, fewer than the 4 of the checkpoint" in line and "cannot be shortened" in line


def test_run_killed_before_final_writes_it_from_the_last_checkpoint(
    runs: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "four"
    shutil.copytree(runs["four"], out)
    shutil.rmtree(out / "final")  # killed after checkpoints/step-4, before final/
    assert _train(out, "train.max_steps=4", "train.resume_from=auto", *SAVES) == 0
    assert _same(_weights(out / "final"), _weights(runs["four"] / "final"))
    assert sorted(_records(out)) == [1, 2, 3, 4]


def test_num_epochs_run_extends_with_more_epochs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # 64 rows at batch 8: 8 steps per epoch; 0.5 epochs = 4 steps, 1 epoch = 8.
    out = tmp_path / "run"
    assert _train(out, "train.num_epochs=0.5") == 0
    capsys.readouterr()
    assert _train(out, "train.num_epochs=1", "train.resume_from=auto") == 0
    assert "train.max_steps 4 -> 8" in capsys.readouterr().out
    assert sorted(_records(out)) == list(range(1, 9))
    code = _train(out, "train.num_epochs=0.5", "train.resume_from=auto")
    printed = capsys.readouterr()
    assert code == 2 and "train.num_epochs: 0.5 epochs are 4 steps, fewer than the 8" in printed.err
