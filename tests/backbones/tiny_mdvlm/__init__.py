"""A tiny remote-code masked-diffusion VLM checkpoint, written the way the real ones ship.

:func:`build_tiny_mdvlm` writes a folder like a downloaded LLaDA-V / LaViDa / MMaDA / Dimple
checkpoint: ``config.json`` with an ``auto_map`` pointing at the modelling files saved next
to the weights (so transformers loads them only with ``trust_remote_code=True``), the
weights, a processor, and the ``vlm2emb_config.json`` a user writes to pick the generic
``masked_diffusion`` adapter and describe the model's mask form and vision type.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent
MODULE_FILES = ("configuration_tiny_mdvlm.py", "modeling_tiny_mdvlm.py")
MASK_TOKEN = "<|mdm_mask|>"
IMAGE_TOKEN = "<image>"

# How the tiny model's own mask input maps to the adapter's mask_form (same names on purpose).
MASK_FORMS = ("4d_bool", "2d", "additive", "none")


def build_tiny_mdvlm(
    path: str | Path, *, seed: int = 0, mask_input: str = "4d_bool", vision: str = "features"
) -> Path:
    """Writes a tiny random masked-diffusion VLM checkpoint into ``path``.

    Args:
        path: Output folder (created if missing).
        seed: Seed for the random weights.
        mask_input: The mask form the model's forward reads (see ``TinyMDVLMConfig``).
        vision: ``"features"`` (vision tower) or ``"vq"`` (VQ codes in the vocabulary).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    import torch
    from transformers import LlavaProcessor, SiglipImageProcessor

    from vlm2emb.testing import tiny_tokenizer

    from .configuration_tiny_mdvlm import TinyMDVLMConfig
    from .modeling_tiny_mdvlm import TinyMDVLMModel

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", MASK_TOKEN, IMAGE_TOKEN, "<|embed|>"]
    tok = tiny_tokenizer(specials, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    # SigLIP-style fixed 16x16 input, 4 px patches: one image -> 16 placeholder tokens.
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessor(size={"height": 16, "width": 16}),
        tokenizer=tok,
        patch_size=4,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        image_token=IMAGE_TOKEN,
    )
    config = TinyMDVLMConfig(
        vocab_size=len(tok),
        image_token_id=ids[IMAGE_TOKEN],
        mask_token_id=ids[MASK_TOKEN],
        mask_input=mask_input,
        vision=vision,
        pad_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|endoftext|>"],
    )
    config.auto_map = {
        "AutoConfig": "configuration_tiny_mdvlm.TinyMDVLMConfig",
        "AutoModel": "modeling_tiny_mdvlm.TinyMDVLMModel",
    }
    torch.manual_seed(seed)
    model = TinyMDVLMModel(config)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    for name in MODULE_FILES:
        shutil.copy(HERE / name, out / name)
    spec = {
        "mask_form": mask_input,
        "mask_kwarg": "attention_bias" if mask_input == "additive" else "attention_mask",
        "vision": vision,
        "image_token": IMAGE_TOKEN,
        "mask_token": MASK_TOKEN,
        "position_ids": True,
    }
    if vision == "vq":
        spec |= {"vq_encoder": "vq.encode", "vq_offset": config.vq_offset}
    (out / "vlm2emb_config.json").write_text(
        json.dumps({"family": "masked_diffusion", "masked_diffusion": spec}, indent=2) + "\n"
    )
    return out
