"""Sources: datasets folders (real `datasets` save_to_disk), Parquet, the MMEB-train layout,
per-source caps, and how specs resolve."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm2emb.data.schema import DataError, load_train_examples
from vlm2emb.data.sources import convert_mmeb, resolve_source


def png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_datasets_folder_with_image_feature(tmp_path: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "query": {"text": datasets.Value("string"), "image": datasets.Image()},
            "positive": {"text": datasets.Value("string")},
            "dataset": datasets.Value("string"),
        }
    )
    rows = {
        "query": [
            {"text": "red", "image": Image.new("RGB", (8, 8), (255, 0, 0))},
            {"text": "blue", "image": Image.new("RGB", (8, 8), (0, 0, 255))},
        ],
        "positive": [{"text": "a red square"}, {"text": "a blue square"}],
        "dataset": ["colors", "colors"],
    }
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "ds"))
    ex = load_train_examples([str(tmp_path / "ds")])
    assert [e.positive["text"] for e in ex] == ["a red square", "a blue square"]
    (ref,) = ex[1].query["images"]
    assert isinstance(ref, bytes)  # kept undecoded until the batch is built
    assert Image.open(io.BytesIO(ref)).getpixel((0, 0)) == (0, 0, 255)
    assert ex[0].source == f"{tmp_path / 'ds'}:1"


def test_dataset_dict_folder_takes_train_or_the_named_split(tmp_path: Path) -> None:
    import datasets

    def split(words: list[str]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"query": words, "positive": [w.upper() for w in words]})

    datasets.DatasetDict({"train": split(["a", "b"]), "validation": split(["c"])}).save_to_disk(
        str(tmp_path / "dd")
    )
    assert [e.query["text"] for e in load_train_examples([str(tmp_path / "dd")])] == ["a", "b"]
    assert [e.positive["text"] for e in load_train_examples([f"{tmp_path / 'dd'}:validation"])] == ["C"]
    with pytest.raises(DataError, match="no split 'test'"):
        load_train_examples([f"{tmp_path / 'dd'}:test"])


def test_plain_folder_is_not_a_source(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_train_examples([str(tmp_path / "imgs")])


def test_hub_specs_resolve_without_network() -> None:
    src = resolve_source("hf:owner/name:validation")
    assert (src.kind, src.config, src.split, src.stem) == ("hub", None, "validation", "name")
    src = resolve_source("hf:TIGER-Lab/MMEB-train:ImageNet_1K:diverse_instruction")
    assert (src.config, src.split, src.stem) == ("ImageNet_1K", "diverse_instruction", "ImageNet_1K")
    assert resolve_source("hf:owner/name").split == "train"
    with pytest.raises(DataError, match="expected hf:OWNER/NAME"):
        resolve_source("hf:owner/name:a:b:c")


MMEB_ROWS = [
    {
        "qry": "<|image_1|>\nRepresent the given image for classification",
        "qry_image_path": "images/red.png",
        "pos_text": "red",
        "pos_image_path": "",
        "neg_text": "",
        "neg_image_path": "",
    },
    {
        "qry": "Find me an everyday image that matches the given caption: a blue square",
        "qry_image_path": "",
        "pos_text": "<|image_1|> Represent the given image.",
        "pos_image_path": "images/blue.png",
        "neg_text": "<|image_1|>",
        "neg_image_path": "images/red.png",
    },
]


def test_mmeb_rows_convert_to_canonical_items() -> None:
    # The <|image_1|> markers stay in the text: the model's prompt style renders them
    # (removed for vlm2emb, VLM2Vec's bare image token for vlm2vec; tests/test_prompts.py).
    first = convert_mmeb(MMEB_ROWS[0])
    assert first == {
        "query": {"text": MMEB_ROWS[0]["qry"], "image": "images/red.png"},
        "positive": {"text": "red"},
    }
    second = convert_mmeb(MMEB_ROWS[1])
    assert second["query"] == {"text": MMEB_ROWS[1]["qry"]}
    assert second["positive"] == {
        "text": "<|image_1|> Represent the given image.",
        "image": "images/blue.png",
    }
    assert second["negatives"] == [{"text": "<|image_1|>", "image": "images/red.png"}]


def test_mmeb_negatives_are_a_choice(tmp_path: Path) -> None:
    """data.mmeb_negatives: false trains as VLM2Vec does (its collators drop neg_text/neg_image_path)."""
    from vlm2emb.data.schema import load_train_examples

    assert "negatives" not in convert_mmeb(MMEB_ROWS[1], negatives=False)
    jsonl, parquet = _mmeb_files(tmp_path)
    for spec in (jsonl, parquet):
        kept = load_train_examples([str(spec)])
        dropped = load_train_examples([str(spec)], mmeb_negatives=False)
        assert [len(ex.negatives) for ex in kept] == [0, 1]
        assert [len(ex.negatives) for ex in dropped] == [0, 0]
        assert [ex.query for ex in dropped] == [ex.query for ex in kept]
    # Canonical rows keep their negatives either way (data.max_negatives caps those).
    canonical = tmp_path / "canonical.jsonl"
    canonical.write_text(json.dumps({"query": "a", "positive": "b", "negatives": ["c"]}) + "\n")
    assert len(load_train_examples([str(canonical)], mmeb_negatives=False)[0].negatives) == 1


def _mmeb_files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "images" / "red.png")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "images" / "blue.png")
    jsonl = tmp_path / "ImageNet_1K.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in MMEB_ROWS))
    import datasets

    parquet = tmp_path / "N24News.parquet"
    datasets.Dataset.from_list(MMEB_ROWS).to_parquet(str(parquet))
    return jsonl, parquet


@pytest.mark.parametrize("data_format", ["auto", "mmeb"])
def test_mmeb_jsonl_and_parquet_load(tmp_path: Path, data_format: str) -> None:
    jsonl, parquet = _mmeb_files(tmp_path)
    ex = load_train_examples([str(jsonl), str(parquet)], data_format=data_format)
    assert len(ex) == 4
    red = str((tmp_path / "images" / "red.png").resolve())
    assert ex[0].query == {"text": MMEB_ROWS[0]["qry"], "images": [red]}  # marker kept for rendering
    assert ex[1].negatives == [{"text": "<|image_1|>", "images": [red]}]
    assert [e.dataset for e in ex] == ["ImageNet_1K"] * 2 + ["N24News"] * 2  # file names
    assert ex[2].query == ex[0].query  # Parquet gives the same rows


def test_mmeb_errors_name_the_line(tmp_path: Path) -> None:
    jsonl, _ = _mmeb_files(tmp_path)
    bad = dict(MMEB_ROWS[0], qry_image_path="")
    jsonl.write_text(json.dumps(MMEB_ROWS[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(
        DataError, match=r"ImageNet_1K\.jsonl:2: MMEB row: qry text has an <\|image_N\|> marker"
    ):
        load_train_examples([str(jsonl)])
    # The canonical format refuses MMEB columns as unknown fields.
    with pytest.raises(DataError, match=r":1: unknown field\(s\) \['neg_image_path'"):
        load_train_examples([str(jsonl)], data_format="canonical")


def test_max_rows_caps_each_source(tmp_path: Path) -> None:
    paths = []
    for name, n in (("a", 5), ("b", 3)):
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps({"query": f"{name}{i}", "positive": "p"}) + "\n" for i in range(n)))
        paths.append(str(p))
    assert len(load_train_examples(paths, max_rows=[2])) == 4  # one cap for all
    got = load_train_examples(paths, max_rows=[0, 1])  # 0 = no cap
    assert [e.query["text"] for e in got] == ["a0", "a1", "a2", "a3", "a4", "b0"]
    assert [e.origin for e in got] == [0] * 5 + [1]
