"""The generic masked-diffusion adapter, on a tiny remote-code masked-diffusion VLM."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.backbones.tiny_mdvlm import MASK_FORMS, MASK_TOKEN, build_tiny_mdvlm
from vlm2emb import EmbeddingModel
from vlm2emb.backbones import get_adapter_class
from vlm2emb.backbones.masked_diffusion import CONFIG_KEY, MaskedDiffusionAdapter, MaskedDiffusionSpec


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """One checkpoint per (mask form, vision type), built lazily and kept for the module."""
    built: dict[tuple[str, str], object] = {}

    def get(mask_input: str = "4d_bool", vision: str = "features"):
        key = (mask_input, vision)
        if key not in built:
            built[key] = build_tiny_mdvlm(
                tmp_path_factory.mktemp(f"mdvlm-{mask_input}-{vision}"), mask_input=mask_input, vision=vision
            )
        return built[key]

    return get


@pytest.fixture(scope="module")
def items(digit_images):
    return [
        "seven",
        "a much longer caption about a handwritten digit that is clearly a three",
        digit_images[0],
        {"text": "which digit is this?", "image": digit_images[1]},
        {"images": [digit_images[2], digit_images[3]], "text": "two images"},
    ]


def _load(path, **kw) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(path, trust_remote_code=True, **kw)


def test_untrusted_remote_code_is_refused_in_one_line(tiny_dirs):
    with pytest.raises(ValueError, match="pass trust_remote_code=True") as info:
        EmbeddingModel.from_pretrained(tiny_dirs())
    assert "\n" not in str(info.value)
    assert get_adapter_class("masked_diffusion") is MaskedDiffusionAdapter


def test_defaults_are_bidirectional_mean_and_causal_is_refused(tiny_dirs):
    model = _load(tiny_dirs())
    assert (model.config.attention, model.config.pooling) == ("bidirectional", "mean")
    with pytest.raises(ValueError, match="bidirectional attention only"):
        _load(tiny_dirs(), attention="causal")


@pytest.mark.parametrize(
    ("mask_input", "vision"),
    [*((form, "features") for form in MASK_FORMS), ("additive", "vq"), ("none", "vq")],
)
def test_embedding_does_not_depend_on_batch_mates(tiny_dirs, items, mask_input, vision):
    model = _load(tiny_dirs(mask_input, vision))
    alone = torch.stack([model.encode(item) for item in items])  # no padding at all
    assert alone.shape == (len(items), model.embedding_dim) and torch.isfinite(alone).all()
    for side in ("left", "right"):
        model.config.padding_side = side
        batched = model.encode(items, batch_size=len(items))  # text, image and mixed, padded together
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    perm = [3, 0, 4, 2, 1]
    torch.testing.assert_close(
        model.encode([items[i] for i in perm], batch_size=3), alone[perm], atol=1e-5, rtol=0
    )


def test_a_model_that_ignores_masks_needs_the_length_buckets(tiny_dirs):
    # Same weights, but the adapter is told (wrongly) that the model reads a 4D mask: the
    # padding now leaks into the real tokens. This is what the "none" buckets prevent.
    model = _load(tiny_dirs("none"))
    texts = ["one two", "a far longer text than the first one, to pad it"]
    correct = model.encode(texts)
    model.adapter._spec.mask_form = "4d_bool"
    leaky = model.encode(texts)
    alone = model.encode(texts[0])
    torch.testing.assert_close(correct[0], alone, atol=1e-5, rtol=0)
    assert (leaky[0] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("pooling", ["last", "eos", "embed_token", "mean"])
def test_each_pooling_gives_finite_distinct_vectors(tiny_dirs, items, pooling):
    model = _load(tiny_dirs(), pooling=pooling)
    emb = model.encode(items)
    assert torch.isfinite(emb).all()
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(items)))
    assert torch.cdist(emb, emb).fill_diagonal_(1.0).min() > 1e-3  # items stay apart


def _hidden(model: EmbeddingModel, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model.adapter.forward(model.backbone, model.collate(texts))


@pytest.mark.parametrize("mask_input", MASK_FORMS)
def test_attention_is_bidirectional_and_padding_never_reaches_real_tokens(tiny_dirs, mask_input):
    model = _load(tiny_dirs(mask_input), padding_side="left")
    pad_text = "a much longer sentence that forces padding of the others"
    h, mask = _hidden(model, ["one two three four", "one two three nine", pad_text])
    first = mask[0].nonzero()[0, 0]  # left padding: the first real token
    # Only the last word differs, yet the first position changes: later tokens are seen.
    assert not torch.allclose(h[0, first], h[1, first], atol=1e-4)
    alone, alone_mask = _hidden(model, ["one two three four"])
    torch.testing.assert_close(h[0][mask[0].bool()], alone[0][alone_mask[0].bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask_input", ["4d_bool", "additive"])
def test_fully_masked_rows_give_no_nan(tiny_dirs, mask_input):
    model = _load(tiny_dirs(mask_input))
    inputs = model.collate(["one two three", "four"])
    inputs["attention_mask"][1] = 0  # a row with no real token at all
    with torch.no_grad():
        hidden, _ = model.adapter.forward(model.backbone, inputs)
    assert torch.isfinite(hidden).all()
    if mask_input == "4d_bool":
        # The naive pairwise mask (query real AND key real) does give NaN in this model, so
        # the check above is not vacuous.
        real = inputs["attention_mask"].bool()
        naive = real[:, None, :, None] & real[:, None, None, :]
        with torch.no_grad():
            out = model.backbone(input_ids=inputs["input_ids"], attention_mask=naive).last_hidden_state
        assert torch.isnan(out).any()


def test_the_noisy_training_forward_is_never_called(tiny_dirs, items):
    model = _load(tiny_dirs())
    backbone = model.backbone
    first = model.encode(items)
    torch.testing.assert_close(model.encode(items), first, atol=0, rtol=0)  # no noise: deterministic
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    model.train()
    model(model.collate(items[:2])).sum().backward()
    assert backbone.noisy_forward_calls == 0
    # The training forward exists, counts its calls and is noisy (two calls differ).
    ids = model.collate(["one two three four five six"])["input_ids"]
    with torch.no_grad():
        _, h1 = backbone.forward_diffusion_loss(ids)
        _, h2 = backbone.forward_diffusion_loss(ids)
    assert backbone.noisy_forward_calls == 2 and not torch.equal(h1, h2)


def test_inputs_holding_the_mask_token_are_refused(tiny_dirs):
    model = _load(tiny_dirs())
    with pytest.raises(ValueError, match="mask token"):
        model.encode([f"one {MASK_TOKEN} three"])
    assert model.adapter.special_ids()["mask"] == model.backbone.config.mask_token_id
    assert model.adapter.special_ids()["image"] == model.backbone.config.image_token_id


def test_vq_images_become_offset_vocabulary_tokens(tiny_dirs, digit_images):
    model = _load(tiny_dirs(vision="vq"))
    cfg = model.backbone.config
    inputs = model.collate([{"text": "seven", "image": digit_images[0]}])
    spliced = model.adapter._splice_vq_codes(model.backbone, inputs["input_ids"], inputs["pixel_values"])
    codes = spliced[inputs["input_ids"] == cfg.image_token_id]
    assert codes.numel() == 16  # 16x16 px, 4 px patches
    assert bool(((codes >= cfg.vq_offset) & (codes < cfg.vq_offset + cfg.vq_codebook_size)).all())
    # Different images give different code sequences (the codes carry the image).
    other = model.collate([{"text": "seven", "image": digit_images[5]}])
    other_codes = model.adapter._splice_vq_codes(model.backbone, other["input_ids"], other["pixel_values"])
    assert not torch.equal(codes, other_codes[other["input_ids"] == cfg.image_token_id])


def test_lora_step_changes_only_language_model_lora_weights(tiny_dirs, items):
    model = _load(tiny_dirs())
    pattern = re.compile(model.adapter.lora_target_modules)
    matched = [n for n, _ in model.backbone.named_modules() if pattern.fullmatch(n)]
    assert len(matched) == 7 * model.backbone.config.num_hidden_layers
    assert all(n.startswith("language_model.layers.") for n in matched)  # not the vision tower
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model.train()
    queries, targets = model(model.collate(items[:3])), model(model.collate(items[2:]))
    loss = -(queries * targets).sum()
    loss.backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n and "language_model" in n for n in changed)


def test_save_load_round_trip_is_exact(tiny_dirs, items, tmp_path):
    model = _load(tiny_dirs("none", "vq"), pooling="last")
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(0.01 * torch.randn_like(p))
    before = model.encode(items)
    out = model.save_pretrained(tmp_path / "saved")
    saved_cfg = json.loads((out / "config.json").read_text())
    assert saved_cfg[CONFIG_KEY]["mask_form"] == "none" and saved_cfg[CONFIG_KEY]["vision"] == "vq"
    assert (out / "modeling_tiny_mdvlm.py").is_file()  # the remote code travels with the weights
    with pytest.raises(ValueError, match="trust_remote_code"):
        EmbeddingModel.from_pretrained(out)
    reloaded = _load(out)
    assert reloaded.config.pooling == "last"
    assert torch.equal(reloaded.encode(items), before)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"mask_form": "sideways"}, "mask_form 'sideways' is not one of"),
        ({"vision": "vq"}, "needs vq_encoder and vq_offset"),
        ({"mask_kwargs": "x"}, r"unknown key\(s\) \['mask_kwargs'\]"),
    ],
)
def test_bad_specs_are_one_line_errors(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        MaskedDiffusionSpec.from_dict(bad)
    assert "\n" not in str(info.value)


def test_text_only_spec_refuses_images(tiny_dirs, digit_images):
    model = _load(tiny_dirs())
    model.adapter._spec.vision = "none"
    with pytest.raises(ValueError, match="text-only"):
        model.encode([digit_images[0]])
