"""Multi-process training on CPU (gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3, with and without
GradCache, compute what one process computes at the same global batch; a run killed with
SIGKILL resumes to the same weights.

Each case launches `accelerate launch --num_processes 2 -m vlm2emb train recipes/demo.yaml`
exactly as a user would (docs/distributed.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import accelerate_launch

REPO = Path(__file__).resolve().parents[2]
RECIPE = str(REPO / "recipes" / "demo.yaml")
COMMON = ["train.batch_size=16", "train.max_steps=3", "train.log_steps=1", "data.eval=[]", "--no-progress"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # CPU processes over gloo everywhere: two ranks cannot share one GPU under NCCL.
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})
    return env


def _run(cmd: list[str]) -> str:
    return _run_both(cmd)[0]


def _run_both(cmd: list[str]) -> tuple[str, str]:
    """stdout and stderr of a run that must succeed (its output tails shown if not)."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "vlm2emb", "train", RECIPE, f"output_dir={out}", *COMMON, *extra]


def _launch_cmd(config: str, out: Path, *extra: str) -> list[str]:
    launch = accelerate_launch(config)
    launch += [a for a in extra if a.startswith("--zero3")]  # launcher flags
    extra = tuple(a for a in extra if not a.startswith("--zero3"))
    return [*launch, "-m", "vlm2emb", "train", RECIPE, f"output_dir={out}", *COMMON, *extra]


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _logged(out: Path, key: str) -> list[float]:
    return [json.loads(line)[key] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run(_train_cmd(out))
    return out


REDUCER_WARNING = "find_unused_parameters=True was specified in DDP constructor"
# Tests sharing a module fixture's run (the one-process references, the 2-process DDP run):
# pytest-xdist (--dist loadgroup) keeps each group on one worker, so each run is made once,
# not once per worker (a run costs 20-40 s, most of it starting the processes).
DENSE = pytest.mark.xdist_group("distributed-dense")
LORA_GROUP = pytest.mark.xdist_group("distributed-lora")
MAXSIM_GROUP = pytest.mark.xdist_group("distributed-maxsim")


@pytest.fixture(scope="module")
def ddp_pair(tmp_path_factory) -> tuple[Path, str, str]:
    """The demo recipe's 3 steps in 2 DDP processes: the run folder, its stdout and stderr."""
    out = tmp_path_factory.mktemp("ddp_pair") / "run"
    return (out, *_run_both(_launch_cmd("ddp", out)))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("ddp", ()),
        ("zero2", ()),
        ("zero3", ()),
        ("ddp", ("train.gradcache_chunk_size=3",)),
        ("zero2", ("train.gradcache_chunk_size=3",)),
        ("zero3", ("train.gradcache_chunk_size=3",)),
        ("zero3", ("--zero3_init_flag=false",)),
    ],
    ids=["ddp", "zero2", "zero3", "ddp-gradcache", "zero2-gradcache", "zero3-gradcache", "zero3-whole-load"],
)
@DENSE
def test_two_processes_match_one(single, tmp_path, request, config, extra):
    if (config, extra) == ("ddp", ()):
        out, log, _ = request.getfixturevalue("ddp_pair")
    else:
        out = tmp_path / config
        log = _run(_launch_cmd(config, out, *extra))
    # zero3.yaml loads partitioned (zero3_init_flag: true): each process holds half the values.
    found = re.search(r"ZeRO-3: model loaded partitioned \(([\d,]+) of ([\d,]+)", log)
    assert (found is not None) == (config == "zero3" and "--zero3_init_flag=false" not in extra), log[-2000:]
    if found:
        local, total = (int(x.replace(",", "")) for x in found.groups())
        assert 0 < local <= total // 2 + 1000  # about half of every weight (partitions are padded)
    # Same loss at every step (the forward is the same computation)...
    assert _losses(out) == pytest.approx(_losses(single), abs=1e-5)
    # ... the same in-batch accuracy (over the gathered batch) and global gradient norm ...
    assert _logged(out, "accuracy") == pytest.approx(_logged(single, "accuracy"), abs=1e-6)
    assert _logged(out, "grad_norm") == pytest.approx(_logged(single, "grad_norm"), rel=1e-4)
    # ...and the same weights after three AdamW steps, up to float reduction order.
    ref, got = _weights(single), _weights(out)
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst < 2e-5, worst


