"""Side-by-side benchmark harness: vlm2emb vs sentence-transformers vs a naive VLM2Vec-style loop.

    python benchmarks/run.py --suite cpu --out results_cpu.json
    python benchmarks/run.py --suite gpu --out results_gpu.json      # needs CUDA
    python benchmarks/run.py --suite cpu --quick --out smoke.json    # a 1-minute check

Every comparison runs in one process on the same model directory, the same items and the
same batches, interleaved (A B A B ... with the order flipped every round) so that a slow
moment of the machine hits all contenders alike; a table row reports the median of the
rounds and the ratio of medians.

What is measured:

- **encode**: items/s of ``EmbeddingModel.encode`` (batches sorted by token count,
  collation of the next batches in a worker thread) against sentence-transformers'
  ``encode`` on the same local directory, for text items and for a mix of image+text and
  text items, and against a naive loop that embeds the items in the given order with no
  sorting and no prefetching (how VLM2Vec's evaluation embeds). ``forward_only`` times the
  model's forward alone on encode()'s batches, collated beforehand: the ceiling of any
  encode of the same model, whose ratio to sentence-transformers bounds what faster
  batching and collation can reach. The directory is a
  ``vlm2emb export --format sentence-transformers`` export, whose chat template makes
  sentence-transformers render exactly vlm2emb's prompts; embeddings are checked to agree
  first (``*_max_abs_diff_vs_st``).
- **train**: samples/s and real tokens/s of one contrastive step (forward, InfoNCE,
  backward, AdamW) on mixed-length pairs. vlm2emb uses its length-grouped batches; the
  naive baseline takes the same examples in random batches padded to the longest (VLM2Vec's
  collator, last-token pooling). Collation is done before timing (data loader workers do it
  in real training), so the step time is the model's. Padding efficiency = real tokens /
  computed tokens (batch x padded length, queries and targets).
- **gradcache**: the GradCache step against the plain step on the same batches.
- **st-train**: vlm2emb's plain and GradCache steps against sentence-transformers'
  MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss (its GradCache) on the
  same text pairs and batches, with the same chunk size.
- **memory**: peak memory per training mode, each in a fresh subprocess on CPU (peak
  resident set) or from ``torch.cuda.max_memory_allocated`` on GPU.
- **mfu**: model FLOP utilisation of the full fine-tune and the LoRA step (vlm2emb's
  length-grouped batches of ``mfu_batch`` rows). The FLOPs of one step (forward, loss,
  backward; no gradient checkpointing, so no recomputation is counted) are counted by
  ``torch.utils.flop_counter.FlopCounterMode`` and written out in the JSON with the real
  tokens and image patches they cover; MFU = counted FLOPs / step time / the device's dense
  bf16 peak (``PEAK_TFLOPS`` by device name, or ``--peak-tflops``). On CPU torch has no
  FLOP formula for its fused attention kernel, so the CPU count leaves attention out and
  reports achieved TFLOP/s only.
- **packing** (only with ``--only packing``): items/s of ``encode`` with padded batches
  against packed ones (``pack_sequences``, same weights and batches), the padding
  efficiency of encode()'s padded batches, and the embeddings' largest difference.

Text is real English of mixed length without a download: docstrings of the Python standard
library (query: a function's name and summary line; target: its whole docstring). Images are
scikit-learn's handwritten digits (real scans), upscaled.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import platform
import random
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
H100_BF16_PEAK = 989e12


# ---------------------------------------------------------------------------------- suites
@dataclass
class Suite:
    """Sizes of one benchmark suite."""

    name: str
    device: str
    dtype: str  # weight dtype for encode; training uses fp32 weights (+ bf16 autocast on GPU)
    encode_items: int
    encode_batch: int
    train_batch: int
    train_batches: int  # global batches per round and mode (each round runs all of them)
    gradcache_chunk: int
    rounds: int
    max_target_words: int
    image_fraction: float
    image_size: int
    length_buckets: int = 4  # train.length_buckets for vlm2emb's plain step
    # encode's image-only workload: sizes drawn uniformly from this range (pixels per side)
    varied_image_sizes: tuple[int, int] = (48, 200)
    lora: bool = False
    mfu_batch: int = 16  # the FLOP-utilisation steps (no gradient checkpointing, so smaller on GPU)
    modes: list[str] = field(default_factory=lambda: ["encode", "train", "gradcache", "st", "memory", "mfu"])


SUITES = {
    "cpu": Suite(
        name="cpu",
        device="cpu",
        dtype="fp32",
        encode_items=768,
        encode_batch=32,
        train_batch=64,
        train_batches=16,
        gradcache_chunk=32,
        rounds=5,
        max_target_words=50,
        image_fraction=0.25,
        image_size=56,
    ),
    "gpu": Suite(
        name="gpu",
        device="cuda",
        dtype="bf16",
        encode_items=512,
        encode_batch=32,
        train_batch=32,
        train_batches=4,
        gradcache_chunk=16,
        rounds=3,
        max_target_words=190,  # about 256 tokens, VLM2Vec's text bound
        image_fraction=0.5,
        image_size=1000,  # under VLM2Vec's 28*28*1280-pixel bound (about 1003x1003)
        varied_image_sizes=(224, 1000),
        lora=True,
        # The count runs without gradient checkpointing: at 8 rows a full fine-tune of the 2B
        # model with ~5,000-patch images needs about 90 GiB (fp32 weights, gradients and AdamW
        # moments 35 GiB, activations ~50 GiB); 4 rows should fit an 80 GB H100.
        mfu_batch=4,
    ),
}


def quick(suite: Suite) -> Suite:
    """A fast smoke version of a suite (numbers are not meaningful)."""
    return Suite(
        **{
            **asdict(suite),
            "encode_items": 64,
            "encode_batch": 16,
            "train_batch": 16,
            "train_batches": 2,
            "gradcache_chunk": 8,
            "rounds": 2,
            "max_target_words": 40,
        }
    )


# ---------------------------------------------------------------------------------- data
_STDLIB = [
    "abc",
    "argparse",
    "ast",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "codecs",
    "collections",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fnmatch",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "lzma",
    "math",
    "mimetypes",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "signal",
    "socket",
    "sqlite3",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "tokenize",
    "traceback",
    "types",
    "typing",
    "unittest",
    "urllib.parse",
    "uuid",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
]


def text_pairs(max_words: int) -> list[tuple[str, str]]:
    """(query, target) pairs from standard-library docstrings, sorted for determinism."""
    seen: set[str] = set()
    pairs = []
    for mod_name in _STDLIB:
        with contextlib.suppress(Exception):
            mod = importlib.import_module(mod_name)
            for name, obj in sorted(vars(mod).items()):
                if name.startswith("_") or not callable(obj):
                    continue
                doc = inspect.getdoc(obj) or ""
                words = re.sub(r"\s+", " ", doc).strip().split(" ")
                if len(words) < 6 or doc in seen:
                    continue
                seen.add(doc)
                summary = " ".join(words[: min(len(words), 16)]).split(". ")[0]
                pairs.append((f"{mod_name}.{name}: {summary}", " ".join(words[:max_words])))
    return pairs


def digit_images(n: int, size: int, seed: int = 0) -> list[tuple[Any, int]]:
    """``n`` (PIL image, label) pairs of scikit-learn's 8x8 digit scans upscaled to ``size``."""
    import numpy as np
    from PIL import Image

    from vlm2emb.data.demo import load_digit_scans

    scans, labels = load_digit_scans()
    rng = np.random.default_rng(seed)
    out = []
    for i in rng.choice(len(scans), size=n, replace=True):
        arr = (scans[i] * (255.0 / 16.0)).astype("uint8")
        img = Image.fromarray(arr).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        out.append((img, int(labels[i])))
    return out


