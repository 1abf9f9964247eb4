"""Harmless third-party warnings stay out of a run's output; other warnings still show."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": ""})
    return env


def test_a_lora_run_prints_no_third_party_warnings(tmp_path: Path) -> None:
    # Before the filters: transformers' `is_gradient_checkpointing` FutureWarning (from peft)
    # and peft's "Could not find a config file in tiny:qwen2_vl" on saving the adapter.
    cmd = [sys.executable, "-m", "vlm2emb", "train", str(REPO / "recipes" / "demo.yaml"),
           f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.batch_size=8", "data.eval=[]",
           "model.lora.r=4", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "adapter").is_dir()  # the adapter save that used to warn
    assert "Warning" not in proc.stderr, proc.stderr


def test_deepspeeds_all_gather_deprecation_is_hidden_but_others_are_not() -> None:
    # A real one-process gloo group: the deprecated collective DeepSpeed's ZeRO calls warns
    # when called; after quiet_third_party() it does not, while another FutureWarning does.
    code = """
import warnings, torch, torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
from vlm2emb._quiet import quiet_third_party
def gather():
    with warnings.catch_warnings(record=True) as seen:
        dist.all_gather_into_tensor(torch.zeros(2), torch.ones(2))
        warnings.warn("something else is deprecated", FutureWarning)
    return sorted(str(w.message).split()[0] for w in seen)
print(gather())
quiet_third_party()
print(gather())
dist.destroy_process_group()
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = proc.stdout.strip().splitlines()
    assert before == "['`torch.distributed.all_gather_into_tensor`', 'something']"
    assert after == "['something']"
