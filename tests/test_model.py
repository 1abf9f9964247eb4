"""EmbeddingModel: batch invariance, padding sides, attention modes, save/load, inputs."""

from __future__ import annotations

import json

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.items import Item
from vlm2emb.model import CONFIG_NAME


@pytest.fixture(scope="module")
def mixed_items(digit_images):
    # Different lengths and modalities so that a batch needs padding.
    return [
        "seven",
        "a much longer caption about a handwritten digit that is clearly a three",
        digit_images[0],
        {"text": "which digit is this?", "image": digit_images[1]},
        {"images": [digit_images[2], digit_images[3]], "text": "two images"},
        {"text": "x"},
    ]


def _load(path, **kw) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(path, **kw)


@pytest.mark.parametrize("pooling", ["last", "eos", "embed_token", "mean"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embedding_does_not_depend_on_batch_mates(tiny_qwen2_vl_dir, mixed_items, pooling, padding_side):
    model = _load(tiny_qwen2_vl_dir, pooling=pooling, padding_side=padding_side)
    batched = model.encode(mixed_items, batch_size=len(mixed_items))  # [n, d], padded together
    alone = torch.stack([model.encode(item) for item in mixed_items])  # [n, d], no padding
    assert batched.shape == (len(mixed_items), model.embedding_dim)
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    # Shuffled batch mates, odd batch size: still the same vectors.
    perm = [4, 1, 5, 0, 3, 2]
    shuffled = model.encode([mixed_items[i] for i in perm], batch_size=4)
    torch.testing.assert_close(shuffled, batched[perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_side_does_not_change_embeddings(tiny_qwen2_vl_dir, mixed_items, pooling):
    left = _load(tiny_qwen2_vl_dir, pooling=pooling, padding_side="left").encode(mixed_items)
    right = _load(tiny_qwen2_vl_dir, pooling=pooling, padding_side="right").encode(mixed_items)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=0)


def test_poolings_differ(tiny_qwen2_vl_dir, mixed_items):
    embs = {p: _load(tiny_qwen2_vl_dir, pooling=p).encode(mixed_items) for p in ("last", "eos", "mean")}
    assert not torch.allclose(embs["last"], embs["eos"], atol=1e-3)
    assert not torch.allclose(embs["last"], embs["mean"], atol=1e-3)


def _hidden(model: EmbeddingModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = model.collate(texts)
    with torch.no_grad():
        return model.adapter.forward(model.backbone, inputs)


@pytest.mark.parametrize("with_padding", [False, True])
def test_bidirectional_attention_sees_later_tokens(tiny_qwen2_vl_dir, with_padding):
    a, b = "one two three four", "one two three nine"  # differ only in the last word
    extra = ["a much longer sentence that forces padding of the others"] if with_padding else []
    for mode, should_change in (("causal", False), ("bidirectional", True)):
        model = _load(tiny_qwen2_vl_dir, attention=mode)
        h, mask = _hidden(model, [a, b, *extra])
        assert torch.isfinite(h[mask.bool()]).all()
        # Position 0 ("one") is identical in both inputs; only attention to the end can change it.
        changed = not torch.allclose(h[0, 0], h[1, 0], atol=1e-6)
        assert changed == should_change, mode


def test_bidirectional_padding_never_changes_real_tokens(tiny_qwen2_vl_dir):
    model = _load(tiny_qwen2_vl_dir, attention="bidirectional")
    alone = model.encode(["one two three"])
    padded = model.encode(["one two three", "a far longer text than the first one, to pad it"])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-5, rtol=0)


def test_unknown_attention_mode_is_rejected(tiny_qwen2_vl_dir):
    with pytest.raises(ValueError, match="attention"):
        _load(tiny_qwen2_vl_dir, attention="sideways")


def test_normalization(tiny_qwen2_vl_dir, mixed_items):
    normed = _load(tiny_qwen2_vl_dir).encode(mixed_items)
    torch.testing.assert_close(normed.norm(dim=-1), torch.ones(len(mixed_items)))
    raw = _load(tiny_qwen2_vl_dir, normalize=False).encode(mixed_items)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(len(mixed_items)), atol=1e-3)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=-1), normed, atol=1e-5, rtol=0)


def test_instruction_changes_the_embedding(tiny_qwen2_vl_dir):
    model = _load(tiny_qwen2_vl_dir)
    plain = model.encode(["seven"])
    instructed = model.encode(["seven"], instruction="Represent the given text.")
    assert not torch.allclose(plain, instructed, atol=1e-4)
    model.config.query_instruction = "Represent the given text."
    torch.testing.assert_close(model.encode_queries(["seven"]), instructed)
    torch.testing.assert_close(model.encode_targets(["seven"]), plain)


