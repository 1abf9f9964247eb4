"""The generative reranker on real tiny backbones and real digit images.

Scores are checked against the family's own ``...ForConditionalGeneration`` forward (full
vocabulary logits from transformers, not vlm2emb's two-row head), batched scores against
pairs scored alone on both padding sides, and saved models against the live ones.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from vlm2emb.backbones.registry import available_families, get_adapter_class
from vlm2emb.rerank import Reranker, RerankerConfig

# Every family whose adapter has a next-token head; a new autoregressive family is picked up
# without being listed. SmolVLM's processor needs num2words (as in test_families.py).
GENERATIVE = [
    pytest.param(
        family,
        marks=pytest.mark.skipif(
            family == "smolvlm" and importlib.util.find_spec("num2words") is None,
            reason="SmolVLM's processor needs num2words",
        ),
    )
    for family in available_families()
    if get_adapter_class(family).generative_head
]

# fp32 on CPU: a batched forward differs from a single one only by the order of float sums
# over padded shapes, far below 1e-4 on logits of size ~0.1-1.
ATOL = 1e-5


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    return Reranker.from_pretrained("tiny:qwen2_vl")


def _pairs(images):
    """Pairs of mixed lengths and media: image queries, text queries, image candidates."""
    return [
        ({"image": images[0]}, "a handwritten digit zero"),
        ("a handwritten digit seven", {"image": images[7]}),
        ("seven", "a handwritten digit seven and some longer text after it to pad the batch"),
        ({"text": "which digit is this?", "image": images[3]}, {"text": "three", "image": images[3]}),
        ("one", "two"),
    ]


def _reference_score(model: Reranker, query, candidate) -> float:
    """logit(yes) - logit(no) from the family's own LM forward over the whole vocabulary."""
    inputs = model.collate_pairs([(query, candidate)])
    with torch.no_grad():
        logits = model.base_lm(**inputs, use_cache=False, return_dict=True).logits  # [1, L, V]
    yes, no = model.answer_ids
    return float(logits[0, -1, yes] - logits[0, -1, no])


