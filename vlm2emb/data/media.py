"""Media decoding: images, video frames and PDF pages, turned into RGB PIL images.

A validated data item keeps its media as *references* (cheap to pickle and to hash for the
false-negative keys): a path string, raw bytes, a :class:`VideoRef` or a :class:`PdfPageRef`.
They are decoded only when a batch is built, by :func:`decode_item`, which applies the
pixel bounds of :class:`MediaOptions`. A video becomes ``frames`` images and a PDF page one
image, so every backbone sees an item with several images (interleaved images), whatever
its native video support.

``av`` (extra ``video``) and ``pypdfium2`` (extra ``pdf``) are imported only when a video
file or a PDF is actually read.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from vlm2emb.items import Item, PdfPageRef, VideoRef

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# PIL's own default (about 89.5 megapixels, a 1024 MiB RGB buffer) is a sane bound for data.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485


class MediaError(ValueError):
    """A media reference that cannot be decoded; the message names the file and the reason."""


@dataclass(frozen=True)
class MediaOptions:
    """How media are decoded for training (the ``data.*`` media keys).

    Args:
        min_pixels: Upscale images with fewer pixels (keeping the aspect ratio); None = off.
        max_pixels: Downscale images with more pixels (keeping the aspect ratio); None = off.
        max_image_pixels: Refuse images (and rendered PDF pages) larger than this before
            decoding them: the decompression-bomb guard. None = no limit.
        video_frames: Frames sampled uniformly from each video.
        pdf_dpi: Resolution PDF pages are rendered at.
        max_text_chars: Cut item texts longer than this many characters when rows are
            loaded (``data.max_text_chars``); None = no cap. It lives here, with the other
            per-item limits, because every loader already carries these options.
    """

    min_pixels: int | None = None
    max_pixels: int | None = None
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
    video_frames: int = 8
    pdf_dpi: int = 144
    max_text_chars: int | None = None


def media_options(data: Any) -> MediaOptions:
    """The :class:`MediaOptions` of a recipe's ``data`` section."""
    return MediaOptions(
        min_pixels=data.min_pixels,
        max_pixels=data.max_pixels,
        max_image_pixels=data.max_image_pixels,
        video_frames=data.video_frames,
        pdf_dpi=data.pdf_dpi,
        max_text_chars=data.max_text_chars,
    )


def load_image(
    ref: Any, *, base_dir: str | Path | None = None, options: MediaOptions | None = None
) -> Image.Image:
    """Decodes an image reference to RGB.

    Args:
        ref: A ``PIL.Image.Image``, raw ``bytes``, a path (absolute, or relative to
            ``base_dir`` / the working directory) or a :class:`PdfPageRef`.
        base_dir: Folder that relative paths resolve against.
        options: Pixel bounds and the decompression-bomb limit (None = only PIL's default
            limit, no resizing).

    Returns:
        An RGB image with EXIF orientation applied (RGBA, palette and grayscale images are
        converted so every backbone sees three channels).

    Raises:
        FileNotFoundError: The path does not exist.
        ValueError: The file or bytes are not a decodable image, or are too large
            (:class:`MediaError`, a ``ValueError``).
    """
    opts = options or MediaOptions()
    if isinstance(ref, Image.Image):
        img = ref
    elif isinstance(ref, (bytes, bytearray)):
        img = _open(io.BytesIO(ref), "<bytes>", opts.max_image_pixels)
    elif isinstance(ref, PdfPageRef):
        if not Path(ref.path).is_absolute() and base_dir is not None:
            ref = PdfPageRef(str(Path(base_dir) / ref.path), ref.page)
        img = render_pdf_page(ref.path, ref.page, dpi=opts.pdf_dpi, max_image_pixels=opts.max_image_pixels)
    elif isinstance(ref, (str, Path)):
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        img = _open(path, str(path), opts.max_image_pixels)
    else:
        raise ValueError(f"unsupported image reference of type {type(ref).__name__}")
    return fit_pixels(to_rgb(img), opts.min_pixels, opts.max_pixels)


