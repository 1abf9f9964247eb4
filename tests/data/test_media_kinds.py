"""Media beyond plain images: pixel bounds, the decompression-bomb guard, videos (a real
clip encoded with PyAV, a frame folder), PDF pages (a real PDF written by PIL) and items
with several images, through the schema and the collator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.helpers import write_pdf, write_video
from vlm2emb.data.media import (
    MediaError,
    MediaOptions,
    PdfPageRef,
    VideoRef,
    decode_item,
    fit_pixels,
    load_image,
    load_video_frames,
    render_pdf_page,
    sample_indices,
)
from vlm2emb.data.schema import DataError, load_train_examples


def test_max_pixels_downscales_keeping_the_aspect_ratio() -> None:
    out = fit_pixels(Image.new("RGB", (400, 100)), None, 10_000)
    assert out.size[0] * out.size[1] <= 10_000
    assert out.size == (200, 50)  # 4:1 kept


def test_min_pixels_upscales_keeping_the_aspect_ratio() -> None:
    out = fit_pixels(Image.new("RGB", (20, 10)), 800, None)
    assert out.size[0] * out.size[1] >= 800
    assert out.size == (40, 20)


def test_pixel_bounds_apply_when_loading(tmp_path: Path) -> None:
    Image.new("RGB", (300, 300), (1, 2, 3)).save(tmp_path / "big.png")
    out = load_image(tmp_path / "big.png", options=MediaOptions(max_pixels=100 * 100))
    assert out.size == (100, 100)
    assert load_image(tmp_path / "big.png").size == (300, 300)  # no bounds by default


def test_configured_pixel_limit_refuses_an_image_before_decoding(tmp_path: Path) -> None:
    Image.new("RGB", (200, 200)).save(tmp_path / "wide.png")
    with pytest.raises(MediaError, match=r"wide\.png is 200x200 = 40,000 pixels.*data\.max_image_pixels"):
        load_image(tmp_path / "wide.png", options=MediaOptions(max_image_pixels=10_000))


def test_real_decompression_bomb_is_a_clean_data_error(tmp_path: Path) -> None:
    # 14000 x 14000 = 196 megapixels, over twice PIL's default limit, in a file of a few
    # hundred KiB: PIL itself would raise DecompressionBombError.
    Image.new("1", (14_000, 14_000)).save(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 2_000_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(tmp_path / "bomb.png")
    with pytest.raises(MediaError, match="over the limit"):
        load_image(tmp_path / "bomb.png")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"query": {"image": "bomb.png"}, "positive": "p"}) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: query\.image: image .*bomb\.png is 14000x14000") as exc:
        load_train_examples([str(data)])
    assert exc.value.kind == "image_too_large"


def test_sample_indices_are_uniform_segment_centres() -> None:
    assert sample_indices(20, 4) == [2, 7, 12, 17]
    assert sample_indices(3, 8) == [0, 1, 2]  # short clips give every frame once
    assert sample_indices(8, 8) == list(range(8))


def test_video_file_frames_are_sampled_uniformly(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4")
    frames = load_video_frames(path, MediaOptions(video_frames=4))
    assert len(frames) == 4
    assert all(f.mode == "RGB" and f.size == (64, 48) for f in frames)
    levels = [f.getpixel((32, 24))[0] for f in frames]
    # Frames 2, 7, 12, 17 at grey 24, 84, 144, 204 (lossy codec: a few levels off).
    assert levels == pytest.approx([24, 84, 144, 204], abs=8)
    assert len(load_video_frames(path)) == 8  # VLM2Vec's default


def test_frame_folder_is_sampled_in_name_order(tmp_path: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(10):
        Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(folder / f"{i:04d}.png")
    (folder / "notes.txt").write_text("not a frame")
    frames = load_video_frames(folder, MediaOptions(video_frames=5))
    assert [f.getpixel((0, 0))[0] for f in frames] == [20, 60, 100, 140, 180]  # frames 1,3,5,7,9


def test_pdf_pages_render_by_index(tmp_path: Path) -> None:
    pdf = write_pdf(tmp_path / "doc.pdf")
    first = render_pdf_page(pdf, 0, dpi=72)
    second = render_pdf_page(pdf, 1, dpi=144)
    assert first.size == (100, 50)
    assert first.getpixel((50, 25))[0] > 240 and first.getpixel((50, 25))[2] < 15
    assert second.size == (120, 160)  # twice the resolution
    assert second.getpixel((60, 80))[2] > 240
    with pytest.raises(MediaError, match="has 2 page"):
        render_pdf_page(pdf, 2)


def test_schema_turns_video_and_pdf_items_into_references(tmp_path: Path) -> None:
    write_video(tmp_path / "clip.mp4")
    write_pdf(tmp_path / "doc.pdf")
    (tmp_path / "frames").mkdir()
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / "frames" / f"{i}.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [
        {"query": {"video": "clip.mp4", "text": "what happens"}, "positive": {"pdf": "doc.pdf", "page": 1}},
        {"query": {"video": "frames"}, "positive": {"images": ["a.png", "a.png"], "image": "a.png"}},
    ]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ex = load_train_examples([str(data)])
    assert ex[0].query["images"] == [VideoRef(str((tmp_path / "clip.mp4").resolve()))]
    assert ex[0].positive["images"] == [PdfPageRef(str((tmp_path / "doc.pdf").resolve()), 1)]
    assert ex[1].query["images"] == [VideoRef(str((tmp_path / "frames").resolve()))]
    assert len(ex[1].positive["images"]) == 3
    decoded = decode_item(ex[0].query, MediaOptions(video_frames=6))
    assert decoded["text"] == "what happens" and len(decoded["images"]) == 6
    page = decode_item(ex[0].positive, MediaOptions(pdf_dpi=72))["images"]
    assert [im.size for im in page] == [(60, 80)]


@pytest.mark.parametrize(
    ("item", "files", "reason", "kind"),
    [
        ({"pdf": "doc.pdf", "page": 5}, True, "page 5 does not exist", "bad_media"),
        ({"pdf": "doc.pdf", "page": "1"}, True, "page must be an integer", "wrong_type"),
        ({"text": "x", "page": 1}, True, "page is given without a pdf", "wrong_type"),
        ({"video": "missing.mp4"}, True, "file not found", "missing_file"),
        ({"video": "empty"}, True, "holds no images", "bad_media"),
        ({"video": "fake.mp4"}, True, "cannot read video", "bad_media"),
        ({"pdf": "fake.pdf"}, True, "cannot read PDF", "bad_media"),
    ],
)
def test_bad_video_and_pdf_items(tmp_path: Path, item, files, reason, kind) -> None:
    write_pdf(tmp_path / "doc.pdf")
    (tmp_path / "empty").mkdir()
    (tmp_path / "fake.mp4").write_bytes(b"not a video at all" * 10)
    (tmp_path / "fake.pdf").write_bytes(b"%PDF-1.4 broken")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"query": item, "positive": "p"}) + "\n")
    with pytest.raises(DataError, match=reason) as exc:
        load_train_examples([str(data)])
    assert str(exc.value).startswith(f"{data}:1: query")
    assert exc.value.kind == kind


def test_collator_decodes_video_pdf_and_several_images_for_the_model(
    tmp_path: Path, tiny_qwen2_vl_dir
) -> None:
    from vlm2emb import EmbeddingModel
    from vlm2emb.data.collate import ContrastiveCollator

    write_video(tmp_path / "clip.mp4")
    write_pdf(tmp_path / "doc.pdf")
    Image.new("RGB", (16, 16), (0, 255, 0)).save(tmp_path / "g.png")
    rows = [
        {"query": {"video": "clip.mp4"}, "positive": "a clip"},
        {"query": {"pdf": "doc.pdf"}, "positive": "a red page"},
        {"query": {"images": ["g.png", "g.png"], "text": "two"}, "positive": "two green squares"},
    ]
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = load_train_examples([str(data)])
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    media = MediaOptions(video_frames=3, max_pixels=32 * 32)
    batch = ContrastiveCollator(model.inputs, media=media)(examples)
    (query,) = batch.query
    # Qwen2-VL: one image_grid_thw row per image: 3 frames + 1 page + 2 images.
    assert query["image_grid_thw"].shape[0] == 6
    emb = model.encode([decode_item(ex.query, media) for ex in examples])
    assert emb.shape[0] == 3 and bool(emb.isfinite().all())


def test_encode_accepts_video_and_pdf_items(tmp_path: Path, tiny_qwen2_vl_dir) -> None:
    from vlm2emb import EmbeddingModel

    clip = write_video(tmp_path / "clip.mp4")
    pdf = write_pdf(tmp_path / "doc.pdf")
    model = EmbeddingModel.from_pretrained(tiny_qwen2_vl_dir)
    batch = model.collate([{"video": str(clip), "text": "a clip"}, {"pdf": str(pdf), "page": 1}])
    assert batch["image_grid_thw"].shape[0] == 8 + 1  # 8 frames (default) + one page
    emb = model.encode([{"video": str(clip)}, {"pdf": str(pdf), "page": 1}, "text"])
    assert emb.shape[0] == 3 and bool(emb.isfinite().all())
    assert not torch.allclose(emb[0], emb[1])
