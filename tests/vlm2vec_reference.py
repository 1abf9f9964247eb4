"""Minimal transcriptions of VLM2Vec's prompt building and MMEB scoring, for equivalence tests.

Test-only reference code: the tests check that vlm2emb's ``vlm2vec`` prompt style gives the
token ids VLM2Vec's own functions give, and that vlm2emb's MMEB scores equal VLM2Vec's, row
by row. Each function below follows the upstream code line for line (names kept where
useful); nothing here is used by the library.

Upstream: https://github.com/TIGER-AI-Lab/VLM2Vec

- commit 6e1e1d42d4cba85ae4db4d3f7a25cba2465d1e16 (main, 2026-01):
  - ``src/model/processor.py``: ``VLM_IMAGE_TOKENS``, ``process_input_text``,
    ``Qwen2_VL_process_fn`` (per-item ids), ``Llava_NEXT_process_fn`` (per-item ids);
  - ``src/data/dataset/mmeb_dataset.py``: ``EvalDataset.__getitem__`` and
    ``TrainTextImageDataset.__getitem__`` replace the Phi-3-V marker ``<|image_1|>`` by the
    backbone's token with ``str.replace``;
  - ``eval.py`` (V2 scoring): candidates ranked by ``np.argsort(-cosine)``, predictions are
    candidate names, hit@1 when the top name is one of the labels (``label_name`` is
    ``tgt_texts[0]``, ``src/data/eval_dataset/image_cls_dataset.py``).
- commit 358bb43ae015d11d6c78c985b42de5b5a426ce09, ``evaluation/eval_utils.py``: ``get_pred``
  (v1 scoring: ``np.argmax`` over the candidate scores); the v1 ``eval.py`` loop keys target
  embeddings by ``(text, img_path)`` (so equal candidates share one) and counts a hit when
  ``pred == 0``.

VLM2Vec loads vendored copies of transformers' Qwen2-VL and LLaVA-NeXT processors; their
placeholder expansion is transformers' (``processing_qwen2_vl.py``: each ``<|image_pad|>``
becomes ``grid_thw.prod() // merge_size**2`` copies), so the tests call the tiny model's own
transformers processor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PHI3V_IMAGE_TOKEN = "<|image_1|>"  # VLM_IMAGE_TOKENS[PHI3V], the marker MMEB writes
VLM_IMAGE_TOKENS = {"qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>", "llava_next": "<image>"}


def replace_marker(text: str, backbone: str) -> str:
    """``EvalDataset.__getitem__``: ``text.replace(VLM_IMAGE_TOKENS[PHI3V], VLM_IMAGE_TOKENS[backbone])``."""
    return text.replace(PHI3V_IMAGE_TOKEN, VLM_IMAGE_TOKENS[backbone])


def process_input_text(
    instruction: str, model_backbone: str, text: str | None = None, add_image_token: bool = False
) -> str:
    """``process_input_text`` for the VLM backbones (the GME / LamRA / E5-V branches left out)."""
    prompt = instruction
    if text:
        prompt = prompt + " " + text
    if add_image_token:
        image_token = VLM_IMAGE_TOKENS[model_backbone]
        prompt = image_token + " " + prompt
    return prompt


def qwen2_vl_input_ids(text: str, images: list[Any] | None, processor: Any) -> list[int]:
    """One item's ``input_ids`` as ``Qwen2_VL_process_fn`` builds them (before batch padding)."""
    if not images:
        inputs = processor(text=[text], images=None, return_tensors="np", max_length=None, truncation=True)
        input_id = inputs["input_ids"].squeeze().tolist()
        return [input_id] if isinstance(input_id, int) else input_id
    if VLM_IMAGE_TOKENS["qwen2_vl"] not in text:
        raise NotImplementedError(f"No visual token found in the text: {text}")
    images = list(images)
    for iid, image in enumerate(images):
        # "rare case in MMEB eval: resize to 28*28 if either w or h is smaller than 28"
        if image.size[0] < 28 or image.size[1] < 28:
            images[iid] = image.resize((56, 56))
    inputs = processor(text=[text], images=images, return_tensors="np", max_length=None, truncation=False)
    return inputs["input_ids"].squeeze().tolist()


def llava_next_input_ids(text: str, images: list[Any] | None, processor: Any) -> list[int]:
    """One item's ``input_ids`` as ``Llava_NEXT_process_fn`` builds them (before batch padding)."""
    if images is None or not images:
        inputs = processor(images=None, text=text, return_tensors="np", max_length=None, truncation=True)
        input_id = inputs["input_ids"].squeeze().tolist()
        return [input_id] if isinstance(input_id, int) else input_id
    inputs = processor(images=images, text=text, return_tensors="np", max_length=None, truncation=True)
    return inputs["input_ids"].squeeze().tolist()


PROCESS_FNS = {
    "qwen2_vl": qwen2_vl_input_ids,
    "qwen2_5_vl": qwen2_vl_input_ids,  # process_vlm_inputs_fns[QWEN2_5_VL] = Qwen2_VL_process_fn
    "llava_next": llava_next_input_ids,
}


def get_pred(qry_t: np.ndarray, tgt_t: np.ndarray, normalization: bool = False) -> tuple[np.ndarray, int]:
    """v1 ``get_pred``: scores of every candidate and the argmax."""
    if normalization:
        qry_t_norm = np.linalg.norm(qry_t)
        tgt_t_norms = np.linalg.norm(tgt_t, axis=1)
        scores = np.dot(tgt_t, qry_t) / (tgt_t_norms * qry_t_norm)
    else:
        scores = np.dot(tgt_t, qry_t)
    pred = np.argmax(scores)
    return scores, int(pred)


def v1_hit(qry_t: np.ndarray, tgt_key2emb: dict[Any, np.ndarray], candidates: list[Any]) -> bool:
    """The v1 ``eval.py`` loop for one row: embeddings by candidate key, hit when ``pred == 0``."""
    tgt_t = np.stack([tgt_key2emb[tt] for tt in candidates], axis=0)
    _, pred = get_pred(qry_t, tgt_t, normalization=True)
    return pred == 0


def v2_hit_at_1(qry_embed: np.ndarray, cand_embed_dict: dict[str, np.ndarray], cand_names: list[str]) -> bool:
    """V2 ``eval.py`` (local candidates) for one row: the top candidate's name is the label."""
    cand_embeds = np.stack([cand_embed_dict[key] for key in cand_names])
    cosine_score = np.dot(qry_embed, cand_embeds.T)
    ranked_candids = np.argsort(-cosine_score)
    prediction = [cand_names[i] for i in ranked_candids]
    label = [cand_names[0]]  # label_name = tgt_texts[0]
    return prediction[0] in label
