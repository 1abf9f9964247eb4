"""The reranker trained by the embedder's trainer (``model.kind: reranker``).

Each run is a real tiny Qwen2-VL (vlm2emb.testing) on real digit images, through
``vlm2emb.train`` (the Python API), ``vlm2emb train`` or ``accelerate launch``, checked
against a plain-PyTorch recomputation of the same steps, a single-process run, or an
uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vlm2emb
from tests.helpers import accelerate_launch, launch_env
from vlm2emb._typed_config import ConfigError
from vlm2emb.data.sampler import sampler_for
from vlm2emb.data.schema import DataError, load_train_examples
from vlm2emb.rerank import Reranker
from vlm2emb.train.config import DataConfig, load_recipe

REPO = Path(__file__).resolve().parents[2]
CAPTIONS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _image_rows(tmp_path: Path, digit_images, n: int, negatives: int) -> list[dict]:
    """Image queries, their caption as positive and ``negatives`` other captions."""
    rows = []
    for i in range(n):
        path = tmp_path / f"digit{i}.png"
        digit_images[i].save(path)
        rows.append(
            {
                "query": {"image": path.name},
                "positive": {"text": CAPTIONS[i]},
                "negatives": [{"text": CAPTIONS[(i + k) % len(CAPTIONS)]} for k in range(1, negatives + 1)],
                "instruction": "Which digit is in the image?",
                "dataset": "digits",
            }
        )
    return rows


def _text_rows(n: int) -> list[dict]:
    """Text-only rows (no image on either side): their batches run the blank-image pair."""
    return [
        {"query": {"text": f"the number {i}"}, "positive": {"text": CAPTIONS[i]}, "dataset": "words"}
        for i in range(n)
    ]


def _write(tmp_path: Path, rows: list[dict], name: str = "train.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _recipe(out: Path, data: str, **train) -> dict:
    return {
        "output_dir": str(out),
        "seed": 0,
        "model": {"kind": "reranker", "name_or_path": "tiny:qwen2_vl"},
        "data": {"train": [data]},
        "rerank": {"group_size": 3, "temperature": 0.5},
        "train": {"batch_size": 4, "learning_rate": 1e-3, "log_steps": 1, **train},
    }


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class _FinalScores:
    """Scores pairs with the in-memory model right after the last optimizer step."""

    def __init__(self, pairs: list[tuple], max_steps: int) -> None:
        self.pairs, self.max_steps, self.scores = pairs, max_steps, None

    def on_step_end(self, state) -> None:
        if state.step == self.max_steps:
            self.scores = state.model.score_pairs(self.pairs)


def test_trainer_equals_a_plain_pytorch_loop_and_final_reloads(tmp_path, digit_images):
    """Four steps of the main trainer against AdamW + transformers' schedule + clipping written
    out over the same groups (each row's own negatives fill its group, every batch is all four
    rows); the saved final/ loads with Reranker.from_pretrained and scores as the trained
    in-memory model did."""
    from transformers import get_scheduler

    rows = _image_rows(tmp_path, digit_images, 4, negatives=2)
    data = _write(tmp_path, rows)
    out = tmp_path / "run"
    probe = [({"image": str(tmp_path / "digit1.png")}, "one"), ("the number 3", "three"), ("x", "seven")]
    final_scores = _FinalScores(probe, 4)
    recipe = _recipe(out, data, max_steps=4, warmup_ratio=0.25, lr_scheduler="linear", weight_decay=0.01)
    summary = vlm2emb.train(recipe, callbacks=[final_scores], progress=False)
    assert summary["steps"] == 4

    # The reference: the same tiny weights, the same groups, the loss in plain torch. Written
    # as log_softmax (not logsumexp - s0, equal in exact arithmetic): the random tiny model's
    # gradients are tiny in many weights, and AdamW turns float-rounding differences there
    # into differences of ~1e-4 after four steps.
    ref = Reranker.from_pretrained("tiny:qwen2_vl", seed=0).train()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=1, num_training_steps=4)
    # The trainer's batches: the recipe's global batch plan over the rows as loaded.
    examples = load_train_examples([data])
    plan = sampler_for(examples, DataConfig(), 4, 0)
    losses = []
    for step in range(4):
        batch = [examples[i] for i in plan.global_batch(step)]
        pairs = [(ex.query, c) for ex in batch for c in [ex.positive, *ex.negatives]]
        instructions = [ex.instruction for ex in batch for _ in range(3)]
        scores = ref(ref.collate_pairs(pairs, instructions)).view(4, 3) / 0.5  # [Q, G]
        loss = -torch.log_softmax(scores, dim=1)[:, 0].mean()  # the positive against its group
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert _losses(out) == pytest.approx(losses, abs=1e-5)
    assert len(set(round(v, 4) for v in losses)) > 1  # the model moved

    final = Reranker.from_pretrained(out / "final")
    got = dict(final.named_parameters())
    worst = max((p.detach() - got[n].detach()).abs().max().item() for n, p in ref.named_parameters())
    assert worst < 2e-5, worst
    torch.testing.assert_close(final.score_pairs(probe), final_scores.scores, atol=1e-6, rtol=0)
    assert final.config.base_model == "tiny:qwen2_vl"
    assert json.loads((out / "final" / "vlm2emb_reranker.json").read_text())["family"] == "qwen2_vl"


class _Saves:
    def __init__(self) -> None:
        self.paths: list[Path] = []

    def on_save(self, state, path: Path) -> None:
        self.paths.append(path)


def _check_tensorboard(out: Path) -> None:
    """The TensorBoard events hold every metrics.jsonl record's loss and accuracy."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "vlm2emb"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for key in ("loss", "accuracy", "lr"):
        assert [e.step for e in events.Scalars(key)] == [r["step"] for r in records]
        assert [e.value for e in events.Scalars(key)] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, digit_images):
    """LoRA with dropout (RNG state), in-batch negatives (rows without their own), batches
    that straddle epochs (6 rows, batch 4); stopped after step 4 as a kill leaves it. The
    first run also reports to TensorBoard and tells a callback about every save."""
    rows = _image_rows(tmp_path, digit_images, 6, negatives=0)
    data = _write(tmp_path, rows)
    ref = tmp_path / "ref"
    recipe = _recipe(ref, data, max_steps=6, save_steps=2, save_total_limit=2)
    recipe["model"]["lora"] = {"r": 4, "dropout": 0.1}
    recipe["train"]["report_to"] = "tensorboard"  # may change on resume: the resumed run has none
    saves = _Saves()
    vlm2emb.train(recipe, callbacks=[saves], progress=False)
    assert saves.paths == [ref / "checkpoints" / f"step-{n}" for n in (2, 4, 6)] + [ref / "final"]
    _check_tensorboard(ref)
    recipe["train"]["report_to"] = []
    kept = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert kept == ["step-4", "step-6"]  # save_total_limit: 2, the last step's checkpoint included

    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-6")
    recipe["output_dir"] = str(resumed)
    vlm2emb.train(recipe, progress=False, **{"train.resume_from": "auto"})
    assert _losses(resumed) == _losses(ref)
    a = load_file(ref / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(a[k].abs().max() > 0 for k in a)  # B starts at zero: the adapter trained
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    # A checkpoint is a loadable reranker too.
    Reranker.from_pretrained(resumed / "checkpoints" / "step-4").score_pairs([("a", "b")])


def test_bad_rows_follow_the_policy(tmp_path, digit_images):
    """A missing image is found when rows load; an image the processor refuses (Qwen2-VL:
    aspect ratio over 200) only when it is preprocessed (the preflight, through the
    reranker's own pair preprocessing). ``error`` stops at the first with one line naming
    the file and line, ``skip`` trains on the rest and counts both."""
    from PIL import Image

    rows = _image_rows(tmp_path, digit_images, 8, negatives=2)
    Image.new("RGB", (2100, 10), (255, 255, 255)).save(tmp_path / "strip.png")
    rows[5]["query"]["image"] = "strip.png"
    rows[2]["query"]["image"] = "missing.png"
    data = _write(tmp_path, rows)

    with pytest.raises(DataError, match=r"train\.jsonl:3.*missing\.png"):
        vlm2emb.train(_recipe(tmp_path / "stop", data, max_steps=1), progress=False)
    assert not (tmp_path / "stop" / "final").exists()
    del rows[2]
    with pytest.raises(DataError, match=r"strip\.jsonl:5.*aspect ratio"):  # strip.png, now on line 5
        recipe = _recipe(tmp_path / "stop2", _write(tmp_path, rows, "strip.jsonl"), max_steps=1)
        vlm2emb.train(recipe, progress=False)
    assert not (tmp_path / "stop2" / "final").exists()

    out = tmp_path / "skip"
    recipe = _recipe(out, data, max_steps=1)
    recipe["data"]["on_bad_example"] = "skip"
    vlm2emb.train(recipe, progress=False)
    report = json.loads((out / "data_report.json").read_text())
    assert report["skipped"] == 2 and report["used"] == 6, report
    assert (out / "final" / "model.safetensors").is_file()


def test_recipe_keys_are_checked_for_the_kind(tmp_path):
    data = _write(tmp_path, _text_rows(4))
    with pytest.raises(ConfigError, match=r"train\.loss: 'distill' is an embedder setting"):
        load_recipe(None, [f"data.train={data}", "model.kind=reranker", "train.loss=distill"])
    with pytest.raises(ConfigError, match=r"train\.temperature: .*use rerank\.temperature"):
        load_recipe(None, [f"data.train={data}", "model.kind=reranker", "train.temperature=0.1"])
    with pytest.raises(
        ConfigError, match=r"data\.streaming: True is not available for model.kind: reranker yet"
    ):
        load_recipe(None, [f"data.train={data}", "model.kind=reranker", "data.streaming=true"])
    with pytest.raises(
        ConfigError, match=r"rerank\.group_size: 8 is a reranker setting; set model\.kind: reranker"
    ):
        load_recipe(None, [f"data.train={data}", "rerank.group_size=8"])
    with pytest.raises(ConfigError, match=r"rerank\.group_size: must be at least 2"):
        load_recipe(None, [f"data.train={data}", "model.kind=reranker", "rerank.group_size=1"])
    with pytest.raises(ConfigError, match=r"rerank\.template: \{query\} must appear exactly once"):
        load_recipe(
            None, [f"data.train={data}", "model.kind=reranker", "rerank.template=no fields {candidate}"]
        )
    with pytest.raises(
        ConfigError, match=r"model\.kind: unknown model kind 'cross'; known kinds: embedder, reranker"
    ):
        load_recipe(None, [f"data.train={data}", "model.kind=cross"])
    with pytest.raises(ConfigError, match=r"rerank\.colour"):
        load_recipe(None, [f"data.train={data}", "model.kind=reranker", "rerank.colour=red"])
    cfg = load_recipe(REPO / "recipes" / "rerank" / "tiny.yaml")
    assert cfg.model.kind == "reranker" and cfg.rerank.group_size == 4


def test_kind_registry_refuses_duplicates_and_unknown_names():
    from vlm2emb.train.kinds import get_model_kind, register_model_kind, unregister_model_kind

    reranker = get_model_kind("reranker")
    assert reranker.name == "reranker" and get_model_kind("embedder").name == "embedder"
    with pytest.raises(ValueError, match="already registered"):
        register_model_kind(reranker)
    with pytest.raises(ValueError, match="built in"):
        unregister_model_kind("reranker")
    with pytest.raises(TypeError, match="ModelKind"):
        register_model_kind(object())


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=launch_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, digit_images) -> str:
    """Eight image rows then eight text-only rows: with data.homogeneous every global batch is
    one dataset's, so an epoch (4 steps of 4) has two batches with no image at all."""
    folder = tmp_path_factory.mktemp("mixed")
    return _write(folder, _image_rows(folder, digit_images, 8, negatives=1) + _text_rows(8))


