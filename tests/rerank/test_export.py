"""``vlm2emb export`` of a saved reranker: weights + prompt settings + model card, verified."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.export import ExportError
from vlm2emb.rerank import Reranker, evaluate_pipeline
from vlm2emb.rerank.export import export_reranker

WORDS = ["zero", "one", "two"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Reranker]:
    reranker = Reranker.from_pretrained("tiny:qwen2_vl", seed=3, instruction="Is this {the} right caption?")
    folder = reranker.save_pretrained(tmp_path_factory.mktemp("rr") / "final")
    return folder, reranker


@pytest.fixture(scope="module")
def report(saved: tuple[Path, Reranker]) -> dict:
    rows = [
        {
            "query": {"text": w},
            "candidates": [{"text": f"digit {v}"} for v in WORDS],
            "positive": i,
            "task": "words",
        }
        for i, w in enumerate(WORDS)
    ]
    return evaluate_pipeline(EmbeddingModel.from_pretrained("tiny:qwen2_vl"), saved[1], rows, recall_k=2)


def _card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def test_export_reloads_with_equal_scores_and_a_card(
    saved, report, tmp_path, digit_images: list[Image.Image]
):
    source, reranker = saved
    out = tmp_path / "exported"
    result = export_reranker(source, out, report=report, license="apache-2.0")
    assert (
        result.out_dir == out
        and result.verifications[0].passed
        and result.verifications[0].loader == "vlm2emb"
    )
    files = set(result.files)
    assert {"model.safetensors", "vlm2emb_reranker.json", "README.md", "config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl"))]
    assert json.loads((out / "vlm2emb_reranker.json").read_text()) == json.loads(
        (source / "vlm2emb_reranker.json").read_text()
    )
    # Pairs the export's own probes do not hold: a digit image each way.
    pairs = [
        ("which digit?", "a handwritten digit zero"),
        ({"image": digit_images[0]}, "zero"),
        ("zero", digit_images[1]),
    ]
    exported = Reranker.from_pretrained(out)
    torch.testing.assert_close(exported.score_pairs(pairs), reranker.score_pairs(pairs), atol=1e-5, rtol=0)

    front, body = _card(out)
    assert front["library_name"] == "vlm2emb" and front["pipeline_tag"] == "text-ranking"
    assert front["base_model"] == "tiny:qwen2_vl" and front["license"] == "apache-2.0"
    assert reranker.config.template in body and "Is this {the} right caption?" in body
    metrics = front["model-index"][0]["results"][0]["metrics"]
    assert {m["type"]: m["value"] for m in metrics}["mrr"] == round(
        report["tasks"]["words"]["reranked"]["mrr"], 4
    )
    assert "examples/load_reranker_transformers.py" in body and "CrossEncoder" in body

    # The card's plain-transformers snippet, run as a user would (path filled in), prints
    # the score vlm2emb gives the same pair.
    code = body.split("## Usage with plain transformers")[1].split("```python\n")[1].split("```")[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(code.replace("path/to/this/folder", str(out)), {})  # the card's own code
    expected = float(reranker.score_pairs([("the digit seven", "a handwritten digit seven")])[0])
    assert float(printed.getvalue()) == pytest.approx(expected, abs=1e-4)
    assert result.verifications[1].passed  # and the export said so in the card
    assert "This snippet reproduced vlm2emb's scores" in body


def test_cross_encoder_finding_is_recorded(saved, tmp_path):
    pytest.importorskip("sentence_transformers")
    out = tmp_path / "ce"
    export_reranker(saved[0], out)
    _, body = _card(out)
    line = next(x for x in body.splitlines() if x.startswith("**sentence-transformers:**"))
    # Whatever the installed version does, the card says it in one line (6.3: it does not load
    # a ...ForConditionalGeneration folder).
    assert "CrossEncoder" in line and ("does not load" in line or "reproduces" in line or "differ" in line)
    assert "No evaluation report was given" in body


def test_bad_inputs_are_one_line_errors_and_leave_nothing(saved, tmp_path, capsys):
    source = saved[0]
    with pytest.raises(ExportError, match="not a saved reranker"):
        export_reranker(tmp_path, tmp_path / "x")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vlm2emb_reranker.json").write_text("{not json")
    (broken / "config.json").write_text("{}")
    assert main(["export", str(broken), str(tmp_path / "out1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "vlm2emb_reranker.json: not valid JSON" in err and len(err.splitlines()) == 1
    (tmp_path / "bad_report.json").write_text(json.dumps({"tasks": {}}))
    assert (
        main(
            [
                "export",
                str(source),
                str(tmp_path / "out2"),
                "--eval-report",
                str(tmp_path / "bad_report.json"),
            ]
        )
        == 2
    )
    assert "missing 'average'" in capsys.readouterr().err
    assert main(["export", str(source), str(tmp_path / "out3"), "--adapter-only"]) == 2
    assert "--adapter-only is not supported for a reranker export" in capsys.readouterr().err
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_a_lora_reranker_exports_merged(tmp_path):
    reranker = Reranker.from_pretrained("tiny:qwen2_vl", seed=5)
    pairs = [("which digit?", "seven"), ("a cat", "a dog on a chair")]
    base = reranker.score_pairs(pairs)
    reranker.apply_lora(r=4, alpha=8, seed=0)
    with torch.no_grad():  # a trained-looking adapter: LoRA's B starts at zero
        for name, param in reranker.lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    source = reranker.save_pretrained(tmp_path / "lora", merge_lora=False)
    assert (source / "adapter").is_dir()
    expected = reranker.score_pairs(pairs)
    assert not torch.allclose(expected, base)  # the adapter changes the scores
    result = export_reranker(source, tmp_path / "out")
    assert not (result.out_dir / "adapter").exists() and "model.safetensors" in result.files
    torch.testing.assert_close(
        Reranker.from_pretrained(result.out_dir).score_pairs(pairs), expected, atol=1e-5, rtol=0
    )
