"""The backbone registry: one registration per family, clashes refused, lazy lookups.

Families added here are registered from fixtures (:func:`vlm2emb.testing.registered_backbone`)
and removed afterwards; no test changes the registry at import.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from vlm2emb.backbones import (
    available_families,
    get_adapter_class,
    register_backbone,
    registry,
    unregister_backbone,
)
from vlm2emb.backbones.lora_targets import LANGUAGE_MODEL_PROJECTIONS
from vlm2emb.backbones.paligemma import PaliGemmaAdapter
from vlm2emb.testing import registered_backbone

# Each family's default LoRA target regex as it was written out in the family files before
# the shared patterns of vlm2emb/backbones/lora_targets.py replaced the copies.
_LM = r".*language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
_TEXT = r".*text_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"
_QWEN = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
OLD_LORA_TARGETS = {
    "diffusion_gemma": r"encoder\.language_model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))",
    "gemma3": _LM,
    "idefics3": _TEXT,
    "internvl": _LM,
    "llava": _LM,
    "llava_next": _LM,
    "llava_onevision": _LM,
    "masked_diffusion": r".*(language_model|transformer\.blocks|model\.layers).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|attn_out|ff_proj|ff_out)",
    "paligemma": _LM,
    "qwen2_5_vl": _QWEN,
    "qwen2_vl": _QWEN,
    "qwen3_vl": _QWEN,
    "smolvlm": _TEXT,
}


class _DerivedAdapter(PaliGemmaAdapter):
    """A family defined outside the package: PaliGemma under another name."""

    family: ClassVar[str] = "test_derived_paligemma"
    model_types: ClassVar[tuple[str, ...]] = ("test_derived_model_type",)


@pytest.fixture
def derived() -> Iterator[type[_DerivedAdapter]]:
    with registered_backbone(_DerivedAdapter) as adapter_cls:
        yield adapter_cls


@pytest.mark.parametrize("family", available_families())
def test_lora_targets_are_the_strings_each_family_had(family):
    assert get_adapter_class(family).lora_target_modules == OLD_LORA_TARGETS[family]


def test_every_family_is_listed_once_and_defined_where_the_table_says():
    # A repeated key in a dict literal would silently keep the last value: the table is
    # read as source to see every line.
    source = Path(registry.__file__).read_text()
    table = next(
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "_FAMILIES"
    )
    keys = [k.value for k in table.keys]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    assert set(keys) == set(available_families())
    model_types: dict[str, str] = {}
    for family in keys:
        adapter_cls = get_adapter_class(family)
        assert adapter_cls.family == family
        assert adapter_cls.__module__ == f"vlm2emb.backbones.{family}"  # one file per family
        for model_type in adapter_cls.model_types:
            assert model_types.setdefault(model_type, family) == family
            assert get_adapter_class(model_type) is adapter_cls


def test_a_family_lookup_imports_only_that_family():
    code = (
        "import sys\n"
        "from vlm2emb.backbones import get_adapter_class\n"
        "get_adapter_class('llava_next')\n"
        "print(sorted(m for m in sys.modules if m.startswith('vlm2emb.backbones.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out.strip()))
    families = {f"vlm2emb.backbones.{f}" for f in available_families()}
    # llava_next subclasses llava, so both are imported; no other family is.
    assert loaded & families == {"vlm2emb.backbones.llava_next", "vlm2emb.backbones.llava"}


def test_a_registered_family_is_found_by_name_and_model_type(derived):
    assert "test_derived_paligemma" in available_families()
    assert get_adapter_class("test_derived_paligemma") is derived
    assert get_adapter_class("test_derived_model_type") is derived
    assert get_adapter_class("paligemma") is PaliGemmaAdapter  # the base family is unchanged


def test_unregistering_removes_the_family_and_its_model_types(derived):
    unregister_backbone(derived.family)
    assert derived.family not in available_families()
    for name in (derived.family, "test_derived_model_type"):
        with pytest.raises(KeyError, match="supported: "):
            get_adapter_class(name)
    register_backbone(derived)  # what the fixture removes again


def test_a_taken_family_name_is_refused(derived):
    with pytest.raises(ValueError, match=r"family 'test_derived_paligemma' is already registered"):
        register_backbone(derived)

    class Llava(PaliGemmaAdapter):
        family: ClassVar[str] = "llava"

    with pytest.raises(ValueError, match=r"family 'llava' is already a built-in family"):
        register_backbone(Llava)


def test_a_taken_model_type_is_refused(derived):
    class Clash(PaliGemmaAdapter):
        family: ClassVar[str] = "test_clash"
        model_types: ClassVar[tuple[str, ...]] = ("qwen2_vl",)

    with pytest.raises(ValueError, match=r"'qwen2_vl' and 'test_clash' both serve model_type 'qwen2_vl'"):
        register_backbone(Clash)
    Clash.model_types = ("masked_diffusion",)  # a family name that is no family's model_type
    with pytest.raises(ValueError, match=r"serves model_type 'masked_diffusion', which is the name of"):
        register_backbone(Clash)
    Clash.model_types = ("test_derived_model_type",)
    with pytest.raises(
        ValueError,
        match=r"'test_derived_paligemma' and 'test_clash' both serve model_type 'test_derived_model_type'",
    ):
        register_backbone(Clash)
    assert "test_clash" not in available_families()  # nothing half-registered


def test_built_in_families_cannot_be_unregistered():
    with pytest.raises(ValueError, match="'llava' is a built-in family"):
        unregister_backbone("llava")
    with pytest.raises(KeyError, match="no registered backbone family 'nope'"):
        unregister_backbone("nope")


def test_a_table_line_whose_class_names_another_family_is_refused(monkeypatch):
    monkeypatch.setitem(registry._FAMILIES, "test_mislabelled", "vlm2emb.backbones.llava:LlavaAdapter")
    with pytest.raises(ValueError, match=r"listed as family 'test_mislabelled' but its family is 'llava'"):
        get_adapter_class("test_mislabelled")


def test_a_class_without_a_family_is_refused():
    class Nameless(PaliGemmaAdapter):
        family: ClassVar[str] = ""

    with pytest.raises(ValueError, match="not an adapter class with a family name"):
        register_backbone(Nameless)
    with pytest.raises(ValueError, match="not an adapter class"):
        register_backbone(object())  # type: ignore[arg-type]


def test_the_shared_language_model_pattern_reaches_only_decoder_projections():
    pattern = re.compile(LANGUAGE_MODEL_PROJECTIONS)
    assert pattern.fullmatch("model.language_model.layers.3.self_attn.q_proj")
    assert pattern.fullmatch("base_model.model.model.language_model.layers.0.mlp.down_proj")
    assert not pattern.fullmatch("model.vision_tower.encoder.layers.0.self_attn.q_proj")
    assert not pattern.fullmatch("model.language_model.layers.0.mlp.act_fn")
