"""Teacher-built batches: the graph from mined negatives, its partitions, and the sampler."""

from __future__ import annotations

import pytest

from tests.helpers import ROOT
from vlm2emb.data.sampler import GlobalBatchSampler, sampler_for
from vlm2emb.data.schema import TrainExample
from vlm2emb.data.teacher_batches import partition, teacher_graph
from vlm2emb.train.config import ConfigError, DataConfig, load_recipe


def _cliques(n_cliques=4, size=8, dataset=lambda c: "d"):
    """Rows in cliques: each row's negatives are the positives of its clique mates."""
    rows = []
    for c in range(n_cliques):
        for k in range(size):
            mates = [f"p{c}-{m}" for m in range(size) if m != k]
            rows.append(
                TrainExample(
                    query={"text": f"q{c}-{k}"},
                    positive={"text": f"p{c}-{k}"},
                    negatives=[{"text": t} for t in mates[:3]],  # a few links per row suffice
                    dataset=dataset(c),
                )
            )
    return rows


def test_graph_links_rows_whose_positive_is_anothers_negative():
    rows = [
        TrainExample(query={"text": "a"}, positive={"text": "A"}, negatives=[{"text": "B"}]),
        TrainExample(query={"text": "b"}, positive={"text": "B"}),
        TrainExample(query={"text": "c"}, positive={"text": "C"}, negatives=[{"text": "unrelated"}]),
        TrainExample(query={"text": "d"}, positive={"text": "B"}),  # shares B: linked to row 0 too
    ]
    assert teacher_graph(rows, None) == [[1, 3], [0], [], [0]]
    # Content ids include the instruction: a negative embedded differently is another item.
    rows[1] = TrainExample(query={"text": "b"}, positive={"text": "B"}, target_instruction="other")
    assert teacher_graph(rows, None) == [[3], [], [], [0]]


@pytest.mark.parametrize("method", ["greedy", "metis"])
def test_each_clique_becomes_one_batch(method):
    rows = _cliques()
    graph = teacher_graph(rows, None)
    batches = partition(graph, range(len(rows)), 8, seed=5, method=method)
    assert len(batches) == 4 and all(len(b) == 8 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(32))
    assert sorted(sorted({i // 8 for i in b}) for b in batches) == [[0], [1], [2], [3]]


def test_greedy_is_seeded_and_fills_exact_batches_on_any_graph():
    rows = _cliques(n_cliques=5, size=7)  # 35 rows, batches of 8: cliques must be split
    graph = teacher_graph(rows, None)
    a = partition(graph, range(35), 8, seed=1)
    assert a == partition(graph, range(35), 8, seed=1)
    assert a != partition(graph, range(35), 8, seed=2)
    assert len(a) == 4 and all(len(b) == 8 for b in a)
    flat = [i for b in a for i in b]
    assert len(flat) == len(set(flat))
    # Far more in-batch links than a random cut of the same rows.
    links = sum(1 for b in a for i in b for j in graph[i] if j in b)
    random_cut = [list(range(35))[k : k + 8] for k in (0, 8, 16, 24)]
    shuffled = sum(1 for b in random_cut for i in b for j in graph[i] if j in b)
    assert links > shuffled


def test_sampler_keeps_datasets_apart_and_processes_consistent():
    rows = _cliques(dataset=lambda c: f"set{c % 2}")
    data = DataConfig(train=["x"], batching="teacher", homogeneous=True)
    whole = sampler_for(rows, data, 8, seed=3)
    plan = [whole.global_batch(s) for s in range(8)]  # two epochs
    assert all(len({rows[i].dataset for i in b}) == 1 for b in plan)
    assert plan[:4] != plan[4:]  # each epoch cuts and orders anew
    # Two processes: their slices form the same global batches; a resumed sampler continues.
    halves = [
        iter(GlobalBatchSampler(32, 8, 3, rank=r, world_size=2, graph=whole.graph, datasets=whole.datasets))
        for r in (0, 1)
    ]
    for step in range(4):
        assert next(halves[0]) + next(halves[1]) == plan[step]
    resumed = iter(GlobalBatchSampler(32, 8, 3, start_step=5, graph=whole.graph, datasets=whole.datasets))
    assert next(resumed) == plan[5]


def test_batching_settings_are_checked():
    base = ROOT / "recipes" / "demo.yaml"
    load_recipe(base, ["data.batching=teacher", "data.batch_partitioner=metis"])
    for override, message in [
        (["data.batching=teachers"], "data.batching"),
        (
            ["data.batching=teacher", "data.group_by_length=true"],
            "cannot be combined with data.group_by_length",
        ),
        (["data.batching=teacher", "data.batch_partitioner=kmeans"], "data.batch_partitioner"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_recipe(base, override)
    with pytest.raises(ValueError, match=r"cannot be combined with data\.group_by_length"):
        GlobalBatchSampler(32, 8, 0, graph=[[]] * 32, lengths=[1] * 32)


@pytest.mark.parametrize("method", ["greedy", "metis"])
def test_teacher_batches_hold_distinct_positives(method):
    # 6 targets, 8 rows each (many rows per target, as in classification data); each row's
    # negatives are two other targets. Batches of 4 must hold 4 different targets.
    rows = [
        TrainExample(
            query={"text": f"q{t}-{k}"},
            positive={"text": f"T{t}"},
            negatives=[{"text": f"T{(t + 1) % 6}"}, {"text": f"T{(t + 2) % 6}"}],
        )
        for t in range(6)
        for k in range(8)
    ]
    sampler = sampler_for(
        rows, DataConfig(train=["x"], batching="teacher", batch_partitioner=method), 4, seed=0
    )
    plan = sampler.epoch_plan(0)
    assert len(plan) >= 8  # most of the 48 rows still train this epoch
    for batch in plan:
        targets = [rows[i].positive["text"] for i in batch]
        assert len(batch) == 4 and len(set(targets)) == 4
