"""Media decoding: turn an image reference into an RGB PIL image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageOps


def load_image(ref: Any, *, base_dir: str | Path | None = None) -> Image.Image:
    """Decodes an image reference to RGB.

    Args:
        ref: A ``PIL.Image.Image``, raw ``bytes``, or a path (absolute, or relative to
            ``base_dir`` / the working directory).
        base_dir: Folder that relative paths resolve against.

    Returns:
        An RGB image with EXIF orientation applied (RGBA, palette and grayscale images are
        converted so every backbone sees three channels).

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The file or bytes are not a decodable image.
    """
    if isinstance(ref, Image.Image):
        img = ref
    elif isinstance(ref, (bytes, bytearray)):
        import io

        img = _open(io.BytesIO(ref), "<bytes>")
    elif isinstance(ref, (str, Path)):
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        img = _open(path, str(path))
    else:
        raise ValueError(f"unsupported image reference of type {type(ref).__name__}")
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dropping alpha directly leaves arbitrary colours under it.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _open(src: Any, name: str) -> Image.Image:
    try:
        img = Image.open(src)
        img.load()
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise ValueError(f"cannot decode image {name}: {exc}") from exc
    return img
