"""``vlm2emb.train(...)``: one training run from Python, the same run ``vlm2emb train`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm2emb.train.config import (
    ConfigError,
    RecipeConfig,
    normalise_recipe_data,
    override_steps,
    read_recipe_file,
    recipe_to_dict,
)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``a.b.c``; a mapping value merges into a section."""
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):  # absent, or "lora: true"
            child = {}
            node[part] = child
        node = child
    key = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(key), dict) and key != "loss_args":
        for sub, sub_value in value.items():
            _set(node, f"{key}.{sub}", sub_value)
    else:
        node[key] = value
    override_steps(data, dotted)


def build_recipe(
    recipe: str | Path | dict[str, Any] | RecipeConfig | None, overrides: dict[str, Any]
) -> RecipeConfig:
    """A validated recipe from a path, a mapping or a RecipeConfig, plus Python overrides.

    Args:
        recipe: A YAML file, a recipe mapping (as the YAML would hold), a
            :class:`RecipeConfig`, or None (all defaults).
        overrides: ``{"train.max_steps": 50}`` (dotted keys), or sections as mappings
            (``train={"max_steps": 50}``); applied in order, after the recipe.

    Raises:
        ConfigError: An unknown key or a bad value, named.
    """
    import copy

    from vlm2emb._typed_config import build_dataclass

    if isinstance(recipe, RecipeConfig):
        data = recipe_to_dict(recipe)
    elif isinstance(recipe, dict):
        data = copy.deepcopy(recipe)
    elif recipe is None:
        data = {}
    else:
        data = read_recipe_file(recipe)
    for key, value in overrides.items():
        _set(data, key, value)
    normalise_recipe_data(data)
    cfg = build_dataclass(RecipeConfig, data)
    cfg.validate()
    return cfg


def train(
    recipe: str | Path | dict[str, Any] | RecipeConfig | None = None,
    *,
    train_data: Any = None,
    eval_data: Any = None,
    callbacks: list[Any] | None = None,
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Trains an embedding model: the run ``vlm2emb train RECIPE key=value ...`` does.

    Example::

        import vlm2emb

        summary = vlm2emb.train(
            "recipes/demo.yaml",
            output_dir="runs/py",
            train={"num_epochs": 1, "report_to": "tensorboard"},
            train_data=[{"query": {"text": "a cat"}, "positive": {"image": "img/cat.png"}}, ...],
        )
        summary["eval"]["average"]["hit@1"], summary["epochs"]

    Args:
        recipe: A recipe YAML file, a recipe mapping, a :class:`RecipeConfig`, or None
            (the defaults; then ``train_data`` or ``data={"train": ...}`` is needed).
        train_data: In-memory training rows instead of ``data.train``: a list of row dicts
            (docs/data.md; media as paths, relative to the working directory or
            ``data.media_root``, or PIL images) or a ``datasets.Dataset`` (``Image``
            features included). Recorded in ``recipe.yaml`` as ``memory:train``.
        eval_data: In-memory evaluation rows instead of ``data.eval`` (same forms).
        callbacks: Objects with some of the hooks of
            :class:`vlm2emb.train.callbacks.TrainerCallback` (``on_step_end``,
            ``on_evaluate``, ``on_save``).
        progress: A progress bar on a terminal; False (or no terminal): a log line every
            ``train.log_steps`` steps.
        **overrides: Recipe keys: ``output_dir="runs/x"``, a section as a mapping
            (``train={"max_steps": 50}``), or dotted keys (``**{"train.max_steps": 50}``).

    Returns:
        The run summary: ``output_dir``, ``steps``, ``epochs`` (passes over the training
        rows), ``final_loss``, ``train_seconds``, ``eval_before`` and ``eval`` (the reports,
        or None without eval data).

    Raises:
        ConfigError: A bad recipe key or value (before anything is loaded).
        DataError: A bad row (before the model loads).
    """
    from vlm2emb.data.sources import register_memory_source, unregister_memory_source
    from vlm2emb.train.loop import train as run_training

    registered = []
    try:
        for side, rows in (("train", train_data), ("eval", eval_data)):
            if rows is None:
                continue
            if f"data.{side}" in overrides or side in (overrides.get("data") or {}):
                raise ConfigError(f"data.{side}: give {side}_data or data.{side}, not both")
            try:
                spec = register_memory_source(side, rows)
            except TypeError as exc:
                raise ConfigError(f"{side}_data: {exc}") from None
            registered.append(side)
            overrides[f"data.{side}"] = [spec]
        cfg = build_recipe(recipe, overrides)
        return run_training(cfg, progress=progress, callbacks=callbacks)
    finally:
        for side in registered:
            unregister_memory_source(side)


__all__ = ["build_recipe", "train"]