_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def training_rows(suite: Suite, n: int, seed: int = 0, images: bool = True) -> list[Any]:
    """``n`` TrainExamples: docstring pairs, a share of them digit-image queries."""
    from vlm2emb.data.schema import TrainExample

    rng = random.Random(seed)
    pairs = text_pairs(suite.max_target_words)
    rng.shuffle(pairs)
    n_img = int(n * suite.image_fraction) if images else 0
    imgs = digit_images(n_img, suite.image_size, seed)
    rows = []
    for i in range(n):
        if i < n_img:
            img, label = imgs[i]
            rows.append(
                TrainExample(
                    query={"text": "Which digit is written here?", "images": [img]},
                    positive={"text": f"a handwritten digit {_NAMES[label]}", "images": []},
                    source=f"digits:{i}",
                )
            )
        else:
            q, t = pairs[i % len(pairs)]
            rows.append(
                TrainExample(
                    query={"text": q, "images": []}, positive={"text": t, "images": []}, source=f"doc:{i}"
                )
            )
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------- timing
def _now(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, device: str) -> dict[str, list[float]]:
    """Seconds per call of each function over ``rounds`` rounds, alternating the order."""
    for fn in fns.values():  # warm-up (allocator, kernel caches, lazy imports)
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = _now(device)
            fns[name]()
            times[name].append(_now(device) - t0)
    return times


