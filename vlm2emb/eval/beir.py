"""BEIR-style retrieval folders (ViDoRe V1/V2/V3, BEIR, MTEB) as corpus tasks.

A BEIR folder holds three tables for one dataset, in either of two layouts:

* JSONL (BEIR's own)::

      DIR/corpus.jsonl        {"_id": "d1", "title": "...", "text": "...", "image": "pages/d1.png"}
      DIR/queries.jsonl       {"_id": "q1", "text": "..."}
      DIR/qrels/test.tsv      query-id<TAB>corpus-id<TAB>score   (header line)

* Parquet, as the Hugging Face dataset repositories ship the ``corpus``, ``queries`` and
  ``qrels`` configs (``vidore/*_beir``, ``mteb/*``)::

      DIR/corpus/test-00000-of-00001.parquet    corpus-id, image (or _id, text, title)
      DIR/queries/test-00000-of-00001.parquet   query-id, query  (or _id, text)
      DIR/qrels/test-00000-of-00001.parquet     query-id, corpus-id, score

  A table may also be one file, ``DIR/corpus.parquet``, and the qrels a TSV in either layout.

Column names differ between publishers, so each field takes the first column present of a
short list (:data:`ID_FIELDS`, :data:`TEXT_FIELDS`, ...). An image is a path (relative to
``media_root`` or ``DIR``), or the ``{"bytes", "path"}`` record of a ``datasets`` Image
column, or a decoded image; images from Parquet stay in memory as PNG/JPEG bytes.

The result is a :class:`~vlm2emb.eval.corpus.CorpusTask`, scored like ``kind: corpus``:
every query ranks the whole corpus, relevance > 0 is relevant, and ``ndcg@k`` uses the
qrels score as a graded, linear gain (pytrec_eval's ``ndcg_cut_k``, what ViDoRe and MTEB
report as nDCG@5 and nDCG@10).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm2emb.data.schema import DataError
from vlm2emb.data.sources import resolve_source
from vlm2emb.eval.corpus import CorpusTask, read_qrels
from vlm2emb.eval.mmeb import records, row_checker

__all__ = [
    "CORPUS_ID_FIELDS",
    "ID_FIELDS",
    "QUERY_ID_FIELDS",
    "SCORE_FIELDS",
    "TEXT_FIELDS",
    "find_table",
    "load_beir_task",
]

# First present wins. BEIR JSONL uses _id; the ViDoRe *_beir Parquet configs use
# corpus-id / query-id; MTEB's converted sets use id; later datasets use snake_case.
CORPUS_ID_FIELDS = ("_id", "corpus-id", "corpus_id", "id", "docid", "doc_id")
QUERY_ID_FIELDS = ("_id", "query-id", "query_id", "id", "qid")
ID_FIELDS = {"corpus": CORPUS_ID_FIELDS, "queries": QUERY_ID_FIELDS}
TEXT_FIELDS = ("text", "query", "markdown")
IMAGE_FIELDS = ("image",)
SCORE_FIELDS = ("score", "relevance")

_TABLE_SUFFIXES = (".jsonl", ".parquet")


def find_table(root: Path, name: str, split: str) -> list[Path]:
    """The file(s) holding table ``name`` (``corpus``, ``queries`` or ``qrels``) for ``split``.

    Looks, in order, for ``root/name.jsonl``, ``root/name.parquet``, then inside the folder
    ``root/name/``: ``split.tsv`` / ``split.jsonl`` / ``split.parquet``, the shards
    ``split-*.parquet``, and last any ``*.parquet`` (a folder holding one split).

    Raises:
        DataError: Nothing matches; the message names the folder and what was looked for.
    """
    for suffix in _TABLE_SUFFIXES:
        if (root / f"{name}{suffix}").is_file():
            return [root / f"{name}{suffix}"]
    folder = root / name
    if folder.is_dir():
        for suffix in (".tsv", ".jsonl", ".parquet"):
            if (folder / f"{split}{suffix}").is_file():
                return [folder / f"{split}{suffix}"]
        shards = sorted(folder.glob(f"{split}-*.parquet")) or sorted(folder.glob("*.parquet"))
        if shards:
            return shards
    if name == "qrels" and (root / "qrels.tsv").is_file():
        return [root / "qrels.tsv"]
    raise DataError(
        f"{root}: no {name} table for split {split!r} (looked for {name}.jsonl, {name}.parquet, "
        f"{name}/{split}.tsv|jsonl|parquet, {name}/{split}-*.parquet)"
    )


def _first(rec: dict[str, Any], fields: tuple[str, ...]) -> tuple[str | None, Any]:
    for key in fields:
        if rec.get(key) is not None:
            return key, rec[key]
    return None, None


def _rows(
    files: list[Path], table: str, media_root: str | None, verify: bool
) -> list[tuple[str, dict[str, Any]]]:
    """``(id, item)`` pairs of the corpus or queries table, ids unique, items checked."""
    out: list[tuple[str, dict[str, Any]]] = []
    seen: set[str] = set()
    for path in files:
        source = resolve_source(str(path), None)
        # Relative image paths follow the dataset folder (the table may sit in a subfolder).
        root = media_root or str(path.parent.parent if path.parent.name == table else path.parent)
        check = row_checker(source, root, verify)
        for lineno, rec in records(source):
            if not isinstance(rec, dict):
                raise check.fail(lineno, f"a row must be a JSON object, got {type(rec).__name__}")
            id_key, rid = _first(rec, ID_FIELDS[table])
            if id_key is None:
                raise check.fail(lineno, f"no id field (one of {', '.join(ID_FIELDS[table])})")
            rid = str(rid)
            if rid in seen:
                raise check.fail(lineno, f"duplicate {table} id {rid!r}")
            seen.add(rid)
            _, text = _first(rec, TEXT_FIELDS)
            title = rec.get("title")
            if isinstance(title, str) and title.strip() and isinstance(text, str):
                text = f"{title} {text}"  # BEIR's usual title + text join
            raw: dict[str, Any] = {"text": text if isinstance(text, str) and text.strip() else None}
            _, image = _first(rec, IMAGE_FIELDS)
            if image is not None and image != "":
                raw["image"] = image
            out.append((rid, check.item(lineno, table, raw)))
    if not out:
        raise DataError(f"{files[0]}: no {table} rows")
    return out


def _qrels(files: list[Path]) -> list[tuple[str, str, float, str]]:
    """``(query_id, corpus_id, score, "file:row")`` from TSV, JSONL or Parquet qrels."""
    out: list[tuple[str, str, float, str]] = []
    for path in files:
        if path.suffix.lower() in (".tsv", ".txt"):
            out.extend(read_qrels(str(path)))
            continue
        for lineno, rec in records(resolve_source(str(path), None)):
            where = f"{path}:{lineno}"
            if not isinstance(rec, dict):
                raise DataError(f"{where}: a qrels row must be a JSON object")
            _, qid = _first(rec, ("query-id", "query_id", "qid"))
            _, cid = _first(rec, ("corpus-id", "corpus_id", "docid", "doc_id"))
            if qid is None or cid is None:
                raise DataError(f"{where}: a qrels row needs query-id and corpus-id (or query_id, corpus_id)")
            _, score = _first(rec, SCORE_FIELDS)
            score = 1 if score is None else score
            if isinstance(score, bool) or not isinstance(score, (int, float)):
                raise DataError(f"{where}: score {score!r} is not a number")
            out.append((str(qid), str(cid), float(score), where))
    if not out:
        raise DataError(f"{files[0]}: no qrels rows")
    return out


def load_beir_task(
    root: str | Path,
    *,
    split: str = "test",
    media_root: str | None = None,
    verify_images: bool = True,
) -> CorpusTask:
    """Reads a BEIR-style folder (module docstring) into a corpus task.

    Args:
        root: The dataset folder.
        split: The qrels split (and Parquet shard prefix) to read.
        media_root: Folder for relative image paths (default: the dataset folder).
        verify_images: Check image headers now.

    Returns:
        A :class:`~vlm2emb.eval.corpus.CorpusTask`; its queries carry no instruction of
        their own (the suite's ``query_instruction`` or the model's applies).

    Raises:
        DataError: A missing table, a row without an id, a duplicate id, an empty item, or
            a qrels row naming an id the corpus or queries table lacks (file and row named).
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"BEIR folder not found: {base}")
    corpus_files = find_table(base, "corpus", split)
    query_files = find_table(base, "queries", split)
    docs = _rows(corpus_files, "corpus", media_root, verify_images)
    queries = _rows(query_files, "queries", media_root, verify_images)
    doc_ids = {d for d, _ in docs}
    query_ids = {q for q, _ in queries}
    rels: dict[str, dict[str, float]] = {}
    for qid, cid, score, where in _qrels(find_table(base, "qrels", split)):
        if qid not in query_ids:
            raise DataError(f"{where}: query id {qid!r} is not in {query_files[0]}")
        if cid not in doc_ids:
            raise DataError(f"{where}: corpus id {cid!r} is not in {corpus_files[0]}")
        rels.setdefault(qid, {})[cid] = score
    return CorpusTask(
        corpus_ids=[d for d, _ in docs],
        corpus_items=[item for _, item in docs],
        query_ids=[q for q, _ in queries],
        query_items=[item for _, item in queries],
        query_instructions=[None] * len(queries),
        qrels=rels,
    )