@pytest.mark.parametrize("family", GENERATIVE)
def test_score_equals_the_families_own_lm_logits(family, digit_images):
    model = Reranker.from_pretrained(f"tiny:{family}")
    pairs = [({"image": digit_images[1]}, "a handwritten digit one"), ("seven", {"image": digit_images[7]})]
    # One padded batch of both (the image prompt is the longer), against each pair run alone
    # through the family's own LM forward.
    got = model.score_pairs(pairs, batch_size=2)
    want = torch.tensor([_reference_score(model, q, c) for q, c in pairs])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    mask = model.collate_pairs(pairs)["attention_mask"]
    assert not bool(mask.all())  # the batch really was padded
    assert got[0] != got[1]  # the pairs differ, and so do their scores


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batched_scores_equal_each_pair_alone(padding_side, digit_images):
    model = Reranker.from_pretrained("tiny:qwen2_vl", padding_side=padding_side)
    pairs = _pairs(digit_images)
    alone = torch.stack([model.score_pairs([pair])[0] for pair in pairs])
    for batch_size in (2, 5):
        batched = model.score_pairs(pairs, batch_size=batch_size)
        torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
    # The batch of 5 really was padded: the prompts differ in length.
    inputs = model.collate_pairs(pairs)
    lengths = inputs["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()


def test_scores_do_not_depend_on_the_padding_side(digit_images):
    right = Reranker.from_pretrained("tiny:qwen2_vl", padding_side="right")
    left = Reranker.from_pretrained("tiny:qwen2_vl", padding_side="left")
    pairs = _pairs(digit_images)
    torch.testing.assert_close(
        right.score_pairs(pairs, batch_size=5), left.score_pairs(pairs, batch_size=5), atol=ATOL, rtol=0
    )


def test_prompt_interleaves_instruction_query_and_candidate(reranker, digit_images):
    prompt, images = reranker.render_pair(
        {"text": "which digit?", "image": digit_images[2]},
        {"text": "two", "image": digit_images[5]},
        "Judge.",
    )
    placeholder = reranker.adapter.image_placeholder
    assert prompt == (
        f"Judge.\nQuery: {placeholder}which digit?\nCandidate: {placeholder}two\nAnswer yes or no.\nAnswer:"
    )
    assert images == [digit_images[2], digit_images[5]]  # query's image first, as in the prompt
    # MMEB <|image_1|> markers are dropped: render_segments places the images.
    prompt, _ = reranker.render_pair({"text": "<|image_1|> what is it", "image": digit_images[2]}, "two")
    assert "<|image_1|>" not in prompt and f"Query: {placeholder}what is it\n" in prompt


def test_rerank_orders_by_score_and_cuts_top_k(reranker):
    candidates = ["seven", "one", "a handwritten digit two", "nine", "eight"]
    scores = reranker.score_pairs([("a handwritten digit seven", c) for c in candidates])
    hits = reranker.rerank("a handwritten digit seven", candidates, top_k=3)
    assert [h["corpus_id"] for h in hits] == scores.argsort(descending=True)[:3].tolist()
    torch.testing.assert_close(
        torch.tensor([h["score"] for h in hits]), scores.sort(descending=True).values[:3]
    )
    assert len(reranker.rerank("q", candidates)) == len(candidates)
    assert reranker.rerank("q", []) == []


def test_save_and_load_round_trip_full(reranker, tmp_path, digit_images):
    reranker.config.template = "{instruction} || {query} || {candidate} ||"
    try:
        pairs = _pairs(digit_images)
        before = reranker.score_pairs(pairs)
        out = reranker.save_pretrained(tmp_path / "rr")
    finally:
        reranker.config.template = RerankerConfig(family="qwen2_vl").template
    saved = json.loads((out / "vlm2emb_reranker.json").read_text())
    assert saved["template"] == "{instruction} || {query} || {candidate} ||"
    assert list(out.glob("*.safetensors"))
    loaded = Reranker.from_pretrained(out)
    assert loaded.config.template == saved["template"]
    torch.testing.assert_close(loaded.score_pairs(pairs), before, atol=ATOL, rtol=0)
    # The folder is a plain transformers checkpoint of the family's LM class, head included.
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(out)
    torch.testing.assert_close(
        plain.get_output_embeddings().weight, loaded.base_lm.get_output_embeddings().weight
    )


def test_save_and_load_round_trip_lora(tmp_path, digit_images):
    model = Reranker.from_pretrained("tiny:qwen2_vl")
    model.apply_lora(r=4, alpha=8, dropout=0.0, seed=0)
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the scores
        for name, p in model.lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    trainable = [n for n, p in model.lm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    pairs = _pairs(digit_images)
    with_lora = model.score_pairs(pairs)
    out = model.save_pretrained(tmp_path / "rr-lora")
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = Reranker.from_pretrained(out)
    unmerged = Reranker.from_pretrained(out, merge_lora=False)
    assert not merged.has_lora and unmerged.has_lora
    torch.testing.assert_close(merged.score_pairs(pairs), with_lora, atol=1e-4, rtol=0)
    torch.testing.assert_close(unmerged.score_pairs(pairs), with_lora, atol=ATOL, rtol=0)
    base = Reranker.from_pretrained("tiny:qwen2_vl").score_pairs(pairs)
    assert (with_lora - base).abs().max() > 1e-3  # the adapter was saved, not dropped


def test_config_errors_are_one_line_and_name_the_field(tmp_path):
    def refused(**kw):
        with pytest.raises(ValueError) as err:
            RerankerConfig(family="qwen2_vl", **kw).validate()
        assert "\n" not in str(err.value)
        return str(err.value)

    assert "{document}" in refused(template="{query} {document} {candidate}")
    assert "{candidate} must appear exactly once" in refused(template="{query}")
    assert "{query} must come before {candidate}" in refused(template="{candidate} {query}")
    assert "{instruction} must appear at most once" in refused(
        template="{instruction}{instruction}{query}{candidate}"
    )
    with pytest.raises(ValueError, match="start with the same token"):
        Reranker.from_pretrained("tiny:qwen2_vl", yes_token="nothing", no_token="no")
    with pytest.raises(ValueError, match="no next-token LM head"):
        Reranker.from_pretrained("tiny:diffusion_gemma")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vlm2emb_reranker.json").write_text(json.dumps({"family": "qwen2_vl", "temprature": 1}))
    with pytest.raises(ValueError, match=r"vlm2emb_reranker.json: unknown key\(s\) \['temprature'\]"):
        RerankerConfig.from_dict(
            json.loads((bad / "vlm2emb_reranker.json").read_text()), str(bad / "vlm2emb_reranker.json")
        )


def test_collated_batch_of_distinct_items_scores_each_pair(reranker, digit_images):
    # Regression: media were cached by the id() of parsed items that had been freed, so a
    # later item could reuse an id and get another item's images.
    pairs = [({"image": digit_images[i]}, {"text": "a handwritten digit"}) for i in range(6)]
    with torch.no_grad():
        batched = reranker(reranker.collate_pairs(pairs))
    alone = torch.stack([reranker.score_pairs([pair])[0] for pair in pairs])
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
    assert len(set(alone.tolist())) == len(pairs)  # different images, different scores


def test_a_saved_embedder_starts_a_reranker_with_its_weights(tmp_path):
    from vlm2emb import EmbeddingModel

    embedder = EmbeddingModel.from_pretrained("tiny:qwen2_vl", seed=5)
    with torch.no_grad():  # make the weights differ from any tiny init
        for p in embedder.backbone.parameters():
            p.add_(0.01)
    embedder.save_pretrained(tmp_path / "emb")
    model = Reranker.from_pretrained(tmp_path / "emb")
    want = dict(embedder.backbone.named_parameters())
    got = dict(model.backbone.named_parameters())
    assert set(got) == set(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, atol=0, rtol=0, msg=name)
    # Qwen2-VL ties its head to the input embeddings: the head is the embedder's too.
    assert torch.equal(
        model.base_lm.get_output_embeddings().weight, want["language_model.embed_tokens.weight"]
    )


def test_plain_transformers_example_reproduces_the_scores(tmp_path, digit_images):
    import subprocess
    import sys
    from pathlib import Path

    model = Reranker.from_pretrained("tiny:qwen2_vl", instruction="Which {digit} is it?")  # braces kept
    out = model.save_pretrained(tmp_path / "rr")
    image = tmp_path / "q.png"
    digit_images[3].save(image)
    captions = ["a handwritten digit three", "a handwritten digit eight"]
    example = Path(__file__).resolve().parents[2] / "examples" / "load_reranker_transformers.py"
    done = subprocess.run(
        [sys.executable, str(example), str(out), str(image), *captions],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    got = [float(line.split("\t")[0]) for line in done.stdout.splitlines()]
    want = model.score_pairs([({"image": str(image)}, c) for c in captions]).tolist()
    assert got == pytest.approx(want, abs=1e-4)
    assert abs(want[0] - want[1]) > 1e-4  # the captions score differently: the check can fail