def test_input_forms(tiny_qwen2_vl_dir, digit_images, tmp_path):
    model = _load(tiny_qwen2_vl_dir)
    path = tmp_path / "d.png"
    digit_images[0].save(path)
    from_pil = model.encode(digit_images[0])
    assert from_pil.shape == (model.embedding_dim,)  # one item in, one vector out
    torch.testing.assert_close(model.encode({"image": str(path)}), from_pil, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode({"image": path.read_bytes()}), from_pil, atol=1e-5, rtol=0)
    torch.testing.assert_close(model.encode({"images": [digit_images[0]]}), from_pil)
    assert model.encode([]).shape == (0, model.embedding_dim)
    sim = model.similarity(model.encode(["a", "b"]), model.encode(["a"]))
    assert sim.shape == (2, 1) and sim[0, 0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (3, "must be a str, a PIL image or a dict"),
        ({"txt": "a"}, "unknown item key"),
        ({}, "needs text or at least one image"),
        ({"text": 5}, "text must be a string"),
        ({"caption": "a"}, "an item has text, image, images, video or pdf"),
    ],
)
def test_bad_items_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        Item.parse(bad)


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="model path not found"):
        EmbeddingModel.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(KeyError, match=r"supported: .*qwen2_vl"):
        EmbeddingModel.from_pretrained("tiny:not_a_family")


def test_save_load_round_trip_is_exact(tiny_qwen2_vl_dir, mixed_items, tmp_path):
    model = _load(tiny_qwen2_vl_dir, pooling="eos", attention="bidirectional")
    model.config.query_instruction = "Find it."
    with torch.no_grad():  # move away from the tiny init so the test sees trained-like weights
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = model.encode(mixed_items)
    out = model.save_pretrained(tmp_path / "saved")
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", CONFIG_NAME, "tokenizer.json"} <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]  # never pickles
    saved_cfg = json.loads((out / CONFIG_NAME).read_text())
    assert saved_cfg["pooling"] == "eos" and saved_cfg["attention"] == "bidirectional"
    reloaded = EmbeddingModel.from_pretrained(out)
    assert reloaded.config.pooling == "eos" and reloaded.config.query_instruction == "Find it."
    assert torch.equal(reloaded.encode(mixed_items), before)


def test_saved_directory_loads_in_plain_transformers(tiny_qwen2_vl_dir, tmp_path):
    from transformers import AutoModel

    model = _load(tiny_qwen2_vl_dir)
    out = model.save_pretrained(tmp_path / "saved")
    plain = AutoModel.from_pretrained(out).eval()
    inputs = model.collate(["one two three"])
    with torch.no_grad():
        ours, _ = model.adapter.forward(model.backbone, inputs)
        theirs = plain(**inputs).last_hidden_state
    torch.testing.assert_close(ours, theirs)


def test_lora_round_trip(tiny_qwen2_vl_dir, mixed_items, tmp_path):
    model = _load(tiny_qwen2_vl_dir)
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    assert model.has_lora
    lora_names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert lora_names and all("lora_" in n for n in lora_names)
    assert all("language_model" in n for n in lora_names)  # the vision tower stays untouched
    with torch.no_grad():  # LoRA B starts at zero; make the adapter do something
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = model.encode(mixed_items)
    base_only = _load(tiny_qwen2_vl_dir).encode(mixed_items)
    assert not torch.allclose(before, base_only, atol=1e-4)

    out = model.save_pretrained(tmp_path / "lora")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(tiny_qwen2_vl_dir)  # where the base came from
    torch.testing.assert_close(
        EmbeddingModel.from_pretrained(out).encode(mixed_items), before, atol=1e-5, rtol=0
    )
    unmerged = EmbeddingModel.from_pretrained(out, merge_lora=False)
    assert unmerged.has_lora
    torch.testing.assert_close(unmerged.encode(mixed_items), before, atol=1e-6, rtol=0)

    merged_dir = model.save_pretrained(tmp_path / "merged", merge_lora=True)
    assert not (merged_dir / "adapter").exists()
    torch.testing.assert_close(
        EmbeddingModel.from_pretrained(merged_dir).encode(mixed_items), before, atol=1e-5, rtol=0
    )
    assert model.has_lora  # merging for the save left the live model's adapter alone


