"""Adam and RMSprop over stacked parameters ``(K, ...)``, with a learning rate per member.

Each does torch's arithmetic (``torch.optim.Adam``, ``torch.optim.RMSprop``, default options:
no weight decay, AMSGrad, momentum or centering) on each member's slice, and gives a member's
state as the ``state_dict`` of the torch optimizer its run alone would hold, so that the run
can continue alone. This module imports neither mlflow nor optuna.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class StackedOptimizer:
    """What the stacked optimizers share: parameters, learning rates, state, the step count."""

    state_names: tuple[str, ...] = ()  # per-parameter state, as torch's optimizer names it

    def __init__(self, params: Sequence[torch.nn.Parameter], lrs: Sequence[float]):
        self.params = list(params)
        self.lrs = torch.tensor(lrs, dtype=self.params[0].dtype, device=self.params[0].device)
        self.steps = 0
        self.state = {name: [torch.zeros_like(p) for p in self.params] for name in self.state_names}

    def per_member(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``values`` (K,) shaped to scale each member's slice of ``like``."""
        return values.view(-1, *([1] * (like.dim() - 1)))

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def member_state(self, index: int, like: torch.optim.Optimizer) -> dict[str, Any]:
        """Member ``index``'s state as the ``state_dict`` of ``like``, the torch optimizer over
        that member's own model (its parameters in the stack's order)."""
        state = like.state_dict()
        for number in state["param_groups"][0]["params"]:
            state["state"][number] = {
                "step": torch.tensor(float(self.steps)),
                **{name: self.state[name][number][index].clone() for name in self.state_names},
            }
        return state


class StackedAdam(StackedOptimizer):
    state_names = ("exp_avg", "exp_avg_sq")

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        lrs: Sequence[float],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ):
        super().__init__(params, lrs)
        self.betas, self.eps = betas, eps

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        negative_step = -self.lrs / bias_correction1
        moments = zip(self.params, self.state["exp_avg"], self.state["exp_avg_sq"], strict=True)
        for p, exp_avg, exp_avg_sq in moments:
            grad = p.grad
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.add_(exp_avg / denom * self.per_member(negative_step, p))


class StackedRMSprop(StackedOptimizer):
    state_names = ("square_avg",)

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        lrs: Sequence[float],
        alpha: float = 0.99,
        eps: float = 1e-8,
    ):
        super().__init__(params, lrs)
        self.alpha, self.eps = alpha, eps

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        for p, square_avg in zip(self.params, self.state["square_avg"], strict=True):
            grad = p.grad
            square_avg.mul_(self.alpha).addcmul_(grad, grad, value=1 - self.alpha)
            avg = square_avg.sqrt().add_(self.eps)
            p.add_(grad / avg * self.per_member(-self.lrs, p))


STACKED_OPTIMIZERS: dict[str, type[StackedOptimizer]] = {
    "adam": StackedAdam,
    "rmsprop": StackedRMSprop,
}
