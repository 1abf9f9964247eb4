"""Hard-negative mining: ``vlm2emb mine`` and :func:`mine_negatives`.

A model (the one being trained, or any teacher) embeds a corpus (a corpus file, or by
default the distinct positives of each dataset of the training rows) and every query;
each query's top candidates become its hard negatives, written into canonical training rows
(``negatives``, and with ``teacher_scores=True`` the scores the ``distill`` loss learns from).

Per query, in this order (docs/negatives.md has the worked example):

1. retrieve the ``skip_top + top_k + FILTER_SLACK`` best corpus entries (exact inner product;
   FAISS when installed, else blocked torch matmuls);
2. drop the query's positives (all of them, for rows with ``positives: [...]``) and exact
   duplicates of them or of the query (same content id);
3. positive-aware filtering (NV-Retriever's "TopK-PercPos"): drop candidates scoring above
   ``max_score_ratio`` times the positive's score, likely unlabelled positives;
4. drop near duplicates of the positive (cosine to the positive above ``dedup_threshold``);
5. skip the ``skip_top`` best survivors, keep the next ``top_k`` (the rank window);
6. take ``num_negatives`` of the window: the best ones (``sample="top"``) or a seeded random
   sample (``sample="random"``, the same draw for a row whatever the block or restart).

Memory: the corpus embeddings ``[N, d]`` and the corpus items are held; training rows are
read twice as a stream (once for the default corpus, the positives; once to mine) and mined
``block_size`` rows at a time. The output is written under ``OUT.partial`` with a progress
file beside it; a restarted run with the same settings continues after the last finished
block, and the embedding cache (``cache_dir``) makes the corpus pass free the second time.
Under ``accelerate launch`` every embedding pass is split across processes
(:class:`vlm2emb.eval.cache.CachedEncoder`) and the main process writes.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["MineConfig", "MineReport", "item_to_json", "mine_negatives"]

# Extra candidates retrieved beyond the window, so that filtered ones rarely shorten it.
FILTER_SLACK = 32
SAMPLES = ("top", "random")


@dataclass
class MineConfig:
    """What :func:`mine_negatives` keeps; the CLI flags of ``vlm2emb mine`` map one to one.

    Attributes:
        num_negatives: Negatives written per row.
        top_k: Size of the rank window the negatives are taken from.
        skip_top: Candidates skipped before the window (after filtering).
        max_score_ratio: Drop candidates with ``score > ratio * positive score``; None keeps all.
        dedup_threshold: Drop candidates whose cosine to the positive exceeds this; None keeps all.
        sample: ``top`` (the best of the window) or ``random`` (a seeded sample of it).
        seed: Seed of ``sample="random"``.
        keep_existing: Keep the rows' own negatives (first) and add mined ones after them.
        teacher_scores: Write ``teacher_scores`` (the model's scores of positive and negatives).
        batch_size: Encoding batch size.
        block_size: Rows mined (and written) per block.
        query_instruction: Instruction of queries without their own (None: the model's).
        target_instruction: Instruction of corpus entries and positives (None: the model's).
    """

    num_negatives: int = 7
    top_k: int = 30
    skip_top: int = 0
    max_score_ratio: float | None = 0.95
    dedup_threshold: float | None = 0.98
    sample: str = "top"
    seed: int = 0
    keep_existing: bool = False
    teacher_scores: bool = False
    batch_size: int = 32
    block_size: int = 4096
    query_instruction: str | None = None
    target_instruction: str | None = None

    def validate(self) -> None:
        """Raises ``ValueError`` naming the first setting out of range."""
        for name in ("num_negatives", "top_k", "batch_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.skip_top < 0:
            raise ValueError(f"skip_top must be >= 0, got {self.skip_top}")
        if self.num_negatives > self.top_k:
            raise ValueError(f"num_negatives ({self.num_negatives}) cannot exceed top_k ({self.top_k})")
        if self.sample not in SAMPLES:
            raise ValueError(f"sample must be one of {', '.join(SAMPLES)}, got {self.sample!r}")
        if self.max_score_ratio is not None and not math.isfinite(self.max_score_ratio):
            raise ValueError("max_score_ratio must be a finite number")
        if self.dedup_threshold is not None and not -1 <= self.dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold must be in [-1, 1], got {self.dedup_threshold}")


@dataclass
class MineReport:
    """What a mining run did (written as JSON beside the output).

    Attributes:
        rows: Rows written.
        corpus: Corpus entries searched.
        negatives: Mined negatives written.
        short_rows: Rows that got fewer than ``num_negatives`` mined negatives.
        filtered: Candidates dropped, by reason (positive, query, too_close, near_duplicate).
        scores: Percentiles of the positive scores, the mined negatives' scores and the margin
            (positive minus best mined negative).
        resumed_rows: Rows taken over from an interrupted run.
        seconds: Wall time.
    """

    rows: int = 0
    corpus: int = 0
    negatives: int = 0
    short_rows: int = 0
    filtered: dict[str, int] = field(
        default_factory=lambda: {"positive": 0, "query": 0, "too_close": 0, "near_duplicate": 0}
    )
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    resumed_rows: int = 0
    seconds: float = 0.0


def item_to_json(item: dict[str, Any]) -> dict[str, Any]:
    """A validated item (text + resolved media refs) as a canonical JSON item.

    Raises:
        ValueError: Media that a JSON row cannot reference (in-memory images) or a mix of
            video/PDF with other media, whose order one JSON item cannot keep.
    """
    from vlm2emb.items import PdfPageRef, VideoRef

    out: dict[str, Any] = {}
    if item.get("text") is not None:
        out["text"] = item["text"]
    refs = list(item.get("images") or [])
    if all(isinstance(r, str) for r in refs):
        if refs:
            out["images"] = refs
        return out
    if len(refs) == 1 and isinstance(refs[0], VideoRef):
        out["video"] = refs[0].path
        return out
    if len(refs) == 1 and isinstance(refs[0], PdfPageRef):
        out["pdf"], out["page"] = refs[0].path, refs[0].page
        return out
    kinds = sorted({type(r).__name__ for r in refs})
    raise ValueError(f"cannot write an item with media {kinds} to a JSON row (mine needs file paths)")


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    t = torch.tensor(values, dtype=torch.float64)
    qs = torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)
    p = torch.quantile(t, qs).tolist()
    return {"mean": float(t.mean()), "p5": p[0], "p25": p[1], "p50": p[2], "p75": p[3], "p95": p[4]}


def _encode_grouped(
    encoder: Any, items: list[Any], instructions: list[str | None], batch_size: int
) -> torch.Tensor:
    """Embeds items whose instructions differ: one encode call per distinct instruction."""
    out: torch.Tensor | None = None
    groups: dict[str | None, list[int]] = {}
    for i, instr in enumerate(instructions):
        groups.setdefault(instr, []).append(i)
    for instr, idx in groups.items():
        emb = encoder.encode([items[i] for i in idx], instruction=instr, batch_size=batch_size)  # [n_g, d]
        if out is None:
            out = torch.empty(len(items), emb.shape[1], dtype=torch.float32)
        out[idx] = emb.float()
    assert out is not None
    return out  # [n, d]


_ALL = "\0all"  # the corpus key when one corpus serves every dataset


class _Corpus:
    """One searchable corpus: items, their instructions, content ids and embeddings."""

    def __init__(self, items: list[Any], instructions: list[str | None]) -> None:
        self.items = items
        self.instructions = instructions
        self.keys: list[int] = []
        self.emb = torch.empty(0)
        self.index: Any = None

    def add(self, item: Any, instruction: str | None) -> None:
        self.items.append(item)
        self.instructions.append(instruction)

    def embed(self, encoder: Any, batch_size: int) -> None:
        """Embeds the items and builds the index (FAISS when installed)."""
        from vlm2emb.data.keys import item_keys

        self.keys = item_keys(self.items, self.instructions).tolist()
        self.emb = _encode_grouped(encoder, self.items, self.instructions, batch_size)  # [N, d]
        try:
            from vlm2emb.index import FlatIndex

            self.index = FlatIndex(self.emb.shape[1])
            self.index.add(self.emb)
        except ImportError:  # no faiss: blocked matmuls in search()
            self.index = None

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores [n, k], ids [n, k])``, best first (exact inner product)."""
        k = min(k, self.emb.shape[0])
        if self.index is not None:
            scores, ids = self.index.search(queries, k)
            return torch.from_numpy(scores), torch.from_numpy(ids).long()
        outs_s, outs_i = [], []
        for start in range(0, queries.shape[0], 1024):  # [1024, N] scores at a time
            top = torch.topk(queries[start : start + 1024] @ self.emb.T, k, dim=1)
            outs_s.append(top.values)
            outs_i.append(top.indices)
        return torch.cat(outs_s), torch.cat(outs_i)


def _rows(spec: str | Sequence[Any], media_root: str | None, verify: bool) -> Iterator[Any]:
    """The training rows of a source, or the given rows themselves (already validated)."""
    if not isinstance(spec, str):
        return iter(spec)
    from vlm2emb.data.schema import iter_source, train_row_builder

    return iter_source(0, spec, "training", train_row_builder(), media_root=media_root, verify_images=verify)


def _corpus_from_file(
    spec: str, media_root: str | None, verify: bool
) -> tuple[list[dict[str, Any]], list[str | None]]:
    from vlm2emb.eval.corpus import _id_rows

    rows = _id_rows(spec, "corpus", ("id", "item", "instruction"), media_root, verify)
    return [item for _, item, _ in rows], [instr for _, _, instr in rows]


def mine_negatives(
    model: Any,
    data: str | Sequence[Any],
    output: str | os.PathLike[str],
    config: MineConfig | None = None,
    *,
    corpus: str | None = None,
    media_root: str | None = None,
    verify_images: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    across_datasets: bool = False,
    progress: bool = False,
    shard: bool = True,
) -> MineReport:
    """Mines hard negatives for every row of ``data`` and writes canonical rows to ``output``.

    Args:
        model: An :class:`~vlm2emb.model.EmbeddingModel` (the student or a teacher).
        data: Training rows: any source ``data.train`` accepts, or loaded
            :class:`~vlm2emb.data.schema.TrainExample` rows (what the trainer's re-mining
            passes; their media must be file paths).
        output: The JSONL file to write; its report goes to ``OUTPUT.report.json``.
        config: What to keep (:class:`MineConfig`).
        corpus: Corpus rows ``{"id", "item", "instruction"?}`` to mine from; default: the
            distinct positives of ``data``.
        media_root: Folder for relative media paths (default: each file's folder).
        verify_images: Check media files while reading rows.
        cache_dir: Embedding cache; None disables it.
        across_datasets: With the default corpus, mine every row from the positives of all
            datasets (default: only from its own dataset's positives, so an image-to-text
            row gets text negatives of its own task).
        progress: Print one line per finished block.
        shard: Under several processes, split each embedding pass across them. False: every
            process embeds everything (needed under ZeRO-3, where every forward is a
            collective that all processes must run the same number of times).

    Returns:
        The :class:`MineReport` (also written beside the output).

    Raises:
        ValueError: A setting out of range.
        vlm2emb.data.errors.DataError: A bad row (file:line and reason).
    """
    from vlm2emb.data.keys import item_keys
    from vlm2emb.distributed import rank_and_world
    from vlm2emb.eval.cache import CachedEncoder
    from vlm2emb.items import resolve_instruction

    cfg = config or MineConfig()
    cfg.validate()
    started = time.perf_counter()
    out = Path(output)
    partial = out.with_name(out.name + ".partial")
    state_path = out.with_name(out.name + ".partial.json")
    rank, _ = rank_and_world()
    encoder = CachedEncoder(model, cache_dir, shard=shard)
    q_default = resolve_instruction(cfg.query_instruction, model.config.query_instruction)
    t_default = resolve_instruction(cfg.target_instruction, model.config.target_instruction)
    report = MineReport()

    # The corpus: a file, or the distinct positives (as embedded: item + instruction) of
    # each dataset, so that a row's negatives come from its own task (same target modality).
    corpora: dict[str, _Corpus] = {}
    if corpus is not None:
        c_items, c_instr_raw = _corpus_from_file(corpus, media_root, verify_images)
        corpora[_ALL] = _Corpus(c_items, [resolve_instruction(i, t_default) for i in c_instr_raw])
    # Every positive of each query (rows with `positives: [...]` arrive as one pair per
    # positive): none of them may be mined as that query's negative.
    positives_of: dict[int, set[int]] = {}
    seen: set[tuple[str, int]] = set()
    for ex in _rows(data, media_root, verify_images):
        instr = resolve_instruction(ex.target_instruction, t_default)
        pos_key = int(item_keys([ex.positive], [instr])[0])
        q_key = int(item_keys([ex.query], [resolve_instruction(ex.instruction, q_default)])[0])
        positives_of.setdefault(q_key, set()).add(pos_key)
        if corpus is None:
            name = _ALL if across_datasets else ex.dataset
            if (name, pos_key) not in seen:
                seen.add((name, pos_key))
                corpora.setdefault(name, _Corpus([], [])).add(ex.positive, instr)
    for part in corpora.values():
        part.embed(encoder, cfg.batch_size)
    report.corpus = sum(len(part.items) for part in corpora.values())

    settings = {
        "config": asdict(cfg),
        "data": str(data) if isinstance(data, str) else None,
        "corpus": str(corpus),
        "n_corpus": report.corpus,
        "across_datasets": across_datasets,
    }
    done = 0
    # In-memory rows have no name to tell them apart from other rows: never resumed.
    if isinstance(data, str) and partial.exists() and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("settings") == settings:
            done = int(state["rows_done"])
            report = MineReport(**{**asdict(report), **state["report"]})
            report.resumed_rows = done
    if rank == 0:
        # Keep exactly the finished blocks (a crash may have left part of the next one).
        with open(partial, "a+b") as fh:
            fh.seek(0)
            kept = b"".join(line for _, line in zip(range(done), fh))
            fh.seek(0)
            fh.truncate()
            fh.write(kept)
    pos_scores: list[float] = list(report.scores.pop("_pos", []))  # type: ignore[arg-type]
    neg_scores: list[float] = list(report.scores.pop("_neg", []))  # type: ignore[arg-type]
    margins: list[float] = list(report.scores.pop("_margin", []))  # type: ignore[arg-type]
    depth = cfg.skip_top + cfg.top_k + FILTER_SLACK

    def flush(block: list[Any], first_row: int) -> None:
        q_instr = [resolve_instruction(ex.instruction, q_default) for ex in block]
        p_instr = [resolve_instruction(ex.target_instruction, t_default) for ex in block]
        q_emb = _encode_grouped(encoder, [ex.query for ex in block], q_instr, cfg.batch_size)  # [n, d]
        p_emb = _encode_grouped(encoder, [ex.positive for ex in block], p_instr, cfg.batch_size)  # [n, d]
        own_q_keys = item_keys([ex.query for ex in block], q_instr).tolist()
        p_keys = [positives_of[k] for k in own_q_keys]  # every positive of the row's query
        q_keys = item_keys([ex.query for ex in block], p_instr).tolist()  # a query found in the corpus
        hits: list[tuple[_Corpus, list[float], list[int], list[float]]] = []
        names = [_ALL if _ALL in corpora else ex.dataset for ex in block]
        for name in dict.fromkeys(names):
            part = corpora[name]
            rows_here = [r for r, n in enumerate(names) if n == name]
            top_s, top_i = part.search(q_emb[rows_here], depth)  # [n_here, depth]
            # Cosine of each candidate to the row's positive, for the near-duplicate filter.
            cand = torch.nn.functional.normalize(part.emb[top_i.clamp(min=0)], dim=-1)  # [n_here, depth, d]
            pos_dir = torch.nn.functional.normalize(p_emb[rows_here], dim=-1)  # [n_here, d]
            to_pos = torch.einsum("nkd,nd->nk", cand, pos_dir)  # [n_here, depth]
            for j in range(len(rows_here)):
                hits.append((part, top_s[j].tolist(), top_i[j].tolist(), to_pos[j].tolist()))
        order = [r for name in dict.fromkeys(names) for r, n in enumerate(names) if n == name]
        by_row = dict(zip(order, hits))
        pos_score = (q_emb * p_emb).sum(-1)  # [n]
        existing_scores: list[list[float]] = [[] for _ in block]
        if cfg.keep_existing and cfg.teacher_scores:
            flat = [(r, n) for r, ex in enumerate(block) for n in ex.negatives]
            if flat:
                n_emb = _encode_grouped(
                    encoder, [n for _, n in flat], [p_instr[r] for r, _ in flat], cfg.batch_size
                )
                for (r, _), e in zip(flat, n_emb):
                    existing_scores[r].append(float(q_emb[r] @ e))
        lines = []
        for r, ex in enumerate(block):
            part, row_s, row_i, row_cos = by_row[r]
            kept: list[tuple[int, float]] = []
            for s, c, cos in zip(row_s, row_i, row_cos):
                if c < 0:
                    continue  # faiss pads with -1 when the corpus is smaller than k
                key = part.keys[c]
                if key in p_keys[r]:
                    report.filtered["positive"] += 1
                elif key == q_keys[r]:
                    report.filtered["query"] += 1
                elif cfg.max_score_ratio is not None and s > cfg.max_score_ratio * float(pos_score[r]):
                    report.filtered["too_close"] += 1
                elif cfg.dedup_threshold is not None and cos > cfg.dedup_threshold:
                    report.filtered["near_duplicate"] += 1
                else:
                    kept.append((c, s))
            window = kept[cfg.skip_top : cfg.skip_top + cfg.top_k]
            if cfg.sample == "random" and len(window) > cfg.num_negatives:
                rng = random.Random(cfg.seed * 1_000_003 + first_row + r)
                chosen = sorted(rng.sample(range(len(window)), cfg.num_negatives))
                picked = [window[j] for j in chosen]
            else:
                picked = window[: cfg.num_negatives]
            report.short_rows += len(picked) < cfg.num_negatives
            report.negatives += len(picked)
            pos_scores.append(float(pos_score[r]))
            neg_scores.extend(s for _, s in picked)
            if picked:
                margins.append(float(pos_score[r]) - picked[0][1])
            negs = [item_to_json(n) for n in ex.negatives] if cfg.keep_existing else []
            negs += [item_to_json(part.items[c]) for c, _ in picked]
            row: dict[str, Any] = {"query": item_to_json(ex.query), "positive": item_to_json(ex.positive)}
            if negs:
                row["negatives"] = negs
            for key in ("instruction", "target_instruction"):
                if getattr(ex, key):
                    row[key] = getattr(ex, key)
            row["dataset"] = ex.dataset
            if cfg.teacher_scores:
                scores = [float(pos_score[r])]
                if cfg.keep_existing:
                    scores += existing_scores[r]
                row["teacher_scores"] = scores + [s for _, s in picked]
            lines.append(json.dumps(row, ensure_ascii=False))
        report.rows += len(block)
        if rank == 0:
            with open(partial, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            snapshot = asdict(report)
            snapshot["scores"] = {"_pos": pos_scores, "_neg": neg_scores, "_margin": margins}
            tmp = state_path.with_name(state_path.name + ".tmp")
            tmp.write_text(
                json.dumps({"settings": settings, "rows_done": first_row + len(block), "report": snapshot})
            )
            os.replace(tmp, state_path)
        if progress and rank == 0:
            print(f"mine: {first_row + len(block)} rows", flush=True)

    block: list[Any] = []
    index = 0
    for ex in _rows(data, media_root, verify_images):
        if index < done:
            index += 1
            continue
        block.append(ex)
        if len(block) == cfg.block_size:
            flush(block, index - len(block) + 1)
            block = []
        index += 1
    if block:
        flush(block, index - len(block))
    report.scores = {
        "positive": _percentiles(pos_scores),
        "negative": _percentiles(neg_scores),
        "margin": _percentiles(margins),
    }
    report.seconds = time.perf_counter() - started
    if rank == 0:
        os.replace(partial, out)
        state_path.unlink(missing_ok=True)
        out.with_name(out.name + ".report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report
