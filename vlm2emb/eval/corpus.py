"""Global retrieval: every query ranks one shared corpus; relevance comes from qrels.

Files (JSONL or Parquet; qrels may also be TSV):

* corpus: ``{"id": "d1", "item": {"text": ..., "image": ...}}`` per row;
* queries: ``{"id": "q1", "item": {...}, "instruction": "..."?}`` per row;
* qrels: ``query_id<TAB>corpus_id<TAB>relevance`` lines (a first line whose relevance is not
  a number is a header, as in BEIR), or JSONL ``{"query_id", "corpus_id", "relevance"}``
  (relevance defaults to 1). Relevance > 0 counts as relevant; ``ndcg@k`` uses the
  relevance as its gain (graded, as pytrec_eval), the other metrics are binary.

Queries without any relevant document are left out of the metrics (as BEIR does) and counted
in ``n_skipped``. A qrels row naming an unknown query or corpus id is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vlm2emb.data.schema import DataError
from vlm2emb.data.sources import resolve_source
from vlm2emb.eval.leaderboard import accumulate, mmeb_metrics
from vlm2emb.eval.metrics import ranking_metrics
from vlm2emb.eval.mmeb import records, resolve_path, row_checker
from vlm2emb.eval.rescore import Rescorer
from vlm2emb.eval.scoring import get_scoring
from vlm2emb.items import resolve_instruction

__all__ = ["CorpusTask", "evaluate_corpus", "load_corpus_task", "read_qrels"]

# Bound on the [query block, corpus] score matrix handed to ranking_metrics at once.
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class CorpusTask:
    """A loaded corpus task: ids and items in file order plus relevance per query id."""

    corpus_ids: list[str]
    corpus_items: list[dict[str, Any]]
    query_ids: list[str]
    query_items: list[dict[str, Any]]
    query_instructions: list[str | None]
    qrels: dict[str, dict[str, float]]  # query id -> corpus id -> relevance


def _id_rows(
    spec: str, kind: str, allowed: tuple[str, ...], media_root: str | None, verify: bool
) -> list[tuple[str, dict[str, Any], str | None]]:
    source = resolve_source(spec, None)
    check = row_checker(source, media_root, verify)
    out: list[tuple[str, dict[str, Any], str | None]] = []
    seen: set[str] = set()
    for lineno, rec in records(source):
        if not isinstance(rec, dict):
            raise check.fail(lineno, f"a row must be a JSON object, got {type(rec).__name__}")
        unknown = sorted(set(rec) - set(allowed))
        if unknown:
            raise check.fail(lineno, f"unknown field(s) {unknown}; {kind} rows hold {', '.join(allowed)}")
        for key in ("id", "item"):
            if rec.get(key) is None:
                raise check.fail(lineno, f"missing field {key!r}")
        rid = str(rec["id"])
        if rid in seen:
            raise check.fail(lineno, f"duplicate {kind} id {rid!r}")
        seen.add(rid)
        instruction = check.optional_str(rec, "instruction", lineno)
        out.append((rid, check.item(lineno, "item", rec["item"]), instruction))
    if not out:
        raise DataError(f"{source.name}: no {kind} rows")
    return out


def read_qrels(spec: str) -> list[tuple[str, str, float, str]]:
    """Reads qrels as ``(query_id, corpus_id, relevance, "file:line")`` tuples.

    Raises:
        DataError: Missing file, malformed line or non-numeric relevance (names file:line).
    """
    path = resolve_path(spec, None)
    out: list[tuple[str, str, float, str]] = []
    if path.suffix.lower() in (".tsv", ".txt", ".qrels"):
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            if len(parts) == 4:  # TREC form: qid 0 docid rel
                parts = [parts[0], parts[2], parts[3]]
            if len(parts) not in (2, 3):
                raise DataError(f"{path}:{lineno}: expected 'query_id<TAB>corpus_id<TAB>relevance'")
            rel_text = parts[2] if len(parts) == 3 else "1"
            try:
                rel = float(rel_text)
            except ValueError:
                if lineno == 1 and not out:
                    continue  # header line ("query-id corpus-id score")
                raise DataError(f"{path}:{lineno}: relevance {rel_text!r} is not a number") from None
            out.append((parts[0], parts[1], rel, f"{path}:{lineno}"))
    else:
        for lineno, rec in records(resolve_source(str(path))):
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: a qrels row must be a JSON object")
            unknown = sorted(set(rec) - {"query_id", "corpus_id", "relevance"})
            if unknown:
                raise DataError(
                    f"{path}:{lineno}: unknown field(s) {unknown}; qrels rows hold query_id, corpus_id, relevance"
                )
            for key in ("query_id", "corpus_id"):
                if rec.get(key) is None:
                    raise DataError(f"{path}:{lineno}: missing field {key!r}")
            rel = rec.get("relevance", 1)
            if isinstance(rel, bool) or not isinstance(rel, (int, float)):
                raise DataError(f"{path}:{lineno}: relevance {rel!r} is not a number")
            out.append((str(rec["query_id"]), str(rec["corpus_id"]), float(rel), f"{path}:{lineno}"))
    if not out:
        raise DataError(f"{path}: no qrels rows")
    return out


def load_corpus_task(
    corpus: str,
    queries: str,
    qrels: str,
    *,
    media_root: str | None = None,
    verify_images: bool = True,
) -> CorpusTask:
    """Reads and cross-checks the three files of a corpus task.

    Raises:
        DataError: A malformed row, a duplicate id, or a qrels row naming an id that the
            corpus or queries file does not hold.
    """
    docs = _id_rows(corpus, "corpus", ("id", "item"), media_root, verify_images)
    qs = _id_rows(queries, "query", ("id", "item", "instruction"), media_root, verify_images)
    doc_ids = {d[0] for d in docs}
    query_ids = {q[0] for q in qs}
    rels: dict[str, dict[str, float]] = {}
    for qid, cid, rel, where in read_qrels(qrels):
        if qid not in query_ids:
            raise DataError(f"{where}: query id {qid!r} is not in {queries}")
        if cid not in doc_ids:
            raise DataError(f"{where}: corpus id {cid!r} is not in {corpus}")
        rels.setdefault(qid, {})[cid] = rel
    return CorpusTask(
        corpus_ids=[d[0] for d in docs],
        corpus_items=[d[1] for d in docs],
        query_ids=[q[0] for q in qs],
        query_items=[q[1] for q in qs],
        query_instructions=[q[2] for q in qs],
        qrels=rels,
    )


def evaluate_corpus(
    model: Any,
    task: CorpusTask,
    *,
    ks: tuple[int, ...] = (1, 5, 10),
    batch_size: int = 32,
    query_instruction: str | None = None,
    target_instruction: str | None = None,
    scoring: str = "cosine",
    rescore: Rescorer | None = None,
) -> dict[str, Any]:
    """Embeds corpus and queries, ranks the whole corpus for every query, averages metrics.

    Args:
        model: Anything with ``encode`` (an EmbeddingModel or a :class:`CachedEncoder`).
        task: The loaded task.
        ks: Metric cut-offs.
        batch_size: Passed to ``encode``.
        query_instruction: Instruction for queries without their own.
        target_instruction: Instruction for corpus items.
        scoring: ``cosine`` or ``maxsim`` (:mod:`vlm2emb.eval.scoring`).
        rescore: Optional second ranking (:class:`vlm2emb.eval.rescore.Rescorer`); its
            metrics, by the same code and qrels, are added under ``"rescored"``.

    Returns:
        ``{metric: value, ..., "n": evaluated queries, "n_skipped": queries without qrels,
        "corpus_size": n}``.
    """
    doc_index = {cid: i for i, cid in enumerate(task.corpus_ids)}
    keep = [i for i, qid in enumerate(task.query_ids) if any(r > 0 for r in task.qrels.get(qid, {}).values())]
    # Queries in id order: the per-query means then add up in the same order whatever the
    # file's order (the reports of reordered files are equal to the last bit).
    keep.sort(key=lambda i: task.query_ids[i])
    if not keep:
        raise DataError("corpus task: no query has a relevant document in the qrels")
    scorer = get_scoring(scoring)
    corpus_emb = scorer.encode(model, task.corpus_items, target_instruction, batch_size)  # [N, ...]
    # Queries: one encode call per distinct instruction (the instruction is part of the prompt).
    by_instr: dict[str | None, list[int]] = {}
    for i in keep:
        by_instr.setdefault(resolve_instruction(task.query_instructions[i], query_instruction), []).append(i)
    parts, position = [], {}  # position[query index] = its row in the concatenated encodings
    instruction_of: dict[int, str | None] = {}  # query index -> the instruction it was embedded with
    for instruction, idx in by_instr.items():
        instruction_of.update(dict.fromkeys(idx, instruction))
        parts.append(scorer.encode(model, [task.query_items[i] for i in idx], instruction, batch_size))
        position.update({i: len(position) + j for j, i in enumerate(idx)})
    query_emb = scorer.concat(parts)  # [Q_kept, ...]
    judged = [
        [(doc_index[cid], rel) for cid, rel in task.qrels[task.query_ids[i]].items() if rel > 0] for i in keep
    ]
    relevant = [[d for d, _ in row] for row in judged]
    # Graded qrels (ViDoRe V2/V3, many BEIR sets) give graded nDCG, as pytrec_eval computes it.
    gains = [[rel for _, rel in row] for row in judged]
    block = max(1, _BLOCK_ELEMENTS // len(task.corpus_ids))
    totals: dict[str, Any] = {}
    for start in range(0, len(keep), block):
        rows = keep[start : start + block]
        scores = scorer.score_all(
            scorer.take(query_emb, torch.tensor([position[r] for r in rows])), corpus_emb
        )  # [b, N]
        metrics: dict[str, Any] = ranking_metrics(
            scores, relevant[start : start + block], ks=ks, gains=gains[start : start + block]
        )
        metrics["leaderboard"] = mmeb_metrics(
            scores, relevant[start : start + block], ks=ks, gains=gains[start : start + block]
        )
        # Per-query means weighted by block size give the mean over all queries.
        accumulate(totals, metrics, len(rows) / len(keep))
        if rescore is not None:
            new_scores = rescore(
                scores,
                [task.query_items[r] for r in rows],
                [instruction_of[r] for r in rows],
                [task.corpus_items] * len(rows),
            )  # [b, N]
            block_relevant = relevant[start : start + block]
            block_gains = gains[start : start + block]
            rescored: dict[str, Any] = ranking_metrics(new_scores, block_relevant, ks=ks, gains=block_gains)
            rescored["leaderboard"] = mmeb_metrics(new_scores, block_relevant, ks=ks, gains=block_gains)
            accumulate(totals.setdefault("rescored", {}), rescored, len(rows) / len(keep))
    return {
        **totals,
        "n": len(keep),
        "n_skipped": len(task.query_ids) - len(keep),
        "corpus_size": len(doc_index),
    }
