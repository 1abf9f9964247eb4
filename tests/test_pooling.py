import pytest
import torch

from vlm2emb.pooling import POOLING_METHODS, last_token_index, pool


def _padded(lengths: list[int], side: str, seq_len: int = 6, hidden: int = 3):
    torch.manual_seed(0)
    h = torch.randn(len(lengths), seq_len, hidden)
    mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        if side == "right":
            mask[i, :n] = 1
        else:
            mask[i, seq_len - n :] = 1
    return h, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_token_index_finds_last_real_token(side: str) -> None:
    lengths = [6, 1, 3]
    _, mask = _padded(lengths, side)
    idx = last_token_index(mask)
    expected = [n - 1 for n in lengths] if side == "right" else [5, 5, 5]
    assert idx.tolist() == expected


@pytest.mark.parametrize("side", ["left", "right"])
def test_last_pooling_matches_manual_gather(side: str) -> None:
    h, mask = _padded([4, 2, 6], side)
    out = pool(h, mask, "last")
    for i in range(3):
        real = h[i][mask[i].bool()]  # [n_i, H] real tokens in order
        torch.testing.assert_close(out[i], real[-1])


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_pooling_ignores_padding(side: str) -> None:
    h, mask = _padded([4, 2, 6], side)
    out = pool(h, mask, "mean")
    for i in range(3):
        torch.testing.assert_close(out[i], h[i][mask[i].bool()].mean(0))


def test_eos_and_embed_token_pool_like_last() -> None:
    h, mask = _padded([3, 5], "right")
    for method in ("eos", "embed_token"):
        torch.testing.assert_close(pool(h, mask, method), pool(h, mask, "last"))


def test_unknown_pooling_is_rejected() -> None:
    h, mask = _padded([2], "right")
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pool(h, mask, "max")
    assert set(POOLING_METHODS) == {"last", "eos", "embed_token", "mean"}
