"""``kind: beir``: a BEIR-style dataset folder (ViDoRe, BEIR, MTEB) scored as global retrieval.

Suite keys (besides the common ones of :class:`~vlm2emb.eval.kinds.base.TaskSpec`)::

    - name: vidore/docvqa_test_subsampled_beir
      kind: beir
      data: vidore/docvqa_test_subsampled_beir   # the folder (JSONL or Parquet layout)
      split: test
      metric: ndcg@5

The layouts and field names are :mod:`vlm2emb.eval.beir`'s; scoring is ``kind: corpus``'s
(:func:`vlm2emb.eval.corpus.evaluate_corpus`, graded nDCG). Instructions: the task's
``query_instruction``, else the model's default unless ``instruction_fallback`` is
``never`` (BEIR rows have no instruction of their own and no MMEB layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm2emb.data.schema import DataError
from vlm2emb.eval.beir import load_beir_task
from vlm2emb.eval.corpus import CorpusTask
from vlm2emb.eval.kinds.base import PATH, TaskSpec
from vlm2emb.eval.kinds.corpus import CorpusKind

__all__ = ["KIND", "BeirKind", "BeirTaskSpec"]


@dataclass(kw_only=True)
class BeirTaskSpec(TaskSpec):
    """A BEIR-folder task.

    Attributes:
        data: The dataset folder (``corpus``, ``queries``, ``qrels`` tables).
        split: The qrels split to score (and the Parquet shard prefix).
    """

    kind: str = "beir"
    data: str = field(metadata=PATH)
    split: str = "test"


class BeirKind(CorpusKind):
    name = "beir"
    spec = BeirTaskSpec

    def check(self, spec: BeirTaskSpec, where: str) -> None:
        if not spec.data:
            raise DataError(f"{where}: a beir task needs 'data' (the dataset folder)")
        if not spec.split:
            raise DataError(f"{where}: 'split' must not be empty")

    def load(self, spec: BeirTaskSpec, *, verify_images: bool = True, work_dir: Any = None) -> CorpusTask:
        return load_beir_task(
            spec.data, split=spec.split, media_root=spec.media_root, verify_images=verify_images
        )


KIND = BeirKind()
