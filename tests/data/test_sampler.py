"""The global batch plan: homogeneous batches, mixing weights, length grouping, dedup."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from vlm2emb.data.sampler import GlobalBatchSampler, grouping_keys, sampler_for
from vlm2emb.data.schema import TrainExample


def _batches(sampler: GlobalBatchSampler, n: int) -> list[list[int]]:
    return [sampler.global_batch(step) for step in range(n)]


def test_default_plan_is_unchanged_by_the_new_options() -> None:
    # A plain sampler and one with a single source and no options draw the same order.
    plain = GlobalBatchSampler(40, 8, seed=3)
    same = GlobalBatchSampler(40, 8, seed=3, sources=[0] * 40)
    assert _batches(plain, 12) == _batches(same, 12)


def test_homogeneous_batches_come_from_one_dataset() -> None:
    names = ["a"] * 30 + ["b"] * 21 + ["c"] * 9
    sampler = GlobalBatchSampler(len(names), 4, seed=0, datasets=names)
    assert sampler.batches_per_epoch == 7 + 5 + 2
    plan = _batches(sampler, sampler.batches_per_epoch)
    assert all(len({names[i] for i in batch}) == 1 for batch in plan)
    per_dataset = Counter(names[batch[0]] for batch in plan)
    assert per_dataset == {"a": 7, "b": 5, "c": 2}
    # The batch order mixes datasets (not all "a" first) and repeats for the same seed.
    assert [names[b[0]] for b in plan] != sorted(names[b[0]] for b in plan)
    again = GlobalBatchSampler(len(names), 4, seed=0, datasets=names)
    assert _batches(again, 20) == _batches(sampler, 20)
    assert _batches(GlobalBatchSampler(len(names), 4, seed=1, datasets=names), 14) != plan


def test_homogeneous_needs_one_dataset_as_large_as_a_batch() -> None:
    with pytest.raises(ValueError, match=r"data\.homogeneous"):
        GlobalBatchSampler(12, 8, seed=0, datasets=["a"] * 6 + ["b"] * 6)


def test_weights_mix_sources_in_proportion() -> None:
    sources = [0] * 80 + [1] * 20
    sampler = GlobalBatchSampler(100, 10, seed=0, sources=sources, weights=[1.0, 1.0])
    rows = [i for batch in _batches(sampler, sampler.batches_per_epoch) for i in batch]
    counts = Counter(sources[i] for i in rows)
    assert counts == {0: 50, 1: 50}  # the small source is upsampled, the large one subsampled
    small = Counter(i for i in rows if sources[i] == 1)
    assert set(small) == set(range(80, 100)) and max(small.values()) <= 3  # each row 2-3 times


def test_zero_weight_drops_a_source() -> None:
    sources = [0] * 20 + [1] * 20
    sampler = GlobalBatchSampler(40, 4, seed=0, sources=sources, weights=[0, 1])
    assert all(i >= 20 for b in _batches(sampler, 30) for i in b)


def test_length_grouping_cuts_padding_and_keeps_every_row() -> None:
    lengths = [(i * 37) % 101 for i in range(200)]
    plain = GlobalBatchSampler(200, 8, seed=0)
    grouped = GlobalBatchSampler(200, 8, seed=0, lengths=lengths, mega_batches=25)

    def padding(batches: list[list[int]]) -> int:
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    p_plain, p_grouped = _batches(plain, 25), _batches(grouped, 25)
    assert padding(p_grouped) < padding(p_plain) / 5
    assert sorted(i for b in p_grouped for i in b) == list(range(200))
    assert _batches(GlobalBatchSampler(200, 8, seed=0, lengths=lengths, mega_batches=25), 25) == p_grouped


def test_dedup_positives_drops_and_replaces_duplicates() -> None:
    keys = [i % 5 for i in range(40)]  # 5 distinct positives, 8 copies each
    sampler = GlobalBatchSampler(40, 5, seed=0, dedup_keys=keys)
    plan = _batches(sampler, sampler.batches_per_epoch)
    assert all(len({keys[i] for i in b}) == 5 for b in plan)
    plain = _batches(GlobalBatchSampler(40, 5, seed=0), 8)
    assert any(len({keys[i] for i in b}) < 5 for b in plain)  # without dedup they collide


def _example(i: int, dataset: str, text: str = "t") -> TrainExample:
    return TrainExample(query={"text": text}, positive={"text": f"p{i}"}, dataset=dataset, origin=0)


def test_sampler_for_reads_the_data_section() -> None:
    examples = [_example(i, "a" if i < 12 else "b", "x" * i) for i in range(24)]
    data = SimpleNamespace(
        homogeneous=True,
        weights=[],
        group_by_length=True,
        mega_batch=2,
        dedup_positives=True,
        target_instruction=None,
        batching="random",
        batch_partitioner="greedy",
    )
    sampler = sampler_for(examples, data, 4, seed=0)
    for batch in _batches(sampler, 12):
        assert len({examples[i].dataset for i in batch}) == 1
    assert grouping_keys([examples[8]]) == [(0, 0, 0, 2, 2)]  # 8 chars of query text / 4, short positive


def test_dedup_epochs_of_different_lengths_follow_each_other() -> None:
    # Many copies of few positives: the rows left waiting at an epoch's end vary by epoch.
    keys = [0] * 9 + [1] * 5 + [2] * 3 + [3] * 2 + [4, 5]
    sampler = GlobalBatchSampler(len(keys), 3, seed=0, dedup_keys=keys)
    lengths = [len(sampler.epoch_plan(e)) for e in range(6)]
    steps = [sampler.global_batch(s) for s in range(sum(lengths))]
    expected = [b for e in range(6) for b in sampler.epoch_plan(e)]
    assert steps == expected
    assert all(len({keys[i] for i in b}) == 3 for b in steps)
    resumed = GlobalBatchSampler(len(keys), 3, seed=0, dedup_keys=keys, start_step=lengths[0] + 1)
    assert next(iter(resumed)) == expected[lengths[0] + 1]


def test_grouping_keys_put_layouts_apart_and_count_tokens(tiny_qwen2_vl_dir) -> None:
    from vlm2emb import EmbeddingModel
    from vlm2emb.data.schema import TrainExample

    tok = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir).adapter.tokenizer
    text_row = TrainExample(query={"text": "short"}, positive={"text": "a much longer target passage " * 8})
    image_row = TrainExample(query={"text": "", "images": ["x.png"]}, positive={"text": "a caption"})
    keys = grouping_keys([text_row, image_row], tok)
    n_target = len(tok(text_row.positive["text"], add_special_tokens=False)["input_ids"])
    n_query = len(tok("short", add_special_tokens=False)["input_ids"])
    assert keys[0] == (0, 0, 0, n_target, n_query + n_target)  # exact counts, longest side first
    assert keys[1][:3] == (1, 0, 0)  # an image query sorts apart from text-only rows
