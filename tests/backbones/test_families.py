"""The same checks for every autoregressive VLM family, on tiny offline checkpoints.

Each family's tiny model is built and loaded once per module (the ``tiny`` fixture is
module-scoped and parametrised, so pytest groups the tests by family). Tests switch pooling,
padding side and attention on that one model and restore them afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vlm2emb import EmbeddingModel
from vlm2emb.backbones import available_families, get_adapter_class
from vlm2emb.losses import InfoNCELoss
from vlm2emb.model import CONFIG_NAME

# Every registered family but the diffusion ones, which have their own test files
# (test_diffusion_gemma.py, test_masked_diffusion.py): a new autoregressive family is
# picked up here without being listed (it then needs its IMAGE_TOKENS entry below).
DIFFUSION_FAMILIES = {"diffusion_gemma", "masked_diffusion"}
_MARKS = {
    "smolvlm": pytest.mark.skipif(
        importlib.util.find_spec("num2words") is None, reason="SmolVLM's processor needs num2words"
    ),
}
FAMILIES = [
    pytest.param(family, marks=_MARKS.get(family, ()))
    for family in available_families()
    if family not in DIFFUSION_FAMILIES
]

# Image tokens the tiny processors write for one 32x32 image alone, and per image when an
# item holds two. They differ only for LLaVA-OneVision: a single image is tiled (anyres),
# each image of a multi-image item is encoded whole (16 features + 1 newline).
IMAGE_TOKENS: dict[str, tuple[int, int]] = {
    "qwen2_vl": (16, 16),
    "qwen2_5_vl": (16, 16),
    "qwen3_vl": (16, 16),
    "llava": (16, 16),
    "llava_next": (36, 36),  # base 16 + one 16-feature tile + 4 row newlines
    "llava_onevision": (36, 17),
    "idefics3": (16, 16),
    "smolvlm": (16, 16),
    "paligemma": (16, 16),
    "gemma3": (16, 16),
    "internvl": (16, 16),
}
POOLINGS = ("last", "eos", "embed_token", "mean")
LM_KINDS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@dataclass
class Tiny:
    family: str
    path: Path
    model: EmbeddingModel


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    # The models are tiny: thread start-up costs more than the matmuls, and on a shared
    # 2-core machine two threads per process make these tests many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns a builder that writes each family's tiny checkpoint once per session."""
    from vlm2emb.testing import tiny_backbone

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny_backbone(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return built[family]

    return get


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_dir: Callable[[str], Path]) -> Tiny:
    path = tiny_dir(request.param)
    model = EmbeddingModel.from_pretrained(path, pooling="last", attention="causal", padding_side="right")
    return Tiny(request.param, path, model)


@pytest.fixture
def model(tiny: Tiny) -> Iterator[EmbeddingModel]:
    """The family's shared model, put back to last pooling, causal attention, right padding."""
    yield tiny.model
    _configure(tiny.model, pooling="last", attention="causal", padding_side="right")


def _configure(
    model: EmbeddingModel,
    *,
    pooling: str | None = None,
    attention: str | None = None,
    padding_side: str | None = None,
) -> None:
    if pooling is not None:
        model.config.pooling = pooling
        model._ensure_pool_token()
    if attention is not None:
        model.set_attention(attention)
    if padding_side is not None:
        model.config.padding_side = padding_side  # the adapter reads it from the config


@pytest.fixture(scope="module")
def items(digit_images):
    # Text only, image only, text + image, two images: a batch of these needs padding.
    return [
        "seven",
        "a much longer caption about a handwritten digit that is clearly a three",
        digit_images[0],
        {"text": "which digit is this?", "image": digit_images[1]},
        {"images": [digit_images[2], digit_images[3]], "text": "two images"},
        {"text": "x"},
    ]


def _hidden(model: EmbeddingModel, batch: list) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = model.collate(batch)
    with torch.no_grad():
        return model.adapter.forward(model.backbone, inputs)