def test_lora_gradient_checkpointing_runs_no_backward_through_the_frozen_tower(
    tiny_qwen2_vl_dir, mixed_items
):
    """enable_gradient_checkpointing() gives LoRA the plain step's gradients while the frozen
    vision tower builds no graph (transformers' enable_input_require_grads made its patch
    embedding require grad, so the tower ran a backward whose gradients went nowhere)."""
    model = _load(tiny_qwen2_vl_dir)
    model.apply_lora(r=4, alpha=8, dropout=0.0, seed=0)
    model.train()
    tower = model.adapter.vision_tower(model.backbone.get_base_model())
    tower_out = []
    tower.register_forward_hook(lambda _m, _a, out: tower_out.append(out.pooler_output))

    def grads() -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model(model.collate(mixed_items)).pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    checkpointed = grads()
    assert tower_out and not tower_out[-1].requires_grad  # no backward through the frozen tower
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    model.disable_gradient_checkpointing()
    assert not model.backbone.get_base_model().is_gradient_checkpointing
    assert getattr(model, "_embedding_grad_hook", None) is None


def test_seeded_lora_init_ignores_earlier_draws(tiny_qwen2_vl_dir):
    def adapter_after(draws: int, seed: int | None) -> dict[str, torch.Tensor]:
        torch.manual_seed(7)
        torch.rand(draws)  # what ran before (a model build, data shuffling) moved the RNG
        model = _load(tiny_qwen2_vl_dir)
        model.apply_lora(r=4, alpha=8, dropout=0.0, seed=seed)
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    first, second = adapter_after(0, seed=3), adapter_after(1000, seed=3)
    assert first and all(torch.equal(first[n], second[n]) for n in first)
    other = adapter_after(0, seed=4)
    assert not torch.equal(first[next(iter(first))], other[next(iter(other))])
    unseeded = adapter_after(1000, seed=None)  # without a seed, the global RNG decides
    assert not torch.equal(adapter_after(0, seed=None)[next(iter(first))], unseeded[next(iter(first))])
    # The global RNG is left where it was.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    _load(tiny_qwen2_vl_dir).apply_lora(r=4, seed=11)
    assert torch.equal(torch.rand(3), expected)


def test_embed_token_is_added_when_missing(tiny_qwen2_vl_dir):
    model = _load(tiny_qwen2_vl_dir)
    rows_before = model.backbone.get_input_embeddings().weight.shape[0]
    model.adapter.embed_token = "<|pool_here|>"
    model.config.pooling = "embed_token"
    model._ensure_pool_token()
    tok = model.adapter.tokenizer
    new_id = tok.convert_tokens_to_ids("<|pool_here|>")
    assert new_id == rows_before  # appended after the old vocabulary
    assert model.backbone.get_input_embeddings().weight.shape[0] == rows_before + 1
    ids = model.collate(["seven"])["input_ids"][0]
    assert ids[-1].item() == new_id  # pooled position holds the new token
    assert torch.isfinite(model.encode(["seven"])).all()


def test_bf16_weights_give_float32_embeddings(tiny_qwen2_vl_dir, mixed_items):
    fp32 = _load(tiny_qwen2_vl_dir).encode(mixed_items)
    bf16_model = _load(tiny_qwen2_vl_dir, torch_dtype="bf16")
    assert bf16_model.dtype == torch.bfloat16
    bf16 = bf16_model.encode(mixed_items)
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    cos = torch.nn.functional.cosine_similarity(bf16, fp32)
    assert cos.min() > 0.98  # same model up to bf16 rounding


def test_always_run_vision_adds_a_dropped_blank_image_row(tiny_qwen2_vl_dir):
    from vlm2emb.inputs import DUMMY_ROWS, InputBuilder

    model = _load(tiny_qwen2_vl_dir)
    texts = ["one two three", "a longer text about a handwritten digit"]
    plain = model.encode(texts)
    assert not model.inputs.always_run_vision  # built outside a process group
    # What a model built in a multi-process run gets.
    model.inputs = InputBuilder(model.adapter, model.config, always_run_vision=True)
    inputs = model.collate(texts)
    # The text-only batch now runs the image path too (same modules on every process)...
    assert inputs[DUMMY_ROWS] == 1 and "pixel_values" in inputs
    assert inputs["input_ids"].shape[0] == 3
    # ...and the extra row is dropped without changing the real rows.
    torch.testing.assert_close(model.encode(texts), plain, atol=1e-5, rtol=0)
    assert DUMMY_ROWS not in model.collate([{"text": "x", "image": model_image()}])


def model_image():
    from PIL import Image

    return Image.new("RGB", (32, 32), (0, 0, 0))


def test_prefetched_encode_equals_the_sequential_one(tiny_qwen2_vl_dir, mixed_items):
    model = _load(tiny_qwen2_vl_dir)
    items = mixed_items * 3
    sequential = model.encode(items, batch_size=2, prefetch=0)
    prefetched = model.encode(items, batch_size=2, prefetch=3)
    assert torch.equal(sequential, prefetched)