def to_rgb(img: Image.Image) -> Image.Image:
    """EXIF orientation applied, then 8-bit RGB.

    Transparency is composited on white. High-bit-depth images (16-bit PNG or TIFF as
    ``I;16*`` or ``I``, 32-bit float ``F``) are rescaled to 8 bits: PIL's own ``convert``
    clips every value above 255, which turns a 16-bit image almost entirely white.
    """
    img = ImageOps.exif_transpose(img) or img
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        img = _high_depth_to_l(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white: dropping alpha directly leaves arbitrary colours under it.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _high_depth_to_l(img: Image.Image) -> Image.Image:
    """A single-channel image of more than 8 bits, rescaled to 8-bit ``L``.

    ``I;16`` modes hold 0..65535 and map linearly onto 0..255. ``I`` (32-bit integers, how
    older PIL versions open 16-bit PNGs) uses the 16-bit scale when its values fit in it,
    else its own range. ``F`` (float) treats 0..1 as the full scale when the values lie in
    it, else uses the value range.
    """
    import numpy as np

    arr = np.asarray(img, dtype=np.float64)
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode.startswith("I;16"):
        scale_lo, scale_hi = 0.0, 65535.0
    elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scale_lo, scale_hi = 0.0, 1.0
    elif img.mode != "F" and lo >= 0.0 and hi <= 65535.0:
        # Values up to 255 in an ``I`` image are already 8-bit data stored wide.
        scale_lo, scale_hi = 0.0, (255.0 if hi <= 255.0 else 65535.0)
    else:
        scale_lo, scale_hi = lo, (hi if hi > lo else lo + 1.0)
    out = np.clip((arr - scale_lo) * (255.0 / (scale_hi - scale_lo)), 0.0, 255.0)
    return Image.fromarray(np.rint(out).astype(np.uint8), mode="L")


def fit_pixels(img: Image.Image, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """Resizes ``img`` so its pixel count lies in ``[min_pixels, max_pixels]``, keeping its shape.

    Bounding the pixels here, before the processor, caps the number of vision tokens (and
    the memory) one item can cost, the way VLM2Vec's min/max pixels do.
    """
    w, h = img.size
    n = w * h
    if max_pixels is not None and n > max_pixels:
        scale = math.sqrt(max_pixels / n)
    elif min_pixels is not None and n < min_pixels:
        scale = math.sqrt(min_pixels / n)
    else:
        return img
    # floor when shrinking so the bound holds; ceil when growing.
    rnd = math.floor if scale < 1 else math.ceil
    size = (max(1, rnd(w * scale)), max(1, rnd(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def _open(src: Any, name: str, max_image_pixels: int | None) -> Image.Image:
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # Our own size check below (from the header, before any pixel is decoded)
            # replaces PIL's global limit, so the configured one applies either way.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None
            img = Image.open(src)
            check_pixels(img.size, name, max_image_pixels)
            img.load()
    except MediaError:
        raise
    except Image.DecompressionBombError as exc:
        raise MediaError(f"image {name} is too large to decode safely ({exc})") from None
    except Exception as exc:  # PIL raises several unrelated types for bad files
        raise MediaError(f"cannot decode image {name}: {exc}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = saved
    return img


def check_pixels(size: tuple[int, int], name: str, max_image_pixels: int | None) -> None:
    """Raises :class:`MediaError` when ``size`` exceeds the decompression-bomb limit."""
    w, h = size
    if max_image_pixels is not None and w * h > max_image_pixels:
        raise MediaError(
            f"image {name} is {w}x{h} = {w * h:,} pixels, over the limit of {max_image_pixels:,} "
            "(data.max_image_pixels; a decompression bomb guard)"
        )


def probe_image(ref: Any, name: str, max_image_pixels: int | None) -> None:
    """Cheap check of an image file or bytes: header, structure and size, no pixel decode.

    Raises:
        MediaError: Unreadable, or larger than ``max_image_pixels``.
    """
    src = io.BytesIO(ref) if isinstance(ref, (bytes, bytearray)) else ref
    saved = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.MAX_IMAGE_PIXELS = None  # the size check is ours, below
            with Image.open(src) as img:
                check_pixels(img.size, name, max_image_pixels)
                img.verify()  # header and structure check, no full decode
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"{name} is not a readable image ({exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = saved


# ---------------------------------------------------------------------- video
def sample_indices(total: int, n: int) -> list[int]:
    """``n`` frame indices spread uniformly over ``total`` frames (segment centres).

    Fewer frames than asked gives every frame once.
    """
    if total <= n:
        return list(range(total))
    return [min(total - 1, int((i + 0.5) * total / n)) for i in range(n)]


def frame_files(folder: str | Path) -> list[Path]:
    """The image files of a frame folder, in name order (zero-padded names sort right)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _import_av() -> Any:
    try:
        import av
    except ImportError:  # pragma: no cover - depends on the install
        raise MediaError("reading video files needs PyAV: pip install 'vlm2emb[video]'") from None
    return av


def video_frame_count(path: str | Path) -> int:
    """Frames in a video file (header count, else counted by decoding).

    Raises:
        MediaError: Not a readable video, or no video stream.
    """
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"video {path} has no video stream")
            stream = container.streams.video[0]
            if stream.frames:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot read video {path}: {exc}") from None


def load_video_frames(path: str | Path, options: MediaOptions | None = None) -> list[Image.Image]:
    """``options.video_frames`` frames sampled uniformly from a video file or a frame folder.

    Raises:
        MediaError: Unreadable video, a folder without frames, or an undecodable frame.
    """
    opts = options or MediaOptions()
    p = Path(path)
    if p.is_dir():
        files = frame_files(p)
        if not files:
            raise MediaError(f"frame folder {p} holds no image files")
        return [load_image(files[i], options=opts) for i in sample_indices(len(files), opts.video_frames)]
    av = _import_av()
    wanted = sample_indices(video_frame_count(p), opts.video_frames)
    frames: list[Image.Image] = []
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            check_pixels((stream.width, stream.height), str(p), opts.max_image_pixels)
            keep = set(wanted)
            for i, frame in enumerate(container.decode(stream)):
                if i in keep:
                    frames.append(
                        fit_pixels(frame.to_image().convert("RGB"), opts.min_pixels, opts.max_pixels)
                    )
                    if len(frames) == len(keep):
                        break
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot decode video {p}: {exc}") from None
    if not frames:
        raise MediaError(f"video {p} has no decodable frames")
    return frames


# ---------------------------------------------------------------------- pdf
def _import_pdfium() -> Any:
    try:
        import pypdfium2
    except ImportError:  # pragma: no cover - depends on the install
        raise MediaError("reading PDF files needs pypdfium2: pip install 'vlm2emb[pdf]'") from None
    return pypdfium2


def pdf_page_count(path: str | Path) -> int:
    """Pages in a PDF file.

    Raises:
        MediaError: Not a readable PDF.
    """
    pdfium = _import_pdfium()
    try:
        doc = pdfium.PdfDocument(str(path))
    except Exception as exc:
        raise MediaError(f"cannot read PDF {path}: {exc}") from None
    try:
        return len(doc)
    finally:
        doc.close()


def render_pdf_page(
    path: str | Path, page: int, *, dpi: int = 144, max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Renders one page (0-based) of a PDF to an RGB image at ``dpi``.

    Raises:
        MediaError: Unreadable PDF, page out of range, or a render over ``max_image_pixels``.
    """
    pdfium = _import_pdfium()
    try:
        doc = pdfium.PdfDocument(str(path))
    except Exception as exc:
        raise MediaError(f"cannot read PDF {path}: {exc}") from None
    try:
        if not 0 <= page < len(doc):
            raise MediaError(f"PDF {path} has {len(doc)} page(s); page {page} does not exist")
        pdf_page = doc[page]
        scale = dpi / 72.0  # PDF sizes are in points (1/72 inch)
        w, h = pdf_page.get_size()
        check_pixels((math.ceil(w * scale), math.ceil(h * scale)), f"{path} page {page}", max_image_pixels)
        return pdf_page.render(scale=scale).to_pil().convert("RGB")
    except MediaError:
        raise
    except Exception as exc:
        raise MediaError(f"cannot render page {page} of PDF {path}: {exc}") from None
    finally:
        doc.close()


# ---------------------------------------------------------------------- items
def load_visuals(ref: Any, options: MediaOptions | None = None) -> list[Image.Image]:
    """Decodes one media reference to its images (a video gives several)."""
    if isinstance(ref, VideoRef):
        return load_video_frames(ref.path, options)
    return [load_image(ref, options=options)]


def decode_item(item: Any, options: MediaOptions | None = None) -> dict[str, Any]:
    """An item with every media reference decoded to RGB PIL images.

    Args:
        item: Anything :meth:`vlm2emb.items.Item.parse` accepts (a row's stored
            ``{"text": ..., "images": [refs]}``, a string, a PIL image, an item dict).
        options: Pixel bounds, limits, frames per video.

    Returns:
        ``{"text": ..., "images": [PIL images]}``, which ``EmbeddingModel.collate`` accepts.
    """
    parsed = Item.parse(item)
    images: list[Image.Image] = []
    for ref in parsed.media:
        images.extend(load_visuals(ref, options))
    return {"text": parsed.text, "images": images}
