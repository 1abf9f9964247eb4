"""Search indexes: :class:`FlatIndex` (single vectors, FAISS) and :class:`MultiVectorIndex`
(token sets scored by MaxSim, stored as safetensors).

:class:`FlatIndex` is a FAISS flat inner-product index (optional extra:
``pip install vlm2emb[faiss]``).

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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["FIRST_STAGES", "FlatIndex", "MultiVectorIndex"]


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


# ---------------------------------------------------------------------------- multi-vector
_MV_FORMAT = "vlm2emb-multivector-index"
_MV_VERSION = "1"
_MV_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# How candidates for exact MaxSim are found when ``search(candidates=...)`` is set.
FIRST_STAGES = ("mean", "tokens")


def _faiss_or_none() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


class _Nearest:
    """Exact maximum-inner-product lookup over ``base`` [m, D]: FAISS's flat index when
    ``faiss`` is installed (built once per search), else a torch matrix product."""

    def __init__(self, base: torch.Tensor) -> None:
        self.base = base.float()  # [m, D]
        faiss = _faiss_or_none()
        self.index = None
        if faiss is not None:
            self.index = faiss.IndexFlatIP(base.shape[1])
            self.index.add(np.ascontiguousarray(self.base.numpy()))

    def top(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """[n, k] ids of the rows with the largest inner products with ``queries`` [n, D]."""
        k = min(k, self.base.shape[0])
        if self.index is not None:
            _, ids = self.index.search(np.ascontiguousarray(queries.float().numpy()), k)
            return torch.from_numpy(ids).long()
        return (queries.float() @ self.base.T).topk(k, dim=1).indices


class MultiVectorIndex:
    """Exact MaxSim search over a corpus of token sets, kept as one flat token matrix.

    The corpus is ``tokens`` [T, D] (every document's token vectors, one after the other)
    and ``offsets`` [N + 1] (document ``i`` owns rows ``offsets[i]:offsets[i + 1]``), the
    layout :meth:`save` writes to one safetensors file. Documents may be pooled when added
    (``pool_factor``, :func:`vlm2emb.multivector.pool_tokens`) and stored in half precision
    (``dtype``) to cut storage; scores are always computed in float32.

    :meth:`search` scores every document by MaxSim (exact), or first picks ``candidates``
    documents cheaply and re-scores only those exactly:

    * ``first_stage="mean"``: cosine between the query's mean token and each document's
      mean token (one vector per document);
    * ``first_stage="tokens"`` (ColBERT's candidate generation): each query token's nearest
      stored tokens (``probe`` of them) vote for their documents with their scores, an
      approximate MaxSim in which the tokens not found count 0.

    Nearest-vector lookups use FAISS's exact flat index when ``faiss`` is installed, else a
    torch matrix product.

    Args:
        dim: D, the token vector size.
        pool_factor: Pool each added document to about ``1 / pool_factor`` of its tokens
            (1 = keep every token).
        dtype: Storage dtype: ``float32``, ``float16`` or ``bfloat16``.

    Example:
        >>> index = MultiVectorIndex(dim=128, pool_factor=2)  # doctest: +SKIP
        >>> index.add(model.encode(pages, output="multivector"))  # doctest: +SKIP
        >>> scores, ids = index.search(model.encode(queries, output="multivector"), top_k=5)  # doctest: +SKIP
        >>> index.save("pages.mvindex.safetensors")  # doctest: +SKIP
    """

    def __init__(self, dim: int, *, pool_factor: int = 1, dtype: str = "float32") -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if isinstance(pool_factor, bool) or not isinstance(pool_factor, int) or pool_factor < 1:
            raise ValueError(f"pool_factor must be a positive integer, got {pool_factor!r}")
        if dtype not in _MV_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_MV_DTYPES)}, got {dtype!r}")
        self.dim, self.pool_factor, self.dtype = dim, pool_factor, dtype
        self._tokens = torch.empty(0, dim, dtype=_MV_DTYPES[dtype])  # [T, D]
        self._offsets = torch.zeros(1, dtype=torch.int64)  # [N + 1]

    # ------------------------------------------------------------------ contents
    def __len__(self) -> int:
        return int(self._offsets.numel() - 1)

    @property
    def num_tokens(self) -> int:
        """T, the stored token vectors."""
        return int(self._tokens.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tokens and offsets (what :meth:`save` writes, less its header)."""
        return self._tokens.numel() * self._tokens.element_size() + self._offsets.numel() * 8

    def token_set(self, i: int) -> torch.Tensor:
        """[L_i, D] document ``i``'s stored (possibly pooled) token vectors, float32."""
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range for an index of {len(self)}")
        return self._tokens[self._offsets[i] : self._offsets[i + 1]].float()

    def add(self, token_sets: Sequence[Any]) -> None:
        """Appends documents; their ids continue from ``len(self)``.

        Args:
            token_sets: One ``[L_i, D]`` tensor or array per document (what
                ``encode(output="multivector")`` returns); ``L_i`` may be 0.

        Raises:
            ValueError: A set of the wrong shape or with non-finite values (nothing is added).
        """
        from vlm2emb.multivector import pool_tokens

        sets = []
        for i, raw in enumerate(token_sets):
            t = torch.as_tensor(raw).detach().float().cpu()
            if t.ndim != 2 or t.shape[1] != self.dim:
                raise ValueError(f"token set {i} must have shape [L, {self.dim}], got {list(t.shape)}")
            if not torch.isfinite(t).all():
                raise ValueError(f"token set {i} has non-finite values")
            sets.append(pool_tokens(t, self.pool_factor))
        if not sets:
            return
        lengths = torch.tensor([len(t) for t in sets], dtype=torch.int64)
        stored = torch.cat(sets).to(_MV_DTYPES[self.dtype])  # [sum L_i', D]
        self._tokens = torch.cat([self._tokens, stored])
        self._offsets = torch.cat([self._offsets, self._offsets[-1] + lengths.cumsum(0)])

    # ------------------------------------------------------------------ search
    def _doc_blocks(
        self, ids: torch.Tensor, max_tokens: int
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The documents ``ids`` padded in blocks of at most ``max_tokens`` padded tokens:
        ``(ids [b], tokens [b, L, D] float32, mask [b, L])`` per block."""
        from vlm2emb.multivector import pad_token_sets

        lengths = (self._offsets[1:] - self._offsets[:-1])[ids]  # [n]
        # Similar lengths share a block: less padding scored.
        order = ids[lengths.argsort(stable=True)]
        blocks, start = [], 0
        while start < len(order):
            end, longest = start, 0
            while end < len(order):
                n = int(self._offsets[order[end] + 1] - self._offsets[order[end]])
                if end > start and max(longest, n) * (end - start + 1) > max_tokens:
                    break
                longest, end = max(longest, n), end + 1
            block = order[start:end]
            tokens, mask = pad_token_sets([self.token_set(int(i)) for i in block])
            blocks.append((block, tokens, mask))
            start = end
        return blocks

    def _exact(self, query: torch.Tensor, query_mask: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[Nq, n] exact MaxSim of the queries against documents ``ids`` [n] (in that order)."""
        from vlm2emb.multivector import maxsim

        out = torch.empty(query.shape[0], len(ids))  # [Nq, n]
        where = {int(d): j for j, d in enumerate(ids.tolist())}
        for block, tokens, mask in self._doc_blocks(ids, max_tokens=1 << 16):
            cols = torch.tensor([where[int(d)] for d in block])
            out[:, cols] = maxsim(query, tokens, query_mask, mask)
        return out

    def _candidates(
        self, query: torch.Tensor, query_mask: torch.Tensor, first_stage: str, candidates: int, probe: int
    ) -> list[torch.Tensor]:
        """Per query, at most ``candidates`` document ids [c] from the first stage."""
        n = len(self)
        owners = self._owners()  # [T]
        tokens = self._tokens.float()  # [T, D]
        if first_stage == "mean":
            doc_means = F.normalize(torch.zeros(n, self.dim).index_add_(0, owners, tokens), dim=-1)  # [N, D]
            q_means = F.normalize((query * query_mask.unsqueeze(-1)).sum(1), dim=-1)  # [Nq, D]
            return list(_Nearest(doc_means).top(q_means, candidates))  # Nq x [c]
        nearest = _Nearest(tokens)
        out = []
        for q, m in zip(query, query_mask):
            real = q[m]  # [Lq_i, D]
            if len(real) == 0:
                out.append(torch.arange(min(candidates, n)))
                continue
            hits = nearest.top(real, probe)  # [Lq_i, p] token ids
            scores = (real.unsqueeze(1) * tokens[hits]).sum(-1)  # [Lq_i, p]
            # Approximate MaxSim: per query token, its best hit inside each document; a
            # document none of its tokens was found for counts 0 for that query token.
            best = torch.full((len(real), n), float("-inf"))
            best.scatter_reduce_(1, owners[hits], scores, reduce="amax")  # [Lq_i, N]
            found = torch.isfinite(best).any(0)  # [N]
            approx = best.clamp(min=0).sum(0).masked_fill(~found, float("-inf"))  # [N]
            out.append(approx.topk(min(candidates, int(found.sum()))).indices)
        return out

    def _owners(self) -> torch.Tensor:
        """[T] the document of each stored token."""
        lengths = self._offsets[1:] - self._offsets[:-1]  # [N]
        return torch.repeat_interleave(torch.arange(len(self)), lengths)

    def search(
        self,
        queries: Sequence[Any],
        top_k: int = 10,
        *,
        candidates: int | None = None,
        first_stage: str = "tokens",
        probe: int = 64,
    ) -> tuple[np.ndarray, np.ndarray]:
        """MaxSim search, best first.

        Args:
            queries: One ``[Lq_i, D]`` token set per query.
            top_k: Hits per query (at most ``len(self)``).
            candidates: None scores every document exactly. Otherwise the first stage picks
                this many documents per query and only they are scored exactly.
            first_stage: ``tokens`` or ``mean`` (see the class docstring).
            probe: With ``first_stage="tokens"``, stored tokens looked up per query token.

        Returns:
            ``(scores [n, k] float32, ids [n, k] int64)`` with ``k = min(top_k, len(self))``;
            a query whose first stage found fewer than ``k`` documents has ids -1 and
            scores -inf in the remaining slots.

        Raises:
            ValueError: An empty index, a bad argument or a query of the wrong shape.
        """
        from vlm2emb.multivector import pad_token_sets

        if len(self) == 0:
            raise ValueError("the index is empty; add() token sets first")
        if first_stage not in FIRST_STAGES:
            raise ValueError(f"first_stage must be one of {', '.join(FIRST_STAGES)}, got {first_stage!r}")
        if candidates is not None and candidates < 1:
            raise ValueError(f"candidates must be a positive integer or None, got {candidates!r}")
        sets = [torch.as_tensor(q).detach().float().cpu() for q in queries]
        for i, q in enumerate(sets):
            if q.ndim != 2 or q.shape[1] != self.dim:
                raise ValueError(f"query {i} must have shape [L, {self.dim}], got {list(q.shape)}")
        if not sets:
            return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64)
        k = min(int(top_k), len(self))
        query, query_mask = pad_token_sets(sets)  # [Nq, Lq, D], [Nq, Lq]
        scores = np.full((len(sets), k), -np.inf, dtype=np.float32)
        ids = np.full((len(sets), k), -1, dtype=np.int64)
        if candidates is None or candidates >= len(self):
            everything = self._exact(query, query_mask, torch.arange(len(self)))  # [Nq, N]
            top = everything.topk(k, dim=1)
            return top.values.numpy().astype(np.float32), top.indices.numpy().astype(np.int64)
        for row, cand in enumerate(self._candidates(query, query_mask, first_stage, candidates, probe)):
            if len(cand) == 0:
                continue
            exact = self._exact(query[row : row + 1], query_mask[row : row + 1], cand)[0]  # [c]
            top = exact.topk(min(k, len(cand)))
            scores[row, : len(top.values)] = top.values.numpy()
            ids[row, : len(top.values)] = cand[top.indices].numpy()
        return scores, ids

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Writes ``tokens`` and ``offsets`` to one safetensors file (written to a temporary
        name first, so an interrupted save never leaves a half-written index)."""
        from safetensors.torch import save_file

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        metadata = {
            "format": _MV_FORMAT,
            "version": _MV_VERSION,
            "dim": str(self.dim),
            "pool_factor": str(self.pool_factor),
            "dtype": self.dtype,
        }
        save_file(
            {"tokens": self._tokens.contiguous(), "offsets": self._offsets}, str(tmp), metadata=metadata
        )
        os.replace(tmp, out)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MultiVectorIndex:
        """Reads an index written by :meth:`save`.

        Raises:
            FileNotFoundError: No such file.
            ValueError: Not a multi-vector index, or its tensors disagree (one line naming the file).
        """
        from safetensors import safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"index file not found: {p}")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                names = set(f.keys())
                tensors = {name: f.get_tensor(name) for name in names & {"tokens", "offsets"}}
        except Exception as exc:  # safetensors raises its own error type for a bad header
            raise ValueError(f"{p}: unreadable index file ({exc})") from exc
        if meta.get("format") != _MV_FORMAT:
            raise ValueError(
                f"{p}: not a vlm2emb multi-vector index (metadata format={meta.get('format')!r})"
            )
        if meta.get("version") != _MV_VERSION:
            raise ValueError(f"{p}: index version {meta.get('version')!r}, this vlm2emb reads {_MV_VERSION}")
        if names != {"tokens", "offsets"}:
            raise ValueError(f"{p}: expected tensors tokens and offsets, found {sorted(names)}")
        tokens, offsets = tensors["tokens"], tensors["offsets"]
        dim, dtype = int(meta.get("dim", -1)), meta.get("dtype", "float32")
        if dtype not in _MV_DTYPES or tokens.dtype != _MV_DTYPES[dtype]:
            raise ValueError(f"{p}: tokens are {tokens.dtype}, metadata says {dtype!r}")
        if tokens.ndim != 2 or tokens.shape[1] != dim:
            raise ValueError(f"{p}: tokens have shape {list(tokens.shape)}, expected [T, {dim}]")
        if (
            offsets.ndim != 1
            or offsets.dtype != torch.int64
            or len(offsets) < 1
            or int(offsets[0]) != 0
            or bool((offsets[1:] < offsets[:-1]).any())
            or int(offsets[-1]) != tokens.shape[0]
        ):
            raise ValueError(
                f"{p}: offsets must be int64, start at 0, never decrease and end at {tokens.shape[0]}"
            )
        obj = cls(dim, pool_factor=int(meta.get("pool_factor", "1")), dtype=dtype)
        obj._tokens, obj._offsets = tokens, offsets
        return obj
