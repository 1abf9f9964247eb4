"""Default LoRA target patterns, shared by the backbone families.

An adapter's ``lora_target_modules`` is a regex that peft matches against full module names.
It must reach the language model's attention and MLP projections and nothing else: vision
towers often have ``q_proj`` too. The families differ only in where their decoder layers
live, so the patterns are built here from that one place name.
"""

from __future__ import annotations

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# The same projections in LLaDA's OLMo naming (attention output, MLP in and out).
OLMO_PROJECTIONS = ("attn_out", "ff_proj", "ff_out")


def decoder_layer_projections(stack: str, anchor: str = ".*") -> str:
    """Every attention and MLP projection of the decoder layers under ``stack``.

    Matches ``<anchor><stack>.layers.<i>.self_attn.{q,k,v,o}_proj`` and
    ``<anchor><stack>.layers.<i>.mlp.{gate,up,down}_proj``.

    Args:
        stack: Regex of the decoder's module path (``language_model``, ``text_model``).
        anchor: What may come before it (``.*``: any prefix, such as a peft wrapper's).
    """
    return (
        rf"{anchor}{stack}\.layers\.\d+\."
        rf"(self_attn\.({'|'.join(ATTENTION_PROJECTIONS)})|mlp\.({'|'.join(MLP_PROJECTIONS)}))"
    )


def named_projections(scope: str, names: tuple[str, ...] = ATTENTION_PROJECTIONS + MLP_PROJECTIONS) -> str:
    """Any module called one of ``names`` anywhere below a module path matching ``scope``."""
    return rf".*{scope}.*\.({'|'.join(names)})"


# The decoder is ``*.language_model`` (LLaVA, PaliGemma, Gemma 3, InternVL, ...).
LANGUAGE_MODEL_PROJECTIONS = decoder_layer_projections("language_model")
# The decoder is ``*.text_model`` (Idefics3, SmolVLM).
TEXT_MODEL_PROJECTIONS = decoder_layer_projections("text_model")
