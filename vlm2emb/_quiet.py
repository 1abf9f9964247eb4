"""Keeps third-party log noise out of user-facing output."""

from __future__ import annotations

import os
import warnings

# Warnings that third-party code raises about third-party code, on every run, with nothing the
# user can do: (category, message pattern). Matched by message, so any other warning of the
# same libraries still shows.
HARMLESS_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # peft asks transformers whether gradient checkpointing is on, through the old name.
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # DeepSpeed's ZeRO collectives call the old all-gather name of torch.distributed.
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    # peft, saving the LoRA adapter of a tiny: model, cannot find a config for that name.
    (UserWarning, r"Could not find a config file in tiny:"),
)


def filter_harmless_warnings() -> None:
    """Hides :data:`HARMLESS_WARNINGS` (process-wide filters; adding them again changes nothing)."""
    for category, pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=category, append=False)


def quiet_third_party() -> None:
    """Silences transformers' load reports and progress bars, DeepSpeed's CPU notice, and
    third-party deprecation warnings about third-party code (:data:`HARMLESS_WARNINGS`).

    Tiny models and LoRA loads trigger many transformers reports that say nothing actionable.
    DeepSpeed (imported by transformers when installed) warns on every machine without a GPU
    that it falls back to the CPU; naming the CPU accelerator up front is what it would pick
    anyway, and it keeps the warning out of every command's output.
    """
    import torch
    from transformers.utils import logging as hf_logging

    filter_harmless_warnings()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
