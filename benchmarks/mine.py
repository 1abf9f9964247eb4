"""Time and peak memory of ``vlm2emb mine`` on a large text-only training file.

    python benchmarks/mine.py --rows 100000 --runs 3 --out mine_cpu.json

Writes ``--rows`` synthetic text rows (a number-words query, its digit string as the
positive; ``--datasets`` datasets, so several corpora are searched), then runs the mining
CLI on them ``--runs`` times, each in a fresh process (peak resident memory is then that
run's own: ``ru_maxrss`` of the child). The model is the offline tiny Qwen2-VL, so the
numbers measure vlm2emb's pipeline (reading, two streaming passes, embedding batches,
search, filtering, writing) with a cheap encoder; on a real model the encoder dominates.
Reported: each run's wall time and peak RSS, their medians, and rows/s.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _words(n: int) -> str:
    ones = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    return " ".join(ones[int(c)] for c in str(n))


def write_rows(path: Path, rows: int, datasets: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as fh:
        for i in range(rows):
            n = rng.randrange(10**7)
            row = {
                "query": {"text": f"the number {_words(n)}"},
                "positive": {"text": f"{n:,}"},
                "dataset": f"set{i % datasets}",
            }
            fh.write(json.dumps(row) + "\n")


def run_once(model: str, data: Path, out: Path, batch_size: int) -> dict[str, float]:
    cmd = [sys.executable, "-m", "vlm2emb", "mine", "--model", model, "--data", str(data), "--out", str(out)]
    cmd += ["--no-cache", "--no-progress", "--batch-size", str(batch_size), "--teacher-scores"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all finished children: fresh runs only grow it,
    # so a smaller run after a larger one would hide; runs here have equal size.
    return {"seconds": seconds, "peak_rss_mib": max(peak_kib, before) / 1024, "summary": proc.stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--datasets", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--model", default="tiny:qwen2_vl")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "train.jsonl"
        write_rows(data, args.rows, args.datasets)
        runs = [
            run_once(args.model, data, Path(tmp) / f"mined{i}.jsonl", args.batch_size)
            for i in range(args.runs)
        ]
    med = statistics.median(r["seconds"] for r in runs)
    result = {
        "rows": args.rows,
        "datasets": args.datasets,
        "model": args.model,
        "runs": runs,
        "median_seconds": med,
        "rows_per_second": args.rows / med,
        "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
