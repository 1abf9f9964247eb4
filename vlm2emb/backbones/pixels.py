"""Qwen-VL image preprocessing without the channel-first copy: the processor's steps, faster.

transformers' torchvision image processors turn each PIL image into a uint8 [C, H, W]
tensor and make it contiguous (a strided copy of every pixel) before resizing it, and
torch's antialiased uint8 resize reads channels-last data fastest. Here each image's
[H, W, C] array is resized through its [C, H, W] *view*, by the processor's own ``resize``
(its ``smart_resize`` target, its resampling filter), and only the resized image, usually
much smaller than the original, is made contiguous. The processor's ``_preprocess`` then
rescales, normalises and patches, here on images stacked by resized shape. The pixels equal
``image_processor(images, return_tensors="pt")``'s exactly (tested per Qwen family and at
the real checkpoints' settings).

Anything this path does not cover (a processor without Qwen-VL's patch and merge sizes,
a non-PIL image, an image that is not plain RGB, another transformers version's private
methods) goes through the processor's public call instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def _channels_last_view(image: Any) -> torch.Tensor | None:
    """The [3, H, W] uint8 view of an RGB PIL image's [H, W, 3] array (None: not such an image)."""
    from PIL import Image

    if (
        not isinstance(image, Image.Image)
        or image.mode != "RGB"
        or image.info.get("transparency") is not None
    ):
        return None
    # np.array, not np.asarray: a writable copy, as the processor's own conversion makes.
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # [3, H, W], strides (1, 3W, 3)


def qwen_vl_pixels(image_processor: Any, images: Sequence[Any]) -> dict[str, Any]:
    """``image_processor(images=images, return_tensors="pt")`` for a Qwen-VL image processor:
    the same tensors, faster.

    Args:
        image_processor: A Qwen-VL image processor (``Qwen2VLImageProcessor``: torchvision
            backend, ``smart_resize`` to a multiple of ``patch_size * merge_size``).
        images: The batch's images, flat.

    Returns:
        The processor's output as a dict (``pixel_values`` [patches, C*T*P*P],
        ``image_grid_thw`` [N, 3]).
    """
    from transformers.image_processing_backends import TorchvisionBackend

    def public_call() -> dict[str, Any]:
        return dict(image_processor(images=list(images), return_tensors="pt"))

    qwen_like = hasattr(image_processor, "merge_size") and hasattr(image_processor, "patch_size")
    if not (isinstance(image_processor, TorchvisionBackend) and qwen_like):
        return public_call()
    views = [_channels_last_view(img) for img in images]
    if any(v is None for v in views):
        return public_call()
    try:
        kwargs = image_processor._merge_and_standardize_kwargs(return_tensors="pt")
        image_processor._validate_preprocess_kwargs(**kwargs)
        if kwargs["do_resize"]:
            resize_kw = {
                "size": kwargs["size"],
                "resample": kwargs["resample"],
                "factor": kwargs["patch_size"] * kwargs["merge_size"],
            }
            # [3, h, w] each, contiguous as the processor's own resized images are.
            views = [image_processor.resize(images=v[None], **resize_kw)[0].contiguous() for v in views]
            kwargs["do_resize"] = False
        else:
            views = [v.contiguous() for v in views]
        if kwargs.get("disable_grouping") is None:
            # transformers normalises and patches CPU images one at a time (its default on
            # the CPU); stacked by resized shape, each of those ops runs once per shape
            # instead of once per image, on the same values (elementwise ops and copies).
            kwargs["disable_grouping"] = False
        return dict(image_processor._preprocess(views, **kwargs))
    except (AttributeError, TypeError, KeyError):  # another transformers version's private API
        return public_call()
