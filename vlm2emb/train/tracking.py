"""Experiment tracking (``train.report_to``) through accelerate's trackers.

accelerate already speaks to TensorBoard, Weights & Biases, MLflow and Trackio; this module
only checks the recipe's choice early, turns the recipe into a flat run config, and keeps
the tracker packages out of every import: they are optional extras
(``pip install "vlm2emb[tensorboard]"``) and are imported by accelerate when a run starts.

Where each one writes (docs/training.md):
    tensorboard   OUTPUT_DIR/logs/<project>/ (event files)
    wandb         OUTPUT_DIR/wandb/ (WANDB_MODE=offline keeps it on disk)
    mlflow        wherever MLFLOW_TRACKING_URI points (mlflow's own default otherwise)
    trackio       trackio's local database (~/.cache/huggingface/trackio)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from vlm2emb._typed_config import ConfigError

# Recipe name -> (import name accelerate looks for, the vlm2emb extra that installs it).
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "vlm2emb"  # project (wandb), experiment (mlflow) and TensorBoard sub-folder name


def normalize_report_to(values: list[str]) -> list[str]:
    """The recipe's tracker names, lower-cased, without ``none`` and duplicates.

    Raises:
        ConfigError: A name that is not a supported tracker.
    """
    out: list[str] = []
    for value in values:
        name = value.strip().lower()
        if name in ("", "none"):
            continue
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: {value!r} is not one of {', '.join(TRACKERS)} (or none)")
        if name not in out:
            out.append(name)
    return out


def check_installed(names: list[str]) -> None:
    """Fails before any model loads when a chosen tracker's package is missing.

    Raises:
        ConfigError: Naming the tracker and the extra that installs it.
    """
    for name in names:
        module, extra = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f'train.report_to: {name} is not installed; pip install "vlm2emb[{extra}]"')


def accelerator_kwargs(report_to: list[str], output_dir: str | Path) -> dict[str, Any]:
    """``Accelerator(...)`` keyword arguments that enable the trackers (empty when none)."""
    if not report_to:
        return {}
    from accelerate.utils import ProjectConfiguration

    out = Path(output_dir)
    return {
        "log_with": list(report_to),
        "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    }


def init_kwargs(report_to: list[str], output_dir: str | Path, run_name: str) -> dict[str, dict[str, Any]]:
    """Per-tracker ``init_trackers`` arguments: the run's name, and wandb's files in output_dir."""
    kwargs: dict[str, dict[str, Any]] = {}
    if "wandb" in report_to:
        kwargs["wandb"] = {"name": run_name, "dir": str(output_dir)}
    if "mlflow" in report_to:
        kwargs["mlflow"] = {"run_name": run_name}
    if "trackio" in report_to:
        kwargs["trackio"] = {"name": run_name}
    return kwargs


def project_name() -> str:
    """The project every tracker files the run under (``WANDB_PROJECT`` when set)."""
    return os.environ.get("WANDB_PROJECT") or PROJECT


def run_config(recipe: dict[str, Any]) -> dict[str, bool | int | float | str]:
    """The recipe as flat ``section.key`` scalars: what every tracker accepts as a run config.

    TensorBoard's hparams and MLflow's params take scalars only, so lists, mappings and
    None are written as their string forms.
    """
    flat: dict[str, bool | int | float | str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}.{key}" if prefix else str(key))
            return
        if isinstance(node, (bool, int, float, str)):
            flat[prefix] = node
        else:
            flat[prefix] = str(node)  # None, [], {} and lists

    walk(recipe, "")
    return flat


def metric_name(key: str) -> str:
    """A metric's name as every tracker accepts it: ``hit@1`` -> ``hit_at_1``.

    MLflow refuses ``@`` in metric names; the same name is sent to every tracker, so that
    runs compare across them.
    """
    return key.replace("@", "_at_")


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics record, nested keys joined by ``/`` (``eval/hit_at_1``)."""
    import math

    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}/{metric_name(str(key))}" if prefix else metric_name(str(key))
        if isinstance(value, dict):
            out |= scalars(value, name)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out
