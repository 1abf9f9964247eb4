"""MMEB-V2's video tasks (kind: mmeb-video) on synthetic files in VLM2Vec's layout.

The rows carry the fields VLM2Vec's loaders read (src/data/eval_dataset/*_dataset.py, commit
6e1e1d4) and the frames are real JPEG files in frame folders under the frame roots of its
experiments/public/eval/video.yaml. The suite entries under test are the bundled mmeb-v2
ones, so a wrong field name in the suite fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import vlm2emb.eval.suites
from vlm2emb import EmbeddingModel
from vlm2emb.cli import main
from vlm2emb.data.schema import DataError
from vlm2emb.eval.harness import load_suite_tasks, run_suite
from vlm2emb.eval.mmeb_video import drop_letter, list_frames, sample_frames
from vlm2emb.eval.suite import load_suite

QA = (
    "Given a video and a question, select the most accurate answer from the provided candidates. "
    "Return only the exact text of your chosen answer. Question: "
)
SCORED = ("K700", "SmthSmthV2", "NExTQA", "MSR-VTT", "QVHighlight")
N_FRAMES = 12  # frames per query video: more than 8, so 8 are sampled
# Frames i*11//7 (0-based) of 12: VLM2Vec's np.linspace(0, 11, 8, dtype=int), by hand.
PICKED = [0, 1, 3, 4, 6, 7, 9, 11]


SUITES = Path(vlm2emb.eval.suites.__file__).parent


def bundled_video_tasks() -> list[dict[str, Any]]:
    """The bundled mmeb-v2 video tasks, to be written into a test suite elsewhere: their
    "suite:" label files (shipped beside the bundled suite) made absolute."""
    tasks = [
        t
        for t in yaml.safe_load((SUITES / "mmeb-v2.yaml").read_text())["tasks"]
        if t.get("kind") == "mmeb-video"
    ]
    for task in tasks:
        if str(task.get("labels", "")).startswith("suite:"):
            task["labels"] = str(SUITES / task["labels"].removeprefix("suite:"))
    return tasks


def shipped_labels(task: str) -> list[str]:
    return (SUITES / "labels" / f"{task}.txt").read_text().splitlines()


def write_frames(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` real 32x32 JPEG frames named without zero padding (frame_1 .. frame_n), so
    natural order differs from name order; returns them in natural order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(1, n + 1):
        pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"frame_{i}.jpg")
        paths.append((folder / f"frame_{i}.jpg").resolve())
    return paths


def write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".jsonl":  # MomentSeeker's table is a JSONL file in VLM2Vec's config
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return
    pq.write_table(pa.Table.from_pylist(rows), path)


# Two rows per task in VLM2Vec's fields, and the frame folders their templates name. Each
# entry: rows, {frame folder under frame_root: frame count}.
LAYOUT: dict[str, tuple[list[dict[str, Any]], dict[str, int]]] = {
    "K700": ([{"video_id": "v0", "pos_text": "archery"}, {"video_id": "v1", "pos_text": "bowling"}], {}),
    "HMDB51": ([{"video_id": "v0", "pos_text": "clap"}, {"video_id": "v1", "pos_text": "wave"}], {}),
    "UCF101": ([{"video_id": "v0", "pos_text": "Diving"}, {"video_id": "v1", "pos_text": "Diving"}], {}),
    "Breakfast": ([{"video_id": "v0", "pos_text": "tea"}, {"video_id": "v1", "pos_text": "juice"}], {}),
    "SmthSmthV2": (
        [
            {
                "video_id": 10,
                "pos_text": "Opening something",
                "neg_text": ["Closing something", "Opening something"],
            },
            {
                "video_id": 11,
                "pos_text": "Tearing something",
                "neg_text": ["Tearing something", "Folding something"],
            },
        ],
        {},
    ),
    "Video-MME": (
        [
            {
                "videoID": "v0",
                "question": "What colour is the car?",
                "options": ["A. Red.", "B. Blue.", "C. Green.", "D. Black."],
                "answer": "B",
                "question_id": "001-1",
                "domain": "x",
                "sub_category": "y",
            },
            {
                "videoID": "v1",
                "question": "How many people?",
                "options": ["A. One.", "B. Two.", "C. Three.", "D. Four."],
                "answer": "D",
                "question_id": "002-1",
                "domain": "x",
                "sub_category": "y",
            },
        ],
        {},
    ),
    "MVBench": (
        [
            {
                "subset": "action_sequence",
                "video": "a.mp4",
                "question": "What happened?",
                "candidates": ["sat", "ran", "ate"],
                "answer": "ran",
            },
            {
                "subset": "object_shuffle",
                "video": "b.mp4",
                "question": "Where is it?",
                "candidates": ["left", "right"],
                "answer": "left",
            },
        ],
        {"action_sequence/a.mp4": N_FRAMES, "object_shuffle/b.mp4": N_FRAMES},
    ),
    "NExTQA": (
        [
            {
                "video": 4010069381,
                "question": "why did the boy fall",
                "answer": 3,
                "qid": 6,
                "type": "CW",
                "a0": "slipped",
                "a1": "pushed",
                "a2": "jumped",
                "a3": "tripped",
                "a4": "sat",
            },
            {
                "video": 4882821564,
                "question": "what is the dog doing",
                "answer": 0,
                "qid": 2,
                "type": "TC",
                "a0": "running",
                "a1": "eating",
                "a2": "sleeping",
                "a3": "barking",
                "a4": "sitting",
            },
        ],
        {"4010069381": N_FRAMES, "4882821564": N_FRAMES},
    ),
    "EgoSchema": (
        [
            {
                "video_idx": "e0",
                "question": "What is C doing?",
                "answer": "1",
                "question_idx": "q0",
                "option": ["A. C cooks.", "B. C cleans.", "C. C reads."],
            },
            {
                "video_idx": "e1",
                "question": "Where is C?",
                "answer": "2",
                "question_idx": "q1",
                "option": ["A. Kitchen.", "B. Garden.", "C. Garage."],
            },
        ],
        {"e0": N_FRAMES, "e1": N_FRAMES},
    ),
    "ActivityNetQA": (
        [
            {"video_name": "abc", "question": "is the man outside", "answer": "no", "question_id": "a1"},
            {"video_name": "def", "question": "is it raining", "answer": "yes", "question_id": "a2"},
        ],
        {"v_abc": N_FRAMES, "v_def": N_FRAMES},
    ),
    "DiDeMo": (
        [
            {"video": "videos/d0.mp4", "caption": "a dog runs"},
            {"video": "videos/d1.mp4", "caption": "a cat sleeps"},
        ],
        {"d0": N_FRAMES, "d1": N_FRAMES},
    ),
    "MSR-VTT": (
        [
            {"video_id": "video7020", "video": "video7020.mp4", "caption": "a man sings"},
            {"video_id": "video7021", "video": "video7021.mp4", "caption": "a woman cooks"},
        ],
        {"video7020": N_FRAMES, "video7021": N_FRAMES},
    ),
    "MSVD": (
        [
            {"video_id": "m0", "video": "m0.avi", "caption": ["a plane lands", "a jet"]},
            {"video_id": "m1", "video": "m1.avi", "caption": ["a boy swims", "swimming"]},
        ],
        {"m0": N_FRAMES, "m1": N_FRAMES},
    ),
    "VATEX": (
        [
            {"videoID": "x0", "enCap": ["people dance", "a dance"]},
            {"videoID": "x1", "enCap": ["a car drives", "cars"]},
        ],
        {"x0": N_FRAMES, "x1": N_FRAMES},
    ),
    "YouCook2": (
        [
            {"id": "y0", "video_path": "val/y0.mp4", "sentence": "chop the onion"},
            {"id": "y1", "video_path": "val/y1.mp4", "sentence": "fry the egg"},
        ],
        {"y0": N_FRAMES, "y1": N_FRAMES},
    ),
}
# Classification and Video-MME rows name their videos by id: v0, v1 (SSv2: 10, 11).
for _name in ("K700", "HMDB51", "UCF101", "Breakfast", "Video-MME"):
    LAYOUT[_name][1].update({"v0": N_FRAMES, "v1": N_FRAMES})
LAYOUT["SmthSmthV2"][1].update({"10": N_FRAMES, "11": N_FRAMES})
# Moment retrieval: <video>/query plus one sub-folder per clip; the negatives have fewer
# frames than 8, so all of theirs are taken.
# MomentSeeker (VLM2Vec's momentseeker_dataset.py): a text-only query (empty input_frames)
# and a video query; clips listed as {"output_path": ...}, frames under
# video_frames/<path before .mp4, "/" -> "_">. Its image queries: test_momentseeker_*.
LAYOUT["MomentSeeker"] = (
    [
        {
            "query": "a dog jumps into the lake",
            "input_frames": "",
            "positive_frames": [{"output_path": "ms/m1/clip_0.mp4"}],
            "negative_frames": [{"output_path": "ms/m1/clip_1.mp4"}, {"output_path": "ms/m1/clip_2.mp4"}],
        },
        {
            "query": "the same scene later",
            "input_frames": "ms/m2/full.mp4",
            "positive_frames": [{"output_path": "ms/m2/clip_5.mp4"}, {"output_path": "ms/m2/clip_6.mp4"}],
            "negative_frames": [{"output_path": "ms/m2/clip_1.mp4"}],
        },
    ],
    {
        "video_frames/ms_m1_clip_0": 3,
        "video_frames/ms_m1_clip_1": 3,
        "video_frames/ms_m1_clip_2": 3,
        "video_frames/ms_m2_full": N_FRAMES,
        "video_frames/ms_m2_clip_5": 2,
        "video_frames/ms_m2_clip_6": 2,
        "video_frames/ms_m2_clip_1": 2,
    },
)
for _name in ("QVHighlight", "Charades-STA"):
    LAYOUT[_name] = (
        [
            {"query": "the man opens the door", "video_path": "qv/vidA.mp4"},
            {"query": "a goal", "video_path": "qv/vidB.mp4"},
        ],
        {
            f"{vid}/{clip}": n
            for vid in ("vidA", "vidB")
            for clip, n in (("query", N_FRAMES), ("positive_0", 9), ("negative_0", 5), ("negative_1", 5))
        },
    )


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel.from_pretrained("tiny:qwen2_vl")


@pytest.fixture(scope="module")
def video_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict[str, list[Path]]]]:
    """The bundled suite's video tasks as a suite file in a data root with their tables and
    frames; returns the root and, per task, frame folder -> frames in natural order."""
    root = tmp_path_factory.mktemp("mmeb_video")
    tasks = bundled_video_tasks()
    frames: dict[str, dict[str, list[Path]]] = {}
    for seed, task in enumerate(tasks):
        rows, folders = LAYOUT[task["name"]]
        write_table(root / task["data"], rows)
        frames[task["name"]] = {
            rel: write_frames(root / task["frame_root"] / rel, n, seed * 100 + j)
            for j, (rel, n) in enumerate(folders.items())
        }
    suite = {"name": "video", "metric": "hit@1", "ks": [1, 5], "tasks": tasks}
    (root / "video.yaml").write_text(yaml.safe_dump(suite, sort_keys=False))
    # One task per layout (global and local classification, QA, retrieval, moments) at 2
    # frames per video, for the scoring test's encoder time (all 17 at 8 frames: ~30 s on
    # CPU); every task's rows and the 8-frame choice are checked on video.yaml.
    fast = {**suite, "tasks": [{**t, "num_frames": 2} for t in tasks if t["name"] in SCORED]}
    (root / "video-2frames.yaml").write_text(yaml.safe_dump(fast, sort_keys=False))
    return root, frames


def loaded_tasks(root: Path) -> dict[str, Any]:
    suite = load_suite(root / "video.yaml")
    return {t.name: p for t, p in zip(suite.tasks, load_suite_tasks(suite), strict=True)}


def sampled(paths: list[Path]) -> list[str]:
    return [str(paths[i]) for i in PICKED]


def test_frames_are_chosen_as_vlm2vec_does(tmp_path: Path) -> None:
    # Natural order: frame_2 before frame_10 (name order would put frame_10 first).
    files = write_frames(tmp_path / "f", 12, 0)
    (tmp_path / "f" / "notes.txt").write_text("not a frame")
    assert list_frames(tmp_path / "f") == files
    # linspace(0, n-1, 8) cast to int, against integer arithmetic; fewer than 8: all frames.
    for n in range(1, 41):
        frames = list(range(n))
        expected = [i * (n - 1) // 7 for i in range(8)] if n >= 8 else frames
        assert sample_frames(frames, 8) == expected, n
    assert sample_frames(list(range(12)), 8) == PICKED
    assert sample_frames(list(range(5)), None) == [0, 1, 2, 3, 4]
    assert drop_letter("A. Red car.") == "Red car" and drop_letter("yes") == "yes"


def test_loaded_rows_match_the_files(video_root: tuple[Path, dict[str, Any]]) -> None:
    root, frames = video_root
    tasks = loaded_tasks(root)
    assert len(tasks) == 18

    # Local QA: NExTQA, options a0..a4, the answer an index.
    rows = tasks["NExTQA"].rows
    assert rows[0]["query"]["text"] == (
        "why did the boy fall\nOptions:\n(A) slipped\n(B) pushed\n(C) jumped\n(D) tripped\n(E) sat"
    )
    assert rows[0]["query"]["images"] == sampled(frames["NExTQA"]["4010069381"])
    assert [c["text"] for c in rows[0]["candidates"]] == ["slipped", "pushed", "jumped", "tripped", "sat"]
    assert rows[0]["positive"] == [3] and rows[1]["positive"] == [0]

    # Video-MME: "A. Red." options become "Red", the letter answer an index.
    rows = tasks["Video-MME"].rows
    assert rows[0]["query"]["text"] == "What colour is the car?\nA. Red.\nB. Blue.\nC. Green.\nD. Black."
    assert [c["text"] for c in rows[0]["candidates"]] == ["Red", "Blue", "Green", "Black"]
    assert rows[0]["positive"] == [1] and rows[1]["positive"] == [3]

    # MVBench: lettered candidates, the answer matched by text, frames under subset/video.
    rows = tasks["MVBench"].rows
    assert [c["text"] for c in rows[0]["candidates"]] == ["(A) sat", "(B) ran", "(C) ate"]
    assert rows[0]["query"]["text"] == "What happened?\nOptions:\n(A) sat\n(B) ran\n(C) ate"
    assert rows[0]["positive"] == [1]
    assert rows[1]["query"]["images"] == sampled(frames["MVBench"]["object_shuffle/b.mp4"])

    # EgoSchema: question and options joined by spaces; the answer a string index.
    rows = tasks["EgoSchema"].rows
    assert rows[0]["query"]["text"] == "What is C doing?A. C cooks. B. C cleans. C. C reads."
    assert [c["text"] for c in rows[1]["candidates"]] == ["Kitchen", "Garden", "Garage"]
    assert rows[0]["positive"] == [1] and rows[1]["positive"] == [2]

    # ActivityNetQA: yes/no candidates, v_<video_name> frame folders.
    rows = tasks["ActivityNetQA"].rows
    assert rows[0]["query"]["text"] == "is the man outside? (A) yes; (B) no."
    assert [c["text"] for c in rows[0]["candidates"]] == ["yes", "no"]
    assert rows[0]["positive"] == [1] and rows[1]["positive"] == [0]
    assert rows[1]["query"]["images"] == sampled(frames["ActivityNetQA"]["v_def"])

    # SSv2: local candidates from neg_text, the positive by pos_text.
    rows = tasks["SmthSmthV2"].rows
    assert rows[0]["query"]["text"] is None
    assert rows[0]["query"]["images"] == sampled(frames["SmthSmthV2"]["10"])
    assert [c["text"] for c in rows[0]["candidates"]] == ["Closing something", "Opening something"]
    assert rows[0]["positive"] == [1] and rows[1]["positive"] == [0]

    # Global classification: the corpus is VLM2Vec's whole label list (its loader's corpus is
    # VIDEOCLS_LABEL_MAPPING[dataset]), the qrels each row's label in it.
    k700 = tasks["K700"].corpus
    labels = shipped_labels("K700")
    assert [c["text"] for c in k700.corpus_items] == labels
    q = k700.query_ids  # ids from the query content (row order does not matter)
    assert k700.qrels == {
        q[0]: {f"c{labels.index('archery')}": 1.0},
        q[1]: {f"c{labels.index('bowling')}": 1.0},
    }
    ucf = tasks["UCF101"].corpus
    diving = f"c{shipped_labels('UCF101').index('Diving')}"
    assert len(ucf.corpus_items) == 101 and ucf.qrels == {
        ucf.query_ids[0]: {diving: 1.0},
        ucf.query_ids[1]: {diving: 1.0},
    }
    assert k700.query_items[1]["images"] == sampled(frames["K700"]["v1"])

    # Global retrieval: caption queries, the corpus the rows' videos.
    for name, first_caption, folder in [
        ("MSR-VTT", "a man sings", "video7020"),
        ("MSVD", "a plane lands", "m0"),
        ("VATEX", "people dance", "x0"),
        ("YouCook2", "chop the onion", "y0"),
        ("DiDeMo", "a dog runs", "d0"),
    ]:
        corpus = tasks[name].corpus
        assert corpus.query_items[0] == {"text": first_caption}, name
        assert corpus.corpus_items[0]["images"] == sampled(frames[name][folder]), name
        assert len(corpus.corpus_items) == 2 and corpus.qrels == {
            corpus.query_ids[0]: {"c0": 1.0},
            corpus.query_ids[1]: {"c1": 1.0},
        }

    # MomentSeeker: a text-only query, then a video query (8 of its 12 frames); the clips
    # are the positives then the negatives, in the row's order, every frame of each.
    rows = tasks["MomentSeeker"].rows
    ms = frames["MomentSeeker"]
    assert rows[0]["query"] == {"text": "a dog jumps into the lake"} and rows[0]["query_media"] == "text"
    assert [c["images"] for c in rows[0]["candidates"]] == [
        [str(p) for p in ms[f"video_frames/ms_m1_clip_{i}"]] for i in (0, 1, 2)
    ]
    assert rows[0]["positive"] == [0]
    assert rows[1]["query"] == {
        "text": "the same scene later",
        "images": sampled(ms["video_frames/ms_m2_full"]),
    }
    assert rows[1]["query_media"] == "video"
    assert [c["images"] for c in rows[1]["candidates"]] == [
        [str(p) for p in ms[f"video_frames/ms_m2_clip_{i}"]] for i in (5, 6, 1)
    ]
    assert rows[1]["positive"] == [0, 1]

    # Moment retrieval: the query's own frames plus text; clips sorted, positive_* relevant,
    # a clip with fewer than 8 frames gives all of them.
    rows = tasks["QVHighlight"].rows
    clips = frames["QVHighlight"]
    assert rows[0]["query"] == {"text": "the man opens the door", "images": sampled(clips["vidA/query"])}
    assert [c["images"] for c in rows[0]["candidates"]] == [
        [str(p) for p in clips["vidA/negative_0"]],
        [str(p) for p in clips["vidA/negative_1"]],
        [str(clips["vidA/positive_0"][i]) for i in (0, 1, 2, 3, 4, 5, 6, 8)],  # 9 frames: i*8//7
    ]
    assert rows[0]["positive"] == [2]


def hit1_local(model: EmbeddingModel, rows: list[dict[str, Any]], qi: str | None, ti: str | None) -> float:
    """hit@1 of local rows by plain PyTorch on the model's embeddings."""
    hits = []
    for row in rows:
        q = model.encode([row["query"]], instruction=qi)  # [1, d]
        c = model.encode(row["candidates"], instruction=ti)  # [n, d]
        scores = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
        hits.append(float(int(scores[0].argmax()) in row["positive"]))
    return sum(hits) / len(hits)