# LoRA dropout is off: its masks are drawn per process over that process's rows, so with
# dropout two processes train on different (equally likely) masks than one process does.
LORA = ("model.lora=true", "model.lora.r=4", "model.lora.dropout=0", "model.gradient_checkpointing=true")


@pytest.fixture(scope="module")
def single_lora(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single_lora")
    _run(_train_cmd(out, *LORA))
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("ddp", ()),
        ("zero3", ()),
        ("ddp", ("train.gradcache_chunk_size=3",)),
        ("zero3", ("train.gradcache_chunk_size=3",)),
    ],
    ids=["ddp", "zero3", "ddp-gradcache", "zero3-gradcache"],
)
@LORA_GROUP
def test_two_processes_match_one_with_lora(single_lora, tmp_path, config, extra):
    """The GradCache cases serve the frozen vision tower's first-pass outputs to the
    re-forward (gradcache_reuse_vision): per chunk under DDP's no_sync, and to the
    checkpointed re-forward under ZeRO-3's partitioned weights."""
    out = tmp_path / config
    _run(_launch_cmd(config, out, *LORA, *extra))
    losses = _losses(single_lora)
    assert len(set(losses)) == 3  # the adapter learns: step 2 differs from step 1
    assert _losses(out) == pytest.approx(losses, abs=1e-5)
    ref = load_file(single_lora / "final" / "adapter" / "adapter_model.safetensors")
    got = load_file(out / "final" / "adapter" / "adapter_model.safetensors")
    assert ref.keys() == got.keys() and any("lora_B" in k for k in ref)
    assert all(ref[k].abs().max() > 0 for k in ref)  # B starts at zero: the adapter trained
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    assert worst < 2e-5, worst


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "extra"),
    [("ddp", ("model.lora.r=4", "model.lora.dropout=0.1")), ("zero3", ())],
    ids=["ddp-lora-dropout", "zero3"],
)
def test_two_process_resume_is_exact(tmp_path, config, extra):
    """Two processes: one RNG file per process; DeepSpeed's own files loaded weights-only."""
    steps = ("train.max_steps=6", "train.save_steps=2", *extra)
    ref = tmp_path / "ref"
    _run(_launch_cmd(config, ref, *steps))
    # As a kill after step 4 leaves it (test_resume.py kills single-process runs for real).
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-6")  # the last step's checkpoint
    out = _run([*_launch_cmd(config, resumed, *steps), "train.resume_from=auto"])
    assert "Resumed from" in out
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert _losses(resumed) == _losses(ref)
    for f in (ref / "final").rglob("*.safetensors"):
        a, b = load_file(f), load_file(resumed / f.relative_to(ref))
        assert all(torch.equal(a[k], b[k]) for k in a), f
    state = resumed / "checkpoints" / "step-2" / "state"
    assert sorted(p.name for p in state.glob("rng-*")) == ["rng-0.safetensors", "rng-1.safetensors"]


