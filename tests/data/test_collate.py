"""Tests for vlm2emb.data.collate: the global batch order and the contrastive collator."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm2emb.data.collate import ContrastiveCollator, GlobalBatchSampler, false_negative_groups
from vlm2emb.data.schema import TrainExample
from vlm2emb.model import EmbeddingModel


def take(sampler: GlobalBatchSampler, n: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), n))


# --------------------------------------------------------------------------- GlobalBatchSampler


def test_same_seed_same_order_different_seed_different_order() -> None:
    a = take(GlobalBatchSampler(50, 8, seed=3), 6)
    b = take(GlobalBatchSampler(50, 8, seed=3), 6)
    c = take(GlobalBatchSampler(50, 8, seed=4), 6)
    assert a == b
    assert a != c
    assert all(len(batch) == 8 for batch in a)
    # Not the identity order: the data really is shuffled.
    assert a[0] != list(range(8))


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_slices_union_to_the_single_process_batch(world_size: int) -> None:
    steps = 7  # crosses an epoch boundary (40 // 12 = 3 batches per epoch)
    single = take(GlobalBatchSampler(40, 12, seed=11), steps)
    per_rank = [
        take(GlobalBatchSampler(40, 12, seed=11, rank=r, world_size=world_size), steps)
        for r in range(world_size)
    ]
    for step in range(steps):
        joined = [i for r in range(world_size) for i in per_rank[r][step]]
        assert joined == single[step]
        assert all(len(per_rank[r][step]) == 12 // world_size for r in range(world_size))


def test_start_step_skips_exactly() -> None:
    full = take(GlobalBatchSampler(30, 4, seed=0), 12)
    for start in (1, 5, 7, 9):
        resumed = take(GlobalBatchSampler(30, 4, seed=0, start_step=start), 12 - start)
        assert resumed == full[start:]
    resumed_rank1 = take(GlobalBatchSampler(30, 4, seed=0, rank=1, world_size=2, start_step=5), 3)
    assert resumed_rank1 == [batch[2:] for batch in full[5:8]]


def test_epochs_roll_over_with_a_new_permutation() -> None:
    sampler = GlobalBatchSampler(10, 4, seed=5)
    assert sampler.batches_per_epoch == 2  # the incomplete last batch is dropped
    batches = take(sampler, 6)  # three epochs
    epochs = [batches[0] + batches[1], batches[2] + batches[3], batches[4] + batches[5]]
    for epoch in epochs:
        assert len(set(epoch)) == 8  # no index repeats within an epoch
        assert set(epoch) <= set(range(10))
    assert epochs[0] != epochs[1]
    assert epochs[1] != epochs[2]
    assert sampler.global_batch(2) == batches[2]


def test_every_example_is_seen_when_batches_tile_the_dataset() -> None:
    batches = take(GlobalBatchSampler(12, 4, seed=1), 3)
    assert sorted(i for b in batches for i in b) == list(range(12))


def test_sampler_argument_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by 3"):
        GlobalBatchSampler(100, 8, seed=0, world_size=3)
    with pytest.raises(ValueError, match=r"larger than the dataset \(5 rows\)"):
        GlobalBatchSampler(5, 8, seed=0)
    GlobalBatchSampler(8, 8, seed=0)  # exactly one batch is fine


# --------------------------------------------------------------------------- ContrastiveCollator


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


@pytest.fixture
def image_path(tmp_path: Path) -> str:
    path = tmp_path / "seven.png"
    img = Image.new("RGB", (32, 32), (255, 255, 255))
    for i in range(6, 26):
        img.putpixel((i, 6), (0, 0, 0))
        img.putpixel((26 - i // 2, i), (0, 0, 0))
    img.save(path)
    return str(path)


def ex(query: dict, positive: dict, negatives: list[dict] | None = None, **kw: object) -> TrainExample:
    return TrainExample(query=query, positive=positive, negatives=negatives or [], source="test:1", **kw)


def decode_rows(model: EmbeddingModel, inputs: dict) -> list[str]:
    tok = model.adapter.tokenizer
    return [tok.decode(ids[mask.bool()]) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]


def test_collator_output_without_negatives(model: EmbeddingModel, image_path: str) -> None:
    examples = [
        ex({"text": None, "images": [image_path]}, {"text": "a handwritten digit seven"}),
        ex({"text": "a handwritten digit seven"}, {"text": None, "images": [image_path]}),
        ex({"text": "what is this"}, {"text": "a handwritten digit seven"}),
    ]
    batch = ContrastiveCollator(model.inputs)(examples)
    assert batch.negatives == []
    assert batch.negative_keys is None and batch.negative_mask is None
    for side in ("query", "positive"):
        assert len(getattr(batch, side)) == 1  # no GradCache: one chunk holds the whole batch
        inputs = getattr(batch, side)[0]
        assert inputs["input_ids"].shape[0] == 3
        assert inputs["attention_mask"].shape == inputs["input_ids"].shape
        # One image on each side: its pixels and grid come along.
        assert inputs["image_grid_thw"].shape == (1, 3)
        assert inputs["pixel_values"].shape[0] == int(inputs["image_grid_thw"].prod())
    keys = batch.positive_keys
    assert keys.shape == (3,)
    assert keys.dtype == torch.int64
    # Rows 0 and 2 share the positive (same text, no instruction): equal keys, masked as duplicates.
    assert keys[0] == keys[2]
    assert keys[0] != keys[1]
    # The batch embeds.
    with torch.no_grad():
        emb = model(batch.query[0])
    assert emb.shape == (3, model.embedding_dim)
    assert torch.isfinite(emb).all()


def test_collator_ragged_negatives(model: EmbeddingModel) -> None:
    examples = [
        ex({"text": "q0"}, {"text": "p0"}, [{"text": "n00"}, {"text": "n01"}, {"text": "p1"}]),
        ex({"text": "q1"}, {"text": "p1"}),
        ex({"text": "q2"}, {"text": "p2"}, [{"text": "n20"}]),
    ]
    batch = ContrastiveCollator(model.inputs, target_instruction="Find it.")(examples)
    mask = batch.negative_mask
    keys = batch.negative_keys
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[True, True, True], [False, False, False], [True, False, False]]
    assert keys.shape == (3, 3)
    assert keys.dtype == torch.int64
    assert (keys[~mask] == -1).all()
    assert (keys[mask] >= 0).all()
    # Negatives are flattened in row order: 3 + 0 + 1.
    assert batch.negatives[0]["input_ids"].shape[0] == 4
    texts = decode_rows(model, batch.negatives[0])
    assert [t.split("\n")[-1] for t in texts] == ["n00", "n01", "p1", "n20"]
    assert all(t.startswith("Find it.\n") for t in texts)
    # A negative equal to another row's positive (same text, same instruction) has its key.
    assert keys[0, 2] == batch.positive_keys[1]
    assert len({int(k) for k in keys[mask]}) == 4


def test_target_instruction_is_part_of_the_key(model: EmbeddingModel) -> None:
    examples = [
        ex({"text": "q0"}, {"text": "same"}),
        ex({"text": "q1"}, {"text": "same"}, target_instruction="Retrieve the caption of the image."),
        ex({"text": "q2"}, {"text": "same"}),
    ]
    keys = ContrastiveCollator(model.inputs)(examples).positive_keys
    assert keys[0] == keys[2]
    assert keys[0] != keys[1]
    # With a default target instruction, rows without their own get the default.
    keys_default = ContrastiveCollator(model.inputs, target_instruction="Retrieve the caption of the image.")(
        examples
    ).positive_keys
    assert keys_default[0] == keys_default[1] == keys_default[2]


def test_row_instruction_overrides_default_query_instruction(model: EmbeddingModel) -> None:
    default = "Represent the given image for classification."
    own = "Find the image that matches the caption."
    examples = [
        ex({"text": "a handwritten digit two"}, {"text": "p"}, instruction=own),
        ex({"text": "a handwritten digit three"}, {"text": "p"}),
    ]
    batch = ContrastiveCollator(model.inputs, query_instruction=default)(examples)
    q0, q1 = decode_rows(model, batch.query[0])
    assert own in q0
    assert default not in q0
    assert q0.endswith("a handwritten digit two")
    assert default in q1
    assert q1.endswith("a handwritten digit three")
    # Query instructions never leak into the positives.
    for text in decode_rows(model, batch.positive[0]):
        assert own not in text
        assert default not in text


def test_collator_error_names_rows(model: EmbeddingModel, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all" * 10)
    examples = [
        TrainExample(query={"text": "q"}, positive={"text": "p"}, source="a.jsonl:1"),
        TrainExample(query={"images": [str(broken)]}, positive={"text": "p"}, source="a.jsonl:2"),
    ]
    with pytest.raises(ValueError, match=r"a\.jsonl:1, a\.jsonl:2.*broken\.png"):
        ContrastiveCollator(model.inputs)(examples)


def test_rows_sharing_a_query_share_a_false_negative_group(model: EmbeddingModel) -> None:
    # The same caption asks for two different images of one digit: each image is a right
    # answer for both queries, so neither may be scored as the other's negative.
    rows = [
        ex({"text": "seven"}, {"text": "img a"}),
        ex({"text": "seven"}, {"text": "img b"}),
        ex({"text": "one"}, {"text": "img c"}),
    ]
    keys = ContrastiveCollator(model.inputs)(rows).positive_keys.tolist()
    assert keys[0] == keys[1] != keys[2]


def test_false_negative_groups_follow_chains() -> None:
    # Row 0 and 1 share a query, 1 and 2 share a positive: all three are one group.
    groups = false_negative_groups(query_keys=[10, 10, 30, 40], positive_keys=[5, 6, 6, 7])
    assert groups == [5, 5, 5, 7]  # named by the smallest positive key in each group
    assert false_negative_groups([1, 2, 3], [9, 8, 7]) == [9, 8, 7]  # no links: unchanged


def test_hard_negative_equal_to_another_rows_positive_joins_its_group(model: EmbeddingModel) -> None:
    rows = [
        ex({"text": "q1"}, {"text": "seven"}, [{"text": "one"}]),
        ex({"text": "q2"}, {"text": "one"}),
    ]
    batch = ContrastiveCollator(model.inputs)(rows)
    assert batch.negative_keys[0, 0].item() == batch.positive_keys[1].item()


def test_collator_slices_the_global_batch_and_chunks(model: EmbeddingModel) -> None:
    rows = [ex({"text": f"q{i}"}, {"text": f"p{i % 3}"}, [{"text": f"n{i}"}] * (i % 2)) for i in range(6)]
    full = ContrastiveCollator(model.inputs)(rows)
    for rank in (0, 1):
        part = ContrastiveCollator(model.inputs, rank=rank, world_size=2, chunk_size=2)(rows)
        # Keys and negative layout describe the GLOBAL batch on every process.
        assert torch.equal(part.positive_keys, full.positive_keys)
        assert torch.equal(part.negative_mask, full.negative_mask)
        assert torch.equal(part.local_negative_mask, full.negative_mask[3 * rank : 3 * rank + 3])
        # Local rows only, in chunks of at most 2.
        assert [c["input_ids"].shape[0] for c in part.query] == [2, 1]
        texts = [t for c in part.query for t in decode_rows(model, c)]
        order = part.query_order.tolist()  # equal lengths: the sort keeps row order
        assert order == [0, 1, 2]
        assert texts == [f"q{i}" for i in range(3 * rank, 3 * rank + 3)]
        # Multi-process: every row is filled to K negatives so all processes embed alike.
        assert part.negatives_padded is True
        assert sum(c["input_ids"].shape[0] for c in part.negatives) == 3 * 1


def test_a_side_in_several_chunks_is_sorted_by_length_and_mapped_back(model: EmbeddingModel) -> None:
    lengths = [3, 40, 9, 25, 1, 14]
    rows = [ex({"text": "q" * n}, {"text": f"p{i}"}) for i, n in enumerate(lengths)]
    batch = ContrastiveCollator(model.inputs, length_buckets=2)(rows)
    order = batch.query_order.tolist()
    assert order == sorted(range(6), key=lambda i: -lengths[i])  # longest first
    texts = [t for c in batch.query for t in decode_rows(model, c)]
    assert texts == ["q" * lengths[i] for i in order]  # chunk j holds rows order[j]
    # Padding: each chunk pads to its own longest, less than one chunk of all six would.
    padded = sum(c["attention_mask"].numel() for c in batch.query)
    whole = ContrastiveCollator(model.inputs)(rows).query[0]["attention_mask"].numel()
    assert padded < whole
    assert ContrastiveCollator(model.inputs)(rows).query_order is None  # one chunk: row order
