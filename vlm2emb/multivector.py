r"""Late interaction (ColBERT / ColPali style): one small vector per token, scored by MaxSim.

A model with a multi-vector head (``EmbeddingConfig.multivector_dim``) projects every
token's last hidden state to ``multivector_dim`` (128 by default, as ColPali and
jina-embeddings-v4 use), L2-normalises each token vector, and keeps a mask of the real
tokens. Its forward returns a :class:`MultiVectorEmbeddings`: the token vectors, their
mask, and, when the single-vector head is on too, the pooled embedding from the same
forward.

MaxSim scores a query against a document by summing, over the query's tokens, the best
dot product with any of the document's tokens:

.. math::

    s(q, d) = \sum_{i \in q} \max_{j \in d} \; q_i \cdot d_j

:func:`maxsim` computes a ``[Nq, Nd]`` score matrix block by block, so the
``[Nq, Nd, Lq, Ld]`` tensor of token dot products never exists at once; padded tokens are
excluded through the masks (not through zero vectors).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "MultiVectorEmbeddings",
    "MultiVectorHead",
    "gather_token_sets",
    "maxsim",
    "maxsim_lists",
    "pad_token_sets",
    "pool_token_sets",
    "pool_tokens",
]

# Upper bound on the token dot products one block of :func:`maxsim` holds at once
# (2**24 float32 = 64 MiB, plus the same again for the masked copy and the max's indices).
DEFAULT_CHUNK_ELEMENTS = 1 << 24
# Most padded query tokens in one block of :func:`maxsim`'s bucketed path (a longer query
# gets a block of its own): similar-length queries share a block, and the GEMM keeps a few
# hundred columns.
QUERY_BLOCK_TOKENS = 512
# Query blocks are not split for padding below this many slots: each query block is one
# more pass over every document block, and a narrow one makes a narrow GEMM. Equal to
# QUERY_BLOCK_TOKENS, query blocks are cut by size only: with the reused buffers, a split
# into a ~250-column and a ~40-column GEMM (16 queries of 10-20 tokens) cost more than the
# padding it saved (single-thread sweep of 256 against 512 on the mild and ragged spreads
# of the four benchmark shapes; docs/benchmarks.md).
QUERY_BLOCK_MIN_TOKENS = 512
# Target size of one block of token dot products without autograd (2 MiB in float32): the
# GEMM writes it into one buffer reused by every block, still in cache when the max reads it.
# Chosen from single-thread sweeps (2**18 to 2**21) on the benchmark's four shapes with
# uniform lengths (2**19 within 3 % of the best on each; 2**21, the previous value, 1.06x-1.33x
# slower), checked on the ragged spread; see docs/benchmarks.md. With 2
# threads on a loaded machine, small blocks were erratic.
BUCKET_BLOCK_ELEMENTS = 1 << 19
# With autograd the previous limits stay: each block's slice or gather backward writes a
# gradient the size of all the token sets, so many small blocks cost more than cache misses
# (2.6x slower with 2**19 blocks on 32 queries x 64 pages of 1,030 tokens, forward and
# backward). Blocks of about 2**21 products; query blocks split for padding from 256 slots.
TRACK_BLOCK_ELEMENTS = 1 << 21
TRACK_QUERY_MIN_TOKENS = 256
# A bucketed block stops growing when padding would exceed 1/8 of its slots.
PADDING_SHARE_DIVISOR = 8


def _pad_tokens(x: Tensor, length: int) -> Tensor:
    """Pads dimension -2 (tokens) of ``x`` [..., L, D] with zeros up to ``length``."""
    return F.pad(x, (0, 0, 0, length - x.shape[-2]))


def _pad_mask(mask: Tensor, length: int) -> Tensor:
    """Pads the last dimension of ``mask`` [..., L] with False up to ``length``."""
    return F.pad(mask, (0, length - mask.shape[-1]), value=False)


@dataclass
class MultiVectorEmbeddings:
    """Per-token embeddings of a batch, padded to a common length, and their mask.

    The leading dimensions are the rows: ``[B]`` for a batch of items, ``[b, K]`` for hard
    negatives grouped by row. Padded token slots hold zero vectors and ``mask`` False.

    Attributes:
        tokens: [..., L, D] float token vectors (L2-normalised by the model).
        mask: [..., L] bool, True for a real (scored) token.
        dense: [..., d] the single-vector embedding of the same forward, or None when the
            model has no single-vector head.
    """

    tokens: Tensor
    mask: Tensor
    dense: Tensor | None = None

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> Tensor:
        """[...] real tokens per row."""
        return self.mask.sum(dim=-1)

    # ------------------------------------------------------------------ row operations
    @classmethod
    def cat_rows(cls, parts: Sequence[MultiVectorEmbeddings]) -> MultiVectorEmbeddings:
        """Concatenates rows, padding every part to the longest token length."""
        length = max(p.tokens.shape[-2] for p in parts)
        dense = [p.dense for p in parts]
        return cls(
            tokens=torch.cat([_pad_tokens(p.tokens, length) for p in parts]),
            mask=torch.cat([_pad_mask(p.mask, length) for p in parts]),
            dense=torch.cat(dense) if all(d is not None for d in dense) else None,  # type: ignore[arg-type]
        )

    def take_rows(self, index: Tensor) -> MultiVectorEmbeddings:
        """The rows ``index`` ([n] int64)."""
        index = index.to(self.tokens.device)
        return MultiVectorEmbeddings(
            self.tokens[index], self.mask[index], self.dense[index] if self.dense is not None else None
        )

    def as_leaf(self) -> MultiVectorEmbeddings:
        """Detached copies whose float parts require grad (GradCache's leaves)."""
        return MultiVectorEmbeddings(
            self.tokens.detach().requires_grad_(),
            self.mask,
            self.dense.detach().requires_grad_() if self.dense is not None else None,
        )

    def grad_dot(self, leaf: MultiVectorEmbeddings) -> Tensor:
        """[] ``sum(self * leaf.grad)`` over the parts of ``leaf`` that got a gradient."""
        total = self.tokens.sum() * 0.0  # keeps the graph when no part was read
        if leaf.tokens.grad is not None:
            total = total + (self.tokens * leaf.tokens.grad).sum()
        if self.dense is not None and leaf.dense is not None and leaf.dense.grad is not None:
            total = total + (self.dense * leaf.dense.grad).sum()
        return total

    def grouped(self, local_mask: Tensor, padded: bool) -> MultiVectorEmbeddings:
        """Negatives in row order -> ``[b, K, ...]`` (see :func:`vlm2emb.rows.grouped`)."""
        b, k = local_mask.shape
        length, dim = self.tokens.shape[-2:]
        if padded:
            return MultiVectorEmbeddings(
                self.tokens.view(b, k, length, dim),
                self.mask.view(b, k, length),
                self.dense.view(b, k, -1) if self.dense is not None else None,
            )
        where = local_mask.to(self.tokens.device)
        tokens = self.tokens.new_zeros(b, k, length, dim)  # [b, K, L, D]
        tokens[where] = self.tokens
        mask = self.mask.new_zeros(b, k, length)  # [b, K, L]
        mask[where] = self.mask
        dense = None
        if self.dense is not None:
            dense = self.dense.new_zeros(b, k, self.dense.shape[-1])  # [b, K, d]
            dense[where] = self.dense
        return MultiVectorEmbeddings(tokens, mask, dense)

    def dense_part(self) -> Tensor:
        """The single-vector embeddings of the same forward (for single-vector losses).

        Raises:
            TypeError: The model has no single-vector head.
        """
        if self.dense is None:
            raise TypeError(
                "this loss reads single-vector embeddings, but the model has only a multi-vector "
                "head (dense_head=False); use train.loss maxsim"
            )
        return self.dense

    def flatten_rows(self) -> MultiVectorEmbeddings:
        """``[b, K, ...]`` -> ``[b * K, ...]``."""
        return MultiVectorEmbeddings(
            self.tokens.flatten(0, -3),
            self.mask.flatten(0, -2),
            self.dense.flatten(0, -2) if self.dense is not None else None,
        )

    def drop_last_rows(self, n: int) -> MultiVectorEmbeddings:
        """All but the last ``n`` rows (the blank image rows of multi-process batches)."""
        if n <= 0:
            return self
        dense = self.dense[:-n] if self.dense is not None else None
        return MultiVectorEmbeddings(self.tokens[:-n], self.mask[:-n], dense)

    def cpu(self) -> MultiVectorEmbeddings:
        return MultiVectorEmbeddings(
            self.tokens.cpu(), self.mask.cpu(), self.dense.cpu() if self.dense is not None else None
        )

    def unpadded(self) -> list[Tensor]:
        """One ``[L_i, D]`` tensor of real token vectors per row (rows of a ``[B]`` batch)."""
        return [t[m] for t, m in zip(self.tokens, self.mask)]


class MultiVectorHead(nn.Module):
    """The multi-vector projection: last hidden states [B, L, H] -> unit token vectors [B, L, D].

    A linear layer with bias (ColPali's projection has one), applied per token, then L2
    normalisation, so a token dot product is a cosine and MaxSim of a query with ``n``
    tokens lies in ``[-n, n]``. Padded tokens come out as zero vectors.

    Args:
        hidden_size: H, the backbone's hidden size.
        dim: D, the token vector size.
    """

    def __init__(self, hidden_size: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, dim)

    def forward(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """Projects and normalises every token.

        Returns a plain tuple, not a :class:`MultiVectorEmbeddings`: DeepSpeed ZeRO-3's module
        hooks only see tensors in tuples, lists and dicts, and a backward through a module
        whose output tensors they cannot see fails ("active_backward_submodules is empty").

        Args:
            hidden: [B, L, H] last hidden states (any float dtype).
            mask: [B, L] attention mask (nonzero = real token).

        Returns:
            ``(tokens [B, L, D] float32, mask [B, L] bool)``; padded tokens are zero vectors.
        """
        # The projection runs in the head's own dtype (float32 unless a wrapper cast it).
        tokens = self.proj(hidden.to(self.proj.weight.dtype)).float()  # [B, L, D]
        keep = mask.to(torch.bool)  # [B, L]
        tokens = F.normalize(tokens, dim=-1) * keep.unsqueeze(-1)
        return tokens, keep


def pad_token_sets(sets: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Pads variable-length token sets into one batch.

    Args:
        sets: ``N`` tensors ``[L_i, D]``.

    Returns:
        ``(tokens [N, L, D], mask [N, L])`` with ``L = max L_i`` (at least 1), zero vectors
        and False at padded slots.
    """
    if not sets:
        raise ValueError("pad_token_sets needs at least one token set")
    length = max(1, max(int(s.shape[0]) for s in sets))
    tokens = torch.stack([_pad_tokens(s, length) for s in sets])  # [N, L, D]
    lengths = torch.tensor([int(s.shape[0]) for s in sets])  # [N]
    mask = torch.arange(length).unsqueeze(0) < lengths.unsqueeze(1)  # [N, L]
    return tokens, mask.to(tokens.device)


def _extents(mask: Tensor, length: int) -> Tensor:
    """[n] one past each row's last real token, from ``mask`` [n, L].

    The extent, not the count of real tokens, bounds what a block may cut: a mask with holes
    (``multivector_tokens: content`` masks the instruction before the item's tokens) still has
    real tokens up to its last True.
    """
    positions = torch.arange(1, length + 1, device=mask.device)  # [L]
    return (mask * positions).amax(dim=1) if length else mask.new_zeros(mask.shape[0], dtype=torch.int64)


def _length_blocks(extents: Tensor, budget: int, min_slots: int = 0) -> list[tuple[Tensor, int]]:
    """Rows grouped by extent: ``(rows [b] int64, padded length)`` per block.

    Rows are sorted by extent and a block is padded only to its own longest member. A block
    grows while ``rows * padded length <= budget`` and, once it has ``min_slots`` slots, while
    its padding stays under ``1 / PADDING_SHARE_DIVISOR`` of its slots (at least one row), so
    similar lengths share a few large blocks: large blocks keep the number of parallel ops
    small, and ``min_slots`` keeps a GEMM from getting too narrow.
    """
    lengths = extents.clamp(min=1).cpu()  # an empty row still occupies one (zero/filler) slot
    order = lengths.argsort(stable=True)  # [n] ascending
    sorted_lengths = lengths[order].tolist()
    blocks, start, n = [], 0, len(sorted_lengths)
    while start < n:
        end, real = start + 1, sorted_lengths[start]
        # Ascending order: the longest member of rows[start:end + 1] is the last one.
        while end < n:
            slots = (end - start + 1) * sorted_lengths[end]
            wasteful = (slots - real - sorted_lengths[end]) * PADDING_SHARE_DIVISOR > slots
            if slots > budget or (slots > min_slots and wasteful):
                break
            real += sorted_lengths[end]
            end += 1
        blocks.append((order[start:end], int(sorted_lengths[end - 1])))
        start = end
    return blocks


@dataclass
class _FlatRows:
    """Token sets stored as one ``[T, D]`` matrix, with what a padded block of rows needs.

    Row ``r``'s position ``p`` is ``flat[starts[r] + p]`` where ``real[r, p]`` (or, without
    ``real``, where ``p < extents[r]``), and ``flat[fill[r]]`` elsewhere.
    """

    flat: Tensor  # [T, D]
    starts: Tensor  # [n] int64
    extents: Tensor  # [n] int64
    fill: Tensor  # [n] int64
    real: Tensor | None = None  # [n, L] bool, for masks with holes
    # Set when row r is exactly flat[r * dense : (r + 1) * dense] (a padded tensor without
    # padding): a block of consecutive rows at that length is then a view.
    dense: int | None = None

    def block(self, rows: Tensor, length: int, out: Tensor | None = None) -> Tensor:
        """[len(rows) * length, D]: ``rows`` padded to ``length``, flattened (one gather,
        into ``out`` when given, or a view of ``flat``)."""
        if self.dense is not None and length == self.dense:
            first, last = int(rows[0]), int(rows[-1])
            if last - first + 1 == len(rows) and bool((rows[1:] > rows[:-1]).all()):
                return self.flat[first * length : (last + 1) * length]
        positions = torch.arange(length, device=self.flat.device)  # [L_b]
        index = self.starts[rows].unsqueeze(1) + positions  # [b, L_b]
        if self.real is not None:
            keep = self.real[rows, :length]  # [b, L_b]
        else:
            keep = positions < self.extents[rows].unsqueeze(1)  # [b, L_b]
        index = torch.where(keep, index, self.fill[rows].unsqueeze(1))  # [b, L_b]
        if out is None:
            return self.flat[index.reshape(-1)]  # [b * L_b, D]
        return torch.index_select(self.flat, 0, index.reshape(-1), out=out)


class _ListRows:
    """Token sets kept as the caller's list (no flat copy of all of them): a padded block of
    rows is one ``torch.cat`` of the rows' sets and their fillers, written into a reused
    buffer when there is no autograd. Padded slots hold zeros (``pad="zero"``, queries) or a
    copy of the set's first token (``"first"``; an empty set gets zeros, and its score is
    zeroed by the caller)."""

    def __init__(self, sets: Sequence[Tensor], dtype: torch.dtype, device: torch.device, pad: str) -> None:
        self.sets = sets
        self.dtype, self.device, self.pad = dtype, device, pad
        self.dim = int(sets[0].shape[-1])
        self.extents = torch.tensor([int(t.shape[0]) for t in sets], dtype=torch.int64)  # [n]

    def block(self, rows: Tensor, length: int, out: Tensor | None = None) -> Tensor:
        """[len(rows) * length, D]: ``rows`` padded to ``length``, flattened."""
        pieces = []
        for r in rows.tolist():
            t = self.sets[r]
            n = int(t.shape[0])
            if n:
                pieces.append(t)
            if n < length:
                if self.pad == "zero" or not n:
                    pieces.append(
                        torch.zeros((), dtype=t.dtype, device=t.device).expand(length - n, self.dim)
                    )
                else:
                    pieces.append(t[:1].expand(length - n, self.dim))
        if out is None:
            return torch.cat([t.to(self.device, self.dtype) for t in pieces])
        if any(t.device != self.device for t in pieces):
            pieces = [t.to(self.device) for t in pieces]
        return torch.cat(pieces, out=out)  # casts to the buffer's dtype


def _bucketed_maxsim(
    query: _FlatRows | _ListRows,
    docs: _FlatRows | _ListRows,
    chunk_elements: int,
    dtype: torch.dtype,
    track: bool,
    work: torch.dtype,
) -> Tensor:
    """[Nq, Nd] MaxSim with rows sorted by length and each block padded to its own longest.

    Padded query slots hold a zero vector (adds 0 to every sum); padded document slots hold a
    copy of one of the document's own tokens (never changes a max). Equal lengths give the
    input order (a stable sort), and a document block of a padded tensor without padding is
    then a view, not a copy.

    The loop runs over document blocks, each built once, and inside it over the query blocks,
    built once up front. Without autograd every block writes into buffers allocated once
    (the document block, the GEMM output, the max), so no block pays for fresh memory, and
    each block's scores go straight to their place in the ``[Nq, Nd]`` result.
    """
    lq_max = max(1, int(query.extents.max()))
    ld_max = max(1, int(docs.extents.max()))
    # Narrow query blocks (few hundred tokens) let similar-length queries share a block,
    # which is where query padding is saved; the GEMM stays wide along the document axis.
    # The memory bound uses the widest query block, so every block of token dot products
    # stays under chunk_elements.
    q_budget = max(lq_max, min(QUERY_BLOCK_TOKENS, chunk_elements // ld_max))
    min_slots, elements = (
        (TRACK_QUERY_MIN_TOKENS, TRACK_BLOCK_ELEMENTS)
        if track
        else (QUERY_BLOCK_MIN_TOKENS, BUCKET_BLOCK_ELEMENTS)
    )
    q_blocks = _length_blocks(query.extents, q_budget, min_slots=min_slots)
    widest = max(len(rows) * length for rows, length in q_blocks)
    d_budget = max(ld_max, min(elements, chunk_elements) // widest)
    d_blocks = _length_blocks(docs.extents, d_budget)
    device = query.flat.device if isinstance(query, _FlatRows) else query.device
    flat_qs = [query.block(rows.to(device), length, None) for rows, length in q_blocks]
    nq, nd = len(query.extents), len(docs.extents)
    if track:
        cols = []
        for d_rows, ld_b in d_blocks:
            flat_d = docs.block(d_rows.to(device), ld_b, None)  # [bd * Ld_b, D]
            c = len(d_rows)
            parts = [
                _block_scores(flat_q, len(q_rows), lq_b, flat_d, c, ld_b, dtype, track)
                for flat_q, (q_rows, lq_b) in zip(flat_qs, q_blocks)
            ]
            cols.append(torch.cat(parts, dim=0))  # [Nq, bd] in sorted query order
        q_order = torch.cat([rows for rows, _ in q_blocks]).to(device)  # [Nq]
        d_order = torch.cat([rows for rows, _ in d_blocks]).to(device)  # [Nd]
        # Back to the input order: sorted row k is input row order[k].
        return torch.cat(cols, dim=1)[q_order.argsort()][:, d_order.argsort()]  # [Nq, Nd]
    largest_d = max(len(rows) * length for rows, length in d_blocks)
    largest_sim = max(len(rows) * length for rows, length in d_blocks) * widest
    dim = flat_qs[0].shape[-1]
    # Buffers reused by every block (the GEMM output is at most BUCKET_BLOCK_ELEMENTS
    # products, or one document against the widest query block).
    d_buf = torch.empty(largest_d * dim, dtype=work, device=device)
    sim_buf = torch.empty(largest_sim, dtype=work, device=device)
    best_buf = torch.empty(max(len(rows) for rows, _ in d_blocks) * widest, dtype=work, device=device)
    scores = torch.empty(nq, nd, dtype=dtype, device=device)
    q_index = [rows.to(device).unsqueeze(1) for rows, _ in q_blocks]  # [bq, 1] each
    for d_rows, ld_b in d_blocks:
        c = len(d_rows)
        flat_d = docs.block(d_rows.to(device), ld_b, d_buf[: c * ld_b * dim].view(c * ld_b, dim))
        for flat_q, q_idx, (q_rows, lq_b) in zip(flat_qs, q_index, q_blocks):
            a = len(q_rows)
            sim = torch.mm(flat_d, flat_q.T, out=sim_buf[: c * ld_b * a * lq_b].view(c * ld_b, a * lq_b))
            best = torch.amax(
                sim.view(c, ld_b, a * lq_b), dim=1, out=best_buf[: c * a * lq_b].view(c, a * lq_b)
            )
            scores[q_idx, d_rows.to(device)] = best.view(c, a, lq_b).sum(dim=-1, dtype=dtype).T  # [bq, bd]
    return scores


def _block_scores(
    flat_q: Tensor, a: int, lq: int, flat_d: Tensor, c: int, ld: int, dtype: torch.dtype, track: bool
) -> Tensor:
    """[a, c] MaxSim of ``a`` queries (``flat_q`` [a * lq, D]) and ``c`` documents
    (``flat_d`` [c * ld, D]), every slot already real, zero (query) or a duplicate (document)."""
    # One plain GEMM with the document tokens as rows, read in place as [c, ld, a * lq]:
    # the max over a document's tokens is a reduction over the middle axis, vectorised
    # along the contiguous query-token axis. (Query tokens as rows, reducing along a
    # contiguous Ld axis, measured 1.6x slower for 1,030-token pages; einsum
    # "aid,cjd->acij" also writes a permuted copy.)
    sim = (flat_d @ flat_q.T).view(c, ld, a * lq)
    # Training keeps max()'s [c, a * lq] indices for the backward; amax() would keep the
    # whole block, and is only the cheaper reduction without grad.
    best = sim.max(dim=1).values if track else sim.amax(dim=1)  # [c, a * lq]
    return best.view(c, a, lq).sum(dim=-1, dtype=dtype).T  # [a, c]


def maxsim(
    query: Tensor,
    docs: Tensor,
    query_mask: Tensor | None = None,
    doc_mask: Tensor | None = None,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    compute_dtype: torch.dtype | None = None,
    bucket_by_length: bool = True,
) -> Tensor:
    r"""MaxSim scores of every query against every document, computed block by block.

    ``score[a, c] = sum_{i: query_mask[a, i]} max_{j: doc_mask[c, j]} query[a, i] . docs[c, j]``.

    Queries and documents are cut into blocks so that one block's token dot products stay
    under ``chunk_elements``; the result (and its gradient) is the same as computing
    everything at once. A document without any real token scores 0.

    With ``bucket_by_length`` (the default), queries and documents are sorted by length and
    each block is padded only to its own longest member (scores come back in the input
    order), so padding costs almost no dot products. Without autograd, blocks reuse buffers
    allocated once per call (equal lengths included: the sort then keeps the input order).
    Bucketed scores equal the unbucketed ones up to the float rounding of the sum over query
    tokens.

    Args:
        query: [Nq, Lq, D] query token vectors.
        docs: [Nd, Ld, D] document token vectors.
        query_mask: [Nq, Lq] bool (True = real token); None = all real.
        doc_mask: [Nd, Ld] bool; None = all real.
        chunk_elements: Most token dot products held at once.
        compute_dtype: Dtype of the token dot products (None: the promoted dtype, at
            least float32). ``torch.bfloat16`` roughly halves the time on a CPU with
            bfloat16 matrix units, at about 3 significant digits per dot product (the sums
            over query tokens stay float32); see docs/benchmarks.md.
        bucket_by_length: Sort rows by length so each block is padded to its own longest
            member. False pads every block to ``Lq`` x ``Ld`` (the reference path).

    Returns:
        [Nq, Nd] scores in the promoted dtype of the inputs (at least float32).
    """
    if query.ndim != 3 or docs.ndim != 3 or query.shape[-1] != docs.shape[-1]:
        raise ValueError(
            f"maxsim needs query [Nq, Lq, D] and docs [Nd, Ld, D] with the same D, "
            f"got {list(query.shape)} and {list(docs.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(query.dtype, docs.dtype), torch.float32)
    query, docs = query.to(dtype), docs.to(dtype)
    nq, lq, dim = query.shape
    nd, ld, _ = docs.shape
    device = query.device
    docs = docs.to(device)
    padded_queries = query_mask is not None and not bool(query_mask.all())
    padded_docs = doc_mask is not None and not bool(doc_mask.all())
    track = torch.is_grad_enabled() and (query.requires_grad or docs.requires_grad)
    if compute_dtype is not None:
        query, docs = query.to(compute_dtype), docs.to(compute_dtype)
    empty = None
    if padded_docs:
        doc_mask = doc_mask.to(device, torch.bool)
        empty = ~doc_mask.any(dim=1)  # [Nd] documents without a real token score 0
    # With autograd and no padding there is nothing to bucket, and the plain path's few large
    # blocks keep the backward cheap (see TRACK_BLOCK_ELEMENTS).
    if bucket_by_length and nq and nd and (padded_queries or padded_docs or not track):
        rows_q = torch.arange(nq, device=device) * lq  # [Nq] start of each row in the flat view
        rows_d = torch.arange(nd, device=device) * ld  # [Nd]
        if padded_queries:
            q_real = query_mask.to(device, torch.bool)  # [Nq, Lq]
            # Padded query slots gather the appended zero row.
            q_flat = torch.cat([query.reshape(nq * lq, dim), query.new_zeros(1, dim)])  # [Nq * Lq + 1, D]
            q_rows = _FlatRows(q_flat, rows_q, _extents(q_real, lq), torch.full_like(rows_q, nq * lq), q_real)
        else:
            full = torch.full_like(rows_q, lq)
            q_rows = _FlatRows(query.reshape(nq * lq, dim), rows_q, full, rows_q, dense=lq)
        if padded_docs:
            # Padded document slots gather the document's first real token (row start when
            # it has none; its score is zeroed below).
            first_real = doc_mask.to(torch.int8).argmax(dim=1)  # [Nd]
            d_rows = _FlatRows(
                docs.reshape(nd * ld, dim), rows_d, _extents(doc_mask, ld), rows_d + first_real, doc_mask
            )
        else:
            full = torch.full_like(rows_d, ld)
            d_rows = _FlatRows(docs.reshape(nd * ld, dim), rows_d, full, rows_d, dense=ld)
        scores = _bucketed_maxsim(q_rows, d_rows, chunk_elements, dtype, track, query.dtype)
    else:
        if padded_queries:
            # A zero query token scores 0 against every document token, so zeroing the padded
            # query slots drops them from the sum with no mask in the inner loop.
            query = query * query_mask.to(device, torch.bool).unsqueeze(-1)  # [Nq, Lq, D]
        if padded_docs:
            # A padded document slot takes a copy of one of its document's real tokens: the
            # max over the document is unchanged (a duplicate never beats its original), so
            # no [.., Lq, Ld] block is masked; through the gather, the gradient of a copy
            # that wins reaches the original token.
            first_real = doc_mask.to(torch.int8).argmax(dim=1)  # [Nd] (0 when none is real)
            filler = docs[torch.arange(nd, device=device), first_real]  # [Nd, D]
            docs = torch.where(doc_mask.unsqueeze(-1), docs, filler.unsqueeze(1))  # [Nd, Ld, D]
        per_pair = max(1, lq * ld)
        bq = max(1, min(nq, chunk_elements // per_pair))
        bd = max(1, min(nd, chunk_elements // (bq * per_pair)))
        flat_docs = docs.reshape(nd * ld, dim)  # [Nd * Ld, D]
        out_rows = []
        for qs in range(0, nq, bq):
            a = min(bq, nq - qs)
            flat_q = query[qs : qs + a].reshape(a * lq, dim)  # [bq * Lq, D]
            cols = []
            for ds in range(0, nd, bd):
                c = min(bd, nd - ds)
                cols.append(
                    _block_scores(flat_q, a, lq, flat_docs[ds * ld : (ds + c) * ld], c, ld, dtype, track)
                )
            out_rows.append(torch.cat(cols, dim=1))  # [bq, Nd]
        scores = torch.cat(out_rows, dim=0)  # [Nq, Nd]
    if empty is not None and bool(empty.any()):
        scores = scores.masked_fill(empty.unsqueeze(0), 0.0)
    return scores


def maxsim_lists(
    queries: Sequence[Tensor],
    docs: Sequence[Tensor],
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    compute_dtype: torch.dtype | None = None,
    bucket_by_length: bool = True,
) -> Tensor:
    """:func:`maxsim` of variable-length token sets (what ``encode(output="multivector")`` returns).

    With ``bucket_by_length`` the sets are never padded to the longest of all: each block
    is concatenated from the list itself, padded to the block's own longest member.

    Args:
        queries: ``Nq`` tensors ``[Lq_i, D]``.
        docs: ``Nd`` tensors ``[Ld_j, D]``.
        chunk_elements, compute_dtype, bucket_by_length: As for :func:`maxsim`.

    Returns:
        [Nq, Nd] scores.
    """
    if not bucket_by_length or not queries or not docs:
        q, qm = pad_token_sets(queries)
        d, dm = pad_token_sets(docs)
        return maxsim(
            q,
            d.to(q.device),
            qm,
            dm.to(q.device),
            chunk_elements=chunk_elements,
            compute_dtype=compute_dtype,
            bucket_by_length=bucket_by_length,
        )
    dtype = torch.promote_types(torch.promote_types(queries[0].dtype, docs[0].dtype), torch.float32)
    device = queries[0].device
    track = torch.is_grad_enabled() and any(t.requires_grad for t in (*queries, *docs))
    work = compute_dtype if compute_dtype is not None else dtype
    q_rows = _ListRows(queries, work, device, pad="zero")
    d_rows = _ListRows(docs, work, device, pad="first")
    scores = _bucketed_maxsim(q_rows, d_rows, chunk_elements, dtype, track, work)
    empty = (d_rows.extents == 0).to(scores.device)  # [Nd]
    if bool(empty.any()):
        scores = scores.masked_fill(empty.unsqueeze(0), 0.0)
    return scores


def pool_tokens(tokens: Tensor, pool_factor: int) -> Tensor:
    """Hierarchical token pooling: fewer vectors for one stored token set.

    The tokens are clustered bottom-up with Ward linkage (SciPy) into at most
    ``max(L // pool_factor, 1)`` clusters, and each cluster is replaced by the
    L2-normalised mean of its tokens. Ward merges the pair of clusters that least increases
    the within-cluster squared distance; for unit vectors that distance is ``2 - 2 cos``, so
    near-duplicate tokens (blank page regions, repeated glyphs) merge first. The idea is
    ColPali's follow-up work on token pooling (colpali-engine's ``HierarchicalTokenPooler``);
    unlike that class, this one clusters the token vectors themselves, not the rows of their
    ``1 - cos`` matrix. Meant for documents at indexing time; queries stay unpooled.

    Args:
        tokens: [L, D] token vectors of one item.
        pool_factor: Keep about ``1 / pool_factor`` of the vectors; 1 returns ``tokens``.

    Returns:
        [L', D] with ``L' <= max(L // pool_factor, 1)``, in ``tokens``' dtype and device.

    Raises:
        ValueError: ``pool_factor`` is not a positive integer, or ``tokens`` is not [L, D].
    """
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, int) or pool_factor < 1:
        raise ValueError(f"pool_factor must be a positive integer, got {pool_factor!r}")
    if tokens.ndim != 2:
        raise ValueError(f"pool_tokens needs one token set [L, D], got shape {list(tokens.shape)}")
    length = tokens.shape[0]
    if pool_factor == 1 or length <= 1:
        return tokens
    from scipy.cluster.hierarchy import fcluster, linkage

    x = tokens.detach().to("cpu", torch.float64)  # [L, D]
    tree = linkage(x.numpy(), method="ward")
    labels = fcluster(tree, t=max(length // pool_factor, 1), criterion="maxclust") - 1  # [L], from 0
    index = torch.from_numpy(labels.astype("int64"))  # [L]
    sums = x.new_zeros(int(index.max()) + 1, x.shape[1]).index_add_(0, index, x)  # [L', D]
    # The normalised sum is the normalised mean (the count cancels).
    return F.normalize(sums, dim=-1).to(tokens.device, tokens.dtype)


def pool_token_sets(sets: Sequence[Tensor], pool_factor: int) -> list[Tensor]:
    """:func:`pool_tokens` of every set (``[L_i, D]`` -> ``[L_i', D]``)."""
    return [pool_tokens(s, pool_factor) for s in sets]


def gather_token_sets(local: MultiVectorEmbeddings) -> MultiVectorEmbeddings:
    """Concatenates every process's rows in rank order, differentiably.

    Processes hold different token lengths: each pads to the longest of any process (one
    small all-reduce), then tokens and dense embeddings are gathered with
    :func:`vlm2emb.distributed.gather_with_grad` and the masks with a plain all-gather.

    Args:
        local: ``[b, ...]`` this process's rows (``b`` and any other leading dimension equal
            on every process).

    Returns:
        ``[world * b, ...]``; ``local`` itself outside distributed runs.
    """
    import torch.distributed as dist

    from vlm2emb.distributed import gather_with_grad, is_distributed

    if not is_distributed():
        return local
    length = torch.tensor([local.tokens.shape[-2]], device=local.tokens.device)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    target = int(length.item())
    tokens = gather_with_grad(_pad_tokens(local.tokens, target))
    mask = _pad_mask(local.mask, target).to(torch.uint8).contiguous()  # gloo has no bool all_gather
    parts = [torch.empty_like(mask) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mask)
    dense = gather_with_grad(local.dense) if local.dense is not None else None
    return MultiVectorEmbeddings(tokens, torch.cat(parts).to(torch.bool), dense)
