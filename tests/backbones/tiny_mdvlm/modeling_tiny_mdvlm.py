"""A tiny masked-diffusion VLM, written for the tests and loaded as remote code.

It has the traits of LLaDA-V / LaViDa / MMaDA / Dimple that an embedding adapter must
respect: a bidirectional transformer (no causal mask anywhere), a ``[MASK]`` token, its own
idea of what an attention mask looks like (``config.mask_input``), image placeholder tokens
that vision features replace, or VQ image codes offset into the vocabulary, and a separate
noisy training forward (:meth:`TinyMDVLMModel.forward_diffusion_loss`) that masks tokens at
a random ratio. That one must never be used to embed; it counts its calls so tests can check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput

from .configuration_tiny_mdvlm import TinyMDVLMConfig


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class TinyAttention(nn.Module):
    """Multi-head self-attention, never causal."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            p(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rope is not None:
            cos, sin = rope  # [B, 1, L, hd]
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        # Eager attention as in most remote-code models: a boolean mask fills -inf, so a
        # query row with no visible key gives NaN (softmax over all -inf).
        scores = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
        if mask is not None and mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        elif mask is not None:
            scores = scores + mask
        out = scores.softmax(dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class TinyMLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, inner: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = TinyAttention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = TinyMLP(hidden, inner)

    def forward(self, x: torch.Tensor, rope: tuple | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLanguageModel(nn.Module):
    def __init__(self, config: TinyMDVLMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TinyBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = nn.LayerNorm(config.hidden_size)


class TinyVisionTower(nn.Module):
    """Patch embedding + one attention block: the SigLIP stand-in."""

    def __init__(self, config: TinyMDVLMConfig) -> None:
        super().__init__()
        p, n = config.patch_size, (config.image_size // config.patch_size) ** 2
        self.patch_size = p
        self.patch_embed = nn.Linear(3 * p * p, config.vision_hidden_size)
        self.position_embedding = nn.Parameter(torch.zeros(n, config.vision_hidden_size))
        self.block = TinyBlock(config.vision_hidden_size, 2, 2 * config.vision_hidden_size)

    def patches(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = pixel_values.unfold(2, p, p).unfold(3, p, p)  # [N, C, h, w, p, p]
        return x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)  # [N, h*w, C*p*p]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(self.patches(pixel_values)) + self.position_embedding
        return self.block(x, None, None)  # [N, patches, vision_hidden]


class TinyVQTokenizer(nn.Module):
    """Nearest-codebook quantiser over patches: the MAGVIT stand-in (codes, no gradient)."""

    def __init__(self, config: TinyMDVLMConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.proj = nn.Linear(3 * config.patch_size**2, 16)
        self.codebook = nn.Parameter(torch.randn(config.vq_codebook_size, 16))

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        x = pixel_values.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        z = self.proj(x.to(self.proj.weight.dtype))  # [N, patches, 16]
        dist = (z.unsqueeze(-2) - self.codebook).pow(2).sum(-1)  # [N, patches, K]
        return dist.argmin(-1)  # [N, patches] codes in [0, K)


class TinyMDVLMPreTrainedModel(PreTrainedModel):
    config_class = TinyMDVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.normal_(0.0, 0.02)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        elif isinstance(module, TinyVisionTower):
            module.position_embedding.normal_(0.0, 0.02)
        elif isinstance(module, TinyVQTokenizer):
            module.codebook.normal_(0.0, 1.0)


class TinyMDVLMModel(TinyMDVLMPreTrainedModel):
    """The plain forward returns hidden states; :meth:`forward_diffusion_loss` is training."""

    def __init__(self, config: TinyMDVLMConfig) -> None:
        super().__init__(config)
        extra = config.vq_codebook_size if config.vision == "vq" else 0
        self.embed_tokens = nn.Embedding(config.vocab_size + extra, config.hidden_size)
        if config.vision == "vq":
            self.vq = TinyVQTokenizer(config)
        else:
            self.vision_tower = TinyVisionTower(config)
            self.mm_projector = nn.Linear(config.vision_hidden_size, config.hidden_size)
        self.language_model = TinyLanguageModel(config)
        self.noisy_forward_calls = 0
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.embed_tokens = value

    def _rope(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hd = self.config.hidden_size // self.config.num_attention_heads
        inv = 1.0 / (
            self.config.rope_theta ** (torch.arange(0, hd, 2, device=position_ids.device).float() / hd)
        )
        ang = position_ids.float().unsqueeze(-1) * inv  # [B, L, hd/2]
        ang = torch.cat((ang, ang), dim=-1).unsqueeze(1)  # [B, 1, L, hd]
        dtype = self.embed_tokens.weight.dtype
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def _mask(
        self, attention_mask: torch.Tensor | None, attention_bias: torch.Tensor | None
    ) -> torch.Tensor | None:
        form = self.config.mask_input
        if form == "none":
            return None  # like LLaDA: padding is not masked at all
        if form == "additive":
            return attention_bias
        if attention_mask is None:
            return None
        if form == "4d_bool":
            if attention_mask.dim() != 4 or attention_mask.dtype != torch.bool:
                raise ValueError("tiny_mdvlm expects attention_mask as a [B, 1, L, L] boolean tensor")
            return attention_mask
        if attention_mask.dim() != 2:
            raise ValueError("tiny_mdvlm expects attention_mask as a [B, L] tensor")
        return attention_mask.bool()[:, None, None, :]  # keys only

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_bias: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        return_dict: bool = True,
        **kwargs,
    ) -> BaseModelOutput:
        """One bidirectional pass over clean tokens; no noise, no timestep."""
        x = self.embed_tokens(input_ids)
        if pixel_values is not None and self.config.vision == "features":
            feats = self.mm_projector(self.vision_tower(pixel_values.to(x.dtype)))  # [N, T, H]
            slots = (input_ids == self.config.image_token_id).unsqueeze(-1)
            if int(slots.sum()) != feats.shape[0] * feats.shape[1]:
                raise ValueError("image placeholder count does not match the image features")
            x = x.masked_scatter(slots, feats.reshape(-1, x.shape[-1]))
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rope = self._rope(position_ids)
        mask = self._mask(attention_mask, attention_bias)
        states = [x]
        for layer in self.language_model.layers:
            x = layer(x, rope, mask)
            states.append(x)
        x = self.language_model.norm(x)
        states[-1] = x
        return BaseModelOutput(
            last_hidden_state=x, hidden_states=tuple(states) if output_hidden_states else None
        )

    def forward_diffusion_loss(
        self, input_ids: torch.LongTensor, labels: torch.LongTensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked-diffusion training step: mask a random fraction t of tokens, predict them.

        Returns ``(loss, hidden states of the noised input)``; the noise differs per call.
        """
        self.noisy_forward_calls += 1
        labels = input_ids if labels is None else labels
        t = torch.rand(input_ids.shape[0], 1, device=input_ids.device).clamp(min=0.1)
        noised = torch.rand(input_ids.shape, device=input_ids.device) < t
        noisy_ids = torch.where(noised, torch.full_like(input_ids, self.config.mask_token_id), input_ids)
        hidden = self.forward(noisy_ids, **kwargs).last_hidden_state
        logits = hidden @ self.embed_tokens.weight.T
        loss = F.cross_entropy(logits[noised], labels[noised], reduction="sum") / (
            t.sum() * input_ids.shape[1]
        )
        return loss, hidden
