"""vlm2emb: turn vision-language models into embedding models by contrastive fine-tuning.

The top-level import stays light: it exposes :class:`EmbeddingModel` and
``vlm2emb.train(recipe, **overrides)`` lazily so that ``import vlm2emb`` loads neither
torch-heavy training code nor deepspeed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["EmbeddingModel", "__version__", "train"]

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.model import EmbeddingModel


def __getattr__(name: str) -> Any:
    # Lazy attribute access keeps `import vlm2emb` cheap (no transformers import until used).
    if name == "EmbeddingModel":
        from vlm2emb.model import EmbeddingModel

        return EmbeddingModel
    if name == "train":
        # vlm2emb.train(recipe, **overrides): the training package, callable (see its doc);
        # imported on first use, so `import vlm2emb` loads no training code.
        import importlib

        return importlib.import_module("vlm2emb.train")
    raise AttributeError(f"module 'vlm2emb' has no attribute {name!r}")