def _image_token_id(model: EmbeddingModel) -> int:
    cfg = model.backbone.config
    for name in ("image_token_id", "image_token_index"):
        if getattr(cfg, name, None) is not None:
            return int(getattr(cfg, name))
    raise AssertionError("config names no image token")


def _lm_prefix(model: EmbeddingModel) -> str:
    lm = model.adapter.language_model(model.backbone)
    return next(name for name, module in model.backbone.named_modules() if module is lm)


# --------------------------------------------------------------------------- structure
def test_registry_and_tiny_layout(tiny):
    adapter_cls = get_adapter_class(tiny.family)
    assert type(tiny.model.adapter) is adapter_cls
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny.path)
    assert get_adapter_class(cfg.model_type) is adapter_cls  # found by model_type as well
    assert cfg.architectures[0].endswith("ForConditionalGeneration")  # saved like a hub download
    names = {p.name for p in tiny.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names


def test_default_lora_targets_are_every_decoder_projection_and_nothing_else(model):
    pattern = re.compile(model.adapter.lora_target_modules)
    matched = [n for n, _ in model.backbone.named_modules() if pattern.fullmatch(n)]
    assert matched, "the LoRA regex matches nothing"
    prefix = _lm_prefix(model) + ".layers."
    assert all(n.startswith(prefix) for n in matched), [n for n in matched if not n.startswith(prefix)]
    n_layers = len(model.adapter.language_model(model.backbone).layers)
    per_layer: dict[int, set[str]] = {}
    for name in matched:
        layer, kind = name[len(prefix) :].split(".")[0], name.rsplit(".", 1)[1]
        per_layer.setdefault(int(layer), set()).add(kind)
    assert per_layer == dict.fromkeys(range(n_layers), LM_KINDS)


def test_image_placeholders_expand_to_the_family_token_count(tiny, model, digit_images):
    single, per_image_in_pair = IMAGE_TOKENS[tiny.family]
    image_id = _image_token_id(model)
    one = model.collate([{"text": "caption", "image": digit_images[0]}])
    assert int((one["input_ids"] == image_id).sum()) == single
    two = model.collate([{"text": "caption", "images": digit_images[:2]}])
    assert int((two["input_ids"] == image_id).sum()) == 2 * per_image_in_pair
    prompt = model.adapter.render_prompt("caption", 1, "Find it.")
    assert "Find it." in prompt and prompt.index("Find it.") < prompt.index("caption")


# --------------------------------------------------------------------------- encoding
def test_every_pooling_encodes_text_images_and_mixed_items(model, items):
    embs = {}
    for pooling in POOLINGS:
        _configure(model, pooling=pooling)
        emb = model.encode(items, batch_size=len(items))
        assert emb.shape == (len(items), model.embedding_dim)
        assert torch.isfinite(emb).all(), pooling
        torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(items)))
        embs[pooling] = emb
    # Different poolings read different positions: if they agreed, pooling would be ignored.
    assert not torch.allclose(embs["last"], embs["mean"], atol=1e-3)
    assert not torch.allclose(embs["last"], embs["embed_token"], atol=1e-3)
    # Text-only, image-only and mixed items get distinct embeddings.
    assert torch.cdist(embs["last"], embs["last"]).fill_diagonal_(1.0).min() > 1e-4


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_embedding_does_not_depend_on_batch_mates(model, items, padding_side):
    _configure(model, padding_side=padding_side)
    for pooling, attention in (("eos", "causal"), ("last", "causal"), ("mean", "bidirectional")):
        _configure(model, pooling=pooling, attention=attention)
        batched = model.encode(items, batch_size=len(items))  # padded together
        alone = torch.stack([model.encode(item) for item in items])  # no padding at all
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0, msg=f"{pooling}, {attention}")
    perm = [4, 1, 5, 0, 3, 2]
    shuffled = model.encode([items[i] for i in perm], batch_size=4)
    torch.testing.assert_close(shuffled, batched[perm], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- attention
def test_attention_modes_switch_the_decoder_and_its_sdpa_modules(model):
    lm = model.adapter.language_model(model.backbone)
    assert lm.config._attn_implementation == "sdpa"  # the path that can silently stay causal
    for mode in ("bidirectional", "causal"):
        _configure(model, attention=mode)
        flags = {m.is_causal for m in lm.modules() if hasattr(m, "is_causal") and m is not lm}
        assert flags == {mode == "causal"}, mode
        assert lm.config.is_causal == (mode == "causal")


@pytest.mark.parametrize("with_image", [False, True])
def test_only_bidirectional_attention_sees_later_tokens(model, digit_images, with_image):
    image = {"image": digit_images[0]} if with_image else {}
    a = {"text": "one two three four", **image}
    b = {"text": "one two three four five six seven eight nine", **image}
    # b extends a's text: the prompts share a prefix, so position 0 holds the same token.
    filler = "a much longer sentence that forces padding of the two others, really much longer"
    for mode in ("causal", "bidirectional"):
        _configure(model, attention=mode)
        # Alone: no padding, so transformers may skip the mask and rely on SDPA's is_causal.
        h_a, mask_a = _hidden(model, [a])
        h_b, mask_b = _hidden(model, [b])
        assert mask_a.all() and mask_b.all()
        ids_a, ids_b = model.collate([a])["input_ids"][0], model.collate([b])["input_ids"][0]
        n = int(torch.cumprod(ids_a == ids_b[: len(ids_a)], 0).sum())  # shared prefix length
        assert n >= 2
        changed_alone = not torch.allclose(h_a[0, 0], h_b[0, 0], atol=1e-6)
        # Batched with padding: the mask is materialised.
        h, mask = _hidden(model, [a, b, filler])
        assert not mask.all()
        assert torch.isfinite(h[mask.bool()]).all(), mode
        rows = [h[i][mask[i].bool()] for i in range(2)]
        changed_padded = not torch.allclose(rows[0][0], rows[1][0], atol=1e-6)
        assert changed_alone == changed_padded == (mode == "bidirectional"), mode
        if mode == "causal":  # on the tokens a and b share, causal states agree exactly
            torch.testing.assert_close(h_a[0, :n], h_b[0, :n], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_never_changes_real_tokens(model, digit_images, attention, padding_side):
    _configure(model, attention=attention, padding_side=padding_side)
    item = {"text": "one two three", "image": digit_images[0]}
    alone, _ = _hidden(model, [item])
    filler = "a far longer text than the first one, to pad it well beyond its length " * 3
    h, mask = _hidden(model, [item, filler])
    assert not mask[0].all()
    real = h[0][mask[0].bool()]
    torch.testing.assert_close(real, alone[0], atol=1e-5, rtol=0)
    assert torch.isfinite(h[mask.bool()]).all()


# --------------------------------------------------------------------------- training
def test_lora_step_trains_only_the_adapter(tiny, items):
    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(tiny.path, pooling="last")
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    prefix = _lm_prefix(tiny.model)  # the decoder's name in the unwrapped backbone
    assert all(f"{prefix}.layers." in n for n in trainable)  # the vision tower stays frozen
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    model.train()
    queries, targets = items[:3], items[3:]
    loss = InfoNCELoss(temperature=0.05)(model(model.collate(queries)), model(model.collate(targets)))
    assert torch.isfinite(loss)
    loss.backward()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0
    )
    optimizer.step()

    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable  # frozen weights did not move
    # LoRA B starts at zero, so only B moves in the first step, and it moves in every
    # adapted projection: all targets lie on the forward path of the embedding.
    lora_b = {n for n in trainable if "lora_B" in n}
    assert changed == lora_b


@pytest.mark.parametrize("single_backward", [False, True])
def test_gradcache_serves_the_frozen_vision_tower(tiny, digit_images, single_backward):
    """Every family: with LoRA (tower frozen) GradCache reuses the tower's first-pass
    outputs in the re-forward and still gives the plain step's gradients."""
    from tests.helpers import check_frozen_vision_is_served, lora
    from vlm2emb.data.schema import TrainExample

    torch.manual_seed(0)
    model = lora(EmbeddingModel.from_pretrained(tiny.path, pooling="last").train())
    rows = [
        TrainExample(
            query={"text": "which digit?", "images": [digit_images[i]]},
            positive={"text": f"a handwritten digit {i}"},
            source=f"t:{i}",
        )
        for i in range(4)
    ]
    check_frozen_vision_is_served(model, rows, single_backward)


# The Qwen-VL families: a packed vision tower (varlen attention), placeholder ids expanded
# and M-RoPE positions built at collation.
QWEN_VL = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"}

# Right-padded causal batches run without the padding mask in every family but these, whose
# decoder masks hold prefix or image blocks built from other inputs
# (BackboneAdapter.padding_mask_optional_when_causal).
KEEP_PADDING_MASK = {"paligemma", "gemma3"}


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batches_are_padded_on_the_configured_side(tiny, model, digit_images, padding_side):
    """Every family pads where padding_side says (InternVL's processor padded left on its own
    before build_inputs passed the side along)."""
    _configure(model, padding_side=padding_side)
    for batch in (
        ["a", "a far longer text " * 4],
        [{"text": "a", "image": digit_images[0]}, "a longer text " * 6],
    ):
        mask = model.collate(batch)["attention_mask"]
        edge = mask[:, 0] if padding_side == "right" else mask[:, -1]
        assert edge.all() and not mask.all(), (tiny.family, padding_side)


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padding_mask_is_left_out_only_for_right_padded_causal_batches(
    tiny, model, digit_images, attention, padding_side
):
    """The mask is dropped only where no real token could attend to a pad (causal, right
    padding, a plain decoder mask); the padded batch's real tokens still equal the item
    embedded alone (test_padding_never_changes_real_tokens), and pooling gets the mask."""
    _configure(model, attention=attention, padding_side=padding_side)
    seen: list[bool] = []
    handle = model.backbone.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append("attention_mask" in kwargs), with_kwargs=True
    )
    try:
        hidden, mask = _hidden(
            model, ["a short one", {"text": "a longer text with an image", "image": digit_images[0]}]
        )
    finally:
        handle.remove()
    dropped = attention == "causal" and padding_side == "right" and tiny.family not in KEEP_PADDING_MASK
    assert seen == [not dropped]
    assert mask.shape == hidden.shape[:2] and not mask.all()  # the pooling mask is returned


