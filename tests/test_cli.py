"""Tests for the ``vlm2emb`` command line (run in-process through ``vlm2emb.cli.main``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vlm2emb.cli import main
from vlm2emb.data.schema import DataError
from vlm2emb.train.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_RECIPE = str(REPO_ROOT / "recipes" / "demo.yaml")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def train_file(tmp_path: Path) -> Path:
    rows = [{"query": f"question {i}", "positive": f"answer {i}"} for i in range(4)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


@pytest.fixture
def eval_file(tmp_path: Path) -> Path:
    rows = [
        {
            "query": {"text": "a handwritten digit seven"},
            "candidates": [{"text": "seven"}, {"text": "one"}, {"text": "three"}],
            "positive": 0,
            "task": "toy-words",
        },
        {"query": "the quick brown fox", "candidates": ["fox", "dog"], "positive": 0, "task": "toy-words"},
        {
            "query": "a red chair",
            "candidates": ["cat", "chair", "window"],
            "positive": 1,
            "task": "toy-words",
        },
    ]
    return write_jsonl(tmp_path / "eval.jsonl", rows)


def user_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Runs argv, checks the user-error contract and returns the one stderr line."""
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err
    assert "Traceback" not in captured.out
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("vlm2emb: error: ")
    return lines[0]


# --------------------------------------------------------------------------- help


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["eval", "--help"],
        ["demo-data", "--help"],
        ["analyze", "--help"],
        ["data-efficiency", "--help"],
        ["data", "make-eval", "--help"],
    ],
)
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlm2emb")
    if argv[0] != "--help":
        assert f"vlm2emb {argv[0]}" in out


def test_no_command_prints_help_and_returns_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: vlm2emb" in out
    for command in ("train", "eval", "demo-data"):
        assert command in out


def test_argparse_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--data", "x.jsonl"])  # --model is required
    assert exc.value.code == 2
    assert "--model" in capsys.readouterr().err


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vlm2emb", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: vlm2emb" in proc.stdout
    assert "demo-data" in proc.stdout


# --------------------------------------------------------------------------- user errors


def test_missing_recipe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    line = user_error(capsys, ["train", str(missing)])
    assert "recipe not found" in line
    assert str(missing) in line


def test_unknown_recipe_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(capsys, ["train", DEMO_RECIPE, "train.lr=1e-4", f"output_dir={tmp_path / 'run'}"])
    assert "unknown key 'train.lr'" in line
    assert "learning_rate" in line
    assert not (tmp_path / "run").exists()  # stopped before anything was written


def test_bad_override_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = user_error(capsys, ["train", DEMO_RECIPE, "train.max_steps=abc", f"output_dir={tmp_path}"])
    assert "train.max_steps" in line


def test_missing_data_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", DEMO_RECIPE, "data.train=/nonexistent.jsonl", f"output_dir={tmp_path / 'run'}"]
    line = user_error(capsys, argv)
    assert line == "vlm2emb: error: data file not found: /nonexistent.jsonl"


def test_malformed_json_line_in_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a", "positive": "b"}\n{"query": "c", "positive": \n')
    argv = ["train", DEMO_RECIPE, f"data.train={bad}", "data.eval=[]", f"output_dir={tmp_path / 'run'}"]
    line = user_error(capsys, argv)
    assert f"{bad}:2:" in line
    assert "malformed JSON" in line


