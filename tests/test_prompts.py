"""Prompt styles: the ``vlm2vec`` style gives VLM2Vec's exact token ids; styles are saved and checked.

The reference ids come from transcriptions of VLM2Vec's own functions
(:mod:`tests.vlm2vec_reference`), run on the tiny models' real processors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import vlm2vec_reference as ref
from vlm2emb.backbones import available_families, get_adapter_class
from vlm2emb.model import CONFIG_NAME, EmbeddingModel
from vlm2emb.prompts import strip_image_markers
from vlm2emb.train.config import ConfigError, load_recipe

# Every family VLM2Vec trains: the ones whose adapter names VLM2Vec's image token.
FAMILIES = [f for f in available_families() if get_adapter_class(f).vlm2vec_image_token is not None]

# MMEB rows carry the instruction in the text with the <|image_1|> marker (v1 eval and train).
MARKER_FORMS = [
    ("<|image_1|>\nRepresent the given image for classification", 1),  # classification query
    ("<|image_1|> Represent the given image for classification.", 1),  # space after the marker
    ("<|image_1|>\nRepresent the given image with the following question: What color is the car?", 1),
    ("Find me an everyday image that matches the given caption: Two people are playing football.", 0),
    ("<|image_1|>\nRepresent the given image.", 1),  # image candidate
    ("tench", 0),  # text candidate
    ("<|image_1|>", 1),  # an MMEB-train negative that is only an image
]
# VLM2Vec-V2's datasets build prompts with process_input_text(instruction, text, image).
V2_FORMS = [
    ("Represent the given image for classification", None, 1),
    ("Represent the given image with the following question:", "What color is the car?", 1),
    ("Find me an everyday image that matches the given caption:", "A man is riding a bicycle.", 0),
]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm2vec_model(request: pytest.FixtureRequest) -> EmbeddingModel:
    return EmbeddingModel.from_pretrained(f"tiny:{request.param}", prompt_style="vlm2vec")


def _images(digit_images, n: int, wide: bool) -> list:
    # A wide image too, so LLaVA-NeXT's anyres tiling (image-size dependent counts) runs.
    first = digit_images[0].resize((64, 32)) if wide else digit_images[0]
    return [first][:n]


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize(("text", "n_images"), MARKER_FORMS)
def test_vlm2vec_style_gives_vlm2vecs_token_ids_for_mmeb_rows(
    vlm2vec_model: EmbeddingModel, digit_images, text: str, n_images: int, wide: bool
) -> None:
    family = vlm2vec_model.adapter.family
    images = _images(digit_images, n_images, wide)
    item = {"text": text, "image": images[0]} if images else text
    theirs = ref.PROCESS_FNS[family](
        ref.replace_marker(text, family), images or None, vlm2vec_model.processor
    )
    ours = vlm2vec_model.render(item)
    assert ours.prompt == ref.replace_marker(text, family)
    assert ours.input_ids == theirs


@pytest.mark.parametrize(("instruction", "text", "n_images"), V2_FORMS)
def test_vlm2vec_style_gives_process_input_text_ids_for_an_instruction(
    vlm2vec_model: EmbeddingModel, digit_images, instruction: str, text: str | None, n_images: int
) -> None:
    family = vlm2vec_model.adapter.family
    images = _images(digit_images, n_images, wide=False)
    prompt = ref.process_input_text(instruction, family, text=text, add_image_token=bool(images))
    theirs = ref.PROCESS_FNS[family](prompt, images or None, vlm2vec_model.processor)
    item = {"text": text, "image": images[0]} if images else text
    ours = vlm2vec_model.render(item, instruction)
    assert ours.prompt == prompt
    assert ours.input_ids == theirs


def test_default_style_is_vlm2emb_and_differs_from_vlm2vec_where_the_issue_says(digit_images) -> None:
    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    assert model.config.prompt_style == "vlm2emb"
    text = MARKER_FORMS[0][0]
    ours = model.render({"text": text, "image": digit_images[0]})
    assert ours.prompt == "<|vision_start|><|image_pad|><|vision_end|>" + strip_image_markers(text)
    theirs = ref.qwen2_vl_input_ids(ref.replace_marker(text, "qwen2_vl"), [digit_images[0]], model.processor)
    assert ours.input_ids != theirs  # why the vlm2vec style exists
    # render() shows exactly what encode() feeds the model.
    batch = model.collate([{"text": text, "image": digit_images[0]}])
    assert ours.input_ids == batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert ours.tokens == model.adapter.tokenizer.convert_ids_to_tokens(ours.input_ids)


def test_prompt_style_is_saved_and_loaded(tmp_path: Path, digit_images) -> None:
    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl", prompt_style="vlm2vec")
    out = model.save_pretrained(tmp_path / "m")
    assert json.loads((out / CONFIG_NAME).read_text())["prompt_style"] == "vlm2vec"
    loaded = EmbeddingModel.from_pretrained(out)
    assert loaded.config.prompt_style == "vlm2vec"
    item = {"text": MARKER_FORMS[0][0], "image": digit_images[0]}
    assert loaded.render(item).input_ids == model.render(item).input_ids
    assert EmbeddingModel.from_pretrained(out, prompt_style="vlm2emb").config.prompt_style == "vlm2emb"


def test_bad_prompt_styles_are_one_line_errors() -> None:
    with pytest.raises(
        ValueError, match=r"^prompt_style: unknown prompt style 'bogus'; choose one of vlm2emb, vlm2vec$"
    ):
        EmbeddingModel.from_pretrained("tiny:qwen2_vl", prompt_style="bogus")
    with pytest.raises(ValueError, match=r"prompt_style: backbone 'llava' has no 'vlm2vec' prompt form"):
        EmbeddingModel.from_pretrained("tiny:llava", prompt_style="vlm2vec")
    with pytest.raises(ConfigError, match=r"model.prompt_style: 'bogus' is not one of vlm2emb, vlm2vec"):
        load_recipe(None, ["data.train=demo:digits/train", "model.prompt_style=bogus"])
    assert (
        load_recipe(None, ["data.train=demo:digits/train", "model.prompt_style=vlm2vec"]).model.prompt_style
        == "vlm2vec"
    )


def test_marker_count_must_match_the_images_in_vlm2vec_style(digit_images) -> None:
    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl", prompt_style="vlm2vec")
    with pytest.raises(ValueError, match="2 <\\|image_N\\|> markers for 1 images"):
        model.render({"text": "<|image_1|> and <|image_2|>", "image": digit_images[0]})


def test_vlm2emb_style_changes_only_texts_with_markers(digit_images) -> None:
    model = EmbeddingModel.from_pretrained("tiny:qwen2_vl")
    assert model.render("  two spaces ").prompt == "  two spaces "  # unchanged, as before
    assert model.render({"text": "<|image_1|> a cat ", "image": digit_images[0]}).prompt == (
        "<|vision_start|><|image_pad|><|vision_end|>a cat"
    )
