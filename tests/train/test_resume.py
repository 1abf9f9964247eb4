"""Nothing lost: checkpoints, kill and resume, damaged checkpoints, reused output folders.

The resume tests kill a real `vlm2emb train` process with SIGKILL after it wrote a
checkpoint and resume it with `train.resume_from=auto`; the result must equal an
uninterrupted run bit for bit (weights and logged losses). Every training mode is resumed
so: two of them killed for real (a plain full fine-tune, and LoRA with dropout under
GradCache, the mode with the most state to restore), the others in this process from a
checkpoint an uninterrupted run wrote, which holds the same state (each process start costs
about 20 s on 2 cores, and the kill itself is the same for every mode).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm2emb.cli import main

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")
COMMON = ["train.batch_size=8", "train.log_steps=1", "data.eval=[]", "--no-progress"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env


def _cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlm2emb", "train", RECIPE, f"output_dir={out}", *COMMON, *extra]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _final(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of final/ (base weights and, with LoRA, the adapter)."""
    tensors = {}
    for f in sorted((out / "final").rglob("*.safetensors")):
        tensors |= {f"{f.relative_to(out)}:{k}": v for k, v in load_file(f).items()}
    return tensors


def _records(out: Path) -> list[dict]:
    def strict(name: str) -> float:
        raise ValueError(f"bare {name} in metrics.jsonl")

    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=strict) for line in lines]


def _assert_same_run(ref: Path, got: Path) -> None:
    a, b = _final(ref), _final(got)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"
    ra, rb = _records(ref), _records(got)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]  # no step logged twice
    assert [(r["loss"], r["lr"]) for r in rb] == [(r["loss"], r["lr"]) for r in ra]


MODES = {
    "full": [],
    "lora-dropout": ["model.lora.r=4", "model.lora.dropout=0.1"],
    "gradcache-lora-dropout": ["model.lora.r=4", "model.lora.dropout=0.1", "train.gradcache_chunk_size=3"],
    "gradcache-full": ["train.gradcache_chunk_size=3"],
    "dora-dropout": ["model.lora.r=4", "model.lora.dropout=0.1", "model.lora.use_dora=true"],
    "frozen-tower": ["model.freeze_vision=true"],
}
KILLED = ("full", "gradcache-lora-dropout")  # the rest: test_every_mode_resumes_bit_exact


