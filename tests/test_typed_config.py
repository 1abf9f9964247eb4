"""The typed loader behind recipes and eval suites (vlm2emb._typed_config)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from vlm2emb._typed_config import ConfigError, build_dataclass
from vlm2emb.train.config import load_recipe

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"


@dataclass
class _Section:
    names: list[str] = field(default_factory=list)
    title: str = ""
    either: str | list[str] | None = None


@pytest.mark.parametrize(
    ("text", "quoted", "key"),
    [
        ("names: [cat, yes]", "names: [cat, 'yes']", "names[1]"),
        ("title: no", "title: 'no'", "title"),
        ("either: [on]", "either: ['on']", "either[0]"),
        ("either: off", "either: 'off'", "either"),
    ],
)
def test_yaml_booleans_are_not_strings(text, quoted, key):
    """YAML 1.1 reads yes/no/on/off as booleans: a string key refuses them by name rather
    than keeping "True" or "False"; quoted, they are the strings."""
    with pytest.raises(ConfigError, match="expected a string, got the boolean") as caught:
        build_dataclass(_Section, yaml.safe_load(text))
    assert str(caught.value).startswith(f"{key}: ")
    built = build_dataclass(_Section, yaml.safe_load(quoted))
    assert "True" not in repr(built) and "False" not in repr(built)
    assert any(word in repr(built) for word in ("'yes'", "'no'", "'on'", "'off'"))


def test_a_recipe_override_with_a_boolean_for_a_list_of_strings_is_refused():
    with pytest.raises(ConfigError, match=r"train.report_to\[0\]: expected a string, got the boolean true"):
        load_recipe(RECIPE, ["train.report_to=[true]"])
    assert load_recipe(RECIPE, ["train.report_to=[tensorboard]"]).train.report_to == ["tensorboard"]
