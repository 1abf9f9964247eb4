"""What every eval task kind shares: the common task keys, the kind interface, the
instruction-fallback rule."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:  # the hook's type only; kinds import nothing for it at run time
    from vlm2emb.eval.rescore import Rescorer

__all__ = ["DEFAULT_KIND", "FALLBACKS", "PATH", "InstructionDefaults", "TaskKind", "TaskSpec"]

FALLBACKS = ("auto", "always", "never")
DEFAULT_KIND = "local"  # the kind of a suite task that names none
# Metadata of a spec field holding a path or a list of paths: the suite resolves relative
# ones against the suite file's folder (``demo:`` specs stay as they are).
PATH = {"path": True}


@dataclass(kw_only=True)
class TaskSpec:
    """The keys every task of a suite has; each kind's spec adds its own.

    Attributes:
        name: Task name in the report.
        kind: The task kind (:mod:`vlm2emb.eval.kinds`); ``local`` when the file omits it.
        meta_task: Group for the per-meta-task averages (MMEB: classification, vqa,
            retrieval, grounding; any string works).
        query_instruction: Instruction for queries without their own.
        target_instruction: Instruction for candidates / corpus items.
        media_root: Folder for relative image paths (default: each file's folder).
        metric: Headline metric (default: the suite's ``metric``).
        instruction_fallback: ``auto``, ``always`` or ``never``
            (:mod:`vlm2emb.eval.suite`); None = the suite's.
        scoring: ``cosine`` (single vectors) or ``maxsim`` (the multi-vector head's
            token sets, :mod:`vlm2emb.eval.scoring`).
        modality: The task's block in the MMEB leaderboard's submission file (``image``,
            ``video`` or ``visdoc``; :mod:`vlm2emb.eval.leaderboard`); None leaves it out.
    """

    name: str
    kind: str = DEFAULT_KIND
    meta_task: str = "other"
    query_instruction: str | None = None
    target_instruction: str | None = None
    media_root: str | None = field(default=None, metadata=PATH)
    metric: str | None = None
    instruction_fallback: str | None = None
    scoring: str = "cosine"
    modality: str | None = None


@dataclass(frozen=True)
class InstructionDefaults:
    """The instructions a task falls back on, and when (a task's own always win).

    Attributes:
        query_instruction: For queries without their own (the model's saved one, or the CLI's).
        target_instruction: For targets, when the task sets none.
        fallback: ``auto``, ``always`` or ``never``: the task's ``instruction_fallback`` or
            else the suite's.
    """

    query_instruction: str | None = None
    target_instruction: str | None = None
    fallback: str = "auto"

    def apply(self, *, mmeb: bool) -> bool:
        """Whether the defaults apply: ``always``, ``never``, or ``auto`` (all but MMEB-layout
        rows, whose text holds MMEB's instruction; a second one would move the scores)."""
        return self.fallback == "always" or (self.fallback == "auto" and not mmeb)

    def query(self, own: str | None, *, mmeb: bool) -> str | None:
        """A query's instruction: its own, else the default where the defaults apply
        (:func:`vlm2emb.items.resolve_instruction`)."""
        from vlm2emb.items import resolve_instruction

        return resolve_instruction(own, self.query_instruction if self.apply(mmeb=mmeb) else None)

    def target(self, own: str | None, *, mmeb: bool) -> str | None:
        """A target's instruction: the task's own, else the default where the defaults apply."""
        from vlm2emb.items import resolve_instruction

        return resolve_instruction(own, self.target_instruction if self.apply(mmeb=mmeb) else None)


class TaskKind:
    """One kind of eval task: its spec, value checks, loading and scoring.

    A kind is registered under :attr:`name` (:func:`vlm2emb.eval.kinds.register_task_kind`);
    a suite task with ``kind: NAME`` is read into :attr:`spec`, checked by :meth:`check`,
    loaded by :meth:`load` before any model work, and scored by :meth:`evaluate`.
    """

    name: ClassVar[str] = ""
    spec: ClassVar[type[TaskSpec]] = TaskSpec
    # False for kinds that list a task without scoring it (``pending``): the harness
    # reports them under ``not_run`` and leaves them out of the averages.
    runnable: ClassVar[bool] = True
    # True for kinds whose ``evaluate`` takes ``rescore=`` (a second ranking of the same
    # scores, reported under ``"rescored"``: the reranker pipeline). A kind registered
    # without it still evaluates; the pipeline refuses it by name.
    supports_rescore: ClassVar[bool] = False

    def check(self, spec: Any, where: str) -> None:
        """Value checks the spec's types do not express; raise
        :class:`~vlm2emb.data.schema.DataError` starting with ``where``."""

    def load(self, spec: Any, *, verify_images: bool = True, work_dir: Any = None) -> Any:
        """Reads the task's files (called for every task before the model loads)."""
        raise NotImplementedError

    def evaluate(
        self,
        encoder: Any,
        spec: Any,
        payload: Any,
        *,
        ks: tuple[int, ...],
        batch_size: int,
        defaults: InstructionDefaults,
        rescore: Rescorer | None = None,
    ) -> dict[str, Any]:
        """Scores the loaded task; returns metrics holding ``spec.metric`` (plus ``n``...).

        ``rescore`` (only passed where :attr:`supports_rescore`): a
        :class:`~vlm2emb.eval.rescore.Rescorer` whose metrics go under ``"rescored"``.
        """
        raise NotImplementedError