def test_missing_model_path_for_eval(
    tmp_path: Path, eval_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-model"
    line = user_error(capsys, ["eval", "--model", str(missing), "--data", str(eval_file)])
    assert "model path not found" in line
    assert str(missing) in line


def test_bad_eval_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = write_jsonl(tmp_path / "ev.jsonl", [{"query": "q", "candidates": ["a"], "positive": 3}])
    line = user_error(capsys, ["eval", "--model", "tiny:qwen2_vl", "--data", str(bad)])
    assert f"{bad}:1:" in line
    assert "out of range" in line


def test_unknown_backbone(tmp_path: Path, train_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "train",
        DEMO_RECIPE,
        "model.name_or_path=tiny:nope",
        f"data.train={train_file}",
        "data.eval=[]",
        "train.batch_size=2",
        f"output_dir={tmp_path / 'run'}",
        "--no-progress",
    ]
    line = user_error(capsys, argv)
    assert "'nope'" in line
    assert "qwen2_vl" in line  # lists what is supported
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("position", ["before", "after"])
def test_debug_propagates_the_exception(tmp_path: Path, position: str) -> None:
    missing = str(tmp_path / "missing.yaml")
    argv = ["--debug", "train", missing] if position == "before" else ["train", missing, "--debug"]
    with pytest.raises(ConfigError, match="recipe not found"):
        main(argv)


def test_debug_propagates_data_errors(tmp_path: Path) -> None:
    argv = ["--debug", "train", DEMO_RECIPE, "data.train=/nonexistent.jsonl", f"output_dir={tmp_path}"]
    with pytest.raises(DataError, match="data file not found"):
        main(argv)


# --------------------------------------------------------------------------- commands


def test_eval_tiny_model(tmp_path: Path, eval_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "r.json"
    code = main(["eval", "--model", "tiny:qwen2_vl", "--data", str(eval_file), "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "toy-words" in captured.out
    assert "average" in captured.out
    assert "hit@1" in captured.out
    report = json.loads(out.read_text())
    assert set(report) == {"tasks", "average", "cache"}
    assert report["cache"]["misses"] == 2 and report["cache"]["hits"] == 0  # queries, candidates
    assert set(report["tasks"]) == {"toy-words"}
    task = report["tasks"]["toy-words"]
    assert task["n"] == 3
    assert 0.0 <= task["hit@1"] <= 1.0
    # With 3 queries hit@1 is a multiple of 1/3.
    assert task["hit@1"] * 3 == pytest.approx(round(task["hit@1"] * 3))
    assert report["average"]["hit@1"] == pytest.approx(task["hit@1"])
    assert report["average"]["n_tasks"] == 1


def test_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo-data", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "train.jsonl") in printed
    assert (out / "train.jsonl").is_file()
    assert (out / "eval.jsonl").is_file()
    assert len(list((out / "images").glob("*.png"))) == 1797


def test_overrides_may_follow_options_and_eval_uses_the_query_instruction(
    tmp_path: Path, train_file: Path, eval_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["train", DEMO_RECIPE, "--no-progress", f"output_dir={out}", f"data.train={train_file}"]
    argv += [f"data.eval={eval_file}", "train.max_steps=2", "train.batch_size=2", "train.eval_before=0"]
    argv += ["data.query_instruction=Find: the answer."]
    assert main(argv) == 0, capsys.readouterr().err
    assert not (out / "eval_before.json").exists()  # eval_before=0 read as false
    assert (out / "final" / "model.safetensors").is_file()
    saved = json.loads((out / "final" / "vlm2emb_config.json").read_text())
    assert saved["query_instruction"] == "Find: the answer."  # ": " kept as text
    # `vlm2emb eval` on the trained model defaults to its query instruction: same numbers as
    # the training run's own eval; another instruction changes the scores.
    train_report = json.loads((out / "eval.json").read_text())
    report_file = tmp_path / "r.json"
    assert (
        main(["eval", "--model", str(out / "final"), "--data", str(eval_file), "--out", str(report_file)])
        == 0
    )
    cli_report = json.loads(report_file.read_text())
    assert {k: cli_report[k] for k in ("tasks", "average")} == train_report
    other = tmp_path / "other.json"
    argv = ["eval", "--model", str(out / "final"), "--data", str(eval_file), "--out", str(other)]
    assert main([*argv, "--query-instruction", "Something else entirely."]) == 0
    assert (
        json.loads(other.read_text())["tasks"]["toy-words"]["mrr"]
        != train_report["tasks"]["toy-words"]["mrr"]
    )
    # A rerun into the same folder needs train.overwrite_output_dir (else it is refused) and
    # starts a fresh metrics log instead of appending.
    rerun = ["train", DEMO_RECIPE, f"output_dir={out}", f"data.train={train_file}", "data.eval=[]"]
    rerun += ["train.max_steps=2", "train.batch_size=2", "--no-progress"]
    assert "train.overwrite_output_dir=true" in user_error(capsys, rerun)
    assert main([*rerun, "train.overwrite_output_dir=true"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2]  # one run's single log step, no eval record


def test_version_flag_prints_the_installed_version(capsys):
    import importlib.metadata

    import vlm2emb
    from vlm2emb.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"vlm2emb {vlm2emb.__version__}"
    assert vlm2emb.__version__ == importlib.metadata.version("vlm2emb")


def test_train_without_a_recipe_prints_its_usage(capsys):
    from vlm2emb.cli import main

    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: vlm2emb train")
    assert "a recipe YAML file is required" in err
    assert "key=value required" not in err and "arguments are required" not in err
