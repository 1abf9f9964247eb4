"""Step time and peak memory against batch size, with and without GradCache.

    python benchmarks/gradcache.py --device cpu --out gradcache_cpu.json
    python benchmarks/gradcache.py --device cuda --model qwen2_vl_2b --lora --image-size 448 \
        --batch-sizes 64,256,1024 --chunk 32 --max-plain-batch 256 --out gc_gpu.json

Each (batch size, mode) runs in a fresh subprocess so that peak memory is its own: peak
resident memory (ru_maxrss) on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. A step is
the whole training step: embed queries (digit image + instruction) and positives
(captions), InfoNCE, backward, AdamW. Time is the mean of ``--steps`` steps after one
warm-up step. The ratio column is GradCache time / plain time at the same batch.
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


def _measure(args: argparse.Namespace, batch: int, mode: str) -> dict:
    from vlm2emb.data.collate import ContrastiveCollator, GlobalBatchSampler
    from vlm2emb.data.demo import resolve_demo
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.gradcache import ContrastiveStep
    from vlm2emb.losses import InfoNCELoss

    torch.manual_seed(0)
    work = Path(tempfile.gettempdir()) / "vlm2emb-bench"
    rows = [
        ex
        for ex in load_train_examples([str(resolve_demo("demo:digits/train", work))])
        if ex.dataset == "digits-i2t"
    ]
    model = _model(args.model, args.device).train()
    device = torch.device(args.device)
    chunk = args.chunk if mode == "gradcache" else 0
    collate = ContrastiveCollator(model, chunk_size=chunk)
    sampler = GlobalBatchSampler(len(rows), batch, seed=0)
    batches = [collate([rows[i] for i in sampler.global_batch(s)]) for s in range(args.steps + 1)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    step = ContrastiveStep(model, InfoNCELoss(temperature=0.02), gradcache=chunk > 0, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.device == "cuda")

    def run(b):
        with autocast:
            loss = step.forward_loss(b)
            step.backward(loss, lambda t, _sync: t.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)

    def now() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    run(batches[0])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = now()
    for b in batches[1:]:
        run(b)
    seconds = (now() - t0) / args.steps
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
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "BATCH:MODE", child process
    args = parser.parse_args()
    if args.one:
        batch, mode = args.one.split(":")
        print(json.dumps(_measure(args, int(batch), mode)))
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
