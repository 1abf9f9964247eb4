"""The benchmark harness runs end to end (quick sizes; the numbers themselves live in
docs/benchmarks.md, not in tests)."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.helpers import ROOT, check_step_flops_against_forward, load_benchmark_harness


def test_quick_train_and_gradcache_comparison_runs(tmp_path):
    harness = load_benchmark_harness()
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


def test_quick_encode_comparison_runs(tmp_path):
    """The encode mode embeds like sentence-transformers (the harness checks that first) and
    times every contender, including the forward-only ceiling."""
    harness = load_benchmark_harness()
    out = tmp_path / "results.json"
    argv = ["--suite", "cpu", "--quick", "--only", "encode", "--rounds", "1"]
    assert harness.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    enc = json.loads(out.read_text())["encode"]
    for name in ("text", "mixed", "images"):
        assert enc[f"{name}_max_abs_diff_vs_st"] < 1e-4
        contenders = {"vlm2emb", "sentence-transformers", "naive", "forward_only"}
        assert contenders <= set(enc[name]) and all(enc[name][c]["items_per_s"] > 0 for c in contenders)
    assert "| encode image+text | forward_only |" in harness.table(json.loads(out.read_text()))
    # The image-only workload really varies the image size (one resize per item).
    images = harness.encode_workloads(harness.quick(harness.SUITES["cpu"]))["images"]
    assert len({img.size for img in images}) > len(images) // 2


@pytest.mark.slow
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

    full = run("--max-plain-batch", "4")  # batch 8: the plain step is skipped, GradCache still timed
    lora = run("--lora", "--image-size", "64")
    assert full["trainable_params"] == full["params"]
    assert 0 < lora["trainable_params"] < full["params"] < lora["params"]  # adapters only, added
    assert lora["pixel_values_per_batch"] > full["pixel_values_per_batch"]  # 64 px > the 32 px digits
    # LoRA freezes the vision tower: the tower-rerunning GradCache step is timed as well.
    assert not full["frozen_vision_tower"] and set(full["step_s"]) == {"gradcache"} and full["ratio"] is None
    assert lora["frozen_vision_tower"] and lora["ratio_rerun_vision"] > 0 and lora["reuse_speedup"] > 0
    assert set(lora["step_s"]) == {"plain", "gradcache", "gradcache_rerun_vision"}
    for result in (full, lora):
        assert all(v > 0 for v in result["step_s"].values())


def test_mfu_flop_count_is_three_forwards_for_a_full_fine_tune(tmp_path):
    """The harness's step FLOP count against an independent count of the forward alone: a
    full fine-tune's backward costs two forwards (input and weight gradients), so the step is
    close to 3x (pixels need no gradient: a little less; the loss's logits: a little more); a
    LoRA step, whose frozen vision tower runs no backward, costs clearly less than 3x its
    forward."""
    ratios = check_step_flops_against_forward(tmp_path)
    assert 2.85 < ratios["full"] < 3.05, ratios
    assert ratios["lora"] < ratios["full"] - 0.2, ratios


def test_quick_mfu_mode_writes_the_flop_count(tmp_path):
    harness = load_benchmark_harness()
    out = tmp_path / "results.json"
    argv = ["--suite", "cpu", "--quick", "--only", "mfu", "--rounds", "1", "--peak-tflops", "1"]
    assert harness.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    mfu = json.loads(out.read_text())["mfu"]
    assert mfu["peak_tflops"] == 1.0
    for mode in ("full", "lora"):
        m = mfu[mode]
        assert m["flops_counted"] > 0 and m["real_tokens"] > 0 and m["image_patches"] > 0
        assert m["mfu"] == pytest.approx(m["flops_counted"] / m["median_s"] / 1e12, rel=1e-2)
    assert mfu["lora"]["trainable_params"] < mfu["full"]["trainable_params"]


def _gpu_check():
    load_benchmark_harness()  # gpu_check imports benchmarks/run.py as ``run``
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lora", [False, True])
def test_gpu_check_counts_the_whole_step_chunk_by_chunk(lora):
    """gpu_check's model FLOPs (one chunk at a time, so a batch that needs checkpointing is
    still counted without it) equal the harness's count of the whole step, and leave neither
    gradients nor a changed attention implementation behind."""
    from vlm2emb.data.collate import ContrastiveCollator

    gc = _gpu_check()
    suite = gc.suite_for(gc.DRY)
    model = gc.build_model(gc.DRY, lora=lora)
    rows = gc.harness.training_rows(suite, 8, seed=5)
    batch = ContrastiveCollator(model.inputs, chunk_size=0, length_buckets=2)(rows)
    assert len(batch.query) == 2  # really more than one chunk per side
    impl = gc._tower(model).config._attn_implementation
    ours = gc.model_flops(model, batch, suite)
    whole = gc.harness.count_step_flops(model, batch, suite)
    assert ours == {"model": whole["total"], "vision": whole["vision"]}
    assert gc._tower(model).config._attn_implementation == impl  # packed attention kept
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_section(tmp_path):
    """The GPU check's dry run (tiny shapes on the CPU) runs every section end to end and
    writes its three files; on the CPU the GPU tests are collected and skipped."""
    gc = _gpu_check()
    out = tmp_path / "out"
    # A budget no machine load can exhaust: with 900 s a loaded machine ran out of a
    # section's share and skipped variants, failing the test by timing alone. The budget
    # logic itself is tested deterministically below (a budget too small to start anything).
    assert gc.main(["--dry-run", "--out", str(out), "--budget-s", "1000000"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "results.json", "summary.md"]
    data = json.loads((out / "results.json").read_text())
    assert {s["status"] for s in data["sections"].values()} == {"ok"}, data["sections"]
    assert "skipped" in data["tests"]["summary"] and not data["tests"]["failures"]
    for mode in ("full", "lora"):
        variants = data[f"mfu_{mode}"]["variants"]
        assert set(variants) == {v.name for v in gc.VARIANTS}
        for name, v in variants.items():
            assert "error" not in v and "skipped" not in v, (name, v)
            assert v["samples_per_s"] > 0 and v["flops"]["model"] > 0
        # Same batch, same model FLOPs: checkpointing and compiling change the time only.
        assert (
            variants["small/ckpt"]["flops"]
            == variants["small"]["flops"]
            == variants["small/compiled"]["flops"]
        )
        assert variants["large/ckpt"]["flops"] == variants["large"]["flops"]
        assert variants["large"]["flops"]["model"] > variants["small"]["flops"]["model"]
    assert data["mfu_lora"]["trainable_params"] < data["mfu_full"]["trainable_params"]
    steps = data["gradcache"]["steps"]
    assert {"gradcache", "plain", "plain/ckpt"} <= set(steps) and all(
        s["median_s"] > 0 for s in steps.values()
    )
    assert data["gradcache"]["overhead_vs_plain"] > 0
    for kind in ("text", "mixed", "images"):
        assert data["encode"][f"{kind}_max_abs_diff_vs_st"] < 1e-4
        assert data["encode"][kind]["vlm2emb"]["items_per_s"] > 0
    table = (out / "summary.md").read_text()
    assert "| mfu lora | large/ckpt/compiled |" in table and "| encode mixed | vlm2emb |" in table
    assert "| encode images | vlm2emb |" in table


def test_gpu_check_records_a_failing_section_and_goes_on(tmp_path):
    """A section that dies (here: out of budget at once) is recorded and the rest still run."""
    gc = _gpu_check()
    out = tmp_path / "out"
    assert gc.main(["--dry-run", "--out", str(out), "--only", "tests,gradcache", "--budget-s", "4"]) == 0
    sections = json.loads((out / "results.json").read_text())["sections"]
    assert set(sections) == {"tests", "gradcache"}
    assert all(s["status"].startswith("skipped") for s in sections.values())


def test_quick_packing_comparison_runs(tmp_path):
    harness = load_benchmark_harness()
    out = tmp_path / "results.json"
    argv = ["--suite", "cpu", "--quick", "--only", "packing", "--rounds", "1"]
    assert harness.main([*argv, "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    packing = json.loads(out.read_text())["packing"]
    for name in ("text", "mixed"):
        assert packing[f"{name}_max_abs_diff"] < 1e-5  # same embeddings, packed or padded
        assert 0 < packing[f"{name}_padding_efficiency"] <= 1
        assert packing[name]["packed"]["items_per_s"] > 0
    assert "| encode text, packed vs padded |" in harness.table(json.loads(out.read_text()))


def test_maxsim_benchmark_runs_and_agrees_with_the_einsum_formula():
    spec = importlib.util.spec_from_file_location("bench_maxsim", ROOT / "benchmarks" / "maxsim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = module.main(["--shapes", "3x4x5x6", "--dim", "8", "--chunk-elements", "50", "--repeat", "1"])
    methods = [r["method"] for r in rows]
    assert methods[0].startswith(("colpali-engine", "einsum"))
    assert methods[1:3] == ["vlm2emb maxsim_lists unbucketed", "vlm2emb maxsim_lists"]
    assert methods[-1] == module.BARE_GEMM and rows[-1]["max_abs_diff"] is None  # a bound, no scores
    ragged = module.main(["--shapes", "2x3x7x9", "--dim", "8", "--spread", "wide", "--repeat", "1"])
    # Zero padding and masks agree here: with this seed every query token's best match is
    # positive, so a padded slot's 0 never wins.
    assert ragged[1]["max_abs_diff"] < 1e-5
    assert ragged[2]["max_abs_diff"] < 1e-5  # the length-bucketed path agrees too
    assert rows[1]["max_abs_diff"] < 1e-5 and rows[2]["max_abs_diff"] < 1e-5
    assert all(r["pairs_per_s"] > 0 for r in rows)