def test_suite_runs_end_to_end_and_scores_match_a_direct_computation(
    video_root: tuple[Path, dict[str, Any]], model: EmbeddingModel
) -> None:
    root, _ = video_root
    suite = load_suite(root / "video-2frames.yaml")
    loaded = load_suite_tasks(suite)
    report = run_suite(model, suite, loaded=loaded, batch_size=4)
    assert all(len(q["images"]) == 2 for q in loaded[0].corpus.query_items)
    assert list(report["tasks"]) == list(SCORED) and not report.get("not_run")
    assert set(report["meta_tasks"]) == {
        "video_classification",
        "video_qa",
        "video_retrieval",
        "moment_retrieval",
    }
    for name, task in report["tasks"].items():
        assert 0.0 <= task["score"] <= 1.0 and task["n"] == 2, name
    by_name = {t.name: (t, p) for t, p in zip(suite.tasks, loaded, strict=True)}

    # A local task: the suite's instructions, ranked by hand.
    spec, payload = by_name["NExTQA"]
    assert spec.query_instruction == QA
    assert report["tasks"]["NExTQA"]["hit@1"] == pytest.approx(
        hit1_local(model, payload.rows, spec.query_instruction, spec.target_instruction)
    )
    spec, payload = by_name["QVHighlight"]
    assert report["tasks"]["QVHighlight"]["hit@1"] == pytest.approx(
        hit1_local(model, payload.rows, spec.query_instruction, spec.target_instruction)
    )
    # A global task: every query against the whole video corpus.
    spec, payload = by_name["MSR-VTT"]
    corpus = payload.corpus
    q = torch.nn.functional.normalize(
        model.encode(corpus.query_items, instruction=spec.query_instruction), dim=-1
    )
    d = torch.nn.functional.normalize(
        model.encode(corpus.corpus_items, instruction=spec.target_instruction), dim=-1
    )
    best = (q @ d.T).argmax(dim=1).tolist()  # [2]
    assert report["tasks"]["MSR-VTT"]["hit@1"] == pytest.approx(sum(b == i for i, b in enumerate(best)) / 2)
    assert report["tasks"]["MSR-VTT"]["corpus_size"] == 2


