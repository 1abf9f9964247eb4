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
  - ``src/utils/eval_utils/metrics.py``: ``RankingMetrics`` (the V2 score files' metric block,
    :mod:`vlm2emb.eval.leaderboard`).
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


# --------------------------------------------------------------------- V2 score files
# src/utils/eval_utils/metrics.py (commit 6e1e1d4): ``RankingMetrics``, per query over the
# ranked candidate names ``prediction`` and the label names; ``evaluate`` averages them.
def rm_precision(prediction: list, labels: list, k: int) -> float:
    if not labels or k == 0:
        return 0.0
    return len(set(prediction[:k]) & set(labels)) / k


def rm_recall(prediction: list, labels: list, k: int) -> float:
    if not labels:
        return 1.0
    if k == 0:
        return 0.0
    return len(set(prediction[:k]) & set(labels)) / len(labels)


def rm_hit(prediction: list, labels: list, k: int) -> float:
    if not labels or k == 0:
        return 0.0
    return 1.0 if set(prediction[:k]) & set(labels) else 0.0


def rm_f1(prediction: list, labels: list, k: int) -> float:
    p, r = rm_precision(prediction, labels, k), rm_recall(prediction, labels, k)
    return 0.0 if p + r == 0 else 2 * p * r / (p + r)


def rm_average_precision(prediction: list, labels: list, k: int) -> float:
    if not labels or k == 0:
        return 0.0
    score, hits = 0.0, 0
    for i, p in enumerate(prediction[:k]):
        if p in labels:
            hits += 1
            score += hits / (i + 1.0)
    return score / min(len(labels), k) if hits else 0.0


def rm_reciprocal_rank(prediction: list, labels: list, k: int) -> float:
    if not labels:
        return 0.0
    for rank, p in enumerate(prediction[:k]):
        if p in labels:
            return 1.0 / (rank + 1)
    return 0.0


def rm_ndcg(prediction: list, labels: list, k: int, rel_scores: list | None, form: str) -> float:
    def dcg(rels: list) -> float:
        if form == "linear":
            return sum(rel / np.log2(i + 2) for i, rel in enumerate(rels))
        return sum((2**rel - 1) / np.log2(i + 2) for i, rel in enumerate(rels))

    if rel_scores is None:
        label_set = set(labels)
        relevance = [1 if item in label_set else 0 for item in prediction[:k]]
        ideal = [1] * min(len(label_set), k)
    else:
        label_rels = dict(zip(labels, rel_scores))
        relevance = [label_rels.get(item, 0) for item in prediction[:k]]
        ideal = sorted(label_rels.values(), reverse=True)[:k]
    idcg = dcg(ideal) if ideal else 1
    return dcg(relevance) / idcg if idcg > 0 else 0.0


def rm_evaluate(cases: list[dict], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``RankingMetrics(["hit", "ndcg", "precision", "recall", "f1", "map", "mrr"]).evaluate``.

    Upstream replaces each case's labels by ``list(set(labels))`` before scoring, while
    ``rel_scores`` keep the original order, so with graded scores and several labels the
    gains are paired with labels in set order (hash order for strings). Callers here pass
    graded cases with labels already in the order ``list(set(...))`` gives.
    """
    per: dict[str, list[float]] = {}
    for case in cases:
        prediction, labels, rels = case["prediction"], list(set(case["label"])), case.get("rel_scores")
        for k in ks:
            per.setdefault(f"hit@{k}", []).append(rm_hit(prediction, labels, k))
            per.setdefault(f"ndcg_linear@{k}", []).append(rm_ndcg(prediction, labels, k, rels, "linear"))
            per.setdefault(f"ndcg_exponential@{k}", []).append(
                rm_ndcg(prediction, labels, k, rels, "exponential")
            )
            per.setdefault(f"precision@{k}", []).append(rm_precision(prediction, labels, k))
            per.setdefault(f"recall@{k}", []).append(rm_recall(prediction, labels, k))
            per.setdefault(f"f1@{k}", []).append(rm_f1(prediction, labels, k))
            per.setdefault(f"map@{k}", []).append(rm_average_precision(prediction, labels, k))
            per.setdefault(f"mrr@{k}", []).append(rm_reciprocal_rank(prediction, labels, k))
    # score_dict: family by family (the metric list's order), each over the cut-offs.
    families = ("hit", "ndcg_linear", "ndcg_exponential", "precision", "recall", "f1", "map", "mrr")
    return {f"{f}@{k}": float(np.mean(per[f"{f}@{k}"])) for f in families for k in ks}
