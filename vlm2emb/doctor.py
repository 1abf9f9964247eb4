"""``vlm2emb doctor MODEL``: a self-test of a backbone as vlm2emb sees it.

It loads the model through the normal path and then checks what is easy to get silently
wrong when a VLM becomes an embedder:

- the attention mode is the one asked for: with bidirectional attention, changing a later
  token changes an earlier position's hidden state, with causal attention it does not. This
  is checked both for a lone input (no padding, where transformers may skip the mask and rely
  on SDPA's ``is_causal`` flag) and inside a padded batch (mask materialised);
- an item's embedding does not depend on its batch mates or the padding;
- every embedding is finite;

and reports what a user wants to know before training: parameter counts, how many modules the
family's default LoRA targets match, and the prompt rendered for a text + image item: the
string and the exact token ids the model gets (:meth:`EmbeddingModel.render`), in the model's
prompt style.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from vlm2emb.model import EmbeddingModel

SAMPLE_TEXT = "A handwritten digit seven on a white page."
SAMPLE_INSTRUCTION = "Represent the given image for classification."


@dataclass
class Check:
    """One check's outcome: a name, whether it passed, and a line of detail."""

    name: str
    passed: bool
    detail: str


@dataclass
class DoctorReport:
    """Everything ``doctor`` found; :meth:`format` renders it for the terminal."""

    model: str
    family: str
    attention: str
    pooling: str
    dtype: str
    embedding_dim: int
    params: dict[str, int] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    prompt: str = ""
    prompt_tokens: dict[str, int] = field(default_factory=dict)
    prompt_style: str = "vlm2emb"
    prompt_ids: list[int] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def format(self) -> str:
        p = self.params
        lines = [
            f"vlm2emb doctor: {self.model}",
            f"  family          {self.family}",
            f"  attention       {self.attention}",
            f"  pooling         {self.pooling}",
            f"  dtype           {self.dtype}",
            f"  prompt style    {self.prompt_style}",
            f"  embedding dim   {self.embedding_dim}",
            "",
            "Parameters",
            f"  total           {p['total']:,}",
            f"  language model  {p['language_model']:,}",
            f"  other (vision, projector) {p['total'] - p['language_model']:,}",
            f"  trainable       {p['trainable']:,}",
            "",
            "LoRA (family default targets)",
            f"  pattern         {self.lora['pattern']}",
            f"  matched modules {self.lora['matched']} in {self.lora['layers']} of "
            f"{self.lora['decoder_layers']} decoder layers ({', '.join(self.lora['kinds']) or 'none'})",
            "",
            "Prompt for a text + image item (before the processor expands image placeholders)",
            f"  {self.prompt!r}",
            f"  -> {self.prompt_tokens['total']} tokens, {self.prompt_tokens['image']} of them image tokens",
            f"  ids {format_ids(self.prompt_ids)}",
            "",
            "Checks",
        ]
        for check in self.checks:
            lines.append(f"  [{'ok' if check.passed else 'FAIL'}] {check.name}: {check.detail}")
        failed = sum(not c.passed for c in self.checks)
        lines += ["", "all checks passed" if not failed else f"{failed} check(s) failed"]
        return "\n".join(lines)


def format_ids(ids: list[int]) -> str:
    """Token ids with runs of one id written ``id x n`` (image placeholders expand to hundreds)."""
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i]:
            j += 1
        parts.append(str(ids[i]) if j - i == 1 else f"{ids[i]} x{j - i}")
        i = j
    return "[" + ", ".join(parts) + "]"


def sample_image(size: int = 64) -> Any:
    """A deterministic RGB test card (gradients and a square), so no file is needed."""
    import numpy as np
    from PIL import Image

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    rgb = np.stack(
        [np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), np.full((size, size), 96.0)], -1
    )
    q = size // 4
    rgb[q : 3 * q, q : 3 * q] = (250.0, 250.0, 250.0)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB")