def _summary(times: dict[str, list[float]], work: dict[str, float], unit: str, ref: str) -> dict[str, Any]:
    """Median seconds, throughput (work / median) and speed ratio against ``ref`` per contender."""
    out: dict[str, Any] = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        out[name] = {
            "median_s": round(med, 4),
            "all_s": [round(t, 4) for t in ts],
            unit: round(work[name] / med, 2),
            "speedup_vs_" + ref: round(statistics.median(times[ref]) / med, 3),
        }
    return out


# ---------------------------------------------------------------------------------- models
def build_model_dir(suite: Suite, work: Path) -> Path:
    """The local directory both libraries load: a backbone (tiny Qwen2-VL on cpu, the 2B
    architecture with random weights on gpu) with last-token pooling, written by
    ``vlm2emb export --format sentence-transformers`` (a transformers model directory plus
    sentence-transformers' module files and a chat template that renders vlm2emb's prompt,
    so sentence-transformers embeds images too, and equally)."""
    from vlm2emb.export import export_model

    out = work / f"{suite.name}_backbone_st"
    if (out / "modules.json").exists():
        return out
    if suite.name == "gpu":
        sys.path.insert(0, str(HERE))
        from gpu_foundation import build_model

        model = build_model()
        model.config.pooling = "last"
    else:
        from vlm2emb import EmbeddingModel

        model = EmbeddingModel.from_pretrained("tiny:qwen2_vl", pooling="last")
    src = model.save_pretrained(work / f"{suite.name}_backbone")
    del model
    if suite.device == "cuda":
        torch.cuda.empty_cache()
    export_model(src, out, format="sentence-transformers", overwrite=True)
    return out


def load_vlm2emb(path: Path, suite: Suite, dtype: str) -> Any:
    from vlm2emb import EmbeddingModel

    return EmbeddingModel.from_pretrained(str(path), device=suite.device, torch_dtype=dtype, pooling="last")


def load_st(path: Path, suite: Suite, dtype: str) -> Any:
    """sentence-transformers on the same directory (its modules.json: Transformer, last-token
    pooling, normalisation, as ours)."""
    from sentence_transformers import SentenceTransformer

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return SentenceTransformer(str(path), device=suite.device, model_kwargs={"dtype": torch_dtype})


# ---------------------------------------------------------------------------------- encode
def _plain_item(item: dict[str, Any]) -> Any:
    """A training item as both libraries take it: a string, or {"text", "image"}."""
    if not item.get("images"):
        return item["text"]
    return {"text": item["text"], "image": item["images"][0]}


def encode_workloads(suite: Suite) -> dict[str, list[Any]]:
    """encode()'s workloads: ``text`` (queries and docstrings), ``mixed`` (the training
    queries: image+text and text items) and ``images`` (image-only items of sizes drawn from
    ``suite.varied_image_sizes``, one processor resize per item, none shared)."""
    rows = training_rows(suite, suite.encode_items, seed=1)
    texts = [t for i, ex in enumerate(rows) if (t := (ex.positive if i % 2 else ex.query)["text"])]
    mixed = [_plain_item(ex.query) for ex in rows]
    rng = random.Random(7)
    lo, hi = suite.varied_image_sizes
    n_images = max(8, int(suite.encode_items * suite.image_fraction))
    images = [digit_images(1, rng.randint(lo, hi), seed=i)[0][0] for i in range(n_images)]
    return {"text": texts, "mixed": mixed, "images": images}