@pytest.mark.slow
@pytest.mark.parametrize("mode", KILLED)
def test_killed_run_resumes_bit_exact(tmp_path: Path, mode: str) -> None:
    # 16 steps: after the kill at step 2 the run has 14 steps and 7 saves left, far more than
    # the few milliseconds the kill takes to land.
    steps = ["train.max_steps=16", "train.save_steps=2", "train.save_total_limit=2", *MODES[mode]]
    ref = tmp_path / "ref"
    _run(_cmd(ref, *steps))

    killed = tmp_path / "killed"
    for _attempt in range(3):  # the tiny model trains fast: make sure the kill lands before final/
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen(
            _cmd(killed, *steps), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(), cwd=REPO
        )
        deadline = time.time() + 300
        while (
            not (killed / "checkpoints" / "step-2").exists()
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not (killed / "final").exists():
            break
    assert not (killed / "final").exists(), "the run finished before it could be killed"

    resumed = _run([*_cmd(killed, *steps), "train.resume_from=auto"])
    assert "Resumed from" in resumed.stdout
    _assert_same_run(ref, killed)
    # save_total_limit=2 held across the kill; step-16 is the last step's checkpoint, and
    # nothing half-written is left.
    kept = sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert kept == ["step-14", "step-16"]
    assert not list((killed / "checkpoints").glob(".tmp-*"))
    assert (killed / "checkpoints" / "step-16" / "manifest.json").is_file()
    # Trainer state is safetensors and JSON only: nothing a resume would have to unpickle.
    pickled = [p for p in (killed / "checkpoints").rglob("*") if p.suffix in (".pkl", ".bin", ".pt", ".pth")]
    assert not pickled


# ----------------------------------------------------------------------- in-process runs
# One process, short runs: a reference run with checkpoints at steps 2 and 4, copied and
# damaged or replanted per test; resuming the copy must give the reference's final/.

IN_PROCESS = ["train.max_steps=6", "train.save_steps=2", "model.lora.r=4", "model.lora.dropout=0.1"]


def _train(out: Path, *extra: str) -> int:
    return main(["train", RECIPE, f"output_dir={out}", *COMMON, *IN_PROCESS, *extra])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    assert _train(out) == 0
    # step-6: the last step's checkpoint (train.save_final_checkpoint), beside save_steps' ones.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    return out


def _interrupted_copy(reference: Path, tmp_path: Path) -> Path:
    """The reference run as a kill after step 4 would leave it: no step-6, no final/, later log lines."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-6")
    return out


@pytest.mark.parametrize("mode", [m for m in MODES if m not in KILLED])
def test_every_mode_resumes_bit_exact(tmp_path: Path, mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each mode's state (dropout RNG, DoRA magnitudes, GradCache's chunk RNG, a frozen
    tower) restored from the step-4 checkpoint of an uninterrupted run gives its steps 5-6
    bit for bit: the state a killed run leaves (the kill is test_killed_run_resumes_bit_exact's)."""
    steps = ["train.max_steps=6", "train.save_steps=2", *MODES[mode]]

    def train(out: Path, *extra: str) -> int:
        return main(["train", RECIPE, f"output_dir={out}", *COMMON, *steps, *extra])

    ref = tmp_path / "ref"
    assert train(ref) == 0, capsys.readouterr().err
    out = _interrupted_copy(ref, tmp_path)
    assert train(out, "train.resume_from=auto") == 0, capsys.readouterr().err
    assert f"Resumed from {out / 'checkpoints' / 'step-4'} at step 4" in capsys.readouterr().out
    _assert_same_run(ref, out)


def _state_file(checkpoint: Path, kind: str) -> Path:
    """A state file by role (the names of this version, or accelerate's of older ones)."""
    patterns = {"model": "model.safetensors", "optimizer": "optimizer.*", "rng": "r*[-_]0.*"}
    (path,) = (checkpoint / "state").glob(patterns[kind])
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_resumed_log_holds_each_step_once(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted_copy(reference, tmp_path)  # metrics.jsonl has steps 1..6, checkpoint 4
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "lo')  # a line cut short by the kill
    assert _train(out, "train.resume_from=auto") == 0, capsys.readouterr().err
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5, 6]
    _assert_same_run(reference, out)


@pytest.mark.parametrize("damaged", ["model", "optimizer"])
def test_damaged_newest_checkpoint_falls_back_to_the_whole_one(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damaged: str
) -> None:
    out = _interrupted_copy(reference, tmp_path)
    bad = _state_file(out / "checkpoints" / "step-4", damaged)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated
    capsys.readouterr()
    assert _train(out, "train.resume_from=auto") == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad) in warnings[0], printed
    assert f"Resumed from {out / 'checkpoints' / 'step-2'} at step 2" in printed
    _assert_same_run(reference, out)


