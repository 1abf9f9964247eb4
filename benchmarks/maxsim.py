"""MaxSim throughput: vlm2emb's blocked, masked ``maxsim`` against the zero-padded einsum
formula colpali-engine's ``score_multi_vector`` uses (recomputed here: colpali-engine is
not installable beside this project's torch), on random unit token vectors.

    python benchmarks/maxsim.py                       # CPU defaults
    python benchmarks/maxsim.py --device cuda --queries 256 --docs 4096 --doc-tokens 1024

Prints one JSON line per method: seconds per full score matrix (best of ``--repeat``),
query-document pairs per second, and the largest absolute difference from the einsum
result (0 up to rounding: every document here has the same token count, so zero padding
and masks agree).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlm2emb.multivector import maxsim


def einsum_scores(q: torch.Tensor, d: torch.Tensor, block: int = 128) -> torch.Tensor:
    """The zero-padded formula, in blocks of ``block`` documents (colpali-engine's default
    batch size): ``einsum("bnd,csd->bcns").max(3).sum(2)``."""
    out = [
        torch.einsum("bnd,csd->bcns", q, d[s : s + block]).max(dim=3)[0].sum(dim=2)
        for s in range(0, len(d), block)
    ]
    return torch.cat(out, dim=1)  # [Nq, Nd]


def _time(fn: Callable[[], torch.Tensor], repeat: int, device: torch.device) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    assert out is not None
    return best, out


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--doc-tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-elements", type=int, default=1 << 24)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(args.queries, args.query_tokens, args.dim, generator=g), dim=-1)
    d = F.normalize(torch.randn(args.docs, args.doc_tokens, args.dim, generator=g), dim=-1)
    q, d = q.to(device, dtype), d.to(device, dtype)
    with torch.inference_mode():
        base_s, base = _time(lambda: einsum_scores(q, d), args.repeat, device)
        ours_s, ours = _time(lambda: maxsim(q, d, chunk_elements=args.chunk_elements), args.repeat, device)
    pairs = args.queries * args.docs
    rows: list[dict[str, float | str]] = [
        {"method": "einsum (colpali-engine formula)", "seconds": base_s, "pairs_per_s": pairs / base_s},
        {
            "method": "vlm2emb.multivector.maxsim",
            "seconds": ours_s,
            "pairs_per_s": pairs / ours_s,
            "max_abs_diff": float((ours.float() - base.float()).abs().max()),
        },
    ]
    for row in rows:
        print(json.dumps({**row, **{k: v for k, v in vars(args).items() if k != "repeat"}}))
    return rows


if __name__ == "__main__":
    main()
