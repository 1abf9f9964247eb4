"""Suites bundled with vlm2emb: published benchmarks as suite files (``--suite NAME``).

Each ``NAME.yaml`` here lists a benchmark's tasks as published, with paths relative to a
data root the user downloads (``vlm2emb eval --suite mmeb-v1 --data-root DIR``); the layout
each expects is written at the top of its file and in docs/evaluation.md.
"""

from __future__ import annotations

from pathlib import Path

from vlm2emb.data.schema import DataError

__all__ = ["SUITES_DIR", "bundled_suites", "resolve_suite"]

SUITES_DIR = Path(__file__).resolve().parent


def bundled_suites() -> list[str]:
    """Names of the bundled suites (``mmeb-v1``, ``mmeb-v2``, ``vidore-v1``, ...), sorted."""
    return sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))


def resolve_suite(ref: str | Path, data_root: str | Path | None = None) -> Path:
    """The suite file for ``ref``: an existing file, a bundled suite's name, or ``demo:``.

    ``demo:study/suite`` (the seed study's digits suite) is written once to vlm2emb's cache
    folder (:func:`vlm2emb.data.demo.resolve_demo`), so ``vlm2emb eval --suite`` and
    ``vlm2emb rerank eval --suite`` run it as they run any file.

    Raises:
        DataError: ``ref`` is neither; a bundled suite without ``data_root``; a
            ``data_root`` that is not a folder.
    """
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise DataError(f"--data-root: folder not found: {data_root}")
    if str(ref).startswith("demo:"):
        from vlm2emb.data.demo import resolve_demo

        path = resolve_demo(str(ref))
        if path.suffix != ".yaml":
            raise DataError(f"{ref} is demo data, not a suite; the demo suite is demo:study/suite")
        return path
    path = Path(ref).expanduser()
    if path.is_file():
        return path
    bundled = SUITES_DIR / f"{ref}.yaml"
    if str(ref) in bundled_suites():
        if data_root is None:
            raise DataError(
                f"suite {ref!r} is bundled with vlm2emb and names no data location; "
                "give --data-root DIR (docs/evaluation.md says what DIR holds)"
            )
        return bundled
    raise DataError(
        f"suite file not found: {ref} (bundled suites: {', '.join(bundled_suites())}; demo: demo:study/suite)"
    )