def test_packed_vision_attention_equals_sdpa_in_fewer_calls(tiny, model, digit_images, monkeypatch):
    """Qwen families attend over the packed images with one SDPA call per image size
    (vlm2emb/backbones/varlen.py) instead of transformers' one per image: the same
    embeddings and gradients as the "sdpa" path, for same-size and mixed-size images."""
    from vlm2emb.backbones.varlen import NAME

    tower = model.adapter.vision_tower(model.backbone)
    packed = tiny.family in QWEN_VL
    assert (tower is not None and tower.config._attn_implementation == NAME) == packed
    if not packed:
        return
    calls: list[int] = []
    in_tower = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        if in_tower:
            calls.append(args[0].shape[0])  # the batch of segments attended at once
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    hooks = [
        tower.register_forward_pre_hook(lambda *_: in_tower.append(1)),
        tower.register_forward_hook(lambda *_: in_tower.clear()),
    ]
    try:
        big = digit_images[2].resize((48, 48))
        for images in (
            [digit_images[0], digit_images[1], digit_images[3]],
            [digit_images[0], big, digit_images[1]],
        ):
            inputs = model.collate([{"text": "which digit?", "image": img} for img in images])
            out = {}
            for impl in (NAME, "sdpa"):
                tower.config._attn_implementation = impl
                calls.clear()
                params = [p for p in model.backbone.parameters() if p.requires_grad]
                emb = model(inputs)
                grads = torch.autograd.grad(emb.square().sum(), params[:3] + params[-3:], allow_unused=True)
                out[impl] = (emb.detach(), grads, list(calls))
            tower.config._attn_implementation = NAME
            torch.testing.assert_close(out[NAME][0], out["sdpa"][0], atol=1e-6, rtol=1e-5)
            for a, b in zip(out[NAME][1], out["sdpa"][1]):
                assert (a is None) == (b is None)
                if a is not None:
                    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
            assert out["sdpa"][2] and set(out["sdpa"][2]) == {1}  # one image (or window) per call
            assert len(out[NAME][2]) < len(out["sdpa"][2])
            if images[1] is not big and tiny.family != "qwen2_5_vl":  # (its windows differ in size)
                assert set(out[NAME][2]) == {3}  # all three images in each call
    finally:
        tower.config._attn_implementation = NAME
        for hook in hooks:
            hook.remove()


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


