"""The CLI's default torch thread count: the rule as a pure function, and its application."""

from __future__ import annotations

import os

import pytest
import torch

from vlm2emb._threads import choose_num_threads, detect_thread_choice
from vlm2emb.cli import _apply_thread_default


@pytest.mark.parametrize(
    ("cores", "local", "load", "expected"),
    [
        (8, 1, None, 8),  # no load figure: every core
        (8, 1, 0.3, 8),  # idle machine: every core
        (8, 2, 0.0, 4),  # two processes of one run share the cores
        (8, 3, 0.0, 2),  # 8 // 3
        (2, 1, 4.8, 1),  # five jobs on two cores (the busy demo machine): one thread
        (8, 1, 5.0, 3),  # three cores left idle
        (8, 1, 5.6, 2),  # 2.4 idle cores round to 2
        (8, 1, 5.4, 3),  # 2.6 round to 3
        (8, 2, 4.0, 2),  # 4 idle cores between two processes
        (4, 8, 0.0, 1),  # more processes than cores: never zero
        (16, 1, 30.0, 1),  # overloaded: never zero
    ],
)
def test_the_rule(cores: int, local: int, load: float | None, expected: int) -> None:
    choice = choose_num_threads(cores, local, load, None)
    assert choice is not None
    assert choice.threads == expected
    assert choice.share == max(1, cores // local)
    assert choice.reduced_for_load == (expected < choice.share)


@pytest.mark.parametrize("omp", ["1", "6", " 3 "])
def test_omp_num_threads_owns_the_setting(omp: str) -> None:
    assert choose_num_threads(8, 1, 30.0, omp) is None
    assert detect_thread_choice({"OMP_NUM_THREADS": omp}) is None
    # An empty value counts as unset (shells that export OMP_NUM_THREADS= ).
    assert choose_num_threads(8, 1, 0.0, "") is not None


def test_detect_reads_the_local_process_count() -> None:
    one = detect_thread_choice({})
    two = detect_thread_choice({"LOCAL_WORLD_SIZE": "2"})
    assert one is not None and two is not None
    assert one.cores == len(os.sched_getaffinity(0))
    assert one.share == one.cores and two.share == max(1, one.cores // 2)
    assert 1 <= two.threads <= two.share


def test_the_cli_applies_the_choice_and_puts_the_old_count_back(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    expected = detect_thread_choice()
    assert expected is not None
    # Start from a count the rule can never pick, so the test sees the call take effect.
    torch.set_num_threads(expected.cores + 3)
    try:
        restore = _apply_thread_default()
        # The load may move between the two reads; the share bounds it either way.
        assert 1 <= torch.get_num_threads() <= expected.share
        restore()
        assert torch.get_num_threads() == expected.cores + 3
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(before)
    _apply_thread_default()()  # OMP_NUM_THREADS set: nothing changes
    assert torch.get_num_threads() == before