DIST = [
    "train.max_steps=4",
    "train.batch_size=4",
    "train.log_steps=1",
    "data.homogeneous=true",
    "--no-progress",
]


def _cli(data: str, out: Path) -> list[str]:
    return ["-m", "vlm2emb", "train", str(REPO / "recipes" / "rerank" / "tiny.yaml"), f"output_dir={out}",
            f"data.train={data}", "data.max_rows=[0]", "train.save_steps=0", *DIST]  # fmt: skip


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, mixed_data) -> Path:
    out = tmp_path_factory.mktemp("single")
    _run([sys.executable, *_cli(mixed_data, out)])
    return out


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(
    ("config", "extra"),
    [
        ("ddp", ()),
        ("zero3", ()),
        ("ddp", ("train.gradcache_chunk_size=5",)),
        ("zero2", ("train.gradcache_chunk_size=5",)),
        ("zero3", ("train.gradcache_chunk_size=5",)),
    ],
    # ZeRO-2 runs with GradCache only: its optimizer sharding is the embedder's (tested
    # there without GradCache); what is the reranker's own is DeepSpeed's single backward.
    ids=["ddp", "zero3", "ddp-gradcache", "zero2-gradcache", "zero3-gradcache"],
)
@pytest.mark.xdist_group("rerank-distributed")  # one worker builds single_run (--dist loadgroup)
def test_two_processes_equal_one(single_run, mixed_data, tmp_path, config, extra):
    """Same losses, accuracies and weights on 2 processes (gloo, CPU) as on one, with the
    global batch split in two. The text-only batches run the blank-image pair on both
    processes: without it DDP (its unused-parameter search off, the probe batch has images)
    would wait for the vision tower's gradients and fail. With GradCache each process scores
    its pairs in chunks of 5 and reduces once, after the last chunk's backward (under DeepSpeed:
    one checkpointed backward over all chunks). Under ZeRO-3
    the LM is loaded partitioned, the yes/no logits come through the head's own forward (the
    only place its whole weight exists) and final/ is written from the gathered weights."""
    out = tmp_path / config
    log = _run([*accelerate_launch(config), *_cli(mixed_data, out), *extra])
    assert "over 2 process(es)" in log
    if config == "zero3":
        assert "ZeRO-3: model loaded partitioned" in log
    assert "DDP searches for unused parameters" not in log
    ref_records = [json.loads(x) for x in (single_run / "metrics.jsonl").read_text().splitlines()]
    got_records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in got_records] == pytest.approx([r["loss"] for r in ref_records], abs=1e-5)
    assert [r["accuracy"] for r in got_records] == pytest.approx(
        [r["accuracy"] for r in ref_records], abs=1e-6
    )
    # The first step's gradient (before any optimizer step) agrees to float rounding. Later
    # steps start from weights that already differ by AdamW's amplified rounding (below), and
    # their norms drift by about 1e-4 relative; how much depends on the CPU's kernels (under
    # ZeRO-3 also on the whole-vocabulary head GEMM that gives the yes/no logits).
    got_norms = [r["grad_norm"] for r in got_records]
    ref_norms = [r["grad_norm"] for r in ref_records]
    assert got_norms[0] == pytest.approx(ref_norms[0], rel=1e-4)
    assert got_norms[1:] == pytest.approx(ref_norms[1:], rel=1e-3)
    ref = load_file(single_run / "final" / "model.safetensors")
    got = load_file(out / "final" / "model.safetensors")
    assert ref.keys() == got.keys()
    diff = torch.cat([(ref[k] - got[k]).abs().flatten() for k in ref])
    # AdamW normalises each element's step, so an element whose gradient is at float-rounding
    # level (many, in a random tiny reranker: its first steps' gradient norm is ~4e-3) moves by
    # up to the learning rate either way when the two processes' gradients are summed in
    # another order. All but a few hundredths of a percent agree to 2e-5; none by more than
    # 0.4 of the summed learning rates (2.5e-3 over the four steps): a wrong gradient moves
    # most elements, not a few.
    assert float((diff > 2e-5).float().mean()) < 1e-3, int((diff > 2e-5).sum())
    assert float(diff.max()) < 1e-3, float(diff.max())


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_lora_run_resumes_to_the_uninterrupted_weights(mixed_data, tmp_path):
    """ZeRO-3 with LoRA: the gathered save writes base + adapter under the checkpoint key
    names (loadable as a reranker), and a run cut after step 2 resumes to the same adapter."""
    ref = tmp_path / "ref"
    lora = ["model.lora.r=4", "model.lora.dropout=0.1", "train.save_total_limit=2"]
    cli = [*accelerate_launch("zero3"), *_cli(mixed_data, ref), "train.save_steps=2", *lora]
    _run(cli)
    resumed = tmp_path / "resumed"
    shutil.copytree(ref, resumed)
    shutil.rmtree(resumed / "final")
    shutil.rmtree(resumed / "checkpoints" / "step-4")
    log = _run([*accelerate_launch("zero3"), *_cli(mixed_data, resumed), "train.save_steps=2", *lora,
                "train.resume_from=auto"])  # fmt: skip
    assert "step-2" in log
    assert _losses(resumed) == _losses(ref)
    a = load_file(ref / "final" / "adapter" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # B starts at zero: it trained
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # The base weights are the untrained tiny backbone's, under the class's own key names.
    base = load_file(ref / "final" / "model.safetensors")
    orig = load_file(ref / "tiny-backbone" / "model.safetensors")
    assert base.keys() == orig.keys()
    assert all(torch.equal(base[k], orig[k]) for k in orig)
    merged = Reranker.from_pretrained(ref / "final")  # the adapter merged in, by default
    kept = Reranker.from_pretrained(ref / "final", merge_lora=False)
    assert kept.has_lora and not merged.has_lora
    pairs = [("a", "b"), ("seven", "7")]
    assert torch.allclose(kept.score_pairs(pairs), merged.score_pairs(pairs), atol=1e-5)


@pytest.mark.parametrize("single_backward", [False, True], ids=["per-chunk", "one-backward"])
def test_gradcache_chunks_give_the_plain_step_gradient(tmp_path, digit_images, single_backward):
    """train.gradcache_chunk_size for the reranker: scores of 5-pair chunks without a graph,
    then each chunk again with its cached score gradients (one backward per chunk, or one
    checkpointed backward for all, DeepSpeed's form), against one forward of all pairs (same
    batch, collated by the trainer's collator with text-only chunks that get the blank-image
    pair)."""
    from vlm2emb.rerank.kind import RerankCollator, RerankStep

    rows = _image_rows(tmp_path, digit_images, 4, negatives=1) + _text_rows(4)
    examples = load_train_examples([_write(tmp_path, rows)])
    model = Reranker.from_pretrained("tiny:qwen2_vl", seed=0).train()
    model.inputs.always_run_vision = True

    def gradient(chunk_size: int) -> tuple[float, dict[str, torch.Tensor], int]:
        batch = RerankCollator(model.inputs, 3, seed=0, chunk_size=chunk_size)(examples)
        step = RerankStep(model, 0.5, gradcache=chunk_size > 0, single_backward=single_backward)
        loss = step.forward_loss(batch)
        calls: list[bool] = []
        step.backward(loss, lambda t, sync: (calls.append(sync), t.backward()))
        assert calls == ([True] if single_backward or not chunk_size else [False] * 4 + [True])
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return float(loss.detach()), grads, len(batch.chunks)

    loss, plain, n_plain = gradient(0)
    loss_c, chunked, n_chunks = gradient(5)
    assert (n_plain, n_chunks) == (1, 5)  # 8 rows x 3 candidates = 24 pairs
    assert loss_c == pytest.approx(loss, abs=1e-6)
    assert plain.keys() == chunked.keys() and any("visual" in n for n in plain)
    for name, grad in plain.items():
        torch.testing.assert_close(chunked[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_checkpointing_gives_the_same_gradient(tmp_path, digit_images):
    """model.gradient_checkpointing for the reranker: one step's LoRA gradients (frozen token
    embeddings, so the first block's input is made to require grad) equal those without."""
    from vlm2emb.rerank.kind import RerankCollator, RerankStep

    examples = load_train_examples([_write(tmp_path, _image_rows(tmp_path, digit_images, 4, negatives=2))])

    def gradient(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = Reranker.from_pretrained("tiny:qwen2_vl", seed=0)
        model.apply_lora(r=4, alpha=8, dropout=0.0, seed=0)
        if checkpointing:
            model.enable_gradient_checkpointing()
        # transformers marks the blocks' owners it will checkpoint.
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        model.train()
        step = RerankStep(model, 0.5)
        step.backward(
            step.forward_loss(RerankCollator(model.inputs, 3, seed=0)(examples)), lambda t, _: t.backward()
        )
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradient(False), gradient(True)
    assert plain.keys() == checkpointed.keys() and plain
    # B starts at zero, so only B has a gradient at the first step: the graph reached every block.
    assert all(g is not None and g.abs().max() > 0 for n, g in checkpointed.items() if "lora_B" in n)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_evaluation_during_training_and_best(tmp_path, digit_images):
    """data.eval with train.eval_steps: eval_before.json, eval.json and best/ as for the
    embedder, the reranker's metrics (each row's candidates ranked by reranker score)
    recomputed by hand from final/'s and best/'s score_pairs."""
    rows = _image_rows(tmp_path, digit_images, 6, negatives=2)
    eval_rows = [
        {
            "query": {"image": f"digit{i}.png"},
            "candidates": [{"text": CAPTIONS[(i + k) % 10]} for k in (2, 0, 5, 7)],
            "positive": 1,
            "task": "digits" if i < 3 else "digits-b",
        }
        for i in range(6)
    ]
    out = tmp_path / "run"
    recipe = _recipe(out, _write(tmp_path, rows), max_steps=4, eval_steps=2)
    recipe["data"]["eval"] = [_write(tmp_path, eval_rows, "eval.jsonl")]
    summary = vlm2emb.train(recipe, progress=False)

    def by_hand(model_dir: Path) -> dict[str, float]:
        model = Reranker.from_pretrained(model_dir)
        hits, rrs = {}, {}
        for row in eval_rows:
            query = {"image": str(tmp_path / row["query"]["image"])}
            scores = model.score_pairs([(query, c) for c in row["candidates"]]).tolist()
            rank = 1 + sum(s >= scores[1] for j, s in enumerate(scores) if j != 1)  # ties: pessimistic
            hits.setdefault(row["task"], []).append(float(rank == 1))
            rrs.setdefault(row["task"], []).append(1.0 / rank)
        mean = lambda d: sum(sum(v) / len(v) for v in d.values()) / len(d)  # noqa: E731
        return {"hit@1": mean(hits), "mrr": mean(rrs)}

    report = json.loads((out / "eval.json").read_text())
    assert report == summary["eval"] and set(report["tasks"]) == {"digits", "digits-b"}
    want = by_hand(out / "final")
    assert report["average"]["hit@1"] == pytest.approx(want["hit@1"])
    assert report["average"]["mrr"] == pytest.approx(want["mrr"], abs=1e-9)
    assert (out / "eval_before.json").is_file()
    best = json.loads((out / "best.json").read_text())
    assert best["metric"] == "hit@1" and best["step"] in (2, 4)
    assert by_hand(out / "best")["hit@1"] == pytest.approx(best["value"])
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "eval" in x]
    assert [r["step"] for r in evals] == [2, 4]