def test_damaged_checkpoint_given_by_path_is_a_one_line_error(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted_copy(reference, tmp_path)
    bad = _state_file(out / "checkpoints" / "step-4", "optimizer")
    bad.write_bytes(bad.read_bytes()[:100])
    line = _one_error_line(capsys, _train(out, f"train.resume_from={out / 'checkpoints' / 'step-4'}"))
    assert str(bad) in line and "truncated" in line
    assert bad.stat().st_size == 100  # the checkpoint is left as it was


def test_every_checkpoint_damaged_is_an_error(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted_copy(reference, tmp_path)
    for step in ("step-2", "step-4"):
        _state_file(out / "checkpoints" / step, "rng").unlink()
    line = _one_error_line(capsys, _train(out, "train.resume_from=auto"))
    assert "no whole checkpoint" in line and "rng-0.safetensors: missing" in line


def test_garbage_rng_state_is_an_error_not_silence(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted_copy(reference, tmp_path)
    rng = _state_file(out / "checkpoints" / "step-4", "rng")
    rng.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage}")
    if (out / "checkpoints" / "step-4" / "manifest.json").exists():
        from vlm2emb.train.state import write_manifest

        write_manifest(out / "checkpoints" / "step-4")  # consistent manifest: the load itself must refuse
    line = _one_error_line(capsys, _train(out, "train.resume_from=auto"))
    assert str(rng) in line and "unreadable" in line


def test_resume_never_unpickles_from_the_run_folder(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted_copy(reference, tmp_path)
    marker = tmp_path / "code-ran"

    class Planted:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    state = out / "checkpoints" / "step-4" / "state"
    # The names accelerate's save_state uses. custom_checkpoint_0.pkl (the LR scheduler) is
    # what accelerate loads with weights_only=False; the others are planted where absent.
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        if name == "custom_checkpoint_0.pkl" or not (state / name).exists():
            torch.save(Planted(), state / name)
    code = _train(out, "train.resume_from=auto")
    assert not marker.exists(), "a planted pickle ran code"
    assert code == 0, capsys.readouterr().err
    _assert_same_run(reference, out)


def test_reused_output_dir_is_refused_unless_overwritten(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    final = (out / "final" / "adapter" / "adapter_model.safetensors").read_bytes()
    line = _one_error_line(capsys, _train(out, "train.learning_rate=1e-3"))
    assert f"output_dir {out} holds another run" in line and "train.overwrite_output_dir=true" in line
    assert (out / "final" / "adapter" / "adapter_model.safetensors").read_bytes() == final  # untouched

    # Explicit overwrite: the other run's outputs go first, so none of it can be resumed.
    assert (
        _train(out, "train.learning_rate=1e-3", "train.save_steps=0", "train.overwrite_output_dir=true") == 0
    )
    # The other run's step-2 and step-4 are gone; step-6 is the new run's last-step checkpoint.
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-6"]
    assert (out / "final" / "adapter" / "adapter_model.safetensors").read_bytes() != final
    assert [r["step"] for r in _records(out)] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_another_recipe_and_names_the_keys(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _interrupted_copy(reference, tmp_path)
    code = _train(out, "train.resume_from=auto", "train.learning_rate=1e-3", "train.temperature=0.1")
    line = _one_error_line(capsys, code)
    assert "different recipe: train.learning_rate, train.temperature" in line
    assert "(train.learning_rate: 0.002 there, 0.001 now)" in line
    # A longer run is a resume key: it continues from step 4.
    assert _train(out, "train.resume_from=auto", "train.max_steps=8") == 0
    assert "Resumed from" in capsys.readouterr().out
    assert [r["step"] for r in _records(out)] == list(range(1, 9))


def test_non_finite_streak_writes_no_checkpoint_and_valid_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    # lr 1e6: the first step leaves finite but huge weights; from then on every step has a
    # non-finite loss or gradient and is skipped, so the weights stay finite and useless.
    # No warmup: transformers' warmup gives the first step a rate of 0.
    overrides = [
        "model.lora=false",
        "train.learning_rate=1e6",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
    ]
    code = _train(out, *overrides, "train.max_bad_steps=100")
    printed = capsys.readouterr()
    assert code == 2 and "Traceback" not in printed.err, printed.err
    assert "non-finite losses; final/ not written" in printed.err
    assert "step 2: checkpoint not saved" in printed.out and "step 4: checkpoint not saved" in printed.out
    assert not (out / "final").exists()
    assert not list(out.glob("checkpoints/step-*"))  # nothing resume=auto could pick
    records = _records(out)  # strict JSON: the NaN loss of a window of skipped steps is null
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[-1]["loss"] is None and records[-1]["skipped_steps"] == 5


def _edit_saved_recipes(out: Path, edit) -> None:
    """Applies ``edit`` to the train section of every checkpoint's saved recipe, keeping the
    checkpoints whole (their manifests rewritten)."""
    from vlm2emb.train.state import TRAINER_STATE, write_manifest

    for state in out.glob(f"checkpoints/*/{TRAINER_STATE}"):
        data = json.loads(state.read_text())
        edit(data["recipe"]["train"])
        state.write_text(json.dumps(data))
        write_manifest(state.parent)


def test_a_checkpoint_from_before_a_new_recipe_key_resumes(
    reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint written before a key existed (its saved recipe lacks the key) resumes
    when this run leaves the key at its default, and is refused, naming the key, when the
    run sets it otherwise. A key the saved recipe has and vlm2emb no longer knows is a
    one-line error naming the checkpoint."""
    out = _interrupted_copy(reference, tmp_path)
    _edit_saved_recipes(out, lambda train: train.pop("weight_decay"))  # as if it came later
    line = _one_error_line(capsys, _train(out, "train.resume_from=auto", "train.weight_decay=0.5"))
    assert "different recipe: train.weight_decay (train.weight_decay: 0.0 there, 0.5 now)" in line
    assert _train(out, "train.resume_from=auto") == 0
    assert "Resumed from" in capsys.readouterr().out

    out = _interrupted_copy(reference, tmp_path / "gone")
    _edit_saved_recipes(out, lambda train: train.update(retired_key=1))
    line = _one_error_line(capsys, _train(out, "train.resume_from=auto"))
    assert "its recipe does not load here" in line and "retired_key" in line
