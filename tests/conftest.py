"""Shared fixtures: tiny offline models and real images."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

# The CLI picks torch's thread count from the machine's load unless OMP_NUM_THREADS is set
# (vlm2emb._threads). In-process CLI runs compared with each other must not depend on the
# load at the moment each started, so tests pin it to what torch already uses here;
# tests of that default remove it themselves.
os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (the README's ``-n 2``) the workers share the cores: torch's
    default of one intra-op thread per core in every worker oversubscribes them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)  # what the CLI then picks in-process


@pytest.fixture(scope="session")
def tiny_qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Qwen2-VL checkpoint written like a downloaded one (built once)."""
    from vlm2emb.testing import tiny_backbone

    return tiny_backbone("qwen2_vl", tmp_path_factory.mktemp("tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def digit_images() -> list[Image.Image]:
    """Real images: scikit-learn's handwritten digits rendered at 32x32 RGB."""
    from vlm2emb.data.demo import load_digit_scans

    scans, _ = load_digit_scans()
    out = []
    for pixels in scans[:12]:
        gray = (255 - pixels * (255.0 / 16.0)).astype(np.uint8)
        out.append(Image.fromarray(gray, mode="L").resize((32, 32)).convert("RGB"))
    return out


@pytest.fixture(autouse=True)
def _embedding_cache_in_tmp(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`vlm2emb eval` caches embeddings; tests keep that cache out of the home folder."""
    monkeypatch.setenv("VLM2EMB_CACHE", str(tmp_path_factory.getbasetemp() / "embedding-cache"))
