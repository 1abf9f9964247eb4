"""vlm2emb.distributed helpers that run in one process."""

from __future__ import annotations

import torch

from vlm2emb.distributed import reachable_parameters


class _Branchy(torch.nn.Module):
    """Shared trunk, two heads; a frozen layer; a parameter used twice (a DAG, not a tree)."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(4, 4)
        self.left = torch.nn.Linear(4, 2)
        self.right = torch.nn.Linear(4, 2)
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.frozen(self.trunk(x)) * self.scale + self.trunk(x) * self.scale
        return self.left(h), self.right(h)


def test_reachable_parameters_match_the_gradients_a_backward_gives():
    """The graph walk agrees with a real backward: a parameter is reached exactly when the
    backward gives it a gradient, whichever outputs the loss uses."""
    torch.manual_seed(0)
    model = _Branchy()
    params = [p for p in model.parameters() if p.requires_grad]
    x = torch.randn(3, 4)
    for use in ("left", "right", "both"):
        model.zero_grad(set_to_none=True)
        left, right = model(x)
        loss = {"left": left.sum(), "right": right.pow(2).sum(), "both": (left.sum() + right.sum())}[use]
        found = reachable_parameters(loss, params)
        loss.backward()
        assert found == [p.grad is not None for p in params], use
        assert found.count(False) == (0 if use == "both" else 2)
