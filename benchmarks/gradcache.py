"""Step time and peak memory against batch size, with and without GradCache.

    python benchmarks/gradcache.py --device cpu --out gradcache_cpu.json
    python benchmarks/gradcache.py --interleaved --batch-sizes 256 --chunk 64 --rounds 7
    python benchmarks/gradcache.py --device cuda --model qwen2_vl_2b --lora --image-size 448 \
        --batch-sizes 64,256,1024 --chunk 32 --max-plain-batch 256 --out gc_gpu.json

Each (batch size, mode) runs in a fresh subprocess so that peak memory is its own: peak
resident memory (ru_maxrss) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. A step is
the whole training step: embed queries (digit image + instruction) and positives
(captions), InfoNCE, backward, AdamW. Time is the mean of ``--steps`` steps after one
warm-up step; batches are collated one at a time, outside the timing. The ratio column is
GradCache time / plain time at the same batch.

``--interleaved`` measures time only, in one process: the plain step and the GradCache step
(and, when the vision tower is frozen, as with ``--lora``, GradCache running the tower
again in its re-forward instead of reusing its first-pass outputs) take turns on the same
batches for ``--rounds`` rounds; medians and their ratios are reported. Separate processes measured
minutes apart on a shared machine scatter by +-30 %; turns taken within seconds do not.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _model(name: str, device: str):
    from vlm2emb import EmbeddingModel

    if name == "tiny":
        return EmbeddingModel.from_pretrained("tiny:qwen2_vl", device=device)
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_foundation import build_model

    return build_model()


def _setup(args: argparse.Namespace) -> tuple[list, object]:
    """The image-to-caption rows of the demo data (images resized to ``--image-size`` if
    given) and the model in training mode (with LoRA r16 adapters if ``--lora``)."""
    from PIL import Image

    from vlm2emb.data.demo import resolve_demo
    from vlm2emb.data.schema import load_train_examples

    torch.manual_seed(0)
    work = Path(tempfile.gettempdir()) / "vlm2emb-bench"
    rows = [
        ex
        for ex in load_train_examples([str(resolve_demo("demo:digits/train", work))])
        if ex.dataset == "digits-i2t"
    ]
    if args.image_size:
        folder = work / f"digits-{args.image_size}px"
        folder.mkdir(parents=True, exist_ok=True)
        for ex in rows:
            src = Path(ex.query["images"][0])
            dst = folder / src.name
            if not dst.exists():
                Image.open(src).convert("RGB").resize((args.image_size,) * 2).save(dst)
            ex.query = {**ex.query, "images": [str(dst)]}
    model = _model(args.model, args.device)
    if args.lora:
        model.apply_lora(r=16, alpha=64, dropout=0.0)
    return rows, model.train()


def _train_step(model, step, lr: float, device: torch.device):
    """One training step on a collated batch: ``step``'s loss and backward (bf16 autocast on
    CUDA), then AdamW on the trainable parameters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def run(b: dict) -> None:
        with autocast:
            loss = step.forward_loss(b)
            step.backward(loss, lambda t, _sync: t.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def _measure(args: argparse.Namespace, batch: int, mode: str) -> dict:
    from vlm2emb.data.collate import ContrastiveCollator, GlobalBatchSampler
    from vlm2emb.gradcache import ContrastiveStep
    from vlm2emb.losses import InfoNCELoss

    rows, model = _setup(args)
    device = torch.device(args.device)
    chunk = args.chunk if mode == "gradcache" else 0
    collate = ContrastiveCollator(model.inputs, chunk_size=chunk)
    sampler = GlobalBatchSampler(len(rows), batch, seed=0)

    def batch_at(s: int) -> dict:
        # Collated step by step (outside the timing): holding every step's batch at once
        # would put steps x pixel_values into the peak (about 77 MB per batch of 1024 images).
        return collate([rows[i] for i in sampler.global_batch(s)])

    step = ContrastiveStep(
        model, InfoNCELoss(temperature=model.config.temperature), gradcache=chunk > 0, device=device
    )
    run = _train_step(model, step, 1e-5, device)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    run(batch_at(0))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = 0.0
    for s in range(1, args.steps + 1):
        b = batch_at(s)
        t0 = now()
        run(b)
        seconds += now() - t0
        del b
    seconds /= args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    return {
        "batch_size": batch,
        "mode": mode,
        "chunk": chunk,
        "step_s": round(seconds, 4),
        "peak_mib": round(peak, 1),
    }


def _interleaved(args: argparse.Namespace, batch: int) -> dict:
    """Step time only, in one process: plain, GradCache, and (frozen tower) GradCache
    without reusing the tower's outputs take turns on the same batches, the order flipped
    every round, so a slow moment of a shared machine hits all of them alike."""
    import statistics

    from vlm2emb.data.collate import ContrastiveCollator, GlobalBatchSampler
    from vlm2emb.gradcache import ContrastiveStep, frozen_vision_tower
    from vlm2emb.losses import InfoNCELoss

    rows, model = _setup(args)
    device = torch.device(args.device)
    sampler = GlobalBatchSampler(len(rows), batch, seed=0)
    ids = [sampler.global_batch(s) for s in range(args.steps)]
    # The plain step embeds each side in the same length-sorted sub-batches as GradCache's
    # chunks, so the ratio is GradCache's extra work, not a difference in padding.
    buckets = -(-batch // args.chunk)
    plain_batches = [
        ContrastiveCollator(model.inputs, length_buckets=buckets)([rows[i] for i in b]) for b in ids
    ]
    gc_batches = [ContrastiveCollator(model.inputs, chunk_size=args.chunk)([rows[i] for i in b]) for b in ids]
    loss = InfoNCELoss(temperature=model.config.temperature)

    def stepper(gradcache: bool, batches: list, reuse: bool = True):
        step = ContrastiveStep(model, loss, gradcache=gradcache, device=device, reuse_frozen_vision=reuse)
        one = _train_step(model, step, 1e-7, device)
        return lambda: [one(b) for b in batches]

    sys.path.insert(0, str(Path(__file__).parent))
    from run import interleaved  # the harness's timing: warm-up, then turns in flipped order

    # Above --max-plain-batch the plain step would not fit in memory: GradCache alone.
    plain = batch <= args.max_plain_batch
    runs = {"plain": stepper(False, plain_batches)} if plain else {}
    runs["gradcache"] = stepper(True, gc_batches)
    frozen = frozen_vision_tower(model) is not None
    if frozen:
        runs["gradcache_rerun_vision"] = stepper(True, gc_batches, reuse=False)
    times = interleaved(runs, args.rounds, device.type)
    med = {name: statistics.median(t) / args.steps for name, t in times.items()}
    base = med.get("plain")
    extra = {}
    if frozen:
        rerun = med["gradcache_rerun_vision"]
        extra = {"ratio_rerun_vision": round(rerun / base, 3) if base else None}
        extra["reuse_speedup"] = round(rerun / med["gradcache"], 3)
    return {
        "batch_size": batch,
        "chunk": args.chunk,
        "rounds": args.rounds,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "pixel_values_per_batch": sum(
            c["pixel_values"].numel() for c in gc_batches[0].query if "pixel_values" in c
        ),
        "step_s": {name: round(v, 4) for name, v in med.items()},
        "frozen_vision_tower": frozen,
        "ratio": round(med["gradcache"] / base, 3) if base else None,
        **extra,
        "all_s": {name: [round(x, 4) for x in t] for name, t in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny", choices=["tiny", "qwen2_vl_2b"])
    parser.add_argument("--batch-sizes", default="16,64,256,1024")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--image-size", type=int, default=0, help="resize images to this square size (0 = as is)"
    )
    parser.add_argument("--lora", action="store_true", help="train LoRA r16 adapters instead of all weights")
    parser.add_argument(
        "--max-plain-batch", type=int, default=1 << 30, help="skip plain steps above this batch"
    )
    parser.add_argument(
        "--interleaved",
        action="store_true",
        help="time only: plain and GradCache steps take turns in one process (--rounds); no memory",
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "BATCH:MODE", child process
    args = parser.parse_args()
    if args.one:
        batch, mode = args.one.split(":")
        print(json.dumps(_measure(args, int(batch), mode)))
        return
    if args.interleaved:
        results = []
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            try:
                results.append(_interleaved(args, batch))
            except torch.OutOfMemoryError as err:  # record it; the other sizes still run
                results.append({"batch_size": batch, "error": f"out of memory: {str(err).splitlines()[0]}"})
                print(f"batch {batch:>5}: {results[-1]['error']}", flush=True)
                torch.cuda.empty_cache()
                continue
            r = results[-1]
            rerun = (
                f", running the frozen tower again {r['step_s']['gradcache_rerun_vision']} s "
                f"({r['ratio_rerun_vision']}x; reuse {r['reuse_speedup']}x faster)"
                if r["frozen_vision_tower"]
                else ""
            )
            print(
                f"batch {batch:>5}: plain {r['step_s'].get('plain', 'skipped')} s, "
                f"GradCache {r['step_s']['gradcache']} s ({r['ratio']}x){rerun}",
                flush=True,
            )
        if args.out:
            Path(args.out).write_text(json.dumps({"device": args.device, "results": results}, indent=2))
        return
    results = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for mode in ("plain", "gradcache"):
            if mode == "plain" and batch > args.max_plain_batch:
                continue
            cmd = [sys.executable, __file__, "--one", f"{batch}:{mode}", "--device", args.device]
            cmd += ["--model", args.model, "--chunk", str(args.chunk), "--steps", str(args.steps)]
            cmd += ["--image-size", str(args.image_size)] + (["--lora"] if args.lora else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
                results.append({"batch_size": batch, "mode": mode, "error": tail})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)
    print(f"\n{'batch':>6} {'plain s':>9} {'gc s':>9} {'ratio':>6} {'plain MiB':>10} {'gc MiB':>9}")
    by = {(r["batch_size"], r["mode"]): r for r in results}
    for batch in sorted({r["batch_size"] for r in results}):
        p, g = by.get((batch, "plain"), {}), by.get((batch, "gradcache"), {})
        ratio = g["step_s"] / p["step_s"] if "step_s" in p and "step_s" in g else float("nan")
        print(
            f"{batch:>6} {p.get('step_s', 'err')!s:>9} {g.get('step_s', 'err')!s:>9} {ratio:>6.2f} "
            f"{p.get('peak_mib', 'err')!s:>10} {g.get('peak_mib', 'err')!s:>9}"
        )
    if args.out:
        Path(args.out).write_text(
            json.dumps({"device": args.device, "model": args.model, "results": results}, indent=2)
        )


if __name__ == "__main__":
    main()
