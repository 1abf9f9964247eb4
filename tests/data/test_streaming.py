"""Streaming training data: lazy reading, seeded shuffling, mixing, homogeneous batches,
DataLoader workers and resuming."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from vlm2emb.data.check import DataReport
from vlm2emb.data.schema import DataError
from vlm2emb.data.streaming import StreamingTrainData


def _jsonl(path: Path, name: str, n: int, bad_every: int = 0) -> str:
    lines = []
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append('{"query": ')  # broken JSON
        else:
            lines.append(json.dumps({"query": f"{name}{i}", "positive": f"p{name}{i}", "dataset": name}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _texts(batches) -> list[list[str]]:
    return [[ex.query["text"] for ex in b] for b in batches]


def test_each_epoch_is_a_seeded_shuffle_of_every_row(tmp_path: Path) -> None:
    spec = _jsonl(tmp_path / "a.jsonl", "a", 24)
    stream = StreamingTrainData([spec], 4, seed=0, shuffle_buffer=8)
    first = _texts(itertools.islice(stream.global_batches(), 12))  # two epochs of 6 batches
    epoch0 = [t for b in first[:6] for t in b]
    assert sorted(epoch0) == sorted(f"a{i}" for i in range(24))
    assert epoch0 != [f"a{i}" for i in range(24)]  # shuffled
    assert first[6:] != first[:6]  # the next epoch reshuffles
    again = StreamingTrainData([spec], 4, seed=0, shuffle_buffer=8)
    assert _texts(itertools.islice(again.global_batches(), 12)) == first
    other = StreamingTrainData([spec], 4, seed=1, shuffle_buffer=8)
    assert _texts(itertools.islice(other.global_batches(), 6)) != first[:6]


def test_parquet_and_homogeneous_streams(tmp_path: Path) -> None:
    import datasets

    rows = [{"query": f"b{i}", "positive": "p", "dataset": "b"} for i in range(12)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "b.parquet"))
    specs = [_jsonl(tmp_path / "a.jsonl", "a", 10), str(tmp_path / "b.parquet")]
    stream = StreamingTrainData(specs, 4, seed=0, homogeneous=True, shuffle_buffer=6)
    batches = list(itertools.islice(stream.global_batches(), 5))  # 2 of a + 3 of b per epoch
    assert all(len({t[0] for t in b}) == 1 for b in _texts(batches))
    assert Counter(b[0].dataset for b in batches) == {"a": 2, "b": 3}


def test_weights_interleave_sources(tmp_path: Path) -> None:
    specs = [_jsonl(tmp_path / "a.jsonl", "a", 100), _jsonl(tmp_path / "b.jsonl", "b", 10)]
    stream = StreamingTrainData(specs, 10, seed=0, weights=[1, 1], shuffle_buffer=1)
    rows = [t for b in _texts(itertools.islice(stream.global_batches(), 10)) for t in b]
    share_b = sum(t.startswith("b") for t in rows) / len(rows)
    assert 0.35 < share_b < 0.65  # about half, though b has a tenth of the rows


def test_workers_and_resume_keep_the_order(tmp_path: Path) -> None:
    spec = _jsonl(tmp_path / "a.jsonl", "a", 40)
    reference = _texts(itertools.islice(StreamingTrainData([spec], 4, seed=3).global_batches(), 15))

    def loader(start_step: int, workers: int):
        data = StreamingTrainData([spec], 4, seed=3, start_step=start_step)
        return torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_texts_one, num_workers=workers)

    assert list(itertools.islice(loader(0, 2), 15)) == reference
    assert list(itertools.islice(loader(5, 0), 10)) == reference[5:]


def _texts_one(batch):
    return [ex.query["text"] for ex in batch]


def test_bad_rows_are_skipped_or_stop_the_stream(tmp_path: Path) -> None:
    spec = _jsonl(tmp_path / "a.jsonl", "a", 30, bad_every=5)
    report = DataReport()
    stream = StreamingTrainData([spec], 4, seed=0, on_bad_example="skip", report=report)
    batches = list(itertools.islice(stream.global_batches(), 6))  # 24 good rows = one epoch
    assert len({t for b in _texts(batches) for t in b}) == 24
    assert report.skipped == 6 and report.reasons == {"malformed_json": 6}
    with pytest.raises(DataError, match=r"a\.jsonl:5: malformed JSON"):
        list(itertools.islice(StreamingTrainData([spec], 4, seed=0).global_batches(), 6))


def test_missing_source_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data file not found"):
        StreamingTrainData([str(tmp_path / "nope.jsonl")], 4, seed=0)
