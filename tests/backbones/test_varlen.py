"""varlen_sdpa against a per-segment loop of plain SDPA calls (the reference): values and
gradients, equal and unequal segment lengths, causal or not."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlm2emb.backbones.varlen import _segments, use_for_vision, varlen_sdpa


def _reference(q, k, v, lengths, is_causal):
    """One SDPA call per segment, outputs concatenated: [1, T, H, D]."""
    outs = [
        F.scaled_dot_product_attention(a, b, c, is_causal=is_causal)
        for a, b, c in zip(*(t.split(lengths, dim=2) for t in (q, k, v)))
    ]
    return torch.cat(outs, dim=2).transpose(1, 2)


@pytest.mark.parametrize("lengths", [[5, 5, 5], [3, 7, 3, 1, 7]], ids=["equal", "mixed"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_varlen_sdpa_equals_a_loop_over_segments(lengths, is_causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, sum(lengths), 4, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    got, weights = varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu, is_causal=is_causal)
    ref = _reference(q, k, v, lengths, is_causal)
    assert weights is None and got.shape == ref.shape == (1, sum(lengths), 2, 4)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    upstream = torch.randn_like(ref)
    grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Segments do not see each other: changing one segment's values leaves the others alone.
    v2 = v.detach().clone()
    v2[:, :, : lengths[0]] += 1.0
    other, _ = varlen_sdpa(None, q, k, v2, cu_seq_lens_q=cu, cu_seq_lens_k=cu, is_causal=is_causal)
    torch.testing.assert_close(other[:, lengths[0] :], got[:, lengths[0] :])
    assert not torch.allclose(other[:, : lengths[0]], got[:, : lengths[0]])


def test_without_segments_it_is_plain_sdpa_and_masks_are_refused_with_them():
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    got, _ = varlen_sdpa(None, q, k, v)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v).transpose(1, 2))
    cu = torch.tensor([0, 3, 6])
    with pytest.raises(ValueError, match="without a mask"):
        varlen_sdpa(None, q, k, v, attention_mask=torch.ones(6, 6, dtype=torch.bool), cu_seq_lens_q=cu)


def test_works_under_inference_mode():
    """encode() runs under torch.inference_mode, whose tensors keep no version counter."""
    q, k, v = (torch.randn(1, 2, 8, 4) for _ in range(3))
    with torch.inference_mode():
        cu = torch.tensor([0, 3, 8])
        got, _ = varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
        again, _ = varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu, cu_seq_lens_k=cu)  # from the cache
    torch.testing.assert_close(got, _reference(q, k, v, [3, 5], False))
    torch.testing.assert_close(again, got)


def test_segment_lengths_are_read_once_per_tensor_and_again_after_a_write():
    cu = torch.tensor([0, 2, 5])
    assert _segments(cu) == ([0, 2], [2, 3])
    assert cu._vlm2emb_segments[1:] == ([0, 2], [2, 3])  # cached on the tensor
    cu[2] = 6  # written in place: the cache must not be trusted
    assert _segments(cu) == ([0, 2], [2, 4])


def test_only_an_sdpa_tower_is_switched():
    from transformers import Qwen2VLConfig

    for impl, switched in (("sdpa", True), ("eager", False)):
        config = Qwen2VLConfig().vision_config
        config._attn_implementation = impl
        assert use_for_vision(config) is switched
        assert (config._attn_implementation == impl) is not switched
    assert use_for_vision(None) is False
