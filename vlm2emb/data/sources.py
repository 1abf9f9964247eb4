"""Where rows come from: JSONL, Parquet, ``datasets`` folders, hub datasets, the MMEB-train layout.

A *source* is one entry of ``data.train`` / ``data.eval``:

- ``path.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line;
- ``path.parquet``: one row per record;
- a folder written by ``datasets.Dataset.save_to_disk`` (a ``DatasetDict`` folder gives its
  ``train`` split, or ``folder:SPLIT``);
- ``hf:OWNER/NAME``, ``hf:OWNER/NAME:SPLIT`` or ``hf:OWNER/NAME:CONFIG:SPLIT``:
  ``datasets.load_dataset`` (needs network or the local hub cache; default split ``train``);
- ``demo:digits/train`` (see :mod:`vlm2emb.data.demo`);
- ``memory:NAME``: rows held in this process (a list of dicts or a ``datasets.Dataset``),
  registered with :func:`register_memory_source` (``vlm2emb.train(train_data=...)`` does).

:func:`iter_records` yields ``(row number, record, error)`` so that one broken line (bad
JSON) is reported (or skipped) without ending the file. ``datasets`` is imported lazily.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm2emb.data.demo import resolve_demo
from vlm2emb.data.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
MMEB_KEYS = ("qry", "qry_image_path", "pos_text", "pos_image_path", "neg_text", "neg_image_path")
DATA_FORMATS = ("auto", "canonical", "mmeb")
# VLM2Vec marks where an image goes with <|image_1|> (Phi-3-V style); our prompt places
# images itself, so the marker and the whitespace around it are removed.
_IMAGE_MARKER = re.compile(r"\s*<\|image_\d+\|>\s*")


@dataclass
class Source:
    """One resolved data source.

    Attributes:
        spec: What the recipe said.
        name: Used in messages (``name:line: reason``) and as the default dataset name.
        kind: ``jsonl`` | ``parquet`` | ``dataset`` | ``hub`` | ``memory``.
        root: Folder relative media paths resolve against (unless ``data.media_root``).
        split: Split of a ``DatasetDict`` folder or hub dataset.
    """

    spec: str
    name: str
    kind: str
    root: Path
    split: str | None = None
    path: Path | None = None
    config: str | None = None  # hub dataset configuration (subset)

    @property
    def stem(self) -> str:
        """Default dataset name: the file name without extension, or the dataset's name."""
        if self.path is not None and self.kind in ("jsonl", "parquet"):
            return self.path.stem
        base = self.spec.removeprefix("hf:").split(":")[0].rstrip("/")
        return self.config or base.rsplit("/", 1)[-1]


# memory:NAME -> rows held by this process. Each process of a multi-process run registers
# its own (every process runs the same script), so nothing crosses a process boundary.
_MEMORY: dict[str, Any] = {}


def register_memory_source(name: str, rows: Any) -> str:
    """Makes in-memory rows a source; returns its spec ``memory:NAME`` for ``data.train``.

    Args:
        name: The source's name (``memory:NAME`` in messages and ``recipe.yaml``).
        rows: A list of row dicts (media as paths, relative to the working directory or
            ``data.media_root``) or a ``datasets.Dataset`` (``Image`` features included).

    Raises:
        TypeError: ``rows`` is neither.
    """
    if not isinstance(rows, list):
        try:
            import datasets
        except ImportError:  # pragma: no cover - datasets is a dependency
            datasets = None
        if datasets is None or not isinstance(rows, datasets.Dataset):
            raise TypeError(
                f"in-memory rows must be a list of dicts or a datasets.Dataset, got {type(rows).__name__}"
            )
    _MEMORY[name] = rows
    return f"memory:{name}"


def unregister_memory_source(name: str) -> None:
    """Forgets ``memory:NAME`` (its rows can then be freed)."""
    _MEMORY.pop(name, None)


def _is_dataset_dir(p: Path) -> bool:
    return p.is_dir() and any(
        (p / n).is_file() for n in ("dataset_info.json", "state.json", "dataset_dict.json")
    )


