"""Helpers shared by several test files (test-only; library-level helpers are in vlm2emb.testing).

Test files import what they share from here, never from each other: the GradCache checks
(tests/test_gradcache.py, tests/test_gpu.py, tests/backbones/test_families.py), the benchmark
harness and its FLOP check (tests/test_benchmarks.py, tests/test_gpu.py), and real media
files (tests/data/test_media_kinds.py, tests/train/test_data_training.py).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlm2emb.data.collate import ContrastiveCollator
from vlm2emb.gradcache import ContrastiveStep
from vlm2emb.losses import InfoNCELoss

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------- media files
def write_video(path: Path, n_frames: int = 20, step: int = 12) -> Path:
    """A real MPEG-4 clip whose frame i is uniformly grey at level i * step."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * step, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_pdf(path: Path) -> Path:
    """A real two-page PDF: a red 100x50 page then a blue 60x80 page (72 dpi)."""
    pages = [Image.new("RGB", (100, 50), (255, 0, 0)), Image.new("RGB", (60, 80), (0, 0, 255))]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


# --------------------------------------------------------------------- benchmark harness
def load_benchmark_harness():
    """benchmarks/run.py, imported as the module ``bench_run``."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def check_step_flops_against_forward(tmp_path: Path, device: str = "cpu") -> dict[str, float]:
    """Step FLOPs / forward FLOPs of the harness's full fine-tune and LoRA steps on one batch
    (shared with tests/test_gpu.py)."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    harness = load_benchmark_harness()
    suite = dataclasses.replace(harness.quick(harness.SUITES["cpu"]), device=device)
    path = harness.build_model_dir(suite, tmp_path)
    rows = harness.training_rows(suite, 16, seed=5)
    ratios = {}
    for mode in ("full", "lora"):
        model = harness.load_vlm2emb(path, suite, "fp32")
        if mode == "lora":
            model.apply_lora(r=4, alpha=8, dropout=0.0, seed=0)
        batch = ContrastiveCollator(model.inputs, chunk_size=0)(rows)
        assert any("pixel_values" in c for c in batch.query)  # images in the count
        step = harness.count_step_flops(model, batch, suite)
        assert 0 < step["vision"] < step["total"]
        assert all(p.grad is None for p in model.parameters())  # the count leaves no gradients
        base = model.backbone.get_base_model() if model.has_lora else model.backbone
        tower = model.adapter.vision_tower(base)
        vision = tower.config._attn_implementation
        base.set_attn_implementation("eager")  # as the harness counts
        if device == "cuda":
            tower.config._attn_implementation = vision
        autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
        with FlopCounterMode(display=False) as counter, torch.no_grad(), autocast:
            model([*batch.query, *batch.positive])
        ratios[mode] = step["total"] / counter.get_total_flops()
    return ratios


# --------------------------------------------------------------------- GradCache
def gradcache_rows(folder: Path, digit_images: list) -> list:
    """Six image-query rows with ragged text negatives, images saved under ``folder``
    (rows 0 and 4 share a positive: a false negative to mask).

    The ``rows`` fixture of tests/test_gradcache.py and tests/test_gpu.py.
    """
    from vlm2emb.data.schema import TrainExample

    paths = []
    for i, img in enumerate(digit_images[:6]):
        paths.append(str(folder / f"{i}.png"))
        img.save(paths[-1])
    out = []
    for i in range(6):
        negatives = [{"text": f"a handwritten digit {(i + 1 + j) % 10}"} for j in range(i % 3)]  # ragged
        out.append(
            TrainExample(
                query={"images": [paths[i]], "text": None},
                positive={"text": f"a handwritten digit {i % 4}"},  # rows 0 and 4 share a positive
                negatives=negatives,
                instruction="Represent the given image.",
                source=f"t:{i}",
            )
        )
    return out


