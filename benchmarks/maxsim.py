"""MaxSim throughput: vlm2emb's ``maxsim`` against colpali-engine's ``score_multi_vector``
on the same random unit token vectors.

colpali-engine is used when it imports (its wheel pins ``torch<2.14``, so install it apart
from the project's environment without its dependencies and put it on the path:
``pip install --no-deps --target /tmp/cpe colpali-engine`` then ``PYTHONPATH=/tmp/cpe``).
Otherwise its formula (token sets zero-padded per block of 128, einsum
``bnd,csd->bcns``, max over document tokens, sum over query tokens) is recomputed here.

    PYTHONPATH=/tmp/cpe:. python benchmarks/maxsim.py                    # the shape grid, equal lengths
    PYTHONPATH=/tmp/cpe:. python benchmarks/maxsim.py --spread wide      # variable lengths

A shape is ``queries x query tokens x docs x doc tokens``; the token counts are the
longest. ``--spread`` draws every query's and every document's length (seeded) as real
corpora have them (page token counts vary with image size, query lengths vary):
``uniform`` all at the longest, ``mild`` between 3/4 of it and all of it, ``ragged``
between 1/2 and all, ``wide`` between 1/8 and all. colpali-engine pads each batch of 128
to its longest member; vlm2emb's ``maxsim`` sorts by length and pads each block to its own
longest (``bucket_by_length``; the ``unbucketed`` row turns that off).

Prints one JSON line per shape and method: the median seconds of ``--repeat`` runs (the
methods alternate inside each repeat, so all see the same machine load), query-document
pairs per second, the speed-up over the baseline, the largest absolute difference from the
baseline's scores and the share of queries whose best document agrees with the baseline's,
and ``real_pair_share``: real token dot products over the ones colpali-engine's padding
computes (the most that skipping padding can save). ``bf16`` computes the dot products in
bfloat16 (``maxsim(compute_dtype=torch.bfloat16)``).

``bare GEMM`` is a bound, not a scorer: only the float32 token dot products of the real
tokens (no padding, no max, no sum, no copies), as one matrix product per block of
``GEMM_BLOCK_ELEMENTS`` outputs written into one buffer allocated before the clock starts,
with every query token as a column and the document tokens as rows. An exact float32 MaxSim
that computes every real dot product with the same BLAS cannot take much less time, so
colpali-engine's time over this one is about the most any such method can gain over it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from vlm2emb.multivector import maxsim_lists

DEFAULT_SHAPES = "32x32x256x256,16x20x256x1030,64x16x1024x128,4x32x2048x256"
# Outputs per block of the bare GEMM bound (2 MiB of float32).
GEMM_BLOCK_ELEMENTS = 1 << 19
BARE_GEMM = "bare GEMM (bound)"
# Shortest length as a share of the longest; lengths are uniform between the two.
SPREADS = {"uniform": 1.0, "mild": 0.75, "ragged": 0.5, "wide": 0.125}


def _lengths(n: int, longest: int, spread: str, g: torch.Generator) -> list[int]:
    shortest = max(1, math.ceil(longest * SPREADS[spread]))
    return torch.randint(shortest, longest + 1, (n,), generator=g).tolist()


def _real_pair_share(q_lengths: list[int], d_lengths: list[int], block: int = 128) -> float:
    """Real token dot products over the ones computed with colpali-engine's padding (each
    batch of ``block`` padded to its longest member)."""

    def padded(lengths: list[int]) -> int:
        return sum(
            len(lengths[i : i + block]) * max(lengths[i : i + block]) for i in range(0, len(lengths), block)
        )

    return sum(q_lengths) * sum(d_lengths) / (padded(q_lengths) * padded(d_lengths))


def einsum_scores(qs: list[torch.Tensor], ds: list[torch.Tensor], block: int = 128) -> torch.Tensor:
    """colpali-engine's formula, recomputed: zero-padded blocks of ``block`` queries and
    documents, ``einsum("bnd,csd->bcns").amax(3).sum(2)``."""
    pad = torch.nn.utils.rnn.pad_sequence
    rows = []
    for i in range(0, len(qs), block):
        q = pad(qs[i : i + block], batch_first=True)  # [bq, Lq, D]
        cols = [
            torch.einsum("bnd,csd->bcns", q, pad(ds[j : j + block], batch_first=True)).amax(dim=3).sum(dim=2)
            for j in range(0, len(ds), block)
        ]
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0)  # [Nq, Nd]


def bare_gemm(qs: list[torch.Tensor], ds: list[torch.Tensor]) -> Callable[[], None]:
    """The timed part of the ``bare GEMM`` bound, set up outside the clock: the real query
    tokens ``[Tq, D]`` and document tokens ``[Td, D]`` as two matrices and one output buffer;
    each call computes every ``Td x Tq`` dot product, block by block, into that buffer."""
    flat_q = torch.cat(qs).float()  # [Tq, D]
    flat_d = torch.cat(ds).float()  # [Td, D]
    rows = max(1, GEMM_BLOCK_ELEMENTS // max(1, flat_q.shape[0]))
    buf = torch.empty(min(rows, flat_d.shape[0]), flat_q.shape[0])

    def run() -> None:
        for start in range(0, flat_d.shape[0], rows):
            block = flat_d[start : start + rows]
            torch.mm(block, flat_q.T, out=buf[: block.shape[0]])

    return run


def baseline() -> tuple[str, Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]]:
    """colpali-engine's own ``score_multi_vector`` when it imports, else the recomputed formula."""
    try:
        from importlib.metadata import version

        from colpali_engine.utils.processing_utils import BaseVisualRetrieverProcessor
    except ImportError:
        return "einsum (colpali-engine formula, recomputed)", einsum_scores

    def score(qs: list[torch.Tensor], ds: list[torch.Tensor]) -> torch.Tensor:
        return BaseVisualRetrieverProcessor.score_multi_vector(qs, ds, device="cpu")

    return f"colpali-engine {version('colpali-engine')} score_multi_vector", score