# Families whose tower returns more than their forward reads: Qwen's pre-merge patches,
# LLaVA's every-layer hidden states.
TRIMMED = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision"}


def test_frozen_vision_cache_keeps_only_what_the_forward_reads(tiny, model, digit_images):
    """GradCache holds a frozen tower's outputs until the backward: trimmed to the fields the
    backbone reads (the forward on the trimmed outputs is checked against the plain step in
    test_gradcache_serves_the_frozen_vision_tower)."""
    from vlm2emb.gradcache import FrozenVisionCache

    tower = model.adapter.vision_tower(model.backbone)
    cache = FrozenVisionCache(
        tower, torch.device("cpu"), lambda out: model.adapter.trim_vision_output(out, model.backbone.config)
    )
    full: list = []
    handle = tower.register_forward_hook(lambda _m, _a, out: full.append(_tensor_bytes(out)))
    try:
        with torch.no_grad(), cache.recording(0):
            model(model.collate([{"text": "which digit?", "image": digit_images[0]}]))
    finally:
        handle.remove()
    kept = sum(_tensor_bytes(out) for _, out in cache.outputs[0])
    assert 0 < kept <= sum(full)
    assert (kept < sum(full)) == (tiny.family in TRIMMED), (kept, sum(full))


def test_lora_adapter_saves_and_reloads(tiny, items, tmp_path):
    model = EmbeddingModel.from_pretrained(tiny.path, pooling="mean", attention="bidirectional")
    model.apply_lora(r=4, alpha=8, dropout=0.0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    before = model.encode(items)
    out = model.save_pretrained(tmp_path / "lora")
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = EmbeddingModel.from_pretrained(out)
    assert (reloaded.config.pooling, reloaded.config.attention) == ("mean", "bidirectional")
    torch.testing.assert_close(reloaded.encode(items), before, atol=1e-5, rtol=0)


def test_save_load_round_trip_is_exact(tiny, model, items, tmp_path):
    from transformers import AutoModel

    _configure(model, pooling="eos", attention="bidirectional")
    before = model.encode(items)
    out = model.save_pretrained(tmp_path / "saved")
    saved = json.loads((out / CONFIG_NAME).read_text())
    assert (saved["family"], saved["pooling"], saved["attention"]) == (tiny.family, "eos", "bidirectional")
    reloaded = EmbeddingModel.from_pretrained(out)
    ours, theirs = model.backbone.state_dict(), reloaded.backbone.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # bit-identical weights
    # Same weights, same inputs; CPU GEMM kernels may still differ in the last bit with the
    # memory alignment of the loaded tensors, hence a tolerance of a few float32 ulps.
    torch.testing.assert_close(reloaded.encode(items), before, atol=1e-6, rtol=0)

    # The folder is a plain transformers checkpoint of the backbone: same hidden states once
    # the plain model gets the same attention mode (transformers' own modules default to
    # causal whatever the saved config says).
    plain = AutoModel.from_pretrained(out).eval()
    model.adapter.set_attention(plain, "bidirectional")
    inputs = model.collate([{"text": "one two three", "image": items[2]}])
    with torch.no_grad():
        ours, _ = model.adapter.forward(model.backbone, inputs)
        theirs = plain(**inputs, use_cache=False).last_hidden_state
    torch.testing.assert_close(ours, theirs)


# --------------------------------------------------------------------------- defaults
def test_default_pooling_follows_the_attention(tiny_dir, tmp_path):
    causal_dir, prefix_lm_dir = tiny_dir("llava"), tiny_dir("paligemma")
    raw = EmbeddingModel.from_pretrained(causal_dir)
    assert (raw.config.attention, raw.config.pooling) == ("causal", "last")
    bidir = EmbeddingModel.from_pretrained(causal_dir, attention="bidirectional")
    assert bidir.config.pooling == "mean"
    explicit = EmbeddingModel.from_pretrained(causal_dir, attention="bidirectional", pooling="last")
    assert explicit.config.pooling == "last"
    # PaliGemma is a prefix-LM: its native attention over the prompt is bidirectional.
    pali = EmbeddingModel.from_pretrained(prefix_lm_dir)
    assert (pali.config.attention, pali.config.pooling) == ("bidirectional", "mean")
    # A saved model keeps what it was saved with, even where the family default differs.
    pali.config.pooling = "last"
    out = pali.save_pretrained(tmp_path / "pali")
    again = EmbeddingModel.from_pretrained(out)
    assert (again.config.attention, again.config.pooling) == ("bidirectional", "last")


# --------------------------------------------------------------------------- family specifics
def test_gemma3_bidirectional_sliding_layers_use_a_symmetric_window(tiny_dir, digit_images):
    model = EmbeddingModel.from_pretrained(tiny_dir("gemma3"), attention="bidirectional")
    # token_type_ids would route Gemma 3 to its image-block masks, which pair a bidirectional
    # mask with a one-sided window; the adapter sends them only for causal attention.
    image_item = [{"text": "x", "image": digit_images[0]}]
    assert "token_type_ids" not in model.collate(image_item)
    _configure(model, attention="causal")
    assert "token_type_ids" in model.collate(image_item)
    _configure(model, attention="bidirectional")
    window = model.backbone.config.text_config.sliding_window  # 8 in the tiny model; layer 0 slides
    inputs = model.collate(["one two three four five six seven eight nine " * 3])
    ids = inputs["input_ids"]
    assert ids.shape[1] > 3 * window

    def layers(changed_at: int) -> tuple[torch.Tensor, ...]:
        edited = ids.clone()
        edited[0, changed_at] = ids[0, changed_at + 1]  # a different token in that one place
        with torch.no_grad():
            return model.backbone(
                input_ids=edited, attention_mask=inputs["attention_mask"], output_hidden_states=True
            ).hidden_states

    base, near, far = layers(ids.shape[1] - 2), layers(2), layers(2 * window)
    sliding, last = 1, -1  # outputs of the sliding layer 0 and of the final (global) layer
    # Position 0 sees a later token inside the window in the sliding layer...
    assert not torch.allclose(base[sliding][0, 0], near[sliding][0, 0], atol=1e-6)
    # ...but not one beyond it: the window is |i - j| <= w, not "everything after i".
    torch.testing.assert_close(base[sliding][0, 0], far[sliding][0, 0], atol=1e-6, rtol=0)
    # The global layer sees the whole sequence in both directions.
    assert not torch.allclose(base[last][0, 0], far[last][0, 0], atol=1e-6)


# --------------------------------------------------------------------------- recipes
_REPO = Path(__file__).resolve().parents[2]
FAMILY_RECIPES = sorted(
    p for p in (_REPO / "recipes").glob("*/*.yaml") if p.parent.name not in ("accelerate", "study")
)


@pytest.mark.parametrize("recipe", FAMILY_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_family_recipes_load_and_start_with_their_launch_command(recipe):
    from vlm2emb.train.config import load_recipe

    cfg = load_recipe(recipe)
    cfg.validate()
    lines = recipe.read_text().splitlines()
    assert lines[0].startswith("#"), "a recipe starts with its comment block"
    header = "\n".join(
        line for line in lines[: next(i for i, x in enumerate(lines) if not x.startswith("#"))]
    )
    relative = recipe.relative_to(_REPO).as_posix()
    assert f"vlm2emb train {relative}" in header  # the exact command, with this file's path


# Families whose image-free batches skip the processor (BackboneAdapter.tokenize_text_directly).
TOKENIZE_TEXT_DIRECTLY = {
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava",
    "llava_next",
    "llava_onevision",
    "idefics3",
    "smolvlm",
}


def test_text_only_batches_tokenize_like_the_processor(tiny, model):
    """The tokenizer-only path for image-free batches gives the processor's ids and mask and
    the same embeddings as the processor's full output; families that keep the processor
    (PaliGemma's needs an image, InternVL's adds tokens) are not opted in."""
    assert type(model.adapter).tokenize_text_directly == (tiny.family in TOKENIZE_TEXT_DIRECTLY)
    prompts = [
        model.adapter.render_prompt(t, 0, "Find the caption.") for t in ("a cat", "two dogs run by a lake")
    ]
    built = model.adapter.build_inputs(prompts, [[], []])
    if tiny.family not in TOKENIZE_TEXT_DIRECTLY:
        assert "input_ids" in built and built["attention_mask"].shape[0] == 2
        return
    model.adapter.tokenizer.padding_side = model.adapter.padding_side
    full = dict(model.adapter.processor(text=prompts, padding=True, return_tensors="pt"))
    assert torch.equal(built["input_ids"], full["input_ids"])
    assert torch.equal(built["attention_mask"], full["attention_mask"])
    assert set(built) <= set(full)
    with torch.no_grad():
        torch.testing.assert_close(model(built), model(full), rtol=0, atol=1e-6)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_collated_tensors_equal_the_processors_own(tiny, model, digit_images, monkeypatch, padding_side):
    """build_inputs asks the processor for NumPy and converts (faster); the result must be
    the processor's return_tensors="pt" output, key for key, dtype for dtype, value for value,
    for an image batch and a text batch. Families with their own build_inputs (Gemma 3,
    LLaVA-OneVision, PaliGemma, SmolVLM) keep return_tensors="pt" and are checked by the
    tests above. The Qwen-VL families' build_inputs adds M-RoPE positions to the base's
    batch (checked against transformers by the rope test below) and is compared without them."""
    from vlm2emb.backbones.base import BackboneAdapter

    adapter = model.adapter
    model.config.padding_side = padding_side
    overridden = type(adapter).build_inputs is not BackboneAdapter.build_inputs
    own = tiny.family in {"gemma3", "llava_onevision", "paligemma", "smolvlm"}
    assert overridden == (own or tiny.family in QWEN_VL)
    if own:
        return
    # Two image sizes, the odd one first (per-image token counts must follow the order).
    images = [[digit_images[0].resize((48, 32))], [], [digit_images[1], digit_images[2]]]
    prompts = [
        adapter.render_prompt(t, len(imgs), "Find it.") for t, imgs in zip(["a", "bb cc", "d"], images)
    ]
    calls: list[int] = []
    processor_call = type(adapter.processor).__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return processor_call(self, *args, **kwargs)

    for case_prompts, case_images in [(prompts, images), (prompts[1:2] * 2, [[], []])]:
        monkeypatch.setattr(type(adapter.processor), "__call__", counting)
        calls.clear()
        built = adapter.build_inputs(case_prompts, case_images)
        monkeypatch.undo()
        built.pop("position_ids", None)
        if case_images[0]:  # the image batch is processed once (no "pt" second pass)
            # Qwen-VL: not by the processor at all (placeholder ids expanded directly).
            assert calls == ([] if tiny.family in QWEN_VL else [1]), tiny.family
        flat = [img for per in case_images for img in per]
        if not flat and adapter.tokenize_text_directly:
            ref = dict(adapter.tokenizer(case_prompts, padding=True, return_tensors="pt"))
        else:
            ref = dict(
                adapter.processor(
                    text=case_prompts,
                    images=flat or None,
                    padding=True,
                    padding_side=adapter.padding_side,
                    return_tensors="pt",
                )
            )
        assert set(built) == set(ref), tiny.family
        for key, value in ref.items():
            assert isinstance(built[key], torch.Tensor) and built[key].dtype == value.dtype, (
                tiny.family,
                key,
            )
            assert torch.equal(built[key], value), (tiny.family, key)


def test_token_counts_equal_the_tokenizers_own(model):
    """Length keys ask the Rust backend directly; the counts are the tokenizer call's."""
    from vlm2emb.inputs import token_counts

    tok = model.adapter.tokenizer
    texts = ["", "a cat", "Two dogs   run by a lake.\nThen 3 more!", "naïve café – 東京", "x" * 300]
    ref = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    assert token_counts(texts, tok) == ref
    # A padded, truncated call leaves its settings on the Rust backend; counts ignore them.
    tok(texts, padding=True, truncation=True, max_length=8)
    assert token_counts(texts, tok) == ref
    assert len(set(ref)) == len(ref)  # the texts differ in length, so a constant count fails


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_qwen_image_batches_carry_transformers_rope_positions(tiny, model, digit_images, padding_side):
    """Qwen-VL image batches carry M-RoPE positions built at collation; they equal
    transformers' own get_rope_index (with and without the mask) and give the embeddings
    the model gets when it derives them itself."""
    from vlm2emb.backbones.qwen2_vl import Qwen2VLAdapter, mrope_position_ids

    adapter = model.adapter
    qwen = isinstance(adapter, Qwen2VLAdapter)
    model.config.padding_side = padding_side
    wide = digit_images[3].resize((48, 32))
    images = [[digit_images[0]], [], [wide, digit_images[1]], [digit_images[2]]]
    texts = ["a cat", "a much longer caption that pads the others", "two", "d"]
    prompts = [adapter.render_prompt(t, len(imgs), "Find it.") for t, imgs in zip(texts, images)]
    built = adapter.build_inputs(prompts, images)
    assert ("position_ids" in built) == qwen, tiny.family
    if not qwen:
        return
    assert "position_ids" not in adapter.build_inputs(prompts[1:2], [[]])  # text: the model's arange
    mask = built["attention_mask"]
    assert bool((mask[:, 0] == 0).any()) == (padding_side == "left")
    args = (built["input_ids"], built["mm_token_type_ids"], built["image_grid_thw"])
    with torch.no_grad():
        ref, _ = model.backbone.get_rope_index(*args, attention_mask=mask)
        ref_unmasked, _ = model.backbone.get_rope_index(*args, attention_mask=None)
    assert built["position_ids"].dtype == torch.int64
    assert torch.equal(built["position_ids"], ref)
    merge = adapter.processor.image_processor.merge_size
    ours = mrope_position_ids(built["mm_token_type_ids"], None, built["image_grid_thw"], merge)
    assert torch.equal(ours, ref_unmasked)
    assert not torch.equal(ref[1], ref[0])  # images give h/w positions that differ from t
    without = {k: v for k, v in built.items() if k != "position_ids"}
    with torch.no_grad():
        torch.testing.assert_close(model(built), model(without), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", sorted(QWEN_VL))
def test_qwen_placeholder_count_must_match_the_images(tiny_dir, family, digit_images):
    """Ids are expanded per placeholder: a prompt without one for its image is an error."""
    model = EmbeddingModel.from_pretrained(tiny_dir(family))
    with pytest.raises(ValueError, match="the prompts hold 1 image placeholders for 2 images"):
        model.adapter.build_inputs(
            [model.adapter.render_prompt("a", 1, None)], [[digit_images[0], digit_images[1]]]
        )
