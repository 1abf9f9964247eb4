"""Tests for vlm2emb.data.demo: the bundled handwritten-digits demo data."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlm2emb.data.demo import WORDS, caption, load_digit_scans, resolve_demo, write_digits
from vlm2emb.data.schema import DataError, load_eval_examples, load_train_examples


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("digits"))


def test_digit_scans_are_scikit_learns_load_digits():
    """Read from scikit-learn's bundled file without importing it: the very arrays
    ``load_digits`` returns (values and dtypes)."""
    from sklearn.datasets import load_digits

    images, labels = load_digit_scans()
    digits = load_digits()
    assert images.dtype == digits.images.dtype and images.shape == (1797, 8, 8)
    assert (images == digits.images).all()
    assert labels.tolist() == digits.target.tolist()


def test_writing_the_demo_data_does_not_import_scikit_learn(tmp_path):
    """Every training process on demo: data writes it; scikit-learn's import alone took
    about 3 s there."""
    import subprocess
    import sys

    code = (
        "import sys; from vlm2emb.data.demo import write_digits; "
        f"write_digits({str(tmp_path)!r}); print('sklearn' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert (tmp_path / "eval.jsonl").is_file()


def label_of(text: str) -> int:
    match = re.fullmatch(r"a handwritten digit (\w+)", text)
    assert match, text
    return WORDS.index(match.group(1))


def test_writes_images_and_both_files(digits_dir: Path) -> None:
    images = sorted((digits_dir / "images").glob("*.png"))
    assert len(images) == 1797
    with Image.open(images[0]) as img:
        assert img.mode == "RGB"
        assert img.size == (32, 32)
    assert (digits_dir / "train.jsonl").is_file()
    assert (digits_dir / "eval.jsonl").is_file()
    assert not list(digits_dir.glob("*.tmp"))  # atomic writes leave nothing behind


def test_train_and_eval_images_are_disjoint(digits_dir: Path) -> None:
    train = read_jsonl(digits_dir / "train.jsonl")
    evals = read_jsonl(digits_dir / "eval.jsonl")
    train_imgs = {
        item["image"] for row in train for item in (row["query"], row["positive"]) if "image" in item
    }
    eval_imgs = {
        item["image"] for row in evals for item in (row["query"], *row["candidates"]) if "image" in item
    }
    assert train_imgs
    assert eval_imgs
    assert not train_imgs & eval_imgs
    # 30 held-out images per class, the rest train (each train image in an i2t and a t2i row).
    assert len(eval_imgs) == 300
    assert len(train_imgs) == 1797 - 300
    assert len(train) == 2 * (1797 - 300)


def test_train_rows_pair_images_with_their_caption(digits_dir: Path) -> None:
    train = read_jsonl(digits_dir / "train.jsonl")
    assert Counter(row["dataset"] for row in train) == {"digits-i2t": 1497, "digits-t2i": 1497}
    by_image: dict[str, set[str]] = {}
    for row in train:
        if row["dataset"] == "digits-i2t":
            by_image.setdefault(row["query"]["image"], set()).add(row["positive"]["text"])
        else:
            by_image.setdefault(row["positive"]["image"], set()).add(row["query"]["text"])
    # Each image gets one caption, consistently in both directions.
    assert all(len(caps) == 1 for caps in by_image.values())


def test_eval_rows(digits_dir: Path) -> None:
    evals = read_jsonl(digits_dir / "eval.jsonl")
    i2t = [r for r in evals if r["task"] == "digits-i2t"]
    t2i = [r for r in evals if r["task"] == "digits-t2i"]
    assert len(i2t) == 300
    assert len(t2i) == 100
    assert len(evals) == 400
    for row in i2t:
        assert len(row["candidates"]) == 10
        assert [c["text"] for c in row["candidates"]] == [caption(d) for d in range(10)]
        assert row["candidates"][row["positive"]]["text"] == caption(row["positive"])
    # Every digit appears 30 times as an i2t query.
    assert Counter(r["positive"] for r in i2t) == dict.fromkeys(range(10), 30)
    t2i_labels = Counter()
    for row in t2i:
        assert len(row["candidates"]) == 10
        assert len({c["image"] for c in row["candidates"]}) == 10
        t2i_labels[label_of(row["query"]["text"])] += 1
        assert label_of(row["query"]["text"]) == row["positive"]
    assert t2i_labels == dict.fromkeys(range(10), 10)


def test_eval_positive_images_match_their_digit(digits_dir: Path) -> None:
    # The i2t query image of a class appears as the t2i candidate at that class's index.
    evals = read_jsonl(digits_dir / "eval.jsonl")
    image_label = {r["query"]["image"]: r["positive"] for r in evals if r["task"] == "digits-i2t"}
    for row in (r for r in evals if r["task"] == "digits-t2i"):
        assert [image_label[c["image"]] for c in row["candidates"]] == list(range(10))


def test_files_load_through_the_schema(digits_dir: Path) -> None:
    train = load_train_examples([str(digits_dir / "train.jsonl")], verify_images=False)
    evals = load_eval_examples([str(digits_dir / "eval.jsonl")], verify_images=False)
    assert len(train) == 2994
    assert len(evals) == 400
    assert Path(train[0].query.get("images", train[0].positive.get("images"))[0]).is_file()


def test_same_seed_gives_identical_files(digits_dir: Path, tmp_path: Path) -> None:
    again = write_digits(tmp_path / "again", seed=0)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (again / name).read_bytes() == (digits_dir / name).read_bytes()
    for name in ("0000.png", "1796.png"):
        assert (again / "images" / name).read_bytes() == (digits_dir / "images" / name).read_bytes()


def test_resolve_demo_materialises_once(tmp_path: Path) -> None:
    train = resolve_demo("demo:digits/train", tmp_path)
    assert train == tmp_path / "demo-data" / "digits" / "train.jsonl"
    assert train.is_file()
    stamp = train.stat().st_mtime_ns
    (train.parent / "marker").write_text("x")
    evals = resolve_demo("demo:digits/eval", tmp_path)
    assert evals == train.parent / "eval.jsonl"
    assert resolve_demo("demo:digits/train", tmp_path) == train
    assert train.stat().st_mtime_ns == stamp  # not rewritten
    assert (train.parent / "marker").is_file()
    # The loaders accept the demo spec directly.
    assert len(load_eval_examples(["demo:digits/eval"], work_dir=tmp_path, verify_images=False)) == 400


def test_demo_data_loads_under_a_relative_output_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's demo writes under the relative runs/demo: media paths must still be
    found inside the (relative) data folder, with images verified as in training."""
    monkeypatch.chdir(tmp_path)
    rows = load_train_examples(["demo:digits/train"], work_dir=Path("runs/demo"), verify_images=True)
    assert len(rows) == 2994
    image = rows[0].query.get("images") or rows[0].positive.get("images")
    assert Path(image[0]).is_absolute() and Path(image[0]).is_file()
    assert len(load_eval_examples(["demo:digits/eval"], work_dir=Path("runs/demo"))) == 400


@pytest.mark.parametrize("spec", ["demo:digits", "demo:digits/test", "demo:mnist/train"])
def test_bad_demo_name(spec: str, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown demo data") as exc:
        resolve_demo(spec, tmp_path)
    assert repr(spec) in str(exc.value)
    assert not (tmp_path / "demo-data").exists()
    with pytest.raises(DataError, match="unknown demo data"):
        load_train_examples([spec], work_dir=tmp_path)
