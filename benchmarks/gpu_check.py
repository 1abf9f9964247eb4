"""The GPU check: one command for a short GPU window (issue: 'On the real chip').

    bash benchmarks/gpu_check.sh                           # on a CUDA machine, < 8 minutes
    python benchmarks/gpu_check.py --out DIR               # the same without the wheel setup
    python benchmarks/gpu_check.py --dry-run --out DIR     # tiny shapes on the CPU (CI runs it)

Runs, in order of value, each section in its own process under a share of the time budget
(a section that fails or runs out of time records that and the next one still runs):

1. ``tests``: ``pytest tests/test_gpu.py`` (CUDA agreement, bf16, GradCache on CUDA, the
   harness's FLOP count with the GPU's SDPA kernels).
2. ``mfu_full`` and ``mfu_lora``: model FLOP utilisation of one training step (InfoNCE,
   backward, AdamW; fp32 weights under bf16 autocast) of the Qwen2-VL-2B architecture
   (random weights) at VLM2Vec's shapes (image+instruction queries with images up to its
   28*28*1280-pixel bound, text targets up to ~256 tokens), as a matrix of variants: two
   batch sizes, gradient checkpointing on/off, the vision tower's packed (varlen) attention
   against transformers' per-image SDPA, right padding (mask-free causal LM) against left
   padding (the padding mask), and ``compile_blocks()`` on/off. Each variant's peak memory
   is recorded; one out of memory or failing records its error.
3. ``gradcache``: GradCache (chunk 32, LoRA r16, frozen tower reused) against the plain step
   on the same batch of 256, with and without gradient checkpointing on the plain side.
4. ``encode``: items/s of ``EmbeddingModel.encode`` against sentence-transformers on the same
   weights and items (benchmarks/run.py's encode mode), text and image+text.

Everything lands in ``OUT``: ``results.json`` (all numbers, written after every variant),
``gpu_check.log`` (every section's output) and ``summary.md`` (the table printed last).

MFU counts model FLOPs, not hardware FLOPs: torch's FlopCounterMode counts the eager step
without checkpointing, chunk by chunk (:func:`model_flops`), so a checkpointed or compiled
variant is charged the same work as the plain one and pays its recompute in time. MFU is given against the dense
bf16 peak (989 TFLOP/s on H100/H200) and against the measured matmul ceiling (~790 TFLOP/s
on the lent H200).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import run as harness  # noqa: E402  (benchmarks/run.py: data, steps, FLOP count, encode)

MATMUL_CEILING_TFLOPS = 790.0  # measured on the lent H200 (8192^3 bf16 products)
WORK_DIR = Path(tempfile.gettempdir()) / "vlm2emb-gpu-check"  # the encode section's model directories


# ---------------------------------------------------------------------------------- sizes
@dataclasses.dataclass(frozen=True)
class Sizes:
    """Shapes of one check: the real one (2B architecture on CUDA) or the CPU dry run."""

    device: str
    image_size: int  # upscaled digit scans; 1000 px is under VLM2Vec's 28*28*1280 bound
    max_target_words: int
    batch_small: int
    batch_large: int
    gradcache_batch: int
    gradcache_chunk: int
    encode_items: int
    rounds: int
    budgets_s: dict[str, float]  # a section's share of the whole budget (the rest carries over)
    # torch.compile's backend for the compiled variants. The dry run checks that the blocks
    # trace and train compiled; inductor's C++ code generation would add about two minutes
    # on 2 CPU cores without checking more of this script.
    compile_backend: str = "inductor"


REAL = Sizes(
    device="cuda",
    image_size=1000,
    max_target_words=190,  # about 256 tokens
    batch_small=8,
    batch_large=32,
    gradcache_batch=256,
    gradcache_chunk=32,
    encode_items=128,
    rounds=3,
    budgets_s={"tests": 80, "mfu_full": 115, "mfu_lora": 85, "gradcache": 90, "encode": 80},
)
DRY = Sizes(
    device="cpu",
    image_size=32,
    max_target_words=30,
    batch_small=4,
    batch_large=8,
    gradcache_batch=16,
    gradcache_chunk=4,
    encode_items=24,
    rounds=1,
    budgets_s={"tests": 120, "mfu_full": 120, "mfu_lora": 120, "gradcache": 90, "encode": 90},
    compile_backend="aot_eager",
)
SECTIONS = ["tests", "mfu_full", "mfu_lora", "gradcache", "encode"]


def suite_for(sizes: Sizes) -> harness.Suite:
    """benchmarks/run.py's Suite for these sizes (its data and model helpers read it)."""
    base = harness.SUITES["gpu" if sizes.device == "cuda" else "cpu"]
    return dataclasses.replace(
        base,
        dtype="bf16" if sizes.device == "cuda" else "fp32",
        encode_items=sizes.encode_items,
        rounds=sizes.rounds,
        max_target_words=sizes.max_target_words,
        image_fraction=0.5,
        image_size=sizes.image_size,
        gradcache_chunk=sizes.gradcache_chunk,
    )


