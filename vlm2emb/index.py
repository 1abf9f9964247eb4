"""A FAISS flat inner-product index for embeddings (optional extra: ``pip install vlm2emb[faiss]``).

``faiss`` is imported only when an index is built or loaded, so ``import vlm2emb`` does not
need it. With L2-normalised embeddings (vlm2emb's default) inner product is cosine
similarity, and a flat index is exact search.

Example:
    >>> from vlm2emb.index import FlatIndex
    >>> index = FlatIndex(dim=64)  # doctest: +SKIP
    >>> index.add(model.encode_targets(corpus))  # doctest: +SKIP
    >>> scores, ids = index.search(model.encode_queries(queries), top_k=5)  # doctest: +SKIP
    >>> index.save("corpus.faiss")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("vlm2emb.index needs faiss: pip install 'vlm2emb[faiss]' (faiss-cpu)") from exc
    return faiss


def _as_matrix(x: Any, dim: int, name: str) -> np.ndarray:
    """Tensor or array [n, d] (or [d]) -> C-contiguous float32 [n, d], as faiss requires."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    arr = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{name} must have shape [n, {dim}], got {list(arr.shape)}")
    return arr


class FlatIndex:
    """Exact inner-product search over added embeddings (``faiss.IndexFlatIP``).

    Args:
        dim: Embedding dimension.
    """

    def __init__(self, dim: int) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = int(dim)
        self._index = _faiss().IndexFlatIP(self.dim)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, embeddings: Any) -> None:
        """Appends [n, dim] embeddings; their ids continue from ``len(self)``."""
        self._index.add(_as_matrix(embeddings, self.dim, "embeddings"))

    def search(self, queries: Any, top_k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Returns ``(scores [n, k], ids [n, k])``, best first (k = min(top_k, len(self)))."""
        if len(self) == 0:
            raise ValueError("the index is empty; add() embeddings first")
        k = min(int(top_k), len(self))
        scores, ids = self._index.search(_as_matrix(queries, self.dim, "queries"), k)
        return scores, ids

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes the index in faiss's own binary format (not a pickle)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        _faiss().write_index(self._index, str(out))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FlatIndex:
        """Reads an index written by :meth:`save`."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"index file not found: {p}")
        raw = _faiss().read_index(str(p))
        if raw.metric_type != _faiss().METRIC_INNER_PRODUCT:
            raise ValueError(f"{p}: not an inner-product index")
        obj = cls.__new__(cls)
        obj.dim = int(raw.d)
        obj._index = raw
        return obj