def resolve_source(spec: str, work_dir: str | Path | None = None) -> Source:
    """Turns a ``data.train`` entry into a :class:`Source`.

    Raises:
        DataError: Missing file, unsupported file type.
    """
    if spec.startswith("memory:"):
        if spec.removeprefix("memory:") not in _MEMORY:
            raise DataError(
                f"{spec}: no in-memory rows of that name in this process (pass them to vlm2emb.train)"
            )
        return Source(spec, spec, "memory", Path.cwd().resolve())
    if spec.startswith("demo:"):
        path = resolve_demo(spec, work_dir)
        return Source(spec, str(path), "jsonl", path.parent.resolve(), path=path)
    if spec.startswith("hf:"):
        name, *rest = spec.removeprefix("hf:").split(":")
        if not name or len(rest) > 2 or any(not part for part in rest):
            raise DataError(f"{spec}: expected hf:OWNER/NAME[:SPLIT] or hf:OWNER/NAME:CONFIG:SPLIT")
        config = rest[0] if len(rest) == 2 else None
        split = rest[-1] if rest else "train"
        return Source(spec, spec, "hub", Path.cwd().resolve(), split=split, config=config)
    p = Path(spec).expanduser()
    split = None
    if not p.exists() and ":" in spec:
        # "folder:split" for a DatasetDict folder.
        head, _, tail = spec.rpartition(":")
        if _is_dataset_dir(Path(head).expanduser()):
            p, split = Path(head).expanduser(), tail
    if not p.exists():
        raise DataError(f"data file not found: {spec}")
    if p.is_dir():
        if not _is_dataset_dir(p):
            raise DataError(
                f"{spec}: a folder source must be written by datasets' save_to_disk (no dataset_info.json)"
            )
        return Source(spec, str(p), "dataset", p.resolve(), split=split, path=p)
    suffix = p.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return Source(spec, str(p), "jsonl", p.parent.resolve(), path=p)
    if suffix == ".parquet":
        return Source(spec, str(p), "parquet", p.parent.resolve(), path=p)
    raise DataError(f"{p}: unsupported data file type {suffix!r} (use .jsonl, .parquet or a datasets folder)")


def iter_records(source: Source) -> Iterator[tuple[int, Any, str | None]]:
    """Yields ``(row number from 1, record, None)``, or ``(n, None, reason)`` for a broken line.

    Records are streamed (JSONL line by line, Parquet and ``datasets`` from their Arrow
    files), so a file larger than memory can be validated or streamed.
    """
    if source.kind == "jsonl":
        assert source.path is not None
        # Read as bytes and decode each line strictly: a lenient decode would turn Latin-1
        # bytes into U+FFFD characters that then train silently as garbage text.
        with source.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    yield lineno, None, _encoding_problem(raw, exc)
                    continue
                if not line.strip():
                    continue
                yield _parse_json_line(lineno, line)
        return
    if source.kind == "memory":
        rows = _MEMORY[source.spec.removeprefix("memory:")]
        if isinstance(rows, list):
            yield from ((i, rec, None) for i, rec in enumerate(rows, start=1))
            return
        ds = _undecoded_dataset(rows)
    else:
        ds = _open_dataset(source)
    for i, rec in enumerate(ds, start=1):
        yield i, drop_nulls(rec), None


# Marks a row's problem as an encoding error (kind ``bad_encoding``), not malformed JSON.
ENCODING_PROBLEM = "not valid UTF-8"


def _encoding_problem(raw: bytes, exc: UnicodeDecodeError) -> str:
    bad = raw[exc.start : exc.start + 4].hex(" ")
    return (
        f"{ENCODING_PROBLEM} (bytes {bad} at byte {exc.start + 1} of the line); "
        "data files must be UTF-8 (re-encode it, e.g. iconv -f latin1 -t utf-8)"
    )


def _parse_json_line(lineno: int, line: str) -> tuple[int, Any, str | None]:
    try:
        return lineno, json.loads(line), None
    except json.JSONDecodeError as exc:
        return lineno, None, f"malformed JSON ({exc.msg}); data files hold one JSON object per line"
    except RecursionError:
        # json's C decoder recurses once per nesting level; no real row nests this deep.
        return lineno, None, "malformed JSON (nested too deeply); data files hold one JSON object per line"


