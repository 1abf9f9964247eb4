"""What a bad row is and how bad rows are counted: :class:`DataError`, :class:`DataReport`.

Every data module raises :class:`DataError` (one line naming file, line and reason) and
counts skipped rows in a :class:`DataReport`; this module imports no other part of
vlm2emb, so the readers (:mod:`~vlm2emb.data.schema`, :mod:`~vlm2emb.data.sources`,
:mod:`~vlm2emb.data.demo`) and the checks (:mod:`~vlm2emb.data.check`) all depend on it and
not on each other. The policy itself (``data.on_bad_example``) is described in
:mod:`vlm2emb.data.check`.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A bad data file or row; the message is one line naming file, line and reason.

    Attributes:
        kind: A short reason category (``missing_file``, ``bad_image``, ``escapes_root``,
            ...), the key under which ``data_report.json`` counts skipped rows.
    """

    def __init__(self, message: str, kind: str = "invalid") -> None:
        super().__init__(message)
        self.kind = kind


ON_BAD_EXAMPLE = ("error", "skip")


class DataWarning(UserWarning):
    """Data that loads but will not train well (every row of a file identical)."""


MAX_EXAMPLES = 20


@dataclass
class DataReport:
    """Counts of rows read, used and skipped, by reason.

    Attributes:
        rows: Rows read (blank lines excluded).
        used: Rows kept.
        skipped: Rows left out.
        reasons: Skipped rows per reason kind (``missing_file``, ``bad_image``, ...).
        examples: The first few ``file:line: reason`` messages.
        warnings: Data warnings (a file of identical rows), each once.
    """

    rows: int = 0
    used: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # Problems that do not make a row bad (a file of identical rows), shown once each.
    warnings: list[str] = field(default_factory=list)
    # Called with every bad row's message (``vlm2emb data check`` prints them all).
    listener: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def add_bad(self, error: DataError) -> None:
        """Counts one bad row."""
        self.skipped += 1
        self.reasons[error.kind] += 1
        if len(self.examples) < MAX_EXAMPLES:
            self.examples.append(str(error))
        if self.listener is not None:
            self.listener(str(error))

    def warn(self, message: str) -> None:
        """Records a data warning and shows it (once per message) through :mod:`warnings`."""
        if message in self.warnings:
            return
        self.warnings.append(message)
        warnings.warn(message, DataWarning, stacklevel=2)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``data_report.json``."""
        return {
            "rows": self.rows,
            "used": self.used,
            "skipped": self.skipped,
            "reasons": dict(sorted(self.reasons.items())),
            "examples": list(self.examples),
            **({"warnings": list(self.warnings)} if self.warnings else {}),
        }

    def write(self, path: str | Path) -> Path:
        """Writes the report as JSON to ``path``."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(self.as_dict(), indent=2) + "\n")
        return out

    def summary(self) -> str:
        """One line: rows, used, skipped and the reasons."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.reasons.items()))
        return f"{self.rows} rows: {self.used} good, {self.skipped} bad" + (
            f" ({reasons})" if reasons else ""
        )
