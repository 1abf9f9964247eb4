"""Collectives for contrastive training across processes.

Contrastive losses need every process's targets as negatives for every other process's
queries. :func:`gather_with_grad` concatenates a tensor from all processes while keeping
the gradient path exact: in the backward pass each process receives the sum, over all
processes' losses, of the gradient with respect to its own slice. Together with a loss that
is the mean over local queries and the gradient averaging of DDP / DeepSpeed, N processes at
batch B/N compute the same gradients as one process at batch B (open_clip calls this
"local loss + gather with grad").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size), (0, 1) outside distributed runs."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def main_process_first() -> Iterator[bool]:
    """Runs the block on the main process, then on the others; yields ``is_main``.

    For files that the main process writes and every process reads: inside the block, write
    only where ``is_main`` is true, and read anywhere. Outside a process group it runs once
    and yields True. The main process reaches the closing barrier even when its block raises,
    so the others are not left waiting (they then run the block and usually fail alike).
    """
    rank, world = rank_and_world()
    if rank != 0:
        dist.barrier()
    try:
        yield rank == 0
    finally:
        if rank == 0 and world > 1:
            dist.barrier()


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:  # local [b, ...] -> [world * b, ...]
        world = dist.get_world_size()
        ctx.rank = dist.get_rank()
        ctx.rows = local.shape[0]
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # grad [world * b, ...]
        # Every process's loss depends on every slice: sum the gradients from all processes
        # (all_reduce; gloo has no reduce_scatter) and keep this process's rows.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows]


def is_zero3_partition(param: torch.Tensor | None) -> bool:
    """Whether ``param`` is a DeepSpeed ZeRO-3 partition (only hooks gather its whole value).

    ZeRO-3 partitions every parameter of a model, so testing one parameter answers for all.
    """
    return hasattr(param, "ds_id")


def is_zero3_module(module: torch.nn.Module) -> bool:
    """Whether ``module``'s parameters are DeepSpeed ZeRO-3 partitions (its first one tells)."""
    return is_zero3_partition(next(module.parameters(), None))


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    """Concatenates ``local`` from all processes in rank order, differentiably.

    Every process must pass a tensor of the same shape.

    Args:
        local: [b, ...] this process's rows.

    Returns:
        [world * b, ...]; the identity outside distributed runs.
    """
    if not is_distributed():
        return local
    return _GatherWithGrad.apply(local)


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when ``flag`` holds on every process (one tiny all-reduce)."""
    if not is_distributed():
        return flag
    t = torch.tensor([0 if flag else 1], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return int(t.item()) == 0


def reachable_parameters(output: torch.Tensor, params: list[torch.nn.Parameter]) -> list[bool]:
    """Which of ``params`` the autograd graph of ``output`` reaches (a backward would give
    them a gradient), found by walking the graph without running it.

    This is the walk DDP repeats every step under ``find_unused_parameters=True``; done once
    on a probe batch it tells whether that search is needed at all.

    Args:
        output: A tensor computed from the parameters (typically a loss).
        params: The parameters to look for.

    Returns:
        One flag per parameter, in order.
    """
    found: set[int] = set()
    seen: set[object] = set()  # the nodes are kept alive here, so their Python objects stay unique
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it feeds
        if variable is not None:
            found.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return [id(p) in found for p in params]
