"""Padding-free (packed) language-model batches: ``EmbeddingConfig.pack_sequences``.

The reference is the padded path of the same weights: a packed batch must give the same
embeddings (text-only, image+text and mixed batches of varied lengths, every pooling,
both padding sides as the reference, causal and bidirectional attention) and the same
parameter gradients through a contrastive loss (full fine-tune and LoRA), while the
language model really sees no padding.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.backbones.registry import packing_families
from vlm2emb.losses import info_nce_loss
from vlm2emb.pooling import POOLING_METHODS

QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Every family whose adapter says it packs (tests below run on each).
FAMILIES = packing_families()
ATOL = 1e-5


def test_the_qwen_vl_families_are_the_packing_families():
    assert packing_families() == sorted(QWEN_VL_FAMILIES)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[EmbeddingModel, EmbeddingModel]]:
    """(padded, packed) models of one family with the same weights."""
    padded = EmbeddingModel.from_pretrained(f"tiny:{request.param}")
    packed = EmbeddingModel.from_pretrained(f"tiny:{request.param}", pack_sequences=True)
    packed.load_state_dict(padded.state_dict())
    yield padded, packed


def _batches(images: list[Any]) -> dict[str, list[Any]]:
    """Batches whose rows differ in length (text and image token counts)."""
    text = [
        "seven",
        "a handwritten digit on a white background, drawn with a thick pen",
        "the number three",
        "zero, one, two, three, four, five, six, seven, eight, nine and ten",
    ]
    image_text = [
        {"text": "a digit", "image": images[0]},
        {"text": "which number is written in this picture, and how thick is the stroke?", "image": images[1]},
        {"text": "two digits side by side", "images": images[2:4]},
    ]
    mixed = [
        "only text in this row, and quite a lot of it compared to the others",
        {"image": images[4]},
        {"text": "an image and a caption", "image": images[5].resize((48, 32))},
        "short",
    ]
    return {"text": text, "image_text": image_text, "mixed": mixed}


def _configure(model: EmbeddingModel, *, pooling: str, padding_side: str, attention: str) -> None:
    model.config.pooling = pooling
    model.config.padding_side = padding_side  # the adapter reads it from the config
    if model.config.attention != attention:
        model.set_attention(attention)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("pooling", POOLING_METHODS)
def test_packed_embeddings_equal_padded(pair, digit_images, pooling, padding_side, attention):
    padded, packed = pair
    _configure(padded, pooling=pooling, padding_side=padding_side, attention=attention)
    _configure(packed, pooling=pooling, padding_side=padding_side, attention=attention)
    try:
        for name, items in _batches(digit_images).items():
            with torch.no_grad():
                want = padded(padded.collate(items))  # [B, d]
                got = packed(packed.collate(items))  # [B, d]
            assert got.shape == want.shape == (len(items), padded.embedding_dim), name
            torch.testing.assert_close(got, want, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        for model in pair:
            _configure(model, pooling="last", padding_side="right", attention="causal")


def test_the_language_model_sees_no_padding(pair, digit_images):
    padded, packed = pair
    items = _batches(digit_images)["mixed"]
    seen: list[torch.Size] = []

    def record(_module: torch.nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(kwargs["inputs_embeds"].shape)  # [rows, tokens, H]

    padded_batch = padded.collate(items)
    real = int(padded_batch["attention_mask"].sum())
    assert real < padded_batch["attention_mask"].numel()  # the padded batch does pad
    lm = packed.adapter.language_model(packed.backbone)
    handle = lm.register_forward_pre_hook(record, with_kwargs=True)
    try:
        packed_batch = packed.collate(items)
        with torch.no_grad():
            packed(packed_batch)
    finally:
        handle.remove()
    assert "attention_mask" not in packed_batch
    assert seen == [torch.Size([1, real, lm.config.hidden_size])]
    lengths = padded_batch["attention_mask"].sum(dim=1)
    assert packed_batch["cu_seqlens"].tolist() == [0, *lengths.cumsum(0).tolist()]


def _contrastive_grads(
    model: EmbeddingModel, queries: list[Any], targets: list[Any]
) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model.train()
    try:
        loss = info_nce_loss(model(model.collate(queries)), model(model.collate(targets)), temperature=0.05)
        loss.backward()
    finally:
        model.eval()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same_grads(padded: EmbeddingModel, packed: EmbeddingModel, items: dict[str, list[Any]]) -> int:
    queries = items["image_text"] + items["text"][:1]
    targets = items["mixed"]
    want = _contrastive_grads(padded, queries, targets)
    got = _contrastive_grads(packed, queries, targets)
    assert got.keys() == want.keys() and want
    nonzero = 0
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, atol=ATOL, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        nonzero += int(grad.abs().sum() > 0)
    return nonzero


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_padded_full_fine_tune(family, digit_images):
    padded = EmbeddingModel.from_pretrained(f"tiny:{family}")
    packed = EmbeddingModel.from_pretrained(f"tiny:{family}", pack_sequences=True)
    packed.load_state_dict(padded.state_dict())
    nonzero = _assert_same_grads(padded, packed, _batches(digit_images))
    assert nonzero > 10  # the decoder's and the vision tower's weights got gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_equal_padded_lora(family, digit_images):
    padded = EmbeddingModel.from_pretrained(f"tiny:{family}")
    packed = EmbeddingModel.from_pretrained(f"tiny:{family}", pack_sequences=True)
    for model in (padded, packed):
        model.apply_lora(r=4, alpha=8, dropout=0.0, seed=0)
    # LoRA's B starts at zero, which zeroes A's gradient: move B so that both get one.
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in padded.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    packed.load_state_dict(padded.state_dict())
    nonzero = _assert_same_grads(padded, packed, _batches(digit_images))
    trainable = [n for n, p in packed.named_parameters() if p.requires_grad]
    assert all("lora_" in n for n in trainable) and nonzero == len(trainable)


def test_a_family_without_packing_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"pack_sequences: backbone 'llava' does not support") as info:
        EmbeddingModel.from_pretrained("tiny:llava", pack_sequences=True)
    assert "\n" not in str(info.value) and "qwen2_vl" in str(info.value)


def test_another_attention_implementation_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"pack_sequences needs attn_implementation='sdpa'") as info:
        EmbeddingModel.from_pretrained("tiny:qwen2_vl", pack_sequences=True, attn_implementation="eager")
    assert "\n" not in str(info.value)


def test_the_setting_round_trips_through_save_and_load(pair, digit_images, tmp_path):
    _, packed = pair
    items = _batches(digit_images)["mixed"]
    out = packed.save_pretrained(tmp_path / "packed")
    assert json.loads((out / "vlm2emb_config.json").read_text())["pack_sequences"] is True
    loaded = EmbeddingModel.from_pretrained(out)
    assert loaded.config.pack_sequences is True
    assert "cu_seqlens" in loaded.collate(items)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(loaded.collate(items)), packed(packed.collate(items)), atol=ATOL, rtol=0
        )
    # The saved backbone config records no attention implementation: it loads anywhere.
    assert "vlm2emb" not in (out / "config.json").read_text()
    # And the call can turn it off again.
    assert EmbeddingModel.from_pretrained(out, pack_sequences=False).config.pack_sequences is False


def test_encode_with_packing_equals_padded_encode(pair, digit_images):
    padded, packed = pair
    items = [row for batch in _batches(digit_images).values() for row in batch]
    want = padded.encode(items, batch_size=4)
    got = packed.encode(items, batch_size=4)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "extra",
    [[], ["train.gradcache_chunk_size=2", "model.gradient_checkpointing=true"]],
    ids=["plain", "gradcache-checkpointing"],
)
def test_a_recipe_trains_packed_to_the_padded_weights(tmp_path, tiny_qwen2_vl_dir, extra):
    """``model.pack_sequences`` in a recipe: a few training steps with hard negatives land on
    the weights padded training reaches (plain steps, and GradCache chunks with gradient
    checkpointing, whose recompute runs the packed attention again), and the final model
    records the setting."""
    from safetensors.torch import load_file

    from vlm2emb.train.config import load_recipe
    from vlm2emb.train.loop import train

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    rows = [
        {
            "query": {"text": f"the number {w}, written out in letters" if i % 2 else f"number {w}"},
            "positive": {"text": w},
            "negatives": [{"text": words[(i + 1) % len(words)]}],
            "dataset": "numbers",
        }
        for i, w in enumerate(words)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    finals = {}
    for packed in (False, True):
        out = tmp_path / f"run-{packed}"
        cfg = load_recipe(
            None,
            [
                f"output_dir={out}",
                f"model.name_or_path={tiny_qwen2_vl_dir}",
                f"model.pack_sequences={str(packed).lower()}",
                f"data.train={data}",
                "train.max_steps=2",
                "train.batch_size=4",
                "train.learning_rate=1e-3",
                *extra,
            ],
        )
        assert cfg.model.pack_sequences is packed
        train(cfg, progress=False)
        finals[packed] = load_file(out / "final" / "model.safetensors")
        saved = json.loads((out / "final" / "vlm2emb_config.json").read_text())
        assert saved["pack_sequences"] is packed
    assert finals[True].keys() == finals[False].keys()
    for key, value in finals[False].items():
        torch.testing.assert_close(
            finals[True][key], value, atol=1e-5, rtol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
        )


def test_multivector_tokens_of_a_packed_batch_equal_the_padded_ones(digit_images):
    """The multi-vector head reads a packed batch's rows unpacked: same token vectors."""
    padded = EmbeddingModel.from_pretrained("tiny:qwen2_vl", config_overrides={"multivector_dim": 8})
    packed = EmbeddingModel.from_pretrained(
        "tiny:qwen2_vl", pack_sequences=True, config_overrides={"multivector_dim": 8}
    )
    packed.load_state_dict(padded.state_dict())
    items = [row for batch in _batches(digit_images).values() for row in batch]
    want = padded.encode(items, batch_size=4, output="multivector")
    got = packed.encode(items, batch_size=4, output="multivector")
    assert [g.shape for g in got] == [w.shape for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0)
