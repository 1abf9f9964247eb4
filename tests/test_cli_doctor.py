"""``vlm2emb doctor``: the report, the exit status, and that it catches a broken attention switch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from vlm2emb.backbones.paligemma import PaliGemmaAdapter
from vlm2emb.cli import main
from vlm2emb.model import CONFIG_NAME
from vlm2emb.testing import registered_backbone


class _PassThroughPaliGemmaAdapter(PaliGemmaAdapter):
    """A real PaliGemma adapter with a realistic bug: it keeps the processor's ``token_type_ids``.

    PaliGemma's processor marks the whole prompt as prefix (``token_type_ids`` 0), and the
    model then attends bidirectionally over the prefix whatever attention mode was switched on:
    ``attention="causal"`` is silently bidirectional.
    """

    family: ClassVar[str] = "paligemma_pass_through"
    model_types: ClassVar[tuple[str, ...]] = ()

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[Any]]) -> dict[str, Any]:
        out = super().build_inputs(prompts, images)
        out["token_type_ids"] = torch.zeros_like(out["input_ids"])  # what the processor writes
        return out

    @classmethod
    def build_tiny(cls, path: Path, *, seed: int = 0) -> Path:
        PaliGemmaAdapter.build_tiny(path, seed=seed)
        # Route loading to this adapter instead of the one for config.model_type.
        (path / CONFIG_NAME).write_text(json.dumps({"family": cls.family}))
        return path


def test_doctor_reports_and_passes_on_a_causal_model(capsys):
    assert main(["doctor", "tiny:llava"]) == 0
    out = capsys.readouterr().out
    assert "family          llava" in out and "attention       causal" in out
    assert "pooling         last" in out  # the default for causal attention
    # 2 decoder layers x (q, k, v, o, gate, up, down).
    assert "matched modules 14 in 2 of 2 decoder layers" in out
    assert "'<image>\\nRepresent the given image for classification.\\nA handwritten digit" in out
    assert "16 of them image tokens" in out
    assert "[ok] attention mode: asked for causal" in out
    assert "[ok] padding / batch invariance" in out and "[ok] finite outputs: 5 of 5" in out
    assert "FAIL" not in out and out.rstrip().endswith("all checks passed")


def test_doctor_honours_attention_and_pooling_flags(capsys):
    assert main(["doctor", "tiny:qwen2_vl", "--attention", "bidirectional", "--pooling", "last"]) == 0
    out = capsys.readouterr().out
    assert "attention       bidirectional" in out and "pooling         last" in out
    assert "[ok] attention mode: asked for bidirectional: position 0 changes" in out
    assert "<|vision_start|><|image_pad|><|vision_end|>Represent" in out


@pytest.fixture
def pass_through_family():
    """The buggy PaliGemma adapter, registered for one test."""
    with registered_backbone(_PassThroughPaliGemmaAdapter) as adapter_cls:
        yield adapter_cls.family


def test_doctor_fails_when_causal_is_silently_bidirectional(capsys, pass_through_family):
    status = main(["doctor", "tiny:paligemma_pass_through", "--attention", "causal"])
    out = capsys.readouterr().out
    assert status == 1
    assert "[FAIL] attention mode: asked for causal" in out
    assert "alone (no padding mask) changed" in out and "in a padded batch changed" in out
    assert out.rstrip().endswith("check(s) failed")
    # The real adapter drops token_type_ids, so the attention mode alone decides.
    assert main(["doctor", "tiny:paligemma", "--attention", "causal"]) == 0
    assert "[ok] attention mode: asked for causal" in capsys.readouterr().out


def test_doctor_user_errors_are_one_line(capsys):
    assert main(["doctor", "tiny:not_a_family"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlm2emb: error: no vlm2emb backbone adapter") and "\n" not in err
    with pytest.raises(SystemExit) as exc:
        main(["doctor", "tiny:llava", "--attention", "sideways"])
    assert exc.value.code == 2
