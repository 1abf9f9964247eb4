"""``kind: pending``: a task a published benchmark counts that vlm2emb cannot load yet.

Suites that mirror a benchmark (``mmeb-v2``) list every task, so the gap is visible in the
file and in the report instead of silently shrinking the benchmark::

    - name: MSR-VTT
      kind: pending
      meta_task: video_retrieval
      reason: no loader for MMEB-V2's video layout yet

A pending task reads no file and is not scored: the report lists it under ``not_run`` with
its reason, and the averages cover the tasks that ran (``n_tasks`` says how many), so an
``average`` of a suite with pending tasks is not the benchmark's overall score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlm2emb.eval.kinds.base import InstructionDefaults, TaskKind, TaskSpec

__all__ = ["KIND", "PendingKind", "PendingTaskSpec"]


@dataclass(kw_only=True)
class PendingTaskSpec(TaskSpec):
    """A task listed but not run.

    Attributes:
        reason: Why it cannot run yet (shown in the report's ``not_run``).
    """

    kind: str = "pending"
    reason: str = "no loader for this task's layout yet"


class PendingKind(TaskKind):
    name = "pending"
    spec = PendingTaskSpec
    runnable = False

    def load(self, spec: PendingTaskSpec, *, verify_images: bool = True, work_dir: Any = None) -> None:
        return None

    def evaluate(
        self,
        encoder: Any,
        spec: PendingTaskSpec,
        payload: Any,
        *,
        ks: tuple[int, ...],
        batch_size: int,
        defaults: InstructionDefaults,
    ) -> dict[str, Any]:
        raise RuntimeError(f"task {spec.name!r} is pending ({spec.reason}); the harness skips it")


KIND = PendingKind()