def one_task_suite(root: Path, task: dict[str, Any]) -> Path:
    path = root / "one.yaml"
    path.write_text(yaml.safe_dump({"name": "one", "tasks": [task]}, sort_keys=False))
    return path


def nextqa_task() -> dict[str, Any]:
    return next(t for t in bundled_video_tasks() if t["name"] == "NExTQA")


def test_bad_layouts_fail_with_one_line_naming_the_file_and_field(tmp_path: Path) -> None:
    task = nextqa_task()
    rows, folders = LAYOUT["NExTQA"]
    for rel, n in folders.items():
        write_frames(tmp_path / task["frame_root"] / rel, n, 0)

    def error(rows: list[dict[str, Any]], **changes: Any) -> str:
        write_table(tmp_path / task["data"], rows)
        with pytest.raises(DataError) as info:  # from the suite's checks or from loading
            load_suite_tasks(load_suite(one_task_suite(tmp_path, {**task, **changes})))
        message = str(info.value)
        assert "\n" not in message
        return message

    no_a3 = [{k: v for k, v in r.items() if k != "a3"} for r in rows]
    msg = error(no_a3)
    assert "test.parquet:1" in msg and "'a3'" in msg
    bad_answer = [rows[0], {**rows[1], "answer": 7}]
    msg = error(bad_answer)
    assert "test.parquet:2" in msg and "'answer' = 7 names no candidate" in msg
    missing_video = [rows[0], {**rows[1], "video": 999}]
    msg = error(missing_video)
    assert "test.parquet:2" in msg and "frame folder not found" in msg and "999" in msg
    msg = error(rows, candidates_field="a0")
    assert "one candidate source" in msg
    msg = error(rows, answer_type="ordinal")
    assert "'answer_type' is 'ordinal'" in msg
    with pytest.raises(Exception, match="unknown"):
        load_suite(one_task_suite(tmp_path, {**task, "frame_dir": "x"}))


