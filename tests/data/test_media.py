"""Tests for vlm2emb.data.media.load_image on real image files written with PIL."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from vlm2emb.data.media import load_image


def test_rgb_file_loads_unchanged(tmp_path: Path) -> None:
    img = Image.new("RGB", (5, 3), (10, 20, 30))
    img.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB"
    assert out.size == (5, 3)
    assert out.getpixel((4, 2)) == (10, 20, 30)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    img = Image.new("RGBA", (2, 1))
    img.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red: must become white
    img.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue: must stay blue
    img.save(tmp_path / "rgba.png")
    out = load_image(str(tmp_path / "rgba.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 0, 255)


def test_half_transparent_pixel_blends_with_white() -> None:
    img = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    (value, *_) = load_image(img).getpixel((0, 0))
    assert 120 <= value <= 135  # about halfway between black and white


def test_palette_image_with_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (2, 1))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((0, 0), 0)  # red entry, declared transparent below
    img.putpixel((1, 0), 1)  # green
    img.save(tmp_path / "p.png", transparency=0)
    assert Image.open(tmp_path / "p.png").mode == "P"
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((1, 0)) == (0, 255, 0)


def test_palette_image_without_transparency(tmp_path: Path) -> None:
    img = Image.new("P", (1, 1))
    img.putpalette([12, 34, 56] + [0] * (256 * 3 - 3))
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (12, 34, 56)


def test_grayscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 77).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (77, 77, 77)


def test_bytes_input() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (6, 2), (1, 2, 3)).save(buf, format="PNG")
    for data in (buf.getvalue(), bytearray(buf.getvalue())):
        out = load_image(data)
        assert out.mode == "RGB"
        assert out.size == (6, 2)
        assert out.getpixel((0, 0)) == (1, 2, 3)


def test_relative_path_uses_base_dir(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (3, 3), (9, 9, 9)).save(tmp_path / "sub" / "a.png")
    out = load_image("sub/a.png", base_dir=tmp_path)
    assert out.size == (3, 3)
    with pytest.raises(FileNotFoundError):
        load_image("sub/a.png", base_dir=tmp_path / "other")


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 50, 50))
    # Mark the left edge so the rotation direction is checked, not only the size.
    for y in range(20):
        for x in range(4):
            img.putpixel((x, y), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    raw = Image.open(tmp_path / "rot.jpg")
    assert raw.size == (40, 20)
    assert raw.getexif()[0x0112] == 6
    out = load_image(tmp_path / "rot.jpg")
    assert out.mode == "RGB"
    assert out.size == (20, 40)
    # After a clockwise turn the stored left edge is at the top.
    top = out.getpixel((10, 1))
    bottom = out.getpixel((10, 38))
    assert max(top) < 60
    assert bottom[0] > 150


def test_pil_image_input_is_converted() -> None:
    out = load_image(Image.new("L", (2, 2), 5))
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == (5, 5, 5)


def test_missing_path_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


def test_garbage_raises_value_error(tmp_path: Path) -> None:
    garbage = b"this is not an image" * 20
    with pytest.raises(ValueError, match="cannot decode image <bytes>"):
        load_image(garbage)
    (tmp_path / "fake.png").write_bytes(garbage)
    with pytest.raises(ValueError, match=r"fake\.png"):
        load_image(tmp_path / "fake.png")


def test_truncated_file_raises_value_error(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (3, 4, 5)).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:60])
    with pytest.raises(ValueError, match=r"cut\.png"):
        load_image(tmp_path / "cut.png")


def test_unsupported_reference_type() -> None:
    with pytest.raises(ValueError, match="int"):
        load_image(42)
