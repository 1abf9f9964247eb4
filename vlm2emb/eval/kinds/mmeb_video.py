"""``kind: mmeb-video``: MMEB-V2's video tasks from VLM2Vec's tables and frame folders.

Suite keys (besides the common ones of :class:`~vlm2emb.eval.kinds.base.TaskSpec`); which
fields make the query, candidates and answer is per task, so it lives in the suite::

    - name: NExTQA
      kind: mmeb-video
      meta_task: video_qa
      data: video-tasks/data/NExTQA/test.parquet
      frame_root: video-tasks/frames/video_qa/NExTQA
      query_video: "{video}"                 # the frame folder, under frame_root
      query_text: "{question}"
      candidate_fields: [a0, a1, a2, a3, a4]
      answer_field: answer
      answer_type: index

The templates and frame sampling are :mod:`vlm2emb.eval.mmeb_video`'s. ``scope: global``
ranks every query against the union of all rows' candidates (or the ``labels`` file), as
VLM2Vec's ``eval_type: global``; ``scope: local`` ranks each row's own candidates.

Instructions: the task's ``query_instruction`` / ``target_instruction`` (the suite carries
VLM2Vec's wording); the model's saved ones only with ``instruction_fallback: always``, as for
MMEB-layout image rows.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlm2emb.data.schema import DataError
from vlm2emb.eval.corpus import evaluate_corpus
from vlm2emb.eval.kinds.base import PATH, InstructionDefaults, TaskKind, TaskSpec
from vlm2emb.eval.mmeb_video import ANSWER_TYPES, QUERY_MEDIA, SCOPES, VideoLayout, VideoTask, load_video_task
from vlm2emb.eval.rescore import Rescorer
from vlm2emb.eval.runner import evaluate

__all__ = ["KIND", "MmebVideoKind", "MmebVideoTaskSpec"]


@dataclass(kw_only=True)
class MmebVideoTaskSpec(TaskSpec, VideoLayout):
    """A video task: the common task keys, :class:`VideoLayout`'s keys, and the ones below.

    Attributes:
        data: The task's table(s): JSONL or Parquet rows as VLM2Vec's Hugging Face dataset
            holds them.
        frame_root: Folder of pre-extracted frame folders, one per video (or clip); relative
            to the suite file.
        labels: Text file, one label per line: the candidate set of a global
            classification task (VLM2Vec keeps these lists in
            ``video_classification_utils.py``); without it, the labels the rows name. The
            layout gets the file's lines.
        query_instruction_by_media: Query instruction per query form (``image``, ``video``,
            ``text``; :data:`~vlm2emb.eval.mmeb_video.QUERY_MEDIA`) of a task whose rows mix
            them (MomentSeeker); a form not listed gets ``query_instruction``.

    Every other key is :class:`~vlm2emb.eval.mmeb_video.VideoLayout`'s, with its default.
    """

    kind: str = "mmeb-video"
    data: list[str] = field(metadata=PATH)
    # Redeclared for the path metadata (resolved against the suite file's folder).
    frame_root: str = field(metadata=PATH)
    # A file here; the layout holds its lines (VideoLayout.labels: list[str] | None).
    labels: str | None = field(default=None, metadata=PATH)  # type: ignore[assignment]
    query_instruction_by_media: dict[str, str] = field(default_factory=dict)


class MmebVideoKind(TaskKind):
    name = "mmeb-video"
    spec = MmebVideoTaskSpec
    supports_rescore = True

    def check(self, spec: MmebVideoTaskSpec, where: str) -> None:
        if not spec.data:
            raise DataError(f"{where}: an mmeb-video task needs 'data'")
        if spec.scope not in SCOPES:
            raise DataError(f"{where}: 'scope' is {spec.scope!r}; choose one of {', '.join(SCOPES)}")
        if spec.answer_type not in ANSWER_TYPES:
            raise DataError(
                f"{where}: 'answer_type' is {spec.answer_type!r}; choose one of {', '.join(ANSWER_TYPES)}"
            )
        if spec.num_frames is not None and spec.num_frames < 1:
            raise DataError(f"{where}: 'num_frames' must be at least 1 (or null for every frame)")
        if not (spec.query_text or spec.query_video or spec.query_media_field):
            raise DataError(f"{where}: set 'query_text', 'query_video' and/or 'query_media_field'")
        if spec.query_media_field and not (spec.query_media_video or spec.query_media_image):
            raise DataError(
                f"{where}: 'query_media_field' needs 'query_media_video' and/or 'query_media_image'"
            )
        if spec.query_media_field and spec.query_video:
            raise DataError(f"{where}: give one query video source: 'query_video' or 'query_media_field'")
        unknown = sorted(set(spec.query_instruction_by_media) - set(QUERY_MEDIA))
        if unknown:
            raise DataError(
                f"{where}: 'query_instruction_by_media' key {unknown[0]!r} is not one of {', '.join(QUERY_MEDIA)}"
            )
        if spec.query_instruction_by_media and spec.scope != "local":
            raise DataError(f"{where}: 'query_instruction_by_media' needs 'scope: local'")
        if spec.positive_clips_field and not spec.clip_video:
            raise DataError(f"{where}: 'positive_clips_field' needs 'clip_video' (the clips' frame folders)")
        if spec.negative_clips_field and not spec.positive_clips_field:
            raise DataError(f"{where}: 'negative_clips_field' needs 'positive_clips_field'")
        sources = [
            spec.target_video,
            spec.clip_folders,
            spec.positive_clips_field,
            spec.candidates_field,
            spec.candidate_fields or None,
            spec.candidate_values or None,
        ]
        named = sum(s is not None for s in sources)
        if named > 1:
            raise DataError(
                f"{where}: give one candidate source: target_video, clip_folders, positive_clips_field, "
                "candidates_field, candidate_fields or candidate_values"
            )
        if named == 0 and not spec.answer_field:
            raise DataError(
                f"{where}: no candidates; set a candidate source or 'answer_field' (global labels)"
            )
        if spec.labels is not None and spec.scope != "global":
            raise DataError(f"{where}: 'labels' needs 'scope: global'")

    def load(self, spec: MmebVideoTaskSpec, *, verify_images: bool = True, work_dir: Any = None) -> VideoTask:
        labels = None
        if spec.labels is not None:
            path = Path(spec.labels)
            if not path.is_file():
                raise DataError(f"labels file not found: {spec.labels}")
            labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            if not labels:
                raise DataError(f"{spec.labels}: no labels")
        # The spec is a layout too; copied so that loading leaves the spec as given, and with
        # the labels file's lines in place of its path.
        given = {f.name: copy.copy(getattr(spec, f.name)) for f in dataclasses.fields(VideoLayout)}
        layout = VideoLayout(**{**given, "labels": labels})
        if not Path(spec.frame_root).is_dir():
            raise DataError(f"{spec.name}: frame_root not found: {spec.frame_root}")
        return load_video_task(spec.data, layout, verify_images=verify_images, work_dir=work_dir)

    def evaluate(
        self,
        encoder: Any,
        spec: MmebVideoTaskSpec,
        payload: VideoTask,
        *,
        ks: tuple[int, ...],
        batch_size: int,
        defaults: InstructionDefaults,
        rescore: Rescorer | None = None,
    ) -> dict[str, Any]:
        # The suite carries VLM2Vec's instructions; a model default on top would change the
        # prompt VLM2Vec scores (the same rule as MMEB-layout image rows).
        query_instruction = defaults.query(spec.query_instruction, mmeb=True)
        target_instruction = defaults.target(spec.target_instruction, mmeb=True)
        if payload.corpus is not None:
            return evaluate_corpus(
                encoder,
                payload.corpus,
                ks=ks,
                batch_size=batch_size,
                query_instruction=query_instruction,
                target_instruction=target_instruction,
                scoring=spec.scoring,
                rescore=rescore,
            )
        # Rows whose query form has its own instruction (MomentSeeker) take that one.
        by_media = {m: defaults.query(i, mmeb=True) for m, i in spec.query_instruction_by_media.items()}
        rows = [
            {
                **row,
                "task": spec.name,
                "instruction": by_media.get(row.get("query_media", "text"), query_instruction),
            }
            for row in payload.rows or []
        ]
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


KIND = MmebVideoKind()
