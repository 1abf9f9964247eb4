"""Bad-input policy and ``vlm2emb data check``: count, report and optionally skip bad rows.

With ``data.on_bad_example: error`` (the default) the first bad row stops the run with one
line naming file, line and reason. With ``skip`` every bad row is left out, counted by
reason, and the run writes ``{output_dir}/data_report.json``::

    {"rows": 120, "used": 117, "skipped": 3,
     "reasons": {"missing_file": 2, "malformed_json": 1},
     "examples": ["train.jsonl:4: query.image file not found: /data/x.png", ...]}

``vlm2emb data check FILE...`` validates files before training, decoding every media item
fully (a header check can miss a truncated JPEG; a full decode cannot).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm2emb.data.schema import DataError

ON_BAD_EXAMPLE = ("error", "skip")
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
    """

    rows: int = 0
    used: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
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

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``data_report.json``."""
        return {
            "rows": self.rows,
            "used": self.used,
            "skipped": self.skipped,
            "reasons": dict(sorted(self.reasons.items())),
            "examples": list(self.examples),
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


def check_files(
    specs: list[str],
    *,
    kind: str = "train",
    media_root: str | Path | None = None,
    data_format: str = "auto",
    options: Any = None,
    print_fn: Any = print,
) -> DataReport:
    """Validates data files and fully decodes every media item; prints every bad row.

    Args:
        specs: Data sources (files, dataset folders, ``hf:`` ids).
        kind: ``train`` or ``eval`` rows.
        media_root: Folder for relative media paths (default: each file's folder).
        data_format: ``auto`` | ``canonical`` | ``mmeb`` (training rows).
        options: :class:`vlm2emb.data.media.MediaOptions` for limits and frames.
        print_fn: Where each bad row's line goes.

    Returns:
        The report; ``report.skipped`` is the number of bad rows.
    """
    from vlm2emb.data.media import MediaOptions, decode_item
    from vlm2emb.data.schema import load_eval_examples, load_train_examples

    opts = options or MediaOptions()
    report = DataReport(listener=print_fn)
    common: dict[str, Any] = dict(
        media_root=media_root, verify_images=True, on_bad_example="skip", report=report, options=opts
    )
    if kind == "eval":
        examples: list[Any] = load_eval_examples(specs, **common)
    else:
        examples = load_train_examples(specs, data_format=data_format, allow_empty=True, **common)
    for ex in examples:
        items = [ex.query, *ex.candidates] if kind == "eval" else [ex.query, ex.positive, *ex.negatives]
        try:
            for item in items:
                decode_item(item, opts)
        except Exception as exc:  # a full decode can still fail where the header check passed
            report.used -= 1
            report.add_bad(DataError(f"{ex.source}: {exc}", kind="bad_media"))
    return report
