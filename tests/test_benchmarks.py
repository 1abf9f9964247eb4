"""The benchmark harness runs end to end (quick sizes; the numbers themselves live in
docs/benchmarks.md, not in tests)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _harness():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_run"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_quick_train_and_gradcache_comparison_runs(tmp_path):
    harness = _harness()
    out = tmp_path / "results.json"
    argv = ["--suite", "cpu", "--quick", "--only", "train,gradcache", "--rounds", "1"]
    assert harness.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    train = results["train"]
    # Same examples on both sides; grouping and sorted sub-batches must pad less.
    assert train["real_tokens_per_batch_vlm2emb"] == train["real_tokens_per_batch_naive"]
    assert train["padding_efficiency_vlm2emb"] > train["padding_efficiency_naive"]
    for name in ("vlm2emb", "naive"):
        assert train["step"][name]["samples_per_s"] > 0
    assert results["gradcache"]["overhead"] > 0
    assert "| GradCache vs plain |" in harness.table(results)


def test_interleaved_gradcache_benchmark_applies_lora_and_image_size(tmp_path):
    """benchmarks/gradcache.py --interleaved runs, and its --lora and --image-size flags
    really change what is trained on (an earlier version accepted and ignored them)."""
    import subprocess

    def run(*flags: str) -> dict:
        out = tmp_path / f"gc{len(flags)}.json"
        argv = ["--interleaved", "--batch-sizes", "8", "--chunk", "4", "--steps", "1", "--rounds", "1"]
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gradcache.py"), *argv, *flags, "--out", str(out)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())["results"][0]

    full = run()
    lora = run("--lora", "--image-size", "64")
    assert full["trainable_params"] == full["params"]
    assert 0 < lora["trainable_params"] < full["params"] < lora["params"]  # adapters only, added
    assert lora["pixel_values_per_batch"] > full["pixel_values_per_batch"]  # 64 px > the 32 px digits
    for result in (full, lora):
        assert set(result["step_s"]) == {"plain", "gradcache", "gradcache_keep_last"}
        assert all(v > 0 for v in result["step_s"].values())
