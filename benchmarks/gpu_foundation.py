"""GPU measurements for the foundation slice: encode and training-step throughput of a
Qwen2-VL-2B-architecture model with random weights (no download), in bf16.

    python benchmarks/gpu_foundation.py --out results.json

What it measures (each after warm-up, CUDA-synchronised wall clock):
- encode: items/s for a 50/50 mix of image+text queries (448x448 images -> 256 visual
  tokens each) and short captions, batch 32;
- train step: samples/s and peak memory for one InfoNCE step (image+instruction queries vs
  caption targets) with LoRA r16 (VLM2Vec's setting) and with full fine-tuning (fp32 master
  weights, bf16 autocast, gradient checkpointing), AdamW.
- MFU for the train steps: matmul FLOPs counted per weight and per token or patch (see
  bench_train), written out in the JSON; the H100 SXM dense bf16 peak is 989 TFLOP/s.

The architecture numbers are Qwen2-VL-2B-Instruct's published config; the tokenizer is the
tiny offline one (token ids stay within the real vocabulary size, which is all a random
model needs).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

H100_BF16_PEAK = 989e12


def build_model(attn: str = "sdpa"):
    from transformers import Qwen2VLConfig, Qwen2VLModel, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from vlm2emb._quiet import quiet_third_party
    from vlm2emb.backbones.qwen2_vl import Qwen2VLAdapter
    from vlm2emb.model import EmbeddingConfig, EmbeddingModel

    quiet_third_party()
    tok = Qwen2VLAdapter._tiny_tokenizer()  # ids stay inside the real vocabulary size
    # VLM2Vec's image bounds: 28*28*4 .. 28*28*1280 pixels.
    pix = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    pix |= {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 1280}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pix),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**pix),
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 151936,
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 28,
            "num_attention_heads": 12,
            "num_key_value_heads": 2,
            "max_position_embeddings": 32768,
            "rope_parameters": {
                "rope_type": "default",
                "mrope_section": [16, 24, 24],
                "rope_theta": 1000000.0,
            },
        },
        vision_config={
            "depth": 32,
            "embed_dim": 1280,
            "hidden_size": 1536,
            "num_heads": 16,
            "mlp_ratio": 4,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **Qwen2VLAdapter._tiny_vision_token_ids(tok),
    )
    config._attn_implementation = attn
    with torch.device("cuda"):
        backbone = Qwen2VLModel(config)
    adapter = Qwen2VLAdapter(processor)
    return EmbeddingModel(backbone, adapter, EmbeddingConfig(family="qwen2_vl"))


def make_items(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    queries, targets = [], []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 255, (448, 448, 3), dtype=np.uint8))
        queries.append({"image": img, "text": f"What is shown in picture number {i}?"})
        targets.append(f"a photo of object {i} on a wooden table next to the window")
    return queries, targets


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def bench_encode(model, queries, targets, batch: int = 32, reps: int = 3) -> dict:
    items = [x for pair in zip(queries, targets) for x in pair]
    model.encode(items[: 2 * batch], batch_size=batch)  # warm-up
    t0 = sync_time()
    for _ in range(reps):
        model.encode(items, batch_size=batch)
    dt = sync_time() - t0
    return {"items": len(items), "batch_size": batch, "items_per_s": round(reps * len(items) / dt, 1)}


def bench_train(model, queries, targets, batch: int, steps: int, lora: bool) -> dict:
    from vlm2emb.losses import InfoNCELoss

    if lora:
        model.apply_lora(r=16, alpha=64, dropout=0.05)
    else:
        model.backbone.float()  # fp32 master weights, bf16 autocast
        model.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = InfoNCELoss(temperature=0.02)
    instr = "Represent the given image with the following question."
    batches = []
    for s in range(steps + 1):
        idx = [(s * batch + i) % len(queries) for i in range(batch)]
        batches.append(
            (model.collate([queries[i] for i in idx], instr), model.collate([targets[i] for i in idx]))
        )
    tokens = sum(int(q["attention_mask"].sum() + p["attention_mask"].sum()) for q, p in batches[1:])
    padded = sum(q["attention_mask"].numel() + p["attention_mask"].numel() for q, p in batches[1:])

    def step(q_in, p_in):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(q_in), model(p_in))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    step(*batches[0])  # warm-up
    torch.cuda.reset_peak_memory_stats()
    t0 = sync_time()
    for q_in, p_in in batches[1:]:
        loss = step(q_in, p_in)
    dt = sync_time() - t0
    # Matmul FLOPs, written out: a weight used in a forward costs 2 per token, its input
    # gradient 2 more, its weight gradient 2 more. The embedding table is a lookup (no FLOPs).
    # LM weights see LM tokens; vision weights see patches (4 per merged visual token).
    # Full fine-tuning: 6 per weight, plus 2 for the forward that gradient checkpointing
    # re-runs. LoRA: the frozen LM needs forward + input gradient (4), the adapters 6, and
    # the frozen vision tower only its forward (2), since pixels need no gradient.
    names = dict(model.named_parameters())
    n_vis = sum(p.numel() for n, p in names.items() if ".visual." in f".{n}" and "lora_" not in n)
    n_emb = sum(p.numel() for n, p in names.items() if "embed_tokens" in n)
    n_lora = sum(p.numel() for n, p in names.items() if "lora_" in n)
    n_lm = n_total - n_vis - n_emb - n_lora
    patches = sum(int(q["pixel_values"].shape[0]) for q, _ in batches[1:])
    if lora:
        flops = tokens * (4 * n_lm + 6 * n_lora) + patches * 2 * n_vis
    else:
        flops = tokens * 8 * n_lm + patches * 8 * n_vis
    achieved = flops / dt
    return {
        "mode": "lora-r16" if lora else "full",
        "batch_size": batch,
        "steps": steps,
        "samples_per_s": round(steps * batch / dt, 2),
        "real_tokens_per_s": round(tokens / dt, 1),
        "padding_efficiency": round(tokens / padded, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "trainable_params": n_trainable,
        "total_params": n_total,
        "params_lm_matmul": n_lm,
        "params_vision": n_vis,
        "params_lora": n_lora,
        "lm_tokens": tokens,
        "vision_patches": patches,
        "flops_counted": flops,
        "achieved_tflops": round(achieved / 1e12, 1),
        "mfu_vs_989_tflops": round(achieved / H100_BF16_PEAK, 3),
        "final_loss": float(loss),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_foundation.json")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    import transformers

    results["transformers"] = transformers.__version__
    queries, targets = make_items(args.n)

    model = build_model().to(torch.bfloat16).eval()
    results["encode_bf16"] = bench_encode(model, queries, targets)
    print(json.dumps(results, indent=2), flush=True)
    results["train_lora"] = bench_train(model, queries, targets, args.train_batch, args.steps, lora=True)
    print(json.dumps(results["train_lora"], indent=2), flush=True)
    del model
    torch.cuda.empty_cache()

    model = build_model()
    results["train_full"] = bench_train(model, queries, targets, args.train_batch, args.steps, lora=False)
    print(json.dumps(results["train_full"], indent=2), flush=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
