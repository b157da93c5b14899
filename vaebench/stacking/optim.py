"""Adam and RMSprop over stacked parameters ``(K, ...)``, with a learning rate per member.

Each runs the kernel its run alone would use on each member's slice, so a member's update is
its run's; consecutive members of one learning rate share one call on ``p[a:b]``."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch


def learning_rate_runs(lrs: Sequence[float]) -> list[tuple[float, slice]]:
    """Maximal runs of consecutive members with one learning rate, as (lr, member slice)."""
    runs: list[tuple[float, slice]] = []
    start = 0
    for index in range(1, len(lrs) + 1):
        if index == len(lrs) or lrs[index] != lrs[start]:
            runs.append((lrs[start], slice(start, index)))
            start = index
    return runs


class StackedOptimizer:
    """What the stacked optimizers share: parameters, learning-rate runs, state, the step."""

    state_names: tuple[str, ...] = ()  # per-parameter state, as torch's optimizer names it

    def __init__(self, params: Sequence[torch.nn.Parameter], lrs: Sequence[float]):
        self.params, self.lrs = list(params), list(lrs)
        self.runs = learning_rate_runs(self.lrs)
        self.steps = 0
        self.state = {name: [torch.zeros_like(p) for p in self.params] for name in self.state_names}

    def run_slices(self, members: slice) -> dict[str, list[torch.Tensor]]:
        whole = members == slice(0, self.params[0].shape[0])

        def part(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return list(tensors) if whole else [t[members] for t in tensors]

        grads: list[torch.Tensor] = [p.grad for p in self.params]  # type: ignore[misc]
        slices = {"params": part(self.params), "grads": part(grads)}
        slices.update({name: part(values) for name, values in self.state.items()})
        return slices

    def keeping(self, kept: Sequence[int], params: Sequence[torch.nn.Parameter]):
        """This optimizer over the members at positions ``kept`` (``params``: their stack's)."""
        smaller, rows = copy.copy(self), list(kept)
        smaller.params, smaller.lrs = list(params), [self.lrs[k] for k in rows]
        smaller.runs = learning_rate_runs(smaller.lrs)
        smaller.state = {name: [t[rows].clone() for t in ts] for name, ts in self.state.items()}
        return smaller

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def member_state(self, index: int, like: torch.optim.Optimizer) -> dict[str, Any]:
        """Member ``index``'s state as the ``state_dict`` of ``like``, its run alone's optimizer."""
        state = like.state_dict()
        for number in state["param_groups"][0]["params"]:
            state["state"][number] = {
                "step": torch.tensor(float(self.steps)),
                **{name: self.state[name][number][index].clone() for name in self.state_names},
            }
        return state


class StackedAdam(StackedOptimizer):
    """``torch.optim.Adam(fused=True)``'s kernel, one call per learning-rate run."""

    state_names = ("exp_avg", "exp_avg_sq")
    betas, eps = (0.9, 0.999), 1e-8  # torch's defaults, the only options a stack takes

    def __init__(self, params: Sequence[torch.nn.Parameter], lrs: Sequence[float]):
        super().__init__(params, lrs)
        # the kernel reads the step count from a float32 tensor on the parameters' device
        self.step_count = torch.zeros((), dtype=torch.float32, device=self.params[0].device)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        self.step_count.add_(1)
        for lr, members in self.runs:
            part = self.run_slices(members)
            torch._fused_adam_(
                part["params"], part["grads"], part["exp_avg"], part["exp_avg_sq"], [],
                [self.step_count] * len(self.params), lr=lr, beta1=self.betas[0],
                beta2=self.betas[1], weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False,
            )


class StackedRMSprop(StackedOptimizer):
    """``torch.optim.RMSprop``'s default arithmetic, in place, per learning-rate run."""

    state_names = ("square_avg",)
    alpha, eps = 0.99, 1e-8  # torch's defaults, the only options a stack takes

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        grads = [p.grad for p in self.params]
        torch._foreach_mul_(self.state["square_avg"], self.alpha)
        torch._foreach_addcmul_(self.state["square_avg"], grads, grads, value=1 - self.alpha)
        for lr, members in self.runs:
            part = self.run_slices(members)
            averages = torch._foreach_sqrt(part["square_avg"])
            torch._foreach_add_(averages, self.eps)
            torch._foreach_addcdiv_(part["params"], part["grads"], averages, value=-lr)


STACKED_OPTIMIZERS: dict[str, type[StackedOptimizer]] = {
    "adam": StackedAdam, "rmsprop": StackedRMSprop,
}
