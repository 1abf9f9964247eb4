"""How many CPU threads torch's operators use in a command.

torch starts one intra-op thread per physical core and keeps them spinning between
operations. That is right on an idle machine, and wrong on a shared one: when the cores are
already busy, the extra threads wait on each other, and a run can be a hundred times slower
than with one thread (the two-core demo: 354 s under load, against 3.2 s per 10 steps with
one thread per process). The commands therefore pick a default from the cores this process
may use, the processes sharing them and the machine's current load. ``OMP_NUM_THREADS``,
when set (by the user, or by ``accelerate launch`` / ``torchrun`` for several processes), is
the one owner of the setting and is left alone.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["ThreadChoice", "choose_num_threads", "detect_thread_choice"]


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a command applies, and why.

    Attributes:
        threads: torch intra-op threads for this process.
        share: this process's share of the cores (cores // local processes).
        cores: cores this process may run on.
        load: the 1-minute load average the choice saw (None where the OS gives none).
    """

    threads: int
    share: int
    cores: int
    load: float | None

    @property
    def reduced_for_load(self) -> bool:
        """True when the machine's load, not the core count, set the number."""
        return self.threads < self.share


def choose_num_threads(
    cores: int, local_processes: int = 1, load: float | None = None, omp_num_threads: str | None = None
) -> ThreadChoice | None:
    """The default torch thread count for one process (a pure function of its inputs).

    Rule: with ``OMP_NUM_THREADS`` set, nothing (None: the user's or the launcher's value
    stands). Otherwise each of the ``local_processes`` processes on this machine gets an
    equal share of ``cores``, and no more than its share of the cores the load average
    leaves idle, rounded to the nearest thread; never fewer than one.

    Args:
        cores: Cores this process may run on (``os.sched_getaffinity``).
        local_processes: Processes of this run on this machine (``LOCAL_WORLD_SIZE``).
        load: The machine's 1-minute load average (runnable processes), or None.
        omp_num_threads: The ``OMP_NUM_THREADS`` environment value, or None when unset.

    Returns:
        The choice, or None when ``OMP_NUM_THREADS`` decides.
    """
    if omp_num_threads is not None and omp_num_threads.strip():
        return None
    cores = max(1, int(cores))
    local_processes = max(1, int(local_processes))
    share = max(1, cores // local_processes)
    threads = share
    if load is not None and math.isfinite(load):
        idle = max(0.0, cores - load)
        # round-half-up so 1.5 idle cores for one process give 2 threads, not banker's 2/1.
        threads = min(share, max(1, math.floor(idle / local_processes + 0.5)))
    return ThreadChoice(threads=threads, share=share, cores=cores, load=load)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset / cgroup cpusets
    except AttributeError:  # macOS and Windows have no affinity call
        return os.cpu_count() or 1


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows
        return None


def detect_thread_choice(environ: Mapping[str, str] | None = None) -> ThreadChoice | None:
    """:func:`choose_num_threads` for this process and machine."""
    env = os.environ if environ is None else environ
    local = env.get("LOCAL_WORLD_SIZE") or "1"
    return choose_num_threads(
        _cores(),
        int(local) if local.isdigit() else 1,
        _load(),
        env.get("OMP_NUM_THREADS"),
    )