def _shape(text: str) -> tuple[int, int, int, int]:
    parts = [int(x) for x in text.lower().split("x")]
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be QxLQxDxLD (4 positive ints), got {text!r}")
    return parts[0], parts[1], parts[2], parts[3]


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated QxLQxDxLD")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument(
        "--spread",
        choices=sorted(SPREADS),
        default="uniform",
        help="how query and document lengths vary (shortest share of the longest)",
    )
    parser.add_argument("--chunk-elements", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    base_name, base_fn = baseline()
    kwargs = {} if args.chunk_elements is None else {"chunk_elements": args.chunk_elements}
    rows: list[dict[str, float | str]] = []
    for text in args.shapes.split(","):
        nq, lq, nd, ld = _shape(text)
        g = torch.Generator().manual_seed(0)
        q_lengths = _lengths(nq, lq, args.spread, g)
        d_lengths = _lengths(nd, ld, args.spread, g)
        qs = [F.normalize(torch.randn(n, args.dim, generator=g), dim=-1) for n in q_lengths]
        ds = [F.normalize(torch.randn(n, args.dim, generator=g), dim=-1) for n in d_lengths]
        methods = {
            base_name: base_fn,
            "vlm2emb maxsim_lists unbucketed": lambda q, d: maxsim_lists(
                q, d, bucket_by_length=False, **kwargs
            ),
            "vlm2emb maxsim_lists": lambda q, d: maxsim_lists(q, d, **kwargs),
            "vlm2emb maxsim_lists bf16": lambda q, d: maxsim_lists(
                q, d, compute_dtype=torch.bfloat16, **kwargs
            ),
        }
        gemm = bare_gemm(qs, ds)
        methods[BARE_GEMM] = lambda q, d, gemm=gemm: gemm()
        times: dict[str, list[float]] = {name: [] for name in methods}
        outs: dict[str, torch.Tensor] = {}
        with torch.inference_mode():
            for _ in range(args.repeat):
                for name, fn in methods.items():
                    start = time.perf_counter()
                    outs[name] = fn(qs, ds)
                    times[name].append(time.perf_counter() - start)
        base_s = statistics.median(times[base_name])
        for name in methods:
            sec = statistics.median(times[name])
            out, base = outs[name], outs[base_name].float()
            # The bound computes no scores.
            diff = None if out is None else float((out.float() - base).abs().max())
            # Ranking agreement: each query's best document is the baseline's.
            top1 = None if out is None else float((out.argmax(1) == base.argmax(1)).float().mean())
            row = {
                "shape": text,
                "spread": args.spread,
                "threads": torch.get_num_threads(),
                "real_pair_share": _real_pair_share(q_lengths, d_lengths),
                "method": name,
                "median_s": sec,
                "runs_s": times[name],
                "pairs_per_s": nq * nd / sec,
                "speedup_vs_baseline": base_s / sec,
                "max_abs_diff": diff,
                "top1_agree": top1,
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
