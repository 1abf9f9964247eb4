"""Best-checkpoint tracking for evaluation during training (``train.eval_steps``).

The trainer evaluates every ``train.eval_steps`` steps and after the last step. Each report's
``average[train.metric_for_best]`` (the mean over tasks, higher is better) is compared with
the best so far; on a strict improvement the trainer saves the model to ``OUTPUT_DIR/best/``
and this module writes ``OUTPUT_DIR/best.json``::

    {"metric": "hit@1", "value": 0.93, "step": 120, "path": "best",
     "history": [{"step": 40, "value": 0.71}, {"step": 80, "value": 0.90}, ...]}

Ties keep the earlier checkpoint (fewer steps for the same score).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["BEST_DIR", "BEST_FILE", "BestTracker"]

BEST_DIR = "best"
BEST_FILE = "best.json"


class BestTracker:
    """Keeps the best evaluation score of a run and its history.

    Args:
        output_dir: The run's output folder.
        metric: Key of the report's ``average`` to maximise, e.g. ``hit@1``.
        resume: Continue from an existing ``best.json`` (a resumed run) instead of starting over.
    """

    def __init__(self, output_dir: str | Path, metric: str, *, resume: bool = False) -> None:
        self.path = Path(output_dir) / BEST_FILE
        self.metric = metric
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.history: list[dict[str, Any]] = []
        if resume and self.path.is_file():
            saved = json.loads(self.path.read_text())
            if saved.get("metric") == metric:
                self.best_value, self.best_step = saved["value"], saved["step"]
                self.history = list(saved.get("history", []))

    def update(self, step: int, report: dict[str, Any]) -> bool:
        """Records one evaluation; True when it beats every earlier one (save it as best)."""
        average = report["average"]
        if self.metric not in average:
            raise KeyError(
                f"train.metric_for_best: {self.metric!r} is not in the eval report ({', '.join(average)})"
            )
        value = float(average[self.metric])
        self.history.append({"step": step, "value": value})
        if self.best_value is not None and value <= self.best_value:
            return False
        self.best_value, self.best_step = value, step
        return True

    def write(self) -> Path:
        """Writes ``best.json`` (call on the main process after the model is saved)."""
        record = {
            "metric": self.metric,
            "value": self.best_value,
            "step": self.best_step,
            "path": BEST_DIR,
            "history": self.history,
        }
        self.path.write_text(json.dumps(record, indent=2) + "\n")
        return self.path
