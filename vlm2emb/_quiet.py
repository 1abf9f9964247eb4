"""Keeps third-party log noise out of user-facing output."""

from __future__ import annotations

import os


def quiet_third_party() -> None:
    """Silences transformers' load reports and progress bars, and DeepSpeed's CPU notice.

    Tiny models and LoRA loads trigger many transformers reports that say nothing actionable.
    DeepSpeed (imported by transformers when installed) warns on every machine without a GPU
    that it falls back to the CPU; naming the CPU accelerator up front is what it would pick
    anyway, and it keeps the warning out of every command's output.
    """
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
