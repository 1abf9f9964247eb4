"""``kind: local``: every row ranks its own candidates (canonical rows or MMEB-eval rows).

Suite keys (besides the common ones of :class:`~vlm2emb.eval.kinds.base.TaskSpec`)::

    - name: digits-i2t
      kind: local          # the default
      data: eval.jsonl     # a path or a list of paths
      format: auto         # auto | vlm2emb | mmeb

Instructions: a row's own instruction, else the task's ``query_instruction``, else the
model's default as ``instruction_fallback`` allows; under ``auto`` MMEB-layout rows get
none (their text holds MMEB's instruction), and in a task with MMEB rows the candidates get
no default target instruction either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlm2emb.data.schema import DataError
from vlm2emb.eval.kinds.base import PATH, InstructionDefaults, TaskKind, TaskSpec
from vlm2emb.eval.mmeb import MMEB_LAYOUT, load_local_rows
from vlm2emb.eval.rescore import Rescorer
from vlm2emb.eval.runner import evaluate

__all__ = ["FORMATS", "KIND", "LocalKind", "LocalTaskSpec"]

FORMATS = ("auto", "vlm2emb", "mmeb")


@dataclass(kw_only=True)
class LocalTaskSpec(TaskSpec):
    """A local task.

    Attributes:
        data: Eval file(s): canonical rows (docs/data.md) or VLM2Vec's MMEB-eval layout
            (``qry_text``, ``qry_img_path``, ``tgt_text``, ``tgt_img_path``).
        format: ``auto`` (detected from the first row), ``vlm2emb`` or ``mmeb``.
    """

    kind: str = "local"
    data: list[str] = field(metadata=PATH)
    format: str = "auto"


class LocalKind(TaskKind):
    name = "local"
    spec = LocalTaskSpec
    supports_rescore = True

    def check(self, spec: LocalTaskSpec, where: str) -> None:
        if not spec.data:
            raise DataError(f"{where}: a local task needs 'data'")
        if spec.format not in FORMATS:
            raise DataError(f"{where}: 'format' is {spec.format!r}; choose one of {', '.join(FORMATS)}")

    def load(self, spec: LocalTaskSpec, *, verify_images: bool = True, work_dir: Any = None) -> Any:
        return load_local_rows(
            spec.data,
            fmt=spec.format,
            media_root=spec.media_root,
            query_instruction=spec.query_instruction,
            verify_images=verify_images,
            work_dir=work_dir,
        )

    def evaluate(
        self,
        encoder: Any,
        spec: LocalTaskSpec,
        payload: list[dict[str, Any]],
        *,
        ks: tuple[int, ...],
        batch_size: int,
        defaults: InstructionDefaults,
        rescore: Rescorer | None = None,
    ) -> dict[str, Any]:
        has_mmeb = any(row.get("layout") == MMEB_LAYOUT for row in payload)
        target_instruction = defaults.target(spec.target_instruction, mmeb=has_mmeb)
        rows = []
        for row in payload:
            instruction = defaults.query(row["instruction"], mmeb=row.get("layout") == MMEB_LAYOUT)
            rows.append({**row, "task": spec.name, "instruction": instruction})
        result = evaluate(
            encoder,
            rows,
            batch_size=batch_size,
            ks=ks,
            target_instruction=target_instruction,
            scoring=spec.scoring,
            rescore=rescore,
        )
        return result["tasks"][spec.name]


KIND = LocalKind()
