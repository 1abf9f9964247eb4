"""Console output: log lines for batch jobs (no terminal, or --no-progress), a bar on a terminal."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import sys
import termios
from pathlib import Path

import pytest

from vlm2emb.train.config import load_recipe
from vlm2emb.train.loop import log_line, train

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "demo.yaml"
TINY = ["train.max_steps=4", "train.log_steps=2", "train.batch_size=8", "data.eval=[]"]
LINE = re.compile(
    r"^step (\d+)/4 \(\d+%\) \| loss \d+\.\d{4} \| acc [01]\.\d{3} \| lr \d\.\d\de[-+]\d\d \| "
    r"[\d.]+ samples/s \| [\d,]+ tok/s \| ETA \d+:\d\d:\d\d$"
)


def test_without_a_terminal_each_record_is_one_log_line(tmp_path: Path, capsys) -> None:
    # pytest captures stderr (not a terminal): even with progress on, lines replace the bar.
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", *TINY])
    train(cfg, progress=True)
    captured = capsys.readouterr()
    steps = [int(m.group(1)) for line in captured.out.splitlines() if (m := LINE.match(line))]
    assert steps == [2, 4], captured.out
    assert "train:" not in captured.err  # no tqdm redraws in a log file


def test_on_a_terminal_the_bar_replaces_the_lines(tmp_path: Path, capsys, monkeypatch) -> None:
    master, slave = os.openpty()  # a real terminal for stderr, 24 x 120 (a new one is 0 x 0)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    terminal = os.fdopen(slave, "w", buffering=1)
    monkeypatch.setattr(sys, "stderr", terminal)
    cfg = load_recipe(RECIPE, [f"output_dir={tmp_path / 'run'}", *TINY])
    try:
        train(cfg, progress=True)
        terminal.flush()
        drawn = ""
        while select.select([master], [], [], 0.1)[0]:  # everything written so far
            drawn += os.read(master, 65536).decode(errors="replace")
    finally:
        terminal.close()
        os.close(master)
    assert "train:" in drawn and "4/4" in drawn
    assert not [line for line in capsys.readouterr().out.splitlines() if LINE.match(line)]


@pytest.mark.parametrize(
    ("record", "eta", "expected"),
    [
        (
            {
                "step": 20,
                "loss": 1.81234,
                "accuracy": 0.53125,
                "lr": 0.00197,
                "samples_per_s": 85.24,
                "tokens_per_s": 2710.4,
            },
            3725.4,
            "step 20/150 (13%) | loss 1.8123 | acc 0.531 | lr 1.97e-03 | 85.2 samples/s | 2,710 tok/s "
            "| ETA 1:02:05",
        ),
        (
            {
                "step": 150,
                "loss": float("nan"),
                "accuracy": float("nan"),
                "lr": 0.0,
                "samples_per_s": 1.0,
                "tokens_per_s": 10.0,
                "skipped_steps": 3,
            },
            0.0,
            "step 150/150 (100%) | loss nan | lr 0.00e+00 | 1.0 samples/s | 10 tok/s | ETA 0:00:00 "
            "| 3 skipped",
        ),
    ],
)
def test_log_line_format(record: dict, eta: float, expected: str) -> None:
    assert log_line(record, 150, eta) == expected