def _hidden(model: EmbeddingModel, items: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = model.collate(items)
    inputs = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    with torch.inference_mode():
        hidden, mask = model.adapter.forward(model.backbone, inputs)
    return hidden.float().cpu(), mask.cpu()


def check_attention(model: EmbeddingModel, tol: float) -> Check:
    """Does a later token change position 0? It must iff the attention is bidirectional."""
    short = "one two three four"
    longer = "one two three four five six seven eight nine"  # same start, later tokens differ
    filler = "a much longer sentence than the other two, so that both of them get padded " * 2
    h_short, _ = _hidden(model, [short])
    h_long, _ = _hidden(model, [longer])
    alone = (h_short[0, 0] - h_long[0, 0]).abs().max().item()
    h, mask = _hidden(model, [short, longer, filler])
    first = [h[i][mask[i].bool()][0] for i in range(2)]
    padded = (first[0] - first[1]).abs().max().item()
    bidirectional = model.config.attention == "bidirectional"
    seen_alone, seen_padded = alone > tol, padded > tol
    passed = seen_alone == seen_padded == bidirectional
    expect = "changes" if bidirectional else "stays the same"
    detail = (
        f"asked for {model.config.attention}: position 0 {expect} when a later token changes? "
        f"alone (no padding mask) {'changed' if seen_alone else 'unchanged'} (max diff {alone:.2e}), "
        f"in a padded batch {'changed' if seen_padded else 'unchanged'} (max diff {padded:.2e})"
    )
    return Check("attention mode", passed, detail)


def check_batch_invariance(model: EmbeddingModel, items: list[Any], tol: float) -> tuple[Check, Check]:
    """Embeddings alone vs. padded together, and whether all of them are finite."""
    batched = model.encode(items, batch_size=len(items))
    alone = torch.stack([model.encode(item) for item in items])
    finite = bool(torch.isfinite(batched).all() and torch.isfinite(alone).all())
    diff = (batched - alone).abs().max().item() if finite else float("inf")
    invariance = Check(
        "padding / batch invariance",
        diff <= tol,
        f"max |batched - alone| = {diff:.2e} over {len(items)} items (tolerance {tol:.0e}, "
        f"{model.config.padding_side} padding)",
    )
    rows = int(torch.isfinite(batched).all(dim=-1).sum())
    finite_check = Check("finite outputs", finite, f"{rows} of {len(items)} embeddings finite")
    return invariance, finite_check


def lora_summary(model: EmbeddingModel) -> dict[str, Any]:
    """Which modules the family's default LoRA targets match (as peft would)."""
    targets = model.adapter.lora_target_modules
    named = [n for n, _ in model.backbone.named_modules() if n]
    if isinstance(targets, str):
        pattern = re.compile(targets)
        matched = [n for n in named if pattern.fullmatch(n)]
    else:  # peft: a list of names matches modules whose name ends with one of them
        matched = [n for n in named if any(n == t or n.endswith("." + t) for t in targets)]
    layers = {m.group(1) for n in matched if (m := re.search(r"layers\.(\d+)\.", n))}
    decoder_layers = len(getattr(model.adapter.language_model(model.backbone), "layers", []))
    return {
        "pattern": targets if isinstance(targets, str) else ", ".join(targets),
        "matched": len(matched),
        "layers": len(layers),
        "decoder_layers": decoder_layers,
        "kinds": sorted({n.rsplit(".", 1)[-1] for n in matched}),
    }


def run_doctor(
    model: EmbeddingModel,
    name: str,
    *,
    text: str = SAMPLE_TEXT,
    instruction: str | None = SAMPLE_INSTRUCTION,
) -> DoctorReport:
    """Runs every check on a loaded model.

    Args:
        model: The model to check (any device or dtype).
        name: How the user named it, for the report header.
        text: The text of the item whose prompt is shown (with one sample image); an MMEB
            text with ``<|image_1|>`` shows how the prompt style treats the marker.
        instruction: The instruction of that item.

    Returns:
        The report; ``report.ok`` is False when a check failed.
    """
    model.eval()
    low_precision = model.dtype in (torch.bfloat16, torch.float16)
    tol = 2e-2 if low_precision else 1e-4
    image = sample_image()
    lm = model.adapter.language_model(model.backbone)
    report = DoctorReport(
        model=name,
        family=model.adapter.family,
        attention=model.config.attention,
        pooling=model.config.pooling,
        dtype=str(model.dtype).removeprefix("torch."),
        embedding_dim=model.embedding_dim,
        params={
            "total": sum(p.numel() for p in model.backbone.parameters()),
            "language_model": sum(p.numel() for p in lm.parameters()),
            "trainable": sum(p.numel() for p in model.backbone.parameters() if p.requires_grad),
        },
        lora=lora_summary(model),
    )
    rendered = model.render({"text": text, "image": image}, instruction)
    report.prompt = rendered.prompt
    report.prompt_style = rendered.prompt_style
    report.prompt_ids = rendered.input_ids
    image_id = _image_token_id(model)
    report.prompt_tokens = {
        "total": len(rendered.input_ids),
        "image": sum(i == image_id for i in rendered.input_ids) if image_id is not None else 0,
    }
    lora = report.lora
    report.checks.append(
        Check(
            "LoRA targets",
            lora["matched"] > 0 and lora["layers"] == lora["decoder_layers"],
            f"{lora['matched']} modules in {lora['layers']}/{lora['decoder_layers']} decoder layers",
        )
    )
    report.checks.append(check_attention(model, tol))
    items = [
        SAMPLE_TEXT,
        "seven",
        image,
        {"text": SAMPLE_TEXT, "image": image},
        {"text": "two views", "images": [image, image.rotate(90)]},
    ]
    report.checks.extend(check_batch_invariance(model, items, tol))
    return report


def _image_token_id(model: EmbeddingModel) -> int | None:
    cfg = model.backbone.config
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None