def test_cli_reports_a_bad_row_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    task = nextqa_task()
    rows, _ = LAYOUT["NExTQA"]
    write_frames(tmp_path / task["frame_root"] / "4010069381", N_FRAMES, 0)  # the second is missing
    write_table(tmp_path / task["data"], rows)
    suite = one_task_suite(tmp_path, task)
    assert main(["eval", "--model", "tiny:qwen2_vl", "--suite", str(suite), "--no-cache"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "test.parquet:2" in err and "frame folder not found" in err


def test_global_labels_file_sets_the_candidate_set(tmp_path: Path, model: EmbeddingModel) -> None:
    task = next(t for t in bundled_video_tasks() if t["name"] == "HMDB51")
    del task["labels"]  # this test's own file below
    rows, folders = LAYOUT["HMDB51"]
    write_table(tmp_path / task["data"], rows)
    for rel, n in folders.items():
        write_frames(tmp_path / task["frame_root"] / rel, n, 1)
    (tmp_path / "labels.txt").write_text("wave\nclap\nrun\n")
    suite = load_suite(one_task_suite(tmp_path, {**task, "labels": "labels.txt"}))
    corpus = load_suite_tasks(suite)[0].corpus
    # The label file's order and its unused label "run"; rows map onto it.
    assert [c["text"] for c in corpus.corpus_items] == ["wave", "clap", "run"]
    assert corpus.qrels == {corpus.query_ids[0]: {"c1": 1.0}, corpus.query_ids[1]: {"c0": 1.0}}
    report = run_suite(model, suite)
    assert report["tasks"]["HMDB51"]["corpus_size"] == 3
    (tmp_path / "labels.txt").write_text("wave\n")
    with pytest.raises(DataError, match="'clap' is not in the 'labels' file"):
        load_suite_tasks(load_suite(one_task_suite(tmp_path, {**task, "labels": "labels.txt"})))


def test_bundled_suite_resolves_video_paths_against_the_data_root(tmp_path: Path) -> None:
    suite = load_suite("mmeb-v2", data_root=tmp_path)
    video = {t.name: t for t in suite.tasks if t.kind == "mmeb-video"}
    assert len(video) == 18
    assert video["MSR-VTT"].data == [str(tmp_path / "video-tasks/data/MSR-VTT/test.parquet")]
    assert video["MSR-VTT"].frame_root == str(tmp_path / "video-tasks/frames/video_ret/MSR-VTT")
    # "suite:" paths follow the suite file, not the data root: the label lists ship with it.
    assert video["K700"].labels == str(SUITES / "labels" / "K700.txt")
    assert video["Charades-STA"].frame_root == str(tmp_path / "video-tasks/frames/video_mret/Charades_STA")
    assert all(t.num_frames == 8 for t in video.values())
    assert not [t for t in suite.tasks if t.kind == "pending"]  # all 78 tasks run
    assert video["MomentSeeker"].data == [str(tmp_path / "video-tasks/data/momentseeker.jsonl")]
    assert video["MomentSeeker"].frame_root == str(tmp_path / "video-tasks/frames/video_mret/MomentSeeker")


def momentseeker_task() -> dict[str, Any]:
    return next(t for t in bundled_video_tasks() if t["name"] == "MomentSeeker")


def test_momentseeker_image_queries_and_per_form_instructions(tmp_path: Path, model: EmbeddingModel) -> None:
    """One row per query form, scored through the suite and by hand with the instruction
    VLM2Vec gives that form (TASK_INST_QRY_TEXT / _IMG / _VIDEO)."""
    task = {**momentseeker_task(), "num_frames": 2}
    frame_root = tmp_path / task["frame_root"]
    for rel, n, seed in [
        ("video_frames/a_clip_0", 3, 1),
        ("video_frames/a_clip_1", 3, 2),
        ("video_frames/b_full", 4, 3),
        ("video_frames/b_clip_0", 2, 4),
        ("video_frames/b_clip_1", 2, 5),
    ]:
        write_frames(frame_root / rel, n, seed)
    Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8)).save(frame_root / "query_a_42.jpg")
    clips = {
        "a": {
            "positive_frames": [{"output_path": "a/clip_0.mp4"}],
            "negative_frames": [{"output_path": "a/clip_1.mp4"}],
        },
        "b": {
            "positive_frames": [{"output_path": "b/clip_1.mp4"}],
            "negative_frames": [{"output_path": "b/clip_0.mp4"}],
        },
    }
    rows = [
        {"query": "a red kite", "input_frames": "", **clips["a"]},
        {"query": "the kite again", "input_frames": "a_42.jpg", **clips["a"]},
        {"query": "what follows", "input_frames": "b/full.mp4", **clips["b"]},
    ]
    write_table(tmp_path / task["data"], rows)
    task = {**task, "data": str(tmp_path / task["data"]), "frame_root": str(frame_root)}
    suite = load_suite(one_task_suite(tmp_path, task))
    (spec,) = suite.tasks
    (payload,) = load_suite_tasks(suite)
    loaded = payload.rows
    assert [r["query_media"] for r in loaded] == ["text", "image", "video"]
    assert loaded[1]["query"] == {
        "text": "the kite again",
        "images": [str((frame_root / "query_a_42.jpg").resolve())],
    }
    assert len(loaded[2]["query"]["images"]) == 2
    instructions = {
        "text": "Find the clip that corresponds to the given text:",
        "image": "Select the video clip that aligns with the given text and image:",
        "video": "Find the clip that corresponds to the given sentence and video segment:",
    }
    assert spec.query_instruction == instructions["text"]
    assert {"text": spec.query_instruction, **spec.query_instruction_by_media} == instructions
    report = run_suite(model, suite, loaded=[payload], batch_size=2)
    by_hand = [
        hit1_local(model, [r], instructions[r["query_media"]], spec.target_instruction) for r in loaded
    ]
    assert report["tasks"]["MomentSeeker"]["hit@1"] == pytest.approx(sum(by_hand) / 3)
    # The instruction matters: the same rows under one instruction embed differently.
    q = [r["query"] for r in loaded]
    assert not torch.allclose(
        model.encode(q[1:2], instruction=instructions["image"]),
        model.encode(q[1:2], instruction=instructions["text"]),
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"query_media_image": None, "query_media_video": None}, "'query_media_field' needs"),
        ({"clip_video": None}, "'positive_clips_field' needs 'clip_video'"),
        ({"query_instruction_by_media": {"audio": "x"}}, "key 'audio' is not one of text, image, video"),
        ({"query_video": "x"}, "give one query video source"),
        ({"clip_folders": "x"}, "give one candidate source"),
    ],
)
def test_momentseeker_layout_keys_are_checked(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    task = {k: v for k, v in {**momentseeker_task(), **changes}.items() if v is not None}
    with pytest.raises(DataError, match=message):
        load_suite(one_task_suite(tmp_path, task))


def test_momentseeker_bad_rows_name_the_row_and_field(tmp_path: Path) -> None:
    task = momentseeker_task()
    frame_root = tmp_path / task["frame_root"]
    write_frames(frame_root / "video_frames/a_clip_0", 2, 0)
    task = {**task, "data": str(tmp_path / "ms.jsonl"), "frame_root": str(frame_root)}
    good = {
        "query": "q",
        "input_frames": "",
        "positive_frames": [{"output_path": "a/clip_0.mp4"}],
        "negative_frames": [],
    }
    for bad, message in [
        ({**good, "positive_frames": []}, "ms.jsonl:2: field 'positive_frames' lists no clip"),
        (
            {**good, "negative_frames": [{"path": "a/clip_0.mp4"}]},
            "ms.jsonl:2: negative_frames\\[0\\] has no 'output_path'",
        ),
        ({**good, "input_frames": "z/full.mp4"}, "ms.jsonl:2: .*frame folder not found"),
        (
            {**good, "negative_frames": [{"output_path": "a/clip_9.mp4"}]},
            "ms.jsonl:2: clip 1 frame folder not found",
        ),
    ]:
        write_table(tmp_path / "ms.jsonl", [good, bad])
        with pytest.raises(DataError, match=message):
            load_suite_tasks(load_suite(one_task_suite(tmp_path, task)))


def test_shipped_label_lists_are_vlm2vecs():
    """The four global classification tasks rank VLM2Vec's full label lists
    (src/data/eval_dataset/video_classification_utils.py at commit 6e1e1d4: 700 K700, 101
    UCF101, 51 HMDB51, 10 Breakfast labels), in that file's order, each once; the bundled
    suite points each task at its list. Spot checks: the first and last labels there."""
    expected = {
        "K700": (700, "waiting_in_line"),
        "UCF101": (101, "Kayaking"),
        "HMDB51": (51, "ride_bike"),
        "Breakfast": (10, "pancake"),
    }
    tasks = {t["name"]: t for t in bundled_video_tasks()}
    for name, (count, first) in expected.items():
        labels = shipped_labels(name)
        assert len(labels) == len(set(labels)) == count and labels[0] == first, name
        assert all(label == label.strip() and label for label in labels), name
        assert tasks[name]["labels"] == str(SUITES / "labels" / f"{name}.txt")
    assert shipped_labels("Breakfast")[-1] == "salad"
    assert "labels" not in tasks["SmthSmthV2"]  # local: its rows' own neg_text candidates