def _homogeneous_worker(rank: int, world: int, data: str, port: int, out: str) -> None:
    """One of two gloo processes: records the dataset of its slice at every step."""
    import torch.distributed as dist

    from vlm2emb.data.sampler import GlobalBatchSampler, sampler_for
    from vlm2emb.data.schema import load_train_examples
    from vlm2emb.train.config import load_recipe

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    cfg = load_recipe(None, [f"data.train={data}", "data.homogeneous=true", "train.batch_size=8"])
    examples = load_train_examples(cfg.data.train)
    # The trainer's path: every process draws the global batch and keeps its rows.
    trainer_sampler = sampler_for(examples, cfg.data, cfg.train.batch_size, cfg.seed)
    local = cfg.train.batch_size // world
    # The sampler's own per-rank mode.
    ranked = GlobalBatchSampler(
        len(examples), 8, cfg.seed, rank=rank, world_size=world, datasets=[e.dataset for e in examples]
    )
    steps = []
    for step, mine in zip(range(30), ranked):
        batch = trainer_sampler.global_batch(step)[rank * local : (rank + 1) * local]
        steps.append(([examples[i].dataset for i in batch], [examples[i].dataset for i in mine]))
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, steps)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_homogeneous_batches_hold_across_two_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    rows = [
        {"query": f"{name} {i}", "positive": f"p {name} {i}", "dataset": name}
        for name in "abc"
        for i in range(20)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "steps.json"
    mp.spawn(_homogeneous_worker, args=(2, str(data), port, str(out)), nprocs=2, join=True)
    rank0, rank1 = json.loads(out.read_text())
    seen = set()
    for step, ((t0, s0), (t1, s1)) in enumerate(zip(rank0, rank1)):
        for a, b in ((t0, t1), (s0, s1)):
            assert len(a) == len(b) == 4
            assert len(set(a) | set(b)) == 1, f"step {step}: rank slices from {set(a)} and {set(b)}"
        seen.add(t0[0])
    assert seen == {"a", "b", "c"}  # all datasets take turns


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_evaluates_before_during_and_after_training(tmp_path):
    """ZeRO-3 loads the weights partitioned: the evaluation before training must run through
    the engine (it crashed on the partitioned weights), and an evaluation between steps must
    not leave the next training step with inference tensors (ZeRO-3 keeps gathered buffers).
    The reports equal one process's on the same weights."""
    with_eval = ("data.eval=demo:digits/eval", "train.eval_steps=2")

    def cmd(base: list[str]) -> list[str]:
        return [a for a in base if a != "data.eval=[]"] + list(with_eval)

    single, z3 = tmp_path / "single", tmp_path / "zero3"
    _run(cmd(_train_cmd(single)))
    _run(cmd(_launch_cmd("zero3", z3)))
    for name in ("eval_before.json", "eval.json"):
        ref, got = (json.loads((out / name).read_text())["average"] for out in (single, z3))
        assert ref.keys() == got.keys() and ref["n_tasks"] > 0
        for metric in ref:
            assert got[metric] == pytest.approx(ref[metric], abs=1e-3), (name, metric)
    evals = [json.loads(line) for line in (z3 / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    assert evals, "no evaluation between steps was logged"
    assert _losses_of(z3) == pytest.approx(_losses_of(single), abs=1e-5)


def _losses_of(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [rec["loss"] for rec in lines if "loss" in rec]


MAXSIM_EXTRA = ("model.multivector_dim=16", "train.loss=maxsim", "train.loss_args.dense_weight=0.5")


@pytest.fixture(scope="module")
def single_maxsim(tmp_path_factory) -> dict[str, Path]:
    """One process, joint dense + MaxSim, with and without GradCache (the references)."""
    out = {}
    for name, extra in (("plain", ()), ("gradcache", ("train.gradcache_chunk_size=3",))):
        out[name] = tmp_path_factory.mktemp(f"single-maxsim-{name}")
        _run(_train_cmd(out[name], *MAXSIM_EXTRA, *extra))
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("ddp", ("train.gradcache_chunk_size=3",)),
        ("zero3", ()),
        ("zero3", ("train.gradcache_chunk_size=3",)),
    ],
    # ZeRO-2 is left out: the token sets' gather does not depend on the stage, and ZeRO-2
    # itself is tested with the dense loss (test_two_processes_match_one).
    ids=["ddp-gradcache", "zero3", "zero3-gradcache"],
)
@MAXSIM_GROUP
def test_two_processes_match_one_for_the_maxsim_loss(single_maxsim, tmp_path, config, extra):
    """Late interaction across processes: token sets of different lengths are gathered
    (padded to the longest of any process, with masks), so two processes under DDP or
    ZeRO-3 give one process's losses and weights at the same global batch, the
    multi-vector head included (under ZeRO-3 the head is partitioned like any parameter
    and gathered for saving); the saved model reloads with the same token vectors."""
    from vlm2emb import EmbeddingModel

    one = single_maxsim["gradcache" if extra else "plain"]
    two = tmp_path / "two"
    _run(_launch_cmd(config, two, *MAXSIM_EXTRA, *extra))
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    for name in ("model.safetensors", "multivector_head.safetensors"):
        ref, got = load_file(one / "final" / name), load_file(two / "final" / name)
        assert ref.keys() == got.keys()
        worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
        assert worst < 2e-5, (name, worst)
    items = ["a handwritten seven", "the digit two"]
    ref_sets = EmbeddingModel.from_pretrained(one / "final").encode(items, output="multivector")
    got_sets = EmbeddingModel.from_pretrained(two / "final").encode(items, output="multivector")
    for a, b in zip(ref_sets, got_sets):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.distributed
@DENSE
def test_ddp_searches_for_unused_parameters_only_when_a_step_leaves_some_out(single, ddp_pair, tmp_path):
    """The probe step decides DDP's unused-parameter search: off for the demo recipe (every
    trainable parameter takes part, so torch's reducer warning is gone) with the same weights
    as one process; on for a single-vector loss on a model with a multi-vector head (the head
    is left out, named in the log, and stays as initialised, as in one process); and the
    recipe key overrides the probe."""
    plain, out, err = ddp_pair
    assert REDUCER_WARNING not in err
    assert "DDP searches for unused parameters" not in out
    ref, got = _weights(single), _weights(plain)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 2e-5

    # Before the fix the head was part of the forward: DDP waited for its gradient and the
    # second step failed ("Expected to have finished reduction in the prior iteration").
    extra = ("model.multivector_dim=16", "train.gradcache_chunk_size=3")
    one, head = tmp_path / "one", tmp_path / "head"
    _run(_train_cmd(one, *extra))
    out, err = _run_both(_launch_cmd("ddp", head, *extra))
    assert "a step leaves out multivector_head.proj.weight, multivector_head.proj.bias" in out
    assert REDUCER_WARNING not in err
    assert _losses(head) == pytest.approx(_losses(one), abs=1e-5)
    ref, got = (
        load_file(one / "final" / "multivector_head.safetensors"),
        load_file(head / "final" / "multivector_head.safetensors"),
    )
    assert all(torch.equal(ref[k], got[k]) for k in ref)

    forced = tmp_path / "forced"
    out, err = _run_both(_launch_cmd("ddp", forced, "train.ddp_find_unused_parameters=true"))
    assert REDUCER_WARNING in err  # asked for, and nothing was unused: torch says so


@pytest.mark.slow
@pytest.mark.distributed
@DENSE
def test_extending_a_finished_two_process_run_matches_one_process(single, ddp_pair, tmp_path):
    """A finished 2-process DDP run, extended with a larger max_steps and resume_from=auto,
    continues from its last-step checkpoint (one RNG file per process) and ends where the
    same extension ends in one process: same losses at every step, same weights."""
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(single, one)  # the finished runs (COMMON: 3 steps), copied: others read them
    shutil.copytree(ddp_pair[0], two)
    for out, launch in ((one, _train_cmd), (two, lambda o, *e: _launch_cmd("ddp", o, *e))):
        stdout = _run(launch(out, "train.max_steps=5", "train.resume_from=auto"))
        assert "Resumed from" in stdout and "step-3" in stdout
    assert [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    ref, got = _weights(one), _weights(two)
    assert max((ref[k] - got[k]).abs().max().item() for k in ref) < 2e-5