def _open_dataset(source: Source) -> Any:
    import datasets
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    try:
        if source.kind == "parquet":
            ds = datasets.Dataset.from_parquet(str(source.path))
        elif source.kind == "dataset":
            ds = datasets.load_from_disk(str(source.path))
            if isinstance(ds, datasets.DatasetDict):
                split = source.split or "train"
                if split not in ds:
                    raise DataError(f"{source.spec}: no split {split!r} (splits: {', '.join(ds)})")
                ds = ds[split]
        else:  # hub
            name = source.spec.removeprefix("hf:").partition(":")[0]
            ds = datasets.load_dataset(name, source.config, split=source.split)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(
            f"{source.spec}: cannot load dataset ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from None
    return _undecoded_dataset(ds)


def _undecoded_dataset(ds: Any) -> Any:
    # Undecoded images: bytes (and paths) are hashable for the false-negative keys and are
    # decoded per batch, with the configured limits, like paths in JSONL.
    return ds.cast(_undecoded(ds.features)) if _has_decoded_images(ds.features) else ds


def _has_decoded_images(feature: Any) -> bool:
    import datasets

    if isinstance(feature, datasets.Image):
        return feature.decode
    if isinstance(feature, dict):
        return any(_has_decoded_images(v) for v in feature.values())
    if isinstance(feature, (list, tuple)):
        return any(_has_decoded_images(v) for v in feature)
    inner = getattr(feature, "feature", None)
    return inner is not None and _has_decoded_images(inner)


def _undecoded(feature: Any) -> Any:
    import copy

    import datasets

    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    if isinstance(feature, datasets.Features):
        return datasets.Features({k: _undecoded(v) for k, v in feature.items()})
    if isinstance(feature, dict):
        return {k: _undecoded(v) for k, v in feature.items()}
    if isinstance(feature, list):
        return [_undecoded(v) for v in feature]
    if getattr(feature, "feature", None) is not None:
        out = copy.copy(feature)
        out.feature = _undecoded(feature.feature)
        return out
    return feature


def drop_nulls(rec: Any) -> Any:
    """Removes None values: Arrow fills absent struct fields with null, meaning absent."""
    if isinstance(rec, dict):
        return {k: drop_nulls(v) for k, v in rec.items() if v is not None}
    if isinstance(rec, list):
        return [drop_nulls(v) for v in rec]
    return rec


# ---------------------------------------------------------------------- MMEB layout
def is_mmeb(rec: dict[str, Any]) -> bool:
    """True for a row in VLM2Vec's MMEB-train layout (``qry``, ``pos_text``, ...)."""
    return "query" not in rec and ("qry" in rec or "pos_text" in rec or "pos_image_path" in rec)


def _mmeb_item(text: Any, image: Any, side: str) -> dict[str, Any] | None:
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{side} text must be a string, got {type(text).__name__}")
    has_marker = bool(text and _IMAGE_MARKER.search(text))
    clean = _IMAGE_MARKER.sub(" ", text).strip() if text else ""
    if image in ("", None):
        image = None
    if has_marker and image is None:
        raise ValueError(f"{side} text has an <|image_N|> marker but its image path is empty")
    if not clean and image is None:
        return None
    # The text keeps its markers: the model's prompt style decides at render time whether
    # they are removed (vlm2emb) or become the backbone's image token in place (vlm2vec).
    item: dict[str, Any] = {"text": text if clean or has_marker else None}
    if image is not None:
        item["image"] = image
    return item


def convert_mmeb(rec: dict[str, Any], *, negatives: bool = True) -> dict[str, Any]:
    """Converts an MMEB-train row to a canonical training row.

    ``qry`` + ``qry_image_path`` become the query, ``pos_text`` + ``pos_image_path`` the
    positive, ``neg_text`` + ``neg_image_path`` (when not empty, and ``negatives``) one hard
    negative. The ``<|image_N|>`` markers stay in the text (the prompt style handles them,
    :mod:`vlm2emb.prompts`); the instruction VLM2Vec writes into ``qry`` stays part of the
    query text, which is how VLM2Vec embeds it.

    Args:
        rec: The MMEB-train row.
        negatives: Keep the row's negative (recipe key ``data.mmeb_negatives``). VLM2Vec
            reads ``neg_text`` / ``neg_image_path`` but its training collators drop them;
            False trains as VLM2Vec does.

    Raises:
        ValueError: The reason, for the caller to prefix with file and line.
    """
    allowed = (*MMEB_KEYS, "dataset")
    unknown = sorted(set(rec) - set(allowed))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; MMEB-train rows hold {', '.join(allowed)}")
    out: dict[str, Any] = {
        "query": _mmeb_item(rec.get("qry"), rec.get("qry_image_path"), "qry"),
        "positive": _mmeb_item(rec.get("pos_text"), rec.get("pos_image_path"), "pos"),
    }
    neg = _mmeb_item(rec.get("neg_text"), rec.get("neg_image_path"), "neg")
    if neg is not None and negatives:
        out["negatives"] = [neg]
    if rec.get("dataset") is not None:
        out["dataset"] = rec["dataset"]
    return {k: v for k, v in out.items() if v is not None}
