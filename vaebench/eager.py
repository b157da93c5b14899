"""torch.optim without torch._dynamo: vaebench trains eagerly (CUDA graphs, never
``torch.compile``).

``Optimizer.add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict`` are
wrapped by ``torch._disable_dynamo``, which imports ``torch._dynamo`` on the first call (about
2.5 s of a process's start on a 2-core CPU, measured) only to mark them as not to be
compiled. The wrapper caches what it calls in the method's ``__dynamo_disable`` attribute;
set to the method itself, it calls the method directly, which is what dynamo's ``disable``
does outside compilation. Where torch names these differently, nothing changes but the
import's cost.

``Optimizer.step`` is wrapped twice: by the profiler's hook runner, and by a wrapper that
imports ``torch._dynamo`` on every call to mark a graph break around the update.
:func:`optimizer_step` calls the update itself (``functools.wraps`` keeps it as
``__wrapped__``) with gradients off, as the wrapper does for a non-differentiable optimizer:
the same arithmetic, without the import (about 1 s of a process's first step on a 2-core CPU,
measured 2026-12-06). The hook runner is skipped with it: vaebench registers no optimizer
hooks."""

from __future__ import annotations

import inspect

import torch

WRAPPED = ("add_param_group", "zero_grad", "state_dict", "load_state_dict")


def optimizers_without_dynamo() -> None:
    for name in WRAPPED:
        method = getattr(getattr(torch.optim.Optimizer, name), "__wrapped__", None)
        if method is not None and not hasattr(method, "__dynamo_disable"):
            method.__dynamo_disable = method


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, the update alone, for the optimizers vaebench builds (no hooks; a
    differentiable one steps through torch's wrapper)."""
    if optimizer.defaults.get("differentiable"):
        optimizer.step()
        return
    with torch.no_grad():
        inspect.unwrap(type(optimizer).step)(optimizer)