# ---------------------------------------------------------------------------------- results
class Results:
    """``results.json`` in OUT, rewritten after every record so a killed section keeps what
    it measured (sections write their own part file; the parent merges them)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None


def _error(exc: BaseException) -> str:
    """One line for the results (the traceback goes to the log)."""
    traceback.print_exc()
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {msg}"[:300]


def time_steps(stepper: Callable[[], Any], device: str, rounds: int, deadline: float) -> dict[str, Any]:
    """A warm-up call (timed apart: it holds any compilation), then up to ``rounds`` timed
    calls, fewer when the next one would overrun ``deadline``; peak memory of the timed ones."""
    t0 = time.perf_counter()
    stepper()
    _sync(device)
    first = time.perf_counter() - t0
    _reset_peak(device)
    times: list[float] = []
    for _ in range(rounds):
        if len(times) >= 2 and deadline - time.time() < 2 * times[-1]:
            break
        _sync(device)
        s0 = time.perf_counter()
        stepper()
        _sync(device)
        times.append(time.perf_counter() - s0)
    med = statistics.median(times)
    return {
        "first_step_s": round(first, 2),
        "all_s": [round(t, 4) for t in times],
        "median_s": round(med, 4),
        "peak_memory_gib": _peak_gib(device),
    }


@contextlib.contextmanager
def recorded(record: dict[str, Any], model: Any, device: str) -> Iterator[None]:
    """Records an exception of the block as the record's ``error`` (one failing variant must
    not cost the others) and frees gradients and cached memory afterwards."""
    try:
        yield
    except Exception as exc:
        record["error"] = _error(exc)
        record["peak_memory_gib"] = _peak_gib(device)
    finally:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- model
def build_model(sizes: Sizes, lora: bool) -> Any:
    """The 2B architecture (random weights, fp32 master weights) on CUDA, or the tiny
    Qwen2-VL on the CPU; LoRA r16 alpha 64 (VLM2Vec's) over the LM's projections."""
    if sizes.device == "cuda":
        from gpu_foundation import build_model as build_2b

        model = build_2b()
    else:
        from vlm2emb import EmbeddingModel

        model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    model.config.pooling = "last"
    if lora:
        model.apply_lora(r=16, alpha=64, dropout=0.0, seed=0)
    return model.train()


def _tower(model: Any) -> Any:
    return model.adapter.vision_tower(model.base_backbone)


@contextlib.contextmanager
def checkpointing(model: Any, on: bool) -> Iterator[None]:
    """Gradient checkpointing as the trainer sets it, for the block."""
    if not on:
        yield
        return
    model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        model.disable_gradient_checkpointing()


@contextlib.contextmanager
def vision_attention(model: Any, packed: bool) -> Iterator[None]:
    """The vision tower's packed varlen attention (vlm2emb's default) or transformers' SDPA
    (one call per image)."""
    tower = _tower(model)
    before = tower.config._attn_implementation
    tower.config._attn_implementation = before if packed else "sdpa"
    try:
        yield
    finally:
        tower.config._attn_implementation = before


def model_flops(model: Any, batch: dict[str, Any], suite: harness.Suite) -> dict[str, int]:
    """Model FLOPs of one plain training step on ``batch`` (forward, loss, backward; no
    recomputation), counted by torch's FlopCounterMode one chunk at a time.

    The model embeds a batch's chunks independently, so the step's FLOPs are the sum over
    chunks of one forward and backward each (the gradient's values do not change the FLOPs)
    plus the loss's. Counting chunk by chunk needs one chunk's activations, not the whole
    batch's: a batch that only fits with gradient checkpointing is still counted without it
    (the recomputed forwards are the variant's cost, not model FLOPs). Equal to
    ``count_step_flops`` on the whole step (tests/test_benchmarks.py).
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vlm2emb.gradcache import ContrastiveStep
    from vlm2emb.losses import InfoNCELoss

    device = torch.device(suite.device)
    base = model.base_backbone
    tower = _tower(model)
    before, vision_impl = base.config._attn_implementation, tower.config._attn_implementation
    # The language model is counted with eager attention (the same matmuls): torch's CUDA
    # SDPA formula rejects grouped-query attention (torch 2.11), and it has none for the CPU
    # kernel. On CUDA the vision tower keeps its SDPA (per image, counted): eager attention
    # would keep a [heads, patches, patches] matrix per image and layer for the backward
    # (a full fine-tune at batch 8 ran out of 140 GiB in the count).
    base.set_attn_implementation("eager")
    if device.type == "cuda":
        tower.config._attn_implementation = vision_impl
    autocast = torch.autocast(suite.device, dtype=torch.bfloat16, enabled=device.type == "cuda")
    chunks = [*batch.query, *batch.positive, *batch.negatives]
    total = vision = 0
    embs = []
    try:
        for chunk in chunks:
            with FlopCounterMode(display=False) as counter, autocast:
                emb = model([chunk])[0]  # [n, d]
                emb.float().sum().backward()
            total += counter.get_total_flops()
            counts = counter.get_flop_counts()
            vision += sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".visual"))
            embs.append(torch.zeros_like(emb, dtype=torch.float32))
        # The loss on leaves of the embeddings' shapes (its FLOPs do not depend on values).
        step = ContrastiveStep(
            model, InfoNCELoss(temperature=model.config.temperature), gradcache=False, device=device
        )
        leaves = [e.requires_grad_() for e in embs]
        nq, np_ = len(batch.query), len(batch.positive)
        with FlopCounterMode(display=False) as counter:
            step._loss(batch, *step._split(leaves, nq, np_, batch), None).backward()
        total += counter.get_total_flops()
    finally:
        base.set_attn_implementation(before)
        tower.config._attn_implementation = vision_impl  # set_attn_implementation resets sub-configs
        model.zero_grad(set_to_none=True)
    return {"model": int(total), "vision": int(vision)}