def step_grads(
    model,
    batch,
    *,
    gradcache,
    single_backward=False,
    learnable=False,
    seed=0,
    device="cpu",
    reuse_vision=True,
    loss=None,
):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # seeds CUDA too
    assert (model.logit_scale is not None) == learnable
    model.config.temperature = 0.05  # the model owns the training temperature
    step = ContrastiveStep(
        model,
        loss if loss is not None else InfoNCELoss(temperature=0.05, symmetric=True),
        gradcache=gradcache,
        device=torch.device(device),
        single_backward=single_backward,
        reuse_frozen_vision=reuse_vision,
    )
    loss = step.forward_loss(batch)
    step.backward(loss, lambda tensor, _sync: tensor.backward())
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def assert_same_step(a, b, atol=1e-5):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(
            grads_a[name], grads_b[name], atol=atol, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def check_gradcache_replays_dropout(model, rows, single_backward, device="cpu", atol=1e-5):
    """Shared with tests/test_gpu.py, where the replayed state is the CUDA generator's."""
    for module in model.backbone.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3  # randomness in every attention layer
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    # Plain step over the same chunks draws the same random numbers in the same order.
    plain = step_grads(model, batch, gradcache=False, seed=3, device=device)
    other_seed = step_grads(model, batch, gradcache=False, seed=4, device=device)
    assert other_seed[0] != pytest.approx(plain[0], abs=1e-6)  # dropout really is active
    cached = step_grads(model, batch, gradcache=True, single_backward=single_backward, seed=3, device=device)
    assert_same_step(cached, plain, atol=atol)


def check_frozen_vision_is_served(model, rows, single_backward, device="cpu", atol=1e-5):
    """GradCache with a frozen vision tower gives the plain step's loss and gradients, and
    the tower runs only as often as in the plain step over the same chunks: its first-pass
    outputs are served to the re-forward. Without the reuse it runs again (the control).

    Shared with tests/backbones/test_families.py (every family) and tests/test_gpu.py.
    """
    from vlm2emb.gradcache import frozen_vision_tower

    tower = frozen_vision_tower(model)
    assert tower is not None  # LoRA (or model.freeze_vision) froze it
    # Count the tower's real work at its first parameterised module: a served output skips
    # the tower's forward, but not the hooks on the tower itself.
    leaf = next(m for m in tower.modules() if next(m.parameters(recurse=False), None) is not None)
    runs: list[int] = []
    handle = leaf.register_forward_hook(lambda *_: runs.append(1))
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    try:
        plain = step_grads(model, batch, gradcache=False, device=device)
        n_plain, runs[:] = len(runs), []
        served = step_grads(model, batch, gradcache=True, single_backward=single_backward, device=device)
        n_served, runs[:] = len(runs), []
        rerun = step_grads(
            model, batch, gradcache=True, single_backward=single_backward, device=device, reuse_vision=False
        )
        n_rerun = len(runs)
    finally:
        handle.remove()
    assert n_plain >= 2 and n_served == n_plain and n_rerun > n_plain, (n_plain, n_served, n_rerun)
    assert_same_step(served, plain, atol=atol)
    assert_same_step(rerun, plain, atol=atol)


def lora(model):
    """LoRA r4 adapters without dropout and with random B (shared with tests/test_gpu.py and
    tests/backbones/test_families.py)."""
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero; give the adapters a nonzero effect
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def check_random_tower_runs_again(model, rows, single_backward, device="cpu", atol=1e-5):
    """Attention dropout in the frozen tower and in the decoder: skipping the tower in the
    re-forward would shift the random numbers the decoder draws after it, so the cache must
    refuse to serve it (it sees the random state change) and the tower runs again, replayed.
    Shared with tests/test_gpu.py (the CUDA generator's state)."""
    from vlm2emb.gradcache import frozen_vision_tower

    lora(model)
    tower = frozen_vision_tower(model)
    for module in model.backbone.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.3
    batch = ContrastiveCollator(model.inputs, chunk_size=2)(rows)
    plain = step_grads(model, batch, gradcache=False, seed=3, device=device)
    assert step_grads(model, batch, gradcache=False, seed=4, device=device)[0] != pytest.approx(
        plain[0], abs=1e-6
    )
    calls: list[int] = []
    handle = tower.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        cached = step_grads(
            model, batch, gradcache=True, single_backward=single_backward, seed=3, device=device
        )
    finally:
        handle.remove()
    image_chunks = sum("pixel_values" in c for c in batch.query)
    assert len(calls) > image_chunks  # ran again in the re-forward
    assert_same_step(cached, plain, atol=atol)


def tiny_run_losses(out_dir: Path, model_dir, data, *overrides: str) -> list[float]:
    """Trains 2 steps of 4 rows (temperature 0.05, a loss record per step) and returns the
    logged losses; ``overrides`` are recipe ``key=value`` strings that come last."""
    import json

    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.loop import train

    cfg = load_recipe(
        None,
        [
            f"output_dir={out_dir}",
            f"model.name_or_path={model_dir}",
            f"data.train={data}",
            "train.max_steps=2",
            "train.batch_size=4",
            "train.log_steps=1",
            "train.temperature=0.05",
            *overrides,
        ],
    )
    train(cfg, progress=False)
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# --------------------------------------------------------------------- experiment trackers
def read_wandb_records(path: Path) -> list:
    """The protobuf records of a wandb ``.wandb`` run file (offline runs are read back here).

    wandb >= 0.2x no longer ships a Python reader: the file is a LevelDB-style log (a 7-byte
    ``:W&B`` header, then 32 KiB blocks of records, each with a 7-byte header: CRC, length,
    type; types 1 = whole, 2/3/4 = first/middle/last piece) of ``wandb_internal_pb2.Record``.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a wandb run file"
    block, pos, pieces, payloads = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            payloads.append(chunk)
        elif kind == 2:
            pieces = chunk
        elif kind == 3:
            pieces += chunk
        elif kind == 4:
            payloads.append(pieces + chunk)
    records = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


# --------------------------------------------------------------------- multi-process launches
def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(config: str = "ddp", num_processes: int = 2) -> list[str]:
    """``python -m accelerate.commands.launch`` with a shipped accelerate config and its own port.

    accelerate's default rendezvous port is fixed (29500): two launches at once (pytest-xdist
    workers) would meet on it, so every launch gets a free port.
    """
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    launch += [str(ROOT / "recipes" / "accelerate" / f"{config}.yaml")]
    return [*launch, "--num_processes", str(num_processes), "--main_process_port", str(free_port())]


def launch_env() -> dict[str, str]:
    """The environment of launched processes: one thread each, no GPU, unbuffered output."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
