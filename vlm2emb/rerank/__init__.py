"""Generative reranking: the same VLM reads query and candidate together and scores them.

An embedder scores a query and a candidate that never saw each other; a reranker reads both
in one prompt, which is slower but sharper, so it re-orders the few best hits of an
embedding search (:meth:`vlm2emb.EmbeddingModel.search` with ``reranker=``). The score is
``logit(yes) - logit(no)`` of the token after an (instruction, query, candidate) prompt.

- :class:`Reranker` / :class:`RerankerConfig` (:mod:`vlm2emb.rerank.model`): loading,
  scoring, ``rerank``, LoRA, save/load.
- :func:`listwise_softmax_loss` (:mod:`vlm2emb.rerank.loss`): the training objective.
- Training: a recipe with ``model.kind: reranker`` runs the embedder's trainer
  (:mod:`vlm2emb.rerank.kind`); :func:`train_reranker` / :class:`RerankTrainConfig`
  (:mod:`vlm2emb.rerank.train`) is the older standalone single-process loop.
- :func:`score_rows` (:mod:`vlm2emb.rerank.score`): reranker scores written into training
  rows as ``teacher_scores``, for the embedder's ``distill`` loss.
- :func:`evaluate_pipeline` / :func:`evaluate_suite_pipeline` (:mod:`vlm2emb.rerank.evaluate`):
  embedder-only and recall -> rerank metrics side by side (rows, or any eval suite), with
  the seconds of each stage.

Names are resolved lazily, so ``import vlm2emb.rerank`` imports neither transformers nor
peft (docs/rerank.md).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "RerankTrainConfig",
    "Reranker",
    "RerankerConfig",
    "evaluate_pipeline",
    "evaluate_suite_pipeline",
    "listwise_softmax_loss",
    "score_rows",
    "train_reranker",
]

_LAZY = {
    "Reranker": "vlm2emb.rerank.model",
    "RerankerConfig": "vlm2emb.rerank.model",
    "listwise_softmax_loss": "vlm2emb.rerank.loss",
    "RerankTrainConfig": "vlm2emb.rerank.train",
    "train_reranker": "vlm2emb.rerank.train",
    "score_rows": "vlm2emb.rerank.score",
    "evaluate_pipeline": "vlm2emb.rerank.evaluate",
    "evaluate_suite_pipeline": "vlm2emb.rerank.evaluate",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vlm2emb.rerank' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