def bench_encode(suite: Suite, path: Path, compile_blocks: bool = False) -> dict[str, Any]:
    model = load_vlm2emb(path, suite, suite.dtype)
    st = load_st(path, suite, suite.dtype)
    compiled = None
    if compile_blocks:  # a second copy with EmbeddingModel.compile_blocks()
        compiled = load_vlm2emb(path, suite, suite.dtype)
        compiled.compile_blocks()
    workloads = encode_workloads(suite)
    bs = suite.encode_batch

    def naive(items: list[Any]) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for s in range(0, len(items), bs):
                out.append(model(model.collate(items[s : s + bs])).cpu())
        return torch.cat(out)

    def collated(items: list[Any]) -> list[dict[str, Any]]:
        """encode()'s batches, collated before timing."""
        from vlm2emb.inputs import length_sorted_batches

        plan = length_sorted_batches(items, model.adapter.tokenizer, bs)
        return [model.collate([items[i] for i in batch]) for batch in plan]

    def forward_only(batches: list[dict[str, Any]]) -> None:
        with torch.inference_mode():
            for batch in batches:
                model(batch).cpu()

    result: dict[str, Any] = {"batch_size": bs}
    for name, items in workloads.items():
        probe = items[:8] + [x for x in items if isinstance(x, dict)][:8]
        ours = model.encode(probe, batch_size=bs)
        theirs = torch.as_tensor(st.encode(probe, batch_size=bs, convert_to_numpy=True)).float()
        result[f"{name}_max_abs_diff_vs_st"] = float((ours - theirs).abs().max())
        batches = collated(items)
        contenders = {
            "vlm2emb": lambda items=items: model.encode(items, batch_size=bs),
            "sentence-transformers": lambda items=items: st.encode(items, batch_size=bs),
            "naive": lambda items=items: naive(items),
            # The model's forward alone on encode()'s batches: the ceiling of any encode
            # that runs the same model (both libraries do), i.e. with free collation.
            "forward_only": lambda batches=batches: forward_only(batches),
        }
        if compiled is not None:
            # The first pass compiles (for these shapes); it is timed apart, not in the rows.
            t0 = time.perf_counter()
            compiled.encode(items, batch_size=bs)
            result[f"{name}_compiled_first_pass_s"] = round(time.perf_counter() - t0, 2)
            # Against the eager probe embeddings above (the compiled graphs exist by now).
            result[f"{name}_compiled_max_abs_diff"] = float(
                (compiled.encode(probe, batch_size=bs) - ours).abs().max()
            )
            contenders["vlm2emb_compiled"] = lambda items=items: compiled.encode(items, batch_size=bs)
        times = interleaved(contenders, suite.rounds, suite.device)
        result[name] = {"items": len(items)} | _summary(
            times, dict.fromkeys(times, len(items)), "items_per_s", "sentence-transformers"
        )
    result["mixed"]["image_fraction"] = suite.image_fraction
    return result


def bench_packing(suite: Suite, path: Path) -> dict[str, Any]:
    """encode() with padded batches against packed ones (``pack_sequences``), same weights.

    Not in the default modes (``--only packing``): on the CPU suite's tiny model the
    decoder is a small share of the time, so this measures mostly the packing overhead.
    """
    from vlm2emb import EmbeddingModel

    padded = load_vlm2emb(path, suite, suite.dtype)
    packed = EmbeddingModel.from_pretrained(
        str(path), device=suite.device, torch_dtype=suite.dtype, pooling="last", pack_sequences=True
    )
    bs = suite.encode_batch
    result: dict[str, Any] = {"batch_size": bs}
    for name, items in encode_workloads(suite).items():
        from vlm2emb.inputs import length_sorted_batches

        plan = length_sorted_batches(items, padded.adapter.tokenizer, bs)
        masks = [padded.collate([items[i] for i in batch])["attention_mask"] for batch in plan]
        result[f"{name}_padding_efficiency"] = round(
            sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks), 3
        )
        result[f"{name}_max_abs_diff"] = float(
            (packed.encode(items[:64], batch_size=bs) - padded.encode(items[:64], batch_size=bs)).abs().max()
        )
        times = interleaved(
            {
                "padded": lambda items=items: padded.encode(items, batch_size=bs),
                "packed": lambda items=items: packed.encode(items, batch_size=bs),
            },
            suite.rounds,
            suite.device,
        )
        result[name] = {"items": len(items)} | _summary(
            times, dict.fromkeys(times, len(items)), "items_per_s", "padded"
        )
    return result


# ---------------------------------------------------------------------------------- train
def _batches_grouped(rows: list[Any], batch: int, seed: int, tokenizer: Any) -> list[list[Any]]:
    """vlm2emb's length-grouped global batches over ``rows`` (the trainer's sampler with
    ``data.group_by_length=true``)."""
    from vlm2emb.data.sampler import GlobalBatchSampler, grouping_keys

    lengths = grouping_keys(rows, tokenizer)
    sampler = GlobalBatchSampler(len(rows), batch, seed, lengths=lengths)
    return [[rows[i] for i in sampler.global_batch(s)] for s in range(sampler.batches_per_epoch)]