# ---------------------------------------------------------------------------------- mfu
@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    batch: str  # "small" | "large"
    ckpt: bool = False
    packed_vision: bool = True
    padding_side: str = "right"
    compiled: bool = False


VARIANTS = [
    Variant("small", "small"),  # vlm2emb's defaults: packed vision attention, mask-free causal LM
    Variant("small/vision-sdpa", "small", packed_vision=False),
    Variant("small/left-pad", "small", padding_side="left"),
    Variant("small/ckpt", "small", ckpt=True),
    Variant("large/ckpt", "large", ckpt=True),
    Variant("large", "large"),  # may run out of memory: recorded
    # compile_blocks() cannot be undone in place: the compiled variants come last.
    Variant("small/compiled", "small", compiled=True),
    Variant("large/ckpt/compiled", "large", ckpt=True, compiled=True),
]


def section_mfu(sizes: Sizes, results: Results, deadline: float, mode: str) -> None:
    from vlm2emb.data.collate import ContrastiveCollator

    suite = suite_for(sizes)
    t0 = time.perf_counter()
    model = build_model(sizes, lora=mode == "lora")
    peak = harness._peak_flops(suite, None)
    info: dict[str, Any] = {
        "build_s": round(time.perf_counter() - t0, 1),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "peak_tflops": peak / 1e12 if peak else None,
        "variants": {},
    }
    results.put(f"mfu_{mode}", info)
    rows = harness.training_rows(suite, sizes.batch_large, seed=5)
    sizes_by_name = {"small": sizes.batch_small, "large": sizes.batch_large}
    tokenizer = model.adapter.tokenizer

    def collate(batch: str, padding_side: str) -> dict[str, Any]:
        model.config.padding_side = padding_side
        try:
            n = sizes_by_name[batch]
            picked = harness._batches_grouped(rows[:n], n, 0, tokenizer)[0]
            return ContrastiveCollator(model.inputs, chunk_size=0, length_buckets=suite.length_buckets)(
                picked
            )
        finally:
            model.config.padding_side = "right"

    flops_cache: dict[tuple[str, str], dict[str, int]] = {}
    last_cost = 0.0
    for variant in VARIANTS:
        left = deadline - time.time()
        if left < max(10.0, 1.5 * last_cost):
            info["variants"][variant.name] = {"skipped": f"time budget ({left:.0f} s left)"}
            results.put(f"mfu_{mode}", info)
            continue
        v0 = time.perf_counter()
        record: dict[str, Any] = {"batch_size": sizes_by_name[variant.batch], **dataclasses.asdict(variant)}
        del record["name"]
        with recorded(record, model, sizes.device):
            if variant.compiled and not getattr(model, "_gpu_check_compiled", False):
                record["blocks_compiled"] = model.compile_blocks(backend=sizes.compile_backend)
                model._gpu_check_compiled = True
            batch = collate(variant.batch, variant.padding_side)
            real, computed = harness._tokens(batch)
            record |= {"real_tokens": real, "padded_tokens": computed}
            record["image_patches"] = sum(
                int(c["pixel_values"].shape[0]) for c in batch.query if "pixel_values" in c
            )
            key = (variant.batch, variant.padding_side)
            if key not in flops_cache:
                # Counted eagerly before any compiled variant runs (the count is the same).
                flops_cache[key] = model_flops(model, batch, suite)
            record["flops"] = flops_cache[key]
            with checkpointing(model, variant.ckpt), vision_attention(model, variant.packed_vision):
                stepper = harness._Stepper(model, [batch], 0, suite)
                record |= time_steps(stepper, sizes.device, max(3, sizes.rounds), deadline)
                del stepper
            achieved = record["flops"]["model"] / record["median_s"]
            record |= {
                "samples_per_s": round(record["batch_size"] / record["median_s"], 2),
                "real_tokens_per_s": round(real / record["median_s"], 1),
                "achieved_tflops": round(achieved / 1e12, 2),
                "mfu": round(achieved / peak, 4) if peak else None,
                "mfu_vs_matmul_ceiling": round(achieved / (MATMUL_CEILING_TFLOPS * 1e12), 4)
                if sizes.device == "cuda"
                else None,
            }
        last_cost = time.perf_counter() - v0
        record["wall_s"] = round(last_cost, 1)
        info["variants"][variant.name] = record
        results.put(f"mfu_{mode}", info)
        print(f"[mfu_{mode}] {variant.name}: {json.dumps(record)}", flush=True)