def test_default_prefetch_leaves_the_cores_to_the_forward(tiny_qwen2_vl_dir, mixed_items):
    """By default encode() prepares batches in a worker thread only when a CPU core is free
    beside torch's threads (or the model is on an accelerator): on a CPU whose cores torch
    already uses, the worker's image kernels slowed the forward."""
    import os
    import threading

    from vlm2emb.model import _default_prefetch

    model = _load(tiny_qwen2_vl_dir)
    threads_seen: list[str] = []
    collate = model.collate

    def recording_collate(*args, **kwargs):
        threads_seen.append(threading.current_thread().name)
        return collate(*args, **kwargs)

    model.collate = recording_collate
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(os.cpu_count() or 1)  # every core for torch: no worker
        assert _default_prefetch(torch.device("cpu")) == 0
        model.encode(mixed_items, batch_size=2)
        assert threads_seen and all(name == threading.current_thread().name for name in threads_seen)
        if (os.cpu_count() or 1) > 1:
            torch.set_num_threads(1)  # a free core: the worker prepares batches
            assert _default_prefetch(torch.device("cpu")) == 2
            threads_seen.clear()
            model.encode(mixed_items, batch_size=2)
            assert all(name.startswith("vlm2emb-prefetch") for name in threads_seen)
    finally:
        torch.set_num_threads(before)
    assert _default_prefetch(torch.device("cuda")) == 2


def test_a_bad_item_in_a_prefetched_batch_raises_its_own_error(tiny_qwen2_vl_dir, tmp_path):
    model = _load(tiny_qwen2_vl_dir)
    # Longer texts sort first, so the broken image is in the last batch, prepared ahead.
    items = [f"caption {i} " + "word " * 300 for i in range(9)] + [{"image": str(tmp_path / "missing.png")}]
    with pytest.raises(Exception, match=r"missing\.png"):
        model.encode(items, batch_size=2, prefetch=2)
    assert model.encode("still works").shape == (model.embedding_dim,)  # usable afterwards


def test_length_keys_follow_media_then_tokens(tiny_qwen2_vl_dir, digit_images):
    from vlm2emb.inputs import length_keys

    model = _load(tiny_qwen2_vl_dir)
    tok = model.adapter.tokenizer
    items = ["two words", "a much longer sentence with many more words in it", {"image": digit_images[0]}]
    keys = length_keys(items, tok)
    counts = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in items[:2]]
    assert keys == [(0, counts[0]), (0, counts[1]), (1, 0)]
    order = sorted(range(3), key=keys.__getitem__, reverse=True)
    assert order == [2, 1, 0]  # the image item first, then the longer text


@pytest.mark.slow
def test_compiled_blocks_encode_like_eager(tiny_qwen2_vl_dir, mixed_items):
    """compile_blocks compiles each decoder and vision layer (real inductor): the same
    embeddings, the same state dict."""
    model = _load(tiny_qwen2_vl_dir)
    keys = list(model.state_dict())
    eager = model.encode(mixed_items, batch_size=2)
    assert model.compile_blocks() == 4  # 2 decoder layers + 2 vision blocks
    lm = model.adapter.language_model(model.backbone)
    assert all(layer._compiled_call_impl is not None for layer in lm.layers)
    compiled = model.encode(mixed_items, batch_size=2)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)
    assert list(model.state_dict()) == keys


def test_learnable_temperature_gets_gradient_and_is_clamped(tiny_qwen2_vl_dir):
    """The model owns the learnable temperature (one clamp, in learned_temperature)."""
    import math

    from vlm2emb.losses import info_nce_loss

    model = _load(tiny_qwen2_vl_dir)
    model.enable_learnable_temperature(0.05)
    assert isinstance(model.logit_scale, torch.nn.Parameter)
    assert model.logit_scale.item() == pytest.approx(math.log(20.0))
    torch.manual_seed(0)
    q, p = torch.randn(5, 8), torch.randn(5, 8)
    n = torch.randn(5, 3, 8)
    loss = info_nce_loss(q, p, n, temperature=model.learned_temperature())
    torch.testing.assert_close(loss, info_nce_loss(q, p, n, temperature=0.05), rtol=0, atol=1e-5)
    loss.backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.abs().item() > 0
    # The scale is capped at max_scale = 100, i.e. temperature >= 0.01, and gets no gradient there.
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    model.logit_scale.grad = None
    t = model.learned_temperature()
    assert float(t.detach()) == pytest.approx(0.01)
    loss = info_nce_loss(q, p, n, temperature=t)
    torch.testing.assert_close(loss, info_nce_loss(q, p, n, temperature=0.01), rtol=0, atol=1e-5)
    loss.backward()
    assert model.logit_scale.grad is None or model.logit_scale.grad.abs().item() == 0
    with pytest.raises(ValueError, match="max_scale"):
        model.enable_learnable_temperature(0.001)