def _batches_random(rows: list[Any], batch: int, seed: int, tokenizer: Any = None) -> list[list[Any]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [[rows[i] for i in order[s : s + batch]] for s in range(0, len(order) - batch + 1, batch)]


def _tokens(batch: dict[str, Any]) -> tuple[int, int]:
    """(real tokens, computed tokens) of a collated training batch."""
    real = computed = 0
    for chunk in [*batch.query, *batch.positive, *batch.negatives]:
        mask = chunk["attention_mask"]
        real += int(mask.sum())
        computed += mask.numel()
    return real, computed


class _Stepper:
    """One vlm2emb training step on pre-collated batches, cycling through them."""

    def __init__(self, model: Any, batches: list[dict[str, Any]], chunk: int, suite: Suite) -> None:
        from vlm2emb.gradcache import ContrastiveStep
        from vlm2emb.losses import InfoNCELoss

        self.model, self.batches, self.suite = model, batches, suite
        self.step = ContrastiveStep(
            model,
            InfoNCELoss(temperature=model.config.temperature),
            gradcache=chunk > 0,
            device=torch.device(suite.device),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-6)

    def __call__(self) -> None:
        for batch in self.batches:
            with torch.autocast(self.suite.device, dtype=torch.bfloat16, enabled=self.suite.device == "cuda"):
                loss = self.step.forward_loss(batch)
                self.step.backward(loss, lambda t, _sync: t.backward())
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)


def _train_model(path: Path, suite: Suite) -> Any:
    model = load_vlm2emb(path, suite, "fp32")
    if suite.lora:
        model.apply_lora(r=16, alpha=64, dropout=0.0)
    return model.train()


def bench_train(suite: Suite, path: Path) -> dict[str, Any]:
    from vlm2emb.data.collate import ContrastiveCollator

    rows = training_rows(suite, suite.train_batch * suite.train_batches, seed=2)
    model = _train_model(path, suite)
    torch.manual_seed(0)
    result: dict[str, Any] = {"batch_size": suite.train_batch, "batches_per_round": suite.train_batches}
    collated = {}
    for name, make in (("vlm2emb", _batches_grouped), ("naive", _batches_random)):
        buckets = suite.length_buckets if name == "vlm2emb" else 1
        collate = ContrastiveCollator(model.inputs, chunk_size=0, length_buckets=buckets)
        collated[name] = [collate(b) for b in make(rows, suite.train_batch, 0, model.adapter.tokenizer)]
        real, computed = map(sum, zip(*(_tokens(b) for b in collated[name])))
        result[f"padding_efficiency_{name}"] = round(real / computed, 3)
        result[f"real_tokens_per_batch_{name}"] = real / len(collated[name])
    steppers = {name: _Stepper(model, batches, 0, suite) for name, batches in collated.items()}
    times = interleaved(steppers, suite.rounds, suite.device)
    samples = suite.train_batch * suite.train_batches
    result["step"] = _summary(times, dict.fromkeys(times, samples), "samples_per_s", "naive")
    for name in times:
        med = statistics.median(times[name])
        result["step"][name]["real_tokens_per_s"] = round(
            result[f"real_tokens_per_batch_{name}"] * suite.train_batches / med, 1
        )
    return result


