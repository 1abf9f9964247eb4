"""The study file: a typed dataclass read from YAML (unknown keys are errors).

Example (``recipes/study/tiny.yaml``)::

    recipe: ../demo.yaml              # the one training recipe every run shares
    overrides: [data.train=demo:study/train, data.eval=demo:study/eval]
    suite: demo:study/suite           # a suite file, a bundled suite name or demo:study/suite
    seeds: [0, 1, 2]
    backbones:
      - {name: ar, kind: autoregressive, overrides: [model.name_or_path=tiny:qwen2_vl]}
      - {name: diffusion, kind: diffusion, overrides: [model.name_or_path=tiny:diffusion_gemma]}
    data_efficiency: {fractions: [0.1, 0.3, 1.0], metric: hit@1}

A backbone differs from the others only by its recipe overrides, so the same study runs on
tiny backbones and on real checkpoints by changing those lines.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm2emb._typed_config import ConfigError, build_dataclass

__all__ = [
    "BACKBONE_KINDS",
    "StudyAnalysis",
    "StudyBackbone",
    "StudyConfig",
    "StudyDataEfficiency",
    "load_study",
]

# The two sides the seed paper compares; figures and the summary group backbones by them.
BACKBONE_KINDS = ("autoregressive", "diffusion")
# Backbone names become folder names and figure labels.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class StudyBackbone:
    """One backbone of the study.

    Attributes:
        name: Label in figures and tables, and the folder ``runs/NAME/``.
        kind: ``autoregressive`` or ``diffusion``.
        overrides: Recipe ``key=value`` overrides that make the shared recipe this
            backbone's (``model.name_or_path=...``, pooling, attention, LoRA, ...).
    """

    name: str
    kind: str
    overrides: list[str] = field(default_factory=list)


@dataclass
class StudyDataEfficiency:
    """The data-efficiency curves.

    Attributes:
        fractions: Fractions of the training rows (1.0 is always run: its model is the one
            the suite evaluates).
        metric: The ``data.eval`` average (a metric name) each point plots.
        on_suite: Also evaluate every fraction's model on the study's suite, for curves per
            meta-task (``data_efficiency_meta_tasks.png``); costs one suite evaluation per
            fraction below 1.0.
    """

    fractions: list[float] = field(default_factory=lambda: [1.0])
    metric: str = "hit@1"
    on_suite: bool = False


@dataclass
class StudyAnalysis:
    """The embedding-space analysis of each run (modality gap, t-SNE of query-target pairs).

    Attributes:
        max_rows_per_task: Rows taken from each local task of the suite (the first ones).
        max_points: Pairs drawn in the projection figure.
        seed: Seed of the projection's sample and of t-SNE.
    """

    max_rows_per_task: int = 100
    max_points: int = 200
    seed: int = 0


@dataclass
class StudyConfig:
    """A study file (``vlm2emb study STUDY.yaml``).

    Attributes:
        recipe: The training recipe every run shares, relative to the study file.
        suite: The eval suite: a file (relative to the study file), a bundled suite name
            (``mmeb-v1``) or ``demo:study/suite`` (the digits study suite).
        backbones: The backbones compared, each a set of recipe overrides.
        seeds: One run per backbone and seed; the summary gives mean and spread over seeds.
        output_dir: Where everything is written.
        overrides: Recipe overrides applied to every run (before each backbone's).
        data_root: Data folder of a bundled suite (``vlm2emb eval --data-root``).
        eval_batch_size: Encoding batch size of the suite and the analysis.
        data_efficiency: The data-efficiency section.
        analysis: The embedding-space analysis section.
    """

    recipe: str
    suite: str
    backbones: list[StudyBackbone]
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "runs/study"
    overrides: list[str] = field(default_factory=list)
    data_root: str | None = None
    eval_batch_size: int = 32
    data_efficiency: StudyDataEfficiency = field(default_factory=StudyDataEfficiency)
    analysis: StudyAnalysis = field(default_factory=StudyAnalysis)

    def validate(self, where: str = "study") -> None:
        """Value checks the types do not express; raises ConfigError naming the key."""
        from vlm2emb.eval.metrics import metric_names

        if not self.backbones:
            raise ConfigError(f"{where}: backbones: list at least one backbone")
        seen: set[str] = set()
        for i, b in enumerate(self.backbones):
            key = f"{where}: backbones[{i}]"
            if not _NAME.match(b.name):
                raise ConfigError(f"{key}.name: {b.name!r} must be letters, digits, '.', '_' or '-'")
            if b.name in seen:
                raise ConfigError(f"{key}.name: duplicate backbone name {b.name!r}")
            seen.add(b.name)
            if b.kind not in BACKBONE_KINDS:
                raise ConfigError(f"{key}.kind: {b.kind!r} is not one of {', '.join(BACKBONE_KINDS)}")
            _check_overrides(f"{key}.overrides", b.overrides)
        _check_overrides(f"{where}: overrides", self.overrides)
        if not self.seeds:
            raise ConfigError(f"{where}: seeds: give at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"{where}: seeds: {self.seeds} repeats a seed")
        for f in self.data_efficiency.fractions:
            if not (math.isfinite(f) and 0 < f <= 1):
                raise ConfigError(f"{where}: data_efficiency.fractions: {f} is not in (0, 1]")
        valid = metric_names((1, 5, 10))
        if self.data_efficiency.metric not in valid:
            raise ConfigError(
                f"{where}: data_efficiency.metric: {self.data_efficiency.metric!r} is not one of {', '.join(valid)}"
            )
        for key in ("max_rows_per_task", "max_points"):
            if getattr(self.analysis, key) < 2:
                raise ConfigError(f"{where}: analysis.{key}: must be at least 2")
        if self.eval_batch_size < 1:
            raise ConfigError(f"{where}: eval_batch_size: must be at least 1")

    @property
    def fractions(self) -> list[float]:
        """The data-efficiency fractions, with 1.0 (the full run) always among them."""
        return sorted(set(self.data_efficiency.fractions) | {1.0})


def _check_overrides(key: str, overrides: list[str]) -> None:
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"{key}: {o!r} is not key=value")
        if o.split("=", 1)[0].strip() in ("seed", "output_dir"):
            raise ConfigError(f"{key}: {o!r}: the study sets seed and output_dir of every run")


def load_study(path: str | Path) -> StudyConfig:
    """Reads and validates a study file; ``recipe`` and a suite file become absolute paths.

    Raises:
        ConfigError: Missing or unreadable file, unknown key or bad value, naming it.
    """
    p = Path(path)
    try:
        raw: Any = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{p}: study file not found") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read the study file ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: a study file must be a YAML mapping")
    try:
        cfg = build_dataclass(StudyConfig, raw)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    cfg.validate(str(p))
    base = p.resolve().parent
    cfg.recipe = str(base / cfg.recipe)
    if not Path(cfg.recipe).is_file():
        raise ConfigError(f"{p}: recipe: {cfg.recipe} not found")
    # A suite names a file next to the study, else a bundled suite (load_suite decides).
    if not cfg.suite.startswith("demo:") and (base / cfg.suite).is_file():
        cfg.suite = str(base / cfg.suite)
    return cfg
