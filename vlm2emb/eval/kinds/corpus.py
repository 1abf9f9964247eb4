"""``kind: corpus``: global retrieval, every query ranks one shared corpus (qrels give relevance).

Suite keys (besides the common ones of :class:`~vlm2emb.eval.kinds.base.TaskSpec`)::

    - name: digits-corpus
      kind: corpus
      corpus: corpus.jsonl     # rows {"id", "item"}
      queries: queries.jsonl   # rows {"id", "item", "instruction"?}
      qrels: qrels.tsv         # query_id  corpus_id  relevance (or JSONL)

The file formats and scoring are :mod:`vlm2emb.eval.corpus`'s. Instructions: a query's own,
else the task's ``query_instruction``, else the model's default unless
``instruction_fallback`` is ``never`` (corpus tasks have no MMEB layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm2emb.data.schema import DataError
from vlm2emb.eval.corpus import CorpusTask, evaluate_corpus, load_corpus_task
from vlm2emb.eval.kinds.base import PATH, InstructionDefaults, TaskKind, TaskSpec
from vlm2emb.eval.rescore import Rescorer

__all__ = ["KIND", "CorpusKind", "CorpusTaskSpec"]


@dataclass(kw_only=True)
class CorpusTaskSpec(TaskSpec):
    """A corpus task.

    Attributes:
        corpus: JSONL/Parquet rows ``{"id", "item"}``.
        queries: Rows ``{"id", "item", "instruction"?}``.
        qrels: TSV (``query_id  corpus_id  relevance``, optional header) or JSONL
            ``{"query_id", "corpus_id", "relevance"}``; relevance > 0 is relevant.
    """

    kind: str = "corpus"
    corpus: str = field(metadata=PATH)
    queries: str = field(metadata=PATH)
    qrels: str = field(metadata=PATH)


class CorpusKind(TaskKind):
    name = "corpus"
    spec = CorpusTaskSpec
    supports_rescore = True

    def check(self, spec: CorpusTaskSpec, where: str) -> None:
        for key in ("corpus", "queries", "qrels"):
            if not getattr(spec, key):
                raise DataError(f"{where}: a corpus task needs {key!r}")

    def load(self, spec: CorpusTaskSpec, *, verify_images: bool = True, work_dir: Any = None) -> CorpusTask:
        return load_corpus_task(
            spec.corpus, spec.queries, spec.qrels, media_root=spec.media_root, verify_images=verify_images
        )

    def evaluate(
        self,
        encoder: Any,
        spec: CorpusTaskSpec,
        payload: CorpusTask,
        *,
        ks: tuple[int, ...],
        batch_size: int,
        defaults: InstructionDefaults,
        rescore: Rescorer | None = None,
    ) -> dict[str, Any]:
        return evaluate_corpus(
            encoder,
            payload,
            ks=ks,
            batch_size=batch_size,
            query_instruction=defaults.query(spec.query_instruction, mmeb=False),
            target_instruction=defaults.target(spec.target_instruction, mmeb=False),
            scoring=spec.scoring,
            rescore=rescore,
        )


KIND = CorpusKind()