# ---------------------------------------------------------------------------------- gradcache
def section_gradcache(sizes: Sizes, results: Results, deadline: float) -> None:
    """GradCache (chunk ``gradcache_chunk``, tower reused) against the plain step on the same
    global batch, LoRA r16; the plain step's sub-batches are the same length-sorted chunks."""
    from vlm2emb.data.collate import ContrastiveCollator

    suite = suite_for(sizes)
    model = build_model(sizes, lora=True)
    n, chunk = sizes.gradcache_batch, sizes.gradcache_chunk
    rows = harness.training_rows(suite, n, seed=3)
    grouped = harness._batches_grouped(rows, n, 0, model.adapter.tokenizer)[0]
    plain = ContrastiveCollator(model.inputs, chunk_size=0, length_buckets=-(-n // chunk))(grouped)
    cached = ContrastiveCollator(model.inputs, chunk_size=chunk)(grouped)
    out: dict[str, Any] = {"batch_size": n, "chunk": chunk, "lora": True, "steps": {}}
    results.put("gradcache", out)
    contenders: list[tuple[str, bool, Callable[[], Any]]] = [
        ("gradcache", False, lambda: harness._Stepper(model, [cached], 1, suite)),
        ("plain/ckpt", True, lambda: harness._Stepper(model, [plain], 0, suite)),
        ("plain", False, lambda: harness._Stepper(model, [plain], 0, suite)),  # may run out of memory
    ]
    for name, ckpt, make in contenders:
        left = deadline - time.time()
        if left < 15:
            out["steps"][name] = {"skipped": f"time budget ({left:.0f} s left)"}
            continue
        record: dict[str, Any] = {"gradient_checkpointing": ckpt}
        with recorded(record, model, sizes.device):
            with checkpointing(model, ckpt):
                stepper = make()
                record |= time_steps(stepper, sizes.device, max(2, sizes.rounds), deadline)
                del stepper
            record["samples_per_s"] = round(n / record["median_s"], 2)
        out["steps"][name] = record
        for ref in ("plain", "plain/ckpt"):
            if "median_s" in out["steps"].get(ref, {}) and "median_s" in out["steps"].get("gradcache", {}):
                out[f"overhead_vs_{ref}"] = round(
                    out["steps"]["gradcache"]["median_s"] / out["steps"][ref]["median_s"], 3
                )
        results.put("gradcache", out)
        print(f"[gradcache] {name}: {json.dumps(record)}", flush=True)


# ---------------------------------------------------------------------------------- encode
def section_encode(sizes: Sizes, results: Results, deadline: float, work: Path) -> None:
    """benchmarks/run.py's encode comparison (vlm2emb, sentence-transformers, naive loop,
    forward alone) on a model directory written in bf16 (the 2B) or fp32 (tiny)."""
    from vlm2emb.export import export_model

    suite = suite_for(sizes)
    t0 = time.perf_counter()
    model = build_model(sizes, lora=False).eval()
    if sizes.device == "cuda":
        model.to(torch.bfloat16)
    src = model.save_pretrained(work / "encode_backbone")
    del model
    if sizes.device == "cuda":
        torch.cuda.empty_cache()
    path = work / "encode_backbone_st"
    export_model(src, path, format="sentence-transformers", overwrite=True)
    results.put("encode", {"model_dir_s": round(time.perf_counter() - t0, 1)})
    out = results.data["encode"] | harness.bench_encode(suite, path)
    for kind in ("text", "mixed", "images"):
        for name, v in out[kind].items():
            if isinstance(v, dict) and "items_per_s" in v:
                print(f"[encode] {kind} {name}: {v['items_per_s']} items/s", flush=True)
    results.put("encode", out)


# ---------------------------------------------------------------------------------- tests
def section_tests(sizes: Sizes, results: Results, deadline: float) -> None:
    timeout = max(10, int(deadline - time.time()) - 5)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfE",
        "--tb=short",
        "-p",
        "no:cacheprovider",
        "tests/test_gpu.py",
    ]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
        text = proc.stdout + proc.stderr
        rc: int | str = proc.returncode
    except subprocess.TimeoutExpired as exc:
        text = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        rc = f"timed out after {timeout} s"
    print(text, flush=True)
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    summary = next(
        (
            ln
            for ln in reversed(lines)
            if " in " in ln and ("passed" in ln or "skipped" in ln or "failed" in ln)
        ),
        "",
    )
    failures = [ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")]
    results.put("tests", {"returncode": rc, "summary": summary.strip("= "), "failures": failures[:20]})


# ---------------------------------------------------------------------------------- driver
def run_section(name: str, sizes: Sizes, out: Path, deadline: float) -> None:
    results = Results(out / f"part_{name}.json")
    work = WORK_DIR  # model directories stay out of OUT
    work.mkdir(exist_ok=True)
    torch.manual_seed(0)
    if name == "tests":
        section_tests(sizes, results, deadline)
    elif name in ("mfu_full", "mfu_lora"):
        section_mfu(sizes, results, deadline, name.split("_")[1])
    elif name == "gradcache":
        section_gradcache(sizes, results, deadline)
    elif name == "encode":
        section_encode(sizes, results, deadline, work)
    else:
        raise ValueError(f"unknown section {name!r}")


def environment(sizes: Sizes) -> dict[str, Any]:
    import platform

    import transformers

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if sizes.device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
        "dry_run": sizes.device == "cpu",
    }
    for pkg in ("peft", "accelerate", "sentence_transformers"):
        with contextlib.suppress(Exception):
            env[pkg] = __import__(pkg).__version__
    if sizes.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def summary(data: dict[str, Any]) -> str:
    """The short table printed last (and written to summary.md)."""
    env = data.get("environment", {})
    lines = [
        f"GPU check {env.get('date', '')} on {env.get('device', '?')} (torch {env.get('torch')}, "
        f"transformers {env.get('transformers')}){' [dry run]' if env.get('dry_run') else ''}",
        "",
        "| section | variant | samples/s | step s | TFLOP/s | MFU (989) | MFU (790) | peak GiB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def pct(x: Any) -> str:
        return f"{x:.1%}" if isinstance(x, (int, float)) else "-"

    tests = data.get("tests", {})
    lines.append(
        f"| tests | tests/test_gpu.py | | | | | | | {tests.get('summary', tests.get('error', 'not run'))} |"
    )
    for mode in ("full", "lora"):
        sec = data.get(f"mfu_{mode}", {})
        if "error" in sec and "variants" not in sec:
            lines.append(f"| mfu {mode} | | | | | | | | {sec['error']} |")
        for name, v in sec.get("variants", {}).items():
            note = (
                v.get("error")
                or v.get("skipped")
                or f"batch {v.get('batch_size')}, first step {v.get('first_step_s')} s"
            )
            lines.append(
                f"| mfu {mode} | {name} | {v.get('samples_per_s', '-')} | {v.get('median_s', '-')} | "
                f"{v.get('achieved_tflops', '-')} | {pct(v.get('mfu'))} | {pct(v.get('mfu_vs_matmul_ceiling'))} | "
                f"{v.get('peak_memory_gib', '-')} | {note} |"
            )
    gc = data.get("gradcache", {})
    for name, v in gc.get("steps", {}).items():
        note = v.get("error") or v.get("skipped") or ""
        lines.append(
            f"| gradcache b{gc.get('batch_size')} c{gc.get('chunk')} | {name} | {v.get('samples_per_s', '-')} | "
            f"{v.get('median_s', '-')} | | | | {v.get('peak_memory_gib', '-')} | {note} |"
        )
    if "error" in gc and "steps" not in gc:
        lines.append(f"| gradcache | | | | | | | | {gc['error']} |")
    enc = data.get("encode", {})
    for kind in ("text", "mixed", "images"):
        for name, v in enc.get(kind, {}).items():
            if isinstance(v, dict) and "items_per_s" in v:
                ratio = v.get("speedup_vs_sentence-transformers")
                lines.append(
                    f"| encode {kind} | {name} | {v['items_per_s']} items/s | {v['median_s']} | | | | | "
                    f"{ratio}x vs sentence-transformers |"
                )
    if "error" in enc and "text" not in enc:
        lines.append(f"| encode | | | | | | | | {enc['error']} |")
    extra = [f"GradCache overhead vs {k[12:]}: {v}x" for k, v in gc.items() if k.startswith("overhead_vs_")]
    for name, sec in data.get("sections", {}).items():
        if sec.get("status") != "ok":
            extra.append(f"section {name}: {sec.get('status')}")
    return "\n".join([*lines, "", *extra]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out")
    parser.add_argument(
        "--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script runs"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the whole check")
    parser.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(SECTIONS))
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # child process
    parser.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = DRY if args.dry_run else REAL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from vlm2emb._quiet import quiet_third_party

    quiet_third_party()
    if args.section:
        run_section(args.section, sizes, out, args.deadline or time.time() + 600)
        return 0
    if sizes.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on a CPU machine")

    start = time.time()
    results = Results(out / "results.json")
    results.put("environment", environment(sizes))
    results.put("sections", {})
    log = (out / "gpu_check.log").open("a")
    sections = args.only.split(",") if args.only else SECTIONS
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    planned = sum(sizes.budgets_s[s] for s in sections)
    scale = args.budget_s / planned
    carry = 0.0
    for name in sections:
        # A section's share of the budget, plus what the ones before it left unused.
        share = sizes.budgets_s[name] * scale + carry
        share = min(share, args.budget_s - (time.time() - start))
        s0 = time.time()
        status = "ok"
        if share < 5:
            status = "skipped: the budget is spent"
        else:
            deadline = s0 + share - 3  # the child stops starting work a little before its kill
            cmd = [
                sys.executable,
                __file__,
                "--section",
                name,
                "--out",
                str(out),
                "--deadline",
                str(deadline),
            ]
            if args.dry_run:
                cmd.append("--dry-run")
            log.write(f"\n===== {name} (share {share:.0f} s)\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            try:
                proc = subprocess.run(
                    cmd,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=share + 20,
                    env=env,
                    check=False,
                )
                if proc.returncode:
                    status = f"failed (exit {proc.returncode}; see gpu_check.log)"
            except subprocess.TimeoutExpired:
                status = f"killed after {share + 20:.0f} s (partial results kept)"
        used = time.time() - s0
        carry = max(0.0, share - used) if status == "ok" else 0.0
        part = out / f"part_{name}.json"
        if part.exists():
            for key, value in json.loads(part.read_text()).items():
                results.put(key, value)
            part.unlink()
        results.data["sections"][name] = {"status": status, "wall_s": round(used, 1)}
        results.put("sections", results.data["sections"])
        print(f"[{name}] {status} in {used:.0f} s", flush=True)
    log.close()
    text = summary(results.data)
    (out / "summary.md").write_text(text)
    print(text)
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