def bench_gradcache(suite: Suite, path: Path) -> dict[str, Any]:
    from vlm2emb.data.collate import ContrastiveCollator

    rows = training_rows(suite, suite.train_batch * suite.train_batches, seed=3)
    model = _train_model(path, suite)
    grouped = _batches_grouped(rows, suite.train_batch, 0, model.adapter.tokenizer)
    # The plain step gets the same length-sorted sub-batches as GradCache's chunks, so the
    # ratio measures GradCache's extra work only, not a difference in padding.
    buckets = -(-suite.train_batch // suite.gradcache_chunk)
    plain = [ContrastiveCollator(model.inputs, chunk_size=0, length_buckets=buckets)(b) for b in grouped]
    cached = [ContrastiveCollator(model.inputs, chunk_size=suite.gradcache_chunk)(b) for b in grouped]
    times = interleaved(
        {"plain": _Stepper(model, plain, 0, suite), "gradcache": _Stepper(model, cached, 1, suite)},
        suite.rounds,
        suite.device,
    )
    samples = suite.train_batch * suite.train_batches
    out = {"batch_size": suite.train_batch, "chunk": suite.gradcache_chunk}
    out |= _summary(times, dict.fromkeys(times, samples), "samples_per_s", "plain")
    out["overhead"] = round(statistics.median(times["gradcache"]) / statistics.median(times["plain"]), 3)
    return out


# Dense bf16 peak (no sparsity) of the SXM parts, TFLOP/s, matched against the device name.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak_flops(suite: Suite, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if suite.device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((tf * 1e12 for key, tf in PEAK_TFLOPS.items() if key in name), None)


def count_step_flops(model: Any, batch: dict[str, Any], suite: Suite) -> dict[str, int]:
    """FLOPs of one training step on ``batch`` (forward, loss, backward; no optimizer step),
    counted by torch's FlopCounterMode: in total and inside the vision tower (its forward,
    and its backward where it trains). Gradients are cleared afterwards.

    The counting pass runs the language model with eager attention (plain matmuls; the same
    FLOPs as SDPA computes): torch has no FLOP formula for the CPU SDPA kernel, and the CUDA
    one rejects grouped-query attention. The vision tower keeps SDPA on CUDA.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from vlm2emb.gradcache import ContrastiveStep
    from vlm2emb.losses import InfoNCELoss

    device = torch.device(suite.device)
    step = ContrastiveStep(
        model, InfoNCELoss(temperature=model.config.temperature), gradcache=False, device=device
    )
    base = model.base_backbone
    before = base.config._attn_implementation
    # set_attn_implementation(before) below resets every sub-config to ``before``: the vision
    # tower's packed varlen attention is put back by hand.
    tower = model.adapter.vision_tower(base)
    vision_before = tower.config._attn_implementation if tower is not None else None
    # The language model counts with eager attention (the same matmuls): torch's CUDA SDPA
    # formula rejects grouped-query attention (torch 2.11), and it has none for the CPU kernel.
    # On CUDA the vision tower keeps its SDPA (per image, counted; eager would keep a
    # [heads, patches, patches] matrix per image and layer for the backward).
    base.set_attn_implementation("eager")
    if tower is not None and device.type == "cuda":
        tower.config._attn_implementation = vision_before
    autocast = torch.autocast(suite.device, dtype=torch.bfloat16, enabled=device.type == "cuda")
    try:
        with FlopCounterMode(display=False) as counter, autocast:
            loss = step.forward_loss(batch)
            step.backward(loss, lambda t, _sync: t.backward())
    finally:
        base.set_attn_implementation(before)
        if tower is not None:
            tower.config._attn_implementation = vision_before
        model.zero_grad(set_to_none=True)
    counts = counter.get_flop_counts()
    vision = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".visual"))
    return {"total": int(counter.get_total_flops()), "vision": int(vision)}


def bench_mfu(suite: Suite, path: Path, peak_tflops: float | None = None) -> dict[str, Any]:
    """Step time, counted FLOPs and MFU of the full fine-tune and the LoRA step."""
    rows = training_rows(suite, suite.mfu_batch * suite.train_batches, seed=5)
    peak = _peak_flops(suite, peak_tflops)
    out: dict[str, Any] = {"batch_size": suite.mfu_batch, "peak_tflops": peak / 1e12 if peak else None}
    for mode in ("full", "lora"):
        try:
            out[mode] = _mfu_mode(suite, path, rows, mode, peak)
        except torch.cuda.OutOfMemoryError:
            # One mode out of memory must not lose the other's numbers (or the other suites').
            out[mode] = {"error": f"CUDA out of memory at mfu_batch {suite.mfu_batch}"}
        if suite.device == "cuda":
            torch.cuda.empty_cache()
    return out


def _mfu_mode(suite: Suite, path: Path, rows: list[Any], mode: str, peak: float | None) -> dict[str, Any]:
    from vlm2emb.data.collate import ContrastiveCollator

    model = load_vlm2emb(path, suite, "fp32")
    if mode == "lora":
        model.apply_lora(r=16, alpha=64, dropout=0.0, seed=0)
    model.train()
    collate = ContrastiveCollator(model.inputs, chunk_size=0, length_buckets=suite.length_buckets)
    batches = [collate(b) for b in _batches_grouped(rows, suite.mfu_batch, 0, model.adapter.tokenizer)]
    flops = [count_step_flops(model, b, suite) for b in batches]
    total = sum(f["total"] for f in flops)
    times = interleaved({mode: _Stepper(model, batches, 0, suite)}, suite.rounds, suite.device)[mode]
    med = statistics.median(times)
    patches = sum(int(c["pixel_values"].shape[0]) for b in batches for c in b.query if "pixel_values" in c)
    return {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": len(batches),
        "real_tokens": sum(_tokens(b)[0] for b in batches),
        "image_patches": patches,
        "flops_counted": total,
        "vision_flops": sum(f["vision"] for f in flops),
        "median_s": round(med, 4),
        "all_s": [round(t, 4) for t in times],
        "samples_per_s": round(suite.mfu_batch * len(batches) / med, 2),
        "achieved_tflops": round(total / med / 1e12, 4),
        "mfu": round(total / med / peak, 4) if peak else None,
    }


def bench_st_train(suite: Suite, path: Path) -> dict[str, Any]:
    """vlm2emb vs sentence-transformers training steps on the same text pairs and batches."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from vlm2emb.data.collate import ContrastiveCollator

    rows = training_rows(suite, suite.train_batch * suite.train_batches, seed=4, images=False)
    ours = _train_model(path, suite)
    batches = _batches_grouped(rows, suite.train_batch, 0, ours.adapter.tokenizer)
    st = load_st(path, suite, "fp32")
    st.train()
    scale = 1.0 / 0.05
    st_losses = {
        "st-mnrl": MultipleNegativesRankingLoss(st, scale=scale),
        "st-cached-mnrl": CachedMultipleNegativesRankingLoss(
            st, scale=scale, mini_batch_size=suite.gradcache_chunk
        ),
    }
    st_features = [
        [st.preprocess([ex.query["text"] for ex in b]), st.preprocess([ex.positive["text"] for ex in b])]
        for b in batches
    ]
    st_opt = torch.optim.AdamW(st.parameters(), lr=1e-6)

    def st_step(loss_fn: Any) -> Callable[[], None]:
        def run() -> None:
            for feats in st_features:
                feats = [
                    {k: v.to(suite.device) if hasattr(v, "to") else v for k, v in f.items()} for f in feats
                ]
                with torch.autocast(suite.device, dtype=torch.bfloat16, enabled=suite.device == "cuda"):
                    loss = loss_fn(feats, None)
                loss.backward()
                st_opt.step()
                st_opt.zero_grad(set_to_none=True)

        return run

    fns = {
        "vlm2emb": _Stepper(
            ours, [ContrastiveCollator(ours.inputs, chunk_size=0)(b) for b in batches], 0, suite
        ),
        "vlm2emb-gradcache": _Stepper(
            ours,
            [ContrastiveCollator(ours.inputs, chunk_size=suite.gradcache_chunk)(b) for b in batches],
            1,
            suite,
        ),
        **{name: st_step(fn) for name, fn in st_losses.items()},
    }
    times = interleaved(fns, suite.rounds, suite.device)
    samples = suite.train_batch * suite.train_batches
    out: dict[str, Any] = {"batch_size": suite.train_batch, "chunk": suite.gradcache_chunk}
    out |= _summary(times, dict.fromkeys(times, samples), "samples_per_s", "st-mnrl")
    out["gradcache_vs_st_cached"] = round(
        statistics.median(times["st-cached-mnrl"]) / statistics.median(times["vlm2emb-gradcache"]), 3
    )
    return out


# ---------------------------------------------------------------------------------- memory
def _memory_worker(suite: Suite, path: Path, mode: str) -> dict[str, Any]:
    """Peak memory of two training steps of one mode (run in its own process)."""
    from vlm2emb.data.collate import ContrastiveCollator

    rows = training_rows(suite, suite.train_batch * 2, seed=5)
    model = _train_model(path, suite)
    chunk = suite.gradcache_chunk if mode == "gradcache" else 0
    make = _batches_random if mode == "naive" else _batches_grouped
    buckets = suite.length_buckets if mode == "vlm2emb" else 1
    collate = ContrastiveCollator(model.inputs, chunk_size=chunk, length_buckets=buckets)
    batches = [collate(b) for b in make(rows, suite.train_batch, 0, model.adapter.tokenizer)]
    stepper = _Stepper(model, batches, chunk, suite)
    if suite.device == "cuda":
        stepper()  # optimizer state exists from here on, as in a running job
        torch.cuda.reset_peak_memory_stats()
        stepper()
        return {"peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}
    stepper()
    base = _rss_mib()
    peak = _RssPeak()
    with peak:
        stepper()
    return {"peak_rss_mib": round(peak.value, 1), "step_growth_mib": round(peak.value - base, 1)}


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


class _RssPeak:
    """Highest resident set size seen while the block runs (sampled every 2 ms)."""

    def __enter__(self) -> _RssPeak:
        import threading

        self.value = _rss_mib()
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self.value = max(self.value, _rss_mib())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.value = max(self.value, _rss_mib())


def bench_memory(suite: Suite, path: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for mode in ("vlm2emb", "gradcache", "naive"):
        cmd = [
            sys.executable,
            __file__,
            "--suite",
            suite.name,
            "--memory-worker",
            mode,
            "--work",
            str(args.work),
        ]
        if args.quick:
            cmd.append("--quick")
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(f"memory worker {mode} failed:\n{proc.stderr[-2000:]}")
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


# ---------------------------------------------------------------------------------- report
def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table."""
    lines = ["| measurement | contender | throughput | median s | ratio |", "|---|---|---|---|---|"]

    def add(section: str, data: dict[str, Any], unit: str) -> None:
        for name, v in data.items():
            if not isinstance(v, dict) or unit not in v:
                continue
            ratio = next((f"{v[k]:.2f}x vs {k[11:]}" for k in v if k.startswith("speedup_vs_")), "")
            lines.append(f"| {section} | {name} | {v[unit]:,} {unit} | {v['median_s']} | {ratio} |")

    enc = results.get("encode", {})
    if enc:
        add("encode text", enc["text"], "items_per_s")
        add("encode image+text", enc["mixed"], "items_per_s")
        if "images" in enc:
            add("encode images (varied sizes)", enc["images"], "items_per_s")
    pk = results.get("packing", {})
    if pk:
        add("encode text, packed vs padded", pk["text"], "items_per_s")
        add("encode image+text, packed vs padded", pk["mixed"], "items_per_s")
    if "train" in results:
        add("train step (mixed length)", results["train"]["step"], "samples_per_s")
    if "gradcache" in results:
        add("GradCache vs plain", results["gradcache"], "samples_per_s")
    if "st" in results:
        add("train step (text) vs sentence-transformers", results["st"], "samples_per_s")
    extra = []
    if "train" in results:
        t = results["train"]
        extra.append(
            f"padding efficiency: vlm2emb {t['padding_efficiency_vlm2emb']}, naive {t['padding_efficiency_naive']}"
        )
    if "gradcache" in results:
        extra.append(f"GradCache overhead: {results['gradcache']['overhead']}x the plain step")
    if "memory" in results:
        extra.append("peak memory: " + json.dumps(results["memory"]))
    for mode in ("full", "lora"):
        m = results.get("mfu", {}).get(mode)
        if m and "error" in m:
            extra.append(f"{mode} step: {m['error']}")
        elif m:
            mfu = f", MFU {m['mfu']:.1%}" if m["mfu"] is not None else ""
            extra.append(
                f"{mode} step: {m['samples_per_s']} samples/s, {m['flops_counted']:.3e} FLOPs counted, "
                f"{m['achieved_tflops']} TFLOP/s{mfu}"
            )
    return "\n".join([*lines, "", *extra])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    parser.add_argument("--out", default=None, help="write the results JSON here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness runs")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated subset of encode,train,gradcache,st,memory,mfu,packing (packing: not in the default set)",
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--compile", action="store_true", help="encode: also time EmbeddingModel.compile_blocks()"
    )
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)"
    )
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vlm2emb-bench"))
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from vlm2emb._quiet import quiet_third_party

    quiet_third_party()
    suite = quick(SUITES[args.suite]) if args.quick else SUITES[args.suite]
    if args.rounds:
        suite.rounds = args.rounds
    if suite.device == "cuda" and not torch.cuda.is_available():
        parser.error("the gpu suite needs CUDA")
    args.work = Path(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    path = build_model_dir(suite, args.work)
    if args.memory_worker:
        print(json.dumps(_memory_worker(suite, path, args.memory_worker)))
        return 0

    import sentence_transformers
    import transformers

    results: dict[str, Any] = {
        "suite": asdict(suite),
        "date": time.strftime("%Y-%m-%d"),
        "machine": torch.cuda.get_device_name() if suite.device == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }
    modes = args.only.split(",") if args.only else suite.modes
    runners = {
        "encode": lambda: bench_encode(suite, path, args.compile),
        "train": lambda: bench_train(suite, path),
        "gradcache": lambda: bench_gradcache(suite, path),
        "st": lambda: bench_st_train(suite, path),
        "memory": lambda: bench_memory(suite, path, args),
        "mfu": lambda: bench_mfu(suite, path, args.peak_tflops),
        "packing": lambda: bench_packing(suite, path),
    }
    for mode in modes:
        t0 = time.perf_counter()
        results[mode] = runners[mode]()
        print(f"[{mode}] done in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
