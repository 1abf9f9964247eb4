"""Bad input that used to be accepted silently, or failed slowly or with an internal error:
wrong field types, the text-length cap, files of identical rows, broken overrides, mistyped
model paths and damaged embedding-cache entries."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from vlm2emb.cli import main
from vlm2emb.data.check import DataReport, DataWarning
from vlm2emb.data.schema import DataError, load_eval_examples, load_train_examples
from vlm2emb.train.config import ConfigError, load_recipe

RECIPE = Path(__file__).parents[2] / "recipes" / "demo.yaml"


@contextlib.contextmanager
def warnings_as_errors() -> Iterator[None]:
    """Turns any warning inside the block into a test failure."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _write(path: Path, *rows: object) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "row,message",
    [
        ({"query": "q", "positive": "p", "negatives": ""}, "negatives must be a list of items, got str"),
        ({"query": "q", "positive": "p", "negatives": 0}, "negatives must be a list of items, got int"),
        ({"query": "q", "positive": "p", "instruction": 5}, "instruction must be a string, got int"),
        ({"query": "q", "positive": "p", "target_instruction": ["a"]}, "target_instruction must be a string"),
        ({"query": "q", "positive": "p", "dataset": ["a", "b"]}, "dataset must be a string, got list"),
        ({"query": "q", "positive": "p", "dataset": 3}, "dataset must be a string, got int"),
    ],
)
def test_wrong_types_are_row_errors(tmp_path: Path, row: dict, message: str) -> None:
    path = _write(tmp_path / "t.jsonl", {"query": "a", "positive": "b"}, row)
    with pytest.raises(DataError, match=re.escape(f"t.jsonl:2: {message}")) as info:
        load_train_examples([str(path)])
    assert info.value.kind == "wrong_type"
    # the skip policy leaves such a row out and counts it
    report = DataReport()
    kept = load_train_examples([str(path)], on_bad_example="skip", report=report)
    assert len(kept) == 1 and report.reasons == {"wrong_type": 1}


def test_eval_task_and_instruction_must_be_strings(tmp_path: Path) -> None:
    path = _write(tmp_path / "ev.jsonl", {"query": "q", "candidates": ["a"], "task": 7})
    with pytest.raises(DataError, match=re.escape("ev.jsonl:1: task must be a string, got int")):
        load_eval_examples([str(path)])


def test_text_cap_key_cuts_long_texts(tmp_path: Path) -> None:
    from vlm2emb.data.media import media_options

    cfg = load_recipe(None, ["data.train=[x.jsonl]", "data.max_text_chars=100"])
    assert cfg.data.max_text_chars == 100
    long = "word " * 10_000  # 50,000 characters
    path = _write(
        tmp_path / "t.jsonl", {"query": long, "positive": {"text": long}}, {"query": "short", "positive": "p"}
    )
    rows = load_train_examples([str(path)], options=media_options(cfg.data))
    assert len(rows[0].query["text"]) == 100 and len(rows[0].positive["text"]) == 100
    assert rows[1].query["text"] == "short"
    with pytest.raises(ConfigError, match=r"data\.max_text_chars: must be > 0"):
        load_recipe(None, ["data.train=[x.jsonl]", "data.max_text_chars=0"])


def test_a_file_of_identical_rows_warns(tmp_path: Path) -> None:
    row = {"query": "q", "positive": "p"}
    path = _write(tmp_path / "same.jsonl", row, row, row)
    report = DataReport()
    with pytest.warns(DataWarning, match=r"same\.jsonl: all 3 training rows are identical"):
        load_train_examples([str(path)], report=report)
    assert len(report.warnings) == 1 and report.as_dict()["warnings"] == report.warnings
    # rows that differ anywhere do not warn
    mixed = _write(tmp_path / "mixed.jsonl", row, {"query": "q", "positive": "other"})
    with warnings_as_errors():
        load_train_examples([str(mixed)])


def test_data_check_cli_prints_the_identical_rows_warning(tmp_path: Path, capsys) -> None:
    row = {"query": "q", "positive": "p"}
    path = _write(tmp_path / "same.jsonl", row, row)
    assert main(["data", "check", str(path), "--model", "none"]) == 0
    out = capsys.readouterr().out
    assert f"warning: {path}: all 2 training rows are identical" in out


@pytest.mark.parametrize("raw", ["[a.jsonl", "[a.jsonl, b.jsonl", "{x: 1"])
def test_an_unclosed_list_override_is_a_one_line_error(raw: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"override 'data.train={raw}': data.train:")) as info:
        load_recipe(None, [f"data.train={raw}"])
    assert "\n" not in str(info.value) and "write lists as [a, b]" in str(info.value)


def test_cli_reports_the_unclosed_list_in_one_line(capsys) -> None:
    assert main(["train", str(RECIPE), "data.train=[a.jsonl"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlm2emb: error: override 'data.train=[a.jsonl'")


@pytest.mark.parametrize("name", ["runs/no-such-run", "finall"])
def test_a_mistyped_local_model_path_is_not_looked_up_on_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from vlm2emb import EmbeddingModel

    (tmp_path / "runs").mkdir()  # "runs/..." names a local folder, not a hub owner
    monkeypatch.chdir(tmp_path)
    # Offline, the old code failed at once with a hub error (online it retried ~30 s).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=re.escape(f"model path not found: {name}")):
        EmbeddingModel.from_pretrained(name)


def test_a_corrupt_embedding_cache_entry_is_recomputed(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from vlm2emb import EmbeddingModel
    from vlm2emb.eval.cache import CachedEncoder

    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    items = ["a handwritten digit one", "a handwritten digit two"]
    first = CachedEncoder(model, tmp_path).encode(items)
    (entry,) = list(tmp_path.rglob("*.safetensors"))
    for damage in (b"\x00garbage", entry.read_bytes()[:20]):  # not safetensors; cut short
        entry.write_bytes(damage)
        encoder = CachedEncoder(model, tmp_path)
        with pytest.warns(UserWarning, match="embedding cache entry .* recomputing it"):
            again = encoder.encode(items)
        torch.testing.assert_close(again, first)
        assert encoder.stats.misses == 1
        assert load_file(str(entry))["embeddings"].shape == first.shape  # rewritten whole
    # a hit on the rewritten entry is served without a warning
    with warnings_as_errors():
        assert CachedEncoder(model, tmp_path).encode(items).shape == first.shape


def test_the_text_cap_bounds_padding_cost(tmp_path: Path) -> None:
    """The cap works where the cost is: a batch with one 50k-character row pads short."""
    from vlm2emb import EmbeddingModel
    from vlm2emb.data.media import MediaOptions, decode_item

    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    path = _write(
        tmp_path / "t.jsonl", {"query": "x" * 50_000, "positive": "p"}, {"query": "a", "positive": "b"}
    )
    opts = MediaOptions(max_text_chars=256)
    rows = load_train_examples([str(path)], options=opts)
    batch = model.collate([decode_item(r.query, opts) for r in rows])
    # Tokens, not seconds: the padded length is what made the batch slow, and it is
    # deterministic under any machine load.
    assert batch["input_ids"].shape[1] <= 256 + 16  # the capped text plus the prompt
