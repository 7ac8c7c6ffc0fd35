"""Scalpel's node mask layer: binary ``alpha`` with hysteresis on a trainable ``beta`` per node.

The rule is the released Caffe layer's: each forward clamps beta to [0, beta_max] and sets
alpha = 1 if beta > T + eps, 0 if beta < T, unchanged in between; y = alpha · x. Backward is
straight-through: grad_x = grad_y · alpha, grad_beta = Σ grad_y · x (as if beta multiplied x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import TrainingError


@dataclass(frozen=True)
class MaskRule:
    """The constants of the mask rule (defaults: the released code's; beta_max 0.82 NIN, 0.81 AlexNet)."""

    threshold: float = 0.8
    eps: float = 1e-4
    beta_init: float = 0.8002
    beta_max: float = 0.802

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < self.threshold + self.eps <= self.beta_max:
            raise TrainingError(
                f"mask rule: expected 0 <= T < T + eps <= beta_max, found T={self.threshold}, "
                f"eps={self.eps}, beta_max={self.beta_max}"
            )
        if not 0.0 <= self.beta_init <= self.beta_max:
            raise TrainingError(f"mask rule: beta_init {self.beta_init} outside [0, {self.beta_max}]")


def hysteresis(alpha: torch.Tensor, beta: torch.Tensor, threshold: float, eps: float) -> torch.Tensor:
    """The new alpha: 1 above T + eps, 0 below T, the old alpha in the dead band [T, T + eps]."""
    on = beta > threshold + eps
    off = beta < threshold
    return torch.where(on, torch.ones_like(alpha), torch.where(off, torch.zeros_like(alpha), alpha))


def balance(alpha: torch.Tensor, beta: torch.Tensor, groups: int = 1, round_to: int = 1,
            min_kept: int = 0) -> torch.Tensor:
    """Re-enable the highest-beta nodes so every group keeps the same count, a multiple of ``round_to``.

    Keeps are only ever added (the count per group is the largest group's, rounded up), so
    balancing never prunes a node the hysteresis kept. Ties go to the lower index.
    """
    n = alpha.numel()
    if groups < 1 or n % groups:
        raise TrainingError(f"balance: {n} nodes cannot be split into {groups} equal groups")
    if groups == 1 and round_to <= 1 and min_kept <= 0:
        return alpha
    size = n // groups
    a = alpha.reshape(groups, size)
    kept = int(a.sum(dim=1).max().item())
    kept = max(kept, min_kept)
    kept = min(size, -(-kept // round_to) * round_to)
    out = torch.zeros_like(a)
    b = beta.detach().reshape(groups, size)
    for g in range(groups):
        # Kept nodes first, then the rest by beta descending; a stable sort breaks ties by index.
        score = torch.where(a[g] > 0, torch.full_like(b[g], float("inf")), b[g])
        order = torch.sort(score, descending=True, stable=True).indices
        out[g, order[:kept]] = 1
    return out.reshape_as(alpha)


class _StraightThroughMask(torch.autograd.Function):
    """y = alpha · x with the straight-through gradient of the released layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        a = alpha.to(x.dtype).view(shape)
        ctx.save_for_backward(x, a)
        return x * a

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, a = ctx.saved_tensors
        grad_x = grad_y * a if ctx.needs_input_grad[0] else None
        grad_beta = None
        if ctx.needs_input_grad[1]:
            dims = [d for d in range(grad_y.dim()) if d != 1]
            grad_beta = (grad_y * x).sum(dim=dims)
        return grad_x, grad_beta, None


class NodeMask(nn.Module):
    """Mask layer for ``num_nodes`` neurons (2-D input) or channels (N-D input, dim 1).

    ``groups`` and ``round_to`` constrain the kept set (grouped convs, hardware multiples);
    ``freeze()`` stops the rule so retraining sees fixed masks.
    """

    def __init__(self, num_nodes: int, rule: MaskRule = MaskRule(), groups: int = 1,
                 round_to: int = 1, min_kept: int = 0) -> None:
        super().__init__()
        if num_nodes < 1:
            raise TrainingError(f"NodeMask: expected at least one node, found {num_nodes}")
        if num_nodes % groups:
            raise TrainingError(f"NodeMask: {num_nodes} nodes are not divisible into {groups} groups")
        self.rule = rule
        self.groups, self.round_to, self.min_kept = groups, max(1, round_to), min_kept
        self.beta = nn.Parameter(torch.full((num_nodes,), rule.beta_init))
        self.register_buffer("alpha", torch.ones(num_nodes))
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))

    @property
    def num_nodes(self) -> int:
        return self.beta.numel()

    @torch.no_grad()
    def update(self) -> None:
        """Clamp beta and move alpha by the hysteresis rule (done at every forward, as in Caffe)."""
        if bool(self.frozen):
            return
        self.beta.clamp_(0.0, self.rule.beta_max)
        alpha = hysteresis(self.alpha, self.beta, self.rule.threshold, self.rule.eps)
        self.alpha.copy_(balance(alpha, self.beta, self.groups, self.round_to, self.min_kept))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_nodes:
            raise TrainingError(
                f"NodeMask: expected input with {self.num_nodes} nodes in dim 1, found shape {tuple(x.shape)}"
            )
        self.update()
        return _StraightThroughMask.apply(x, self.beta, self.alpha)

    @torch.no_grad()
    def penalize(self, amount: float) -> None:
        """The L1 step ``beta -= lambda · lr`` (call after every optimizer step)."""
        if not bool(self.frozen):
            self.beta.sub_(amount)

    def freeze(self) -> None:
        """Fix alpha; beta gets no more gradient."""
        self.update()
        self.frozen.fill_(True)
        self.beta.requires_grad_(False)

    def kept(self) -> torch.Tensor:
        """Indices of the kept nodes, ascending."""
        return torch.nonzero(self.alpha > 0.5).flatten()

    def extra_repr(self) -> str:
        return (f"{self.num_nodes}, kept={int(self.alpha.sum())}, groups={self.groups}, "
                f"round_to={self.round_to}, frozen={bool(self.frozen)}")
