"""Tests for vlm2emb.train.config: recipe loading, typed overrides and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm2emb.train.config import (
    ConfigError,
    LoraConfig,
    RecipeConfig,
    apply_override,
    load_recipe,
    recipe_to_dict,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# recipes/accelerate/ holds launch configs and recipes/study/ study files (tests/test_study.py).
RECIPES = sorted(
    p for p in (REPO_ROOT / "recipes").rglob("*.yaml") if not {"accelerate", "study"} & set(p.parts)
)
DEMO = REPO_ROOT / "recipes" / "demo.yaml"

# Enough for validate() to pass when no recipe file is given.
BASE = ("data.train=train.jsonl",)


def load(*overrides: str, path: Path | None = None) -> RecipeConfig:
    return load_recipe(path, [*BASE, *overrides])


def test_recipes_are_found() -> None:
    assert DEMO in RECIPES
    assert not any("accelerate" in p.parts for p in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_validates(recipe: Path) -> None:
    cfg = load_recipe(recipe)
    cfg.validate()
    assert cfg.data.train
    raw = yaml.safe_load(recipe.read_text())
    # Values written in the file survive (a key silently dropped would fall back to a default).
    for section in ("model", "data", "train"):
        for key, value in (raw.get(section) or {}).items():
            got = getattr(getattr(cfg, section), key)
            if isinstance(got, list) and not isinstance(value, list):
                value = [value]
            if key == "lora":
                value = None if value in (False, None) else LoraConfig(**({} if value is True else value))
            if isinstance(got, float):
                value = float(value)
            assert got == value, f"{recipe.name}: {section}.{key}"


def test_demo_recipe_values() -> None:
    cfg = load_recipe(DEMO)
    assert cfg.model.name_or_path == "tiny:qwen2_vl"
    assert cfg.model.lora is None
    assert cfg.data.train == ["demo:digits/train"]
    assert cfg.data.eval == ["demo:digits/eval"]
    assert cfg.train.learning_rate == pytest.approx(2e-3)
    assert isinstance(cfg.train.max_steps, int)


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("override", "full_key", "valid"),
    [
        ("epochs=3", "'epochs'", "output_dir, seed, model, data, train"),
        ("train.lr=1e-4", "'train.lr'", "learning_rate"),
        ("model.pool=mean", "'model.pool'", "pooling"),
        ("model.lora.rank=8", "'model.lora.rank'", "r, alpha, dropout, target_modules, use_dora"),
    ],
)
def test_unknown_keys_name_the_dotted_key(override: str, full_key: str, valid: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(override)
    msg = str(exc.value)
    assert f"unknown key {full_key}" in msg
    assert valid in msg.split("valid keys here:", 1)[1]


def test_unknown_key_in_a_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data:\n  train: a.jsonl\n  shuffle: true\n")
    with pytest.raises(ConfigError, match=r"unknown key 'data\.shuffle'; valid keys here: train, eval"):
        load_recipe(path)


# --------------------------------------------------------------------------- typed overrides


def test_learning_rate_is_a_float_even_without_a_dot() -> None:
    # PyYAML reads "1e-4" (no dot) as a string.
    assert isinstance(yaml.safe_load("1e-4"), str)
    cfg = load("train.learning_rate=1e-4")
    assert isinstance(cfg.train.learning_rate, float)
    assert cfg.train.learning_rate == pytest.approx(1e-4)


def test_learning_rate_from_yaml_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("data: {train: a.jsonl}\ntrain:\n  learning_rate: 3e-5\n  temperature: 1\n")
    cfg = load_recipe(path)
    assert cfg.train.learning_rate == pytest.approx(3e-5)
    assert isinstance(cfg.train.temperature, float)


def test_int_override() -> None:
    cfg = load("train.max_steps=5", "seed=7")
    assert cfg.train.max_steps == 5
    assert type(cfg.train.max_steps) is int
    assert cfg.seed == 7


def test_lora_true_gives_defaults() -> None:
    cfg = load("model.lora=true")
    assert cfg.model.lora == LoraConfig()
    assert (cfg.model.lora.r, cfg.model.lora.alpha) == (16, 64)


def test_lora_r_turns_lora_on() -> None:
    cfg = load("model.lora.r=8")
    assert cfg.model.lora is not None
    assert cfg.model.lora.r == 8
    assert cfg.model.lora.alpha == 64
    # Also when the recipe file says "lora: false" ...
    cfg = load_recipe(DEMO, ["model.lora.r=8"])
    assert cfg.model.lora == LoraConfig(r=8)
    # ... and when an earlier override said "true".
    cfg = load("model.lora=true", "model.lora.r=8", "model.lora.alpha=32")
    assert cfg.model.lora == LoraConfig(r=8, alpha=32)


def test_lora_r_keeps_lora_true_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model:\n  lora: true\ndata:\n  train: a.jsonl\n")
    assert load_recipe(path).model.lora == LoraConfig()
    assert load_recipe(path, ["model.lora.r=4"]).model.lora == LoraConfig(r=4)


def test_lora_false_is_none() -> None:
    assert load("model.lora=false").model.lora is None
    assert load("model.lora=true", "model.lora=false").model.lora is None


def test_lora_target_modules_list() -> None:
    cfg = load("model.lora.target_modules=[q_proj,v_proj]")
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_data_lists() -> None:
    assert load_recipe(None, ["data.train=a.jsonl"]).data.train == ["a.jsonl"]
    assert load_recipe(None, ["data.train=[a.jsonl,b.jsonl]"]).data.train == ["a.jsonl", "b.jsonl"]
    assert load_recipe(None, ["data.train=a.jsonl,b.jsonl"]).data.train == ["a.jsonl", "b.jsonl"]
    assert load_recipe(DEMO, ["data.eval=[]"]).data.eval == []


def test_optional_values_accept_null() -> None:
    cfg = load("data.max_negatives=3", "data.query_instruction=Find it.")
    assert cfg.data.max_negatives == 3
    assert cfg.data.query_instruction == "Find it."
    cfg = load("data.max_negatives=null", "model.attn_implementation=none")
    assert cfg.data.max_negatives is None
    assert cfg.model.attn_implementation is None


def test_override_value_keeps_equals_signs() -> None:
    cfg = load("data.query_instruction=a=b")
    assert cfg.data.query_instruction == "a=b"


def test_bool_override() -> None:
    assert load("model.normalize=false").model.normalize is False
    assert load("model.normalize=yes").model.normalize is True
    # YAML reads "=1" / "=0" as integers; they still mean true / false here.
    assert load("train.eval_before=0").train.eval_before is False
    assert load("train.eval_before=1").train.eval_before is True
    with pytest.raises(ConfigError, match=r"train\.eval_before: expected true or false, got 2"):
        load("train.eval_before=2")


def test_override_text_with_colon_stays_text() -> None:
    assert load("data.query_instruction=Find: the image.").data.query_instruction == "Find: the image."


def test_lora_target_modules_regex_string() -> None:
    cfg = load(r"model.lora.target_modules=.*language_model.*\.(q_proj|v_proj)")
    assert cfg.model.lora.target_modules == r".*language_model.*\.(q_proj|v_proj)"
    assert load("model.dtype=auto").model.dtype == "auto"


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("train.max_steps=abc", "train.max_steps", "expected an integer"),
        ("train.max_steps=1.5", "train.max_steps", "expected an integer"),
        ("train.max_steps=true", "train.max_steps", "expected an integer"),
        ("model.normalize=maybe", "model.normalize", "expected true or false"),
        ("train.learning_rate=fast", "train.learning_rate", "expected a number"),
        ("model.pooling=[a,b]", "model.pooling", "expected a string"),
        ("model=big", "model", "expected a mapping"),
        ("seed=null", "seed", "must not be null"),
    ],
)
def test_wrong_types_name_the_key(override: str, key: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(override)
    msg = str(exc.value)
    assert msg.startswith(f"{key}: "), msg
    assert expected in msg


# --------------------------------------------------------------------------- validate()


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("model.pooling=foo",), r"model\.pooling: 'foo' is not one of"),
        (("model.attention=sideways",), r"model\.attention"),
        (("train.precision=fp8",), r"train\.precision"),
        (("train.batch_size=1",), r"train\.batch_size: contrastive training needs at least 2"),
        (("train.batch_size=0",), r"train\.batch_size: must be > 0"),
        (("train.save_steps=-5",), r"train\.save_steps: must be >= 0, got -5"),
        (("train.warmup_ratio=1",), r"train\.warmup_ratio"),
        (("train.temperature=0",), r"train\.temperature: must be > 0"),
        (("train.log_steps=0",), r"train\.log_steps: must be > 0"),
        (("data.max_negatives=-1",), r"data\.max_negatives: must be >= 0"),
        (("data.num_workers=-2",), r"data\.num_workers: must be >= 0"),
        (("model.lora.r=0",), r"model\.lora\.r: must be > 0"),
        (("model.lora.dropout=1.5",), r"model\.lora\.dropout: must be in \[0, 1\)"),
        (("model.dtype=int8",), r"model\.dtype: 'int8' is not one of"),
        # NaN passed every "<= 0" check; negative rates and decay were not checked at all.
        (("train.learning_rate=-1e-4",), r"train\.learning_rate: must be > 0, got -0\.0001"),
        (("train.learning_rate=0",), r"train\.learning_rate: must be > 0"),
        (("train.learning_rate=nan",), r"train\.learning_rate: must be a finite number, got nan"),
        (("train.learning_rate=inf",), r"train\.learning_rate: must be a finite number"),
        (("train.weight_decay=-0.1",), r"train\.weight_decay: must be >= 0, got -0\.1"),
        (("train.weight_decay=nan",), r"train\.weight_decay: must be a finite number, got nan"),
        (("train.temperature=nan",), r"train\.temperature: must be a finite number"),
        (("train.max_grad_norm=nan",), r"train\.max_grad_norm: must be a finite number"),
        (("model.lora.dropout=nan",), r"model\.lora\.dropout: must be a finite number"),
        (
            ("train.matryoshka_weights=[1.0, nan]", "train.matryoshka_dims=[4, 8]"),
            r"train\.matryoshka_weights",
        ),
    ],
)
def test_validate_errors(overrides: tuple[str, ...], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(*overrides)


def test_missing_training_data() -> None:
    with pytest.raises(ConfigError, match=r"data\.train: no training data"):
        load_recipe(None)
    with pytest.raises(ConfigError, match=r"data\.train"):
        load_recipe(DEMO, ["data.train=[]"])


def test_valid_config_passes() -> None:
    cfg = load("model.pooling=mean", "train.batch_size=2", "train.save_steps=0")
    assert cfg.model.pooling == "mean"
    assert cfg.train.batch_size == 2


# --------------------------------------------------------------------------- files


def test_missing_recipe_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="recipe not found") as exc:
        load_recipe(missing)
    assert str(missing) in str(exc.value)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  pooling: [last\ndata: {train: a.jsonl}\n")
    with pytest.raises(ConfigError, match="invalid YAML") as exc:
        load_recipe(path)
    assert str(exc.value).startswith(f"{path}: ")
    assert "\n" not in str(exc.value)


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping") as exc:
        load_recipe(path)
    assert str(path) in str(exc.value)


def test_empty_recipe_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    cfg = load_recipe(path, ["data.train=a.jsonl"])
    assert cfg == load_recipe(None, ["data.train=a.jsonl"])


@pytest.mark.parametrize("override", ["train.max_steps", "=5"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ConfigError, match="override"):
        load(override)


def test_apply_override_builds_nested_mappings() -> None:
    data: dict = {"model": {"lora": False}}
    apply_override(data, "model.lora.r=8")
    apply_override(data, "train.max_steps=5")
    assert data == {"model": {"lora": {"r": 8}}, "train": {"max_steps": 5}}


def test_recipe_to_dict_round_trips(tmp_path: Path) -> None:
    cfg = load_recipe(
        DEMO,
        [
            "model.lora.r=8",
            "model.lora.target_modules=[q_proj]",
            "data.eval=[a.jsonl,b.jsonl]",
            "data.max_negatives=2",
            "train.learning_rate=1e-5",
            "output_dir=runs/x",
        ],
    )
    data = recipe_to_dict(cfg)
    assert data["model"]["lora"]["r"] == 8
    assert data["train"]["learning_rate"] == pytest.approx(1e-5)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    again = load_recipe(path)
    assert again == cfg
    assert recipe_to_dict(again) == data
    # LoRA off round-trips too.
    cfg_off = load_recipe(DEMO)
    path.write_text(yaml.safe_dump(recipe_to_dict(cfg_off)))
    assert load_recipe(path) == cfg_off


def test_mmeb_negatives_key() -> None:
    base = ["data.train=demo:digits/train"]
    assert load_recipe(None, base).data.mmeb_negatives is True  # vlm2emb trains on them
    assert load_recipe(None, [*base, "data.mmeb_negatives=false"]).data.mmeb_negatives is False
    with pytest.raises(ConfigError, match=r"data\.mmeb_negatives"):
        load_recipe(None, [*base, "data.mmeb_negatives=maybe"])


def test_the_vlm2vec_reproduction_recipe_matches_vlm2vec() -> None:
    cfg = load_recipe(Path(__file__).parents[2] / "recipes" / "qwen2_vl" / "2b_lora.yaml")
    assert cfg.data.mmeb_negatives is False  # VLM2Vec's collators drop MMEB's negatives
    assert cfg.model.prompt_style == "vlm2vec"  # and its backbone sees VLM2Vec's tokens
