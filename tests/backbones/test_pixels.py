"""vlm2emb.backbones.pixels: the Qwen-VL processors' pixels without the channel-first copy.

Every case is checked against the processor's own public call on the same images: the
same keys, dtypes, shapes and values, bit for bit.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

from vlm2emb.backbones.pixels import qwen_vl_pixels
from vlm2emb.backbones.registry import get_adapter_class
from vlm2emb.data.demo import load_digit_scans

QWEN_FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]


def _images(n: int, lo: int, hi: int, seed: int) -> list[Image.Image]:
    """Digit scans upscaled to varied sizes, square and not, plus an exact duplicate."""
    scans, _ = load_digit_scans()
    rng = random.Random(seed)
    out = []
    for i in range(n):
        gray = (255 - scans[i] * (255.0 / 16.0)).astype(np.uint8)
        w, h = rng.randint(lo, hi), rng.randint(lo, hi) if i % 2 else None
        img = Image.fromarray(gray, mode="L").convert("RGB")
        out.append(img.resize((w, h or w), Image.Resampling.BILINEAR))
    return [*out, out[0].copy()]  # two images of one shape: the processor resizes them stacked


def _assert_same(ref, got) -> None:
    assert sorted(ref.keys()) == sorted(got.keys())
    for key in ref:
        assert ref[key].dtype == got[key].dtype and ref[key].shape == got[key].shape, key
        assert torch.equal(ref[key], got[key]), key


class _PublicCallRefused(Qwen2VLImageProcessor):
    """The real processor with its public entry point closed: proves the fast path is taken."""

    def preprocess(self, *args, **kwargs):
        raise AssertionError("the public preprocess ran")


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_tiny_processors_give_the_processors_pixels(family, tmp_path):
    from transformers import AutoProcessor

    path = get_adapter_class(family).build_tiny(tmp_path, seed=0)
    processor = AutoProcessor.from_pretrained(path).image_processor
    images = _images(12, 9, 200, seed=1)  # 9 px: below min_pixels, upscaled
    _assert_same(processor(images=images, return_tensors="pt"), qwen_vl_pixels(processor, images))


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("Qwen2-VL / Qwen2.5-VL", {}),  # the class defaults are the released checkpoints'
        (
            "Qwen3-VL",
            {
                "patch_size": 16,
                "min_pixels": 65536,
                "max_pixels": 16777216,
                "image_mean": [0.5] * 3,
                "image_std": [0.5] * 3,
            },
        ),
        ("VLM2Vec's bound", {"max_pixels": 28 * 28 * 1280 // 4}),
    ],
)
def test_real_checkpoint_settings_give_the_processors_pixels(name, settings):
    images = _images(10, 100, 1000, seed=2)
    fast = _PublicCallRefused(**settings)
    ref = Qwen2VLImageProcessor(**settings)(images=images, return_tensors="pt")
    _assert_same(ref, qwen_vl_pixels(fast, images))


def test_other_inputs_go_through_the_public_call():
    """Grayscale, RGBA (composited on white by the processor) and arrays: the processor's
    own conversion decides, through its public call."""
    rgb = _images(2, 40, 80, seed=3)
    gray = rgb[0].convert("L")
    rgba = rgb[1].convert("RGBA")
    rgba.putpixel((0, 0), (10, 20, 30, 0))
    array = np.array(rgb[0])
    processor = Qwen2VLImageProcessor()
    for batch in ([gray, rgb[1]], [rgba], [array]):
        _assert_same(processor(images=batch, return_tensors="pt"), qwen_vl_pixels(processor, batch))
    with pytest.raises(AssertionError, match="public preprocess ran"):
        qwen_vl_pixels(_PublicCallRefused(), [gray])
