"""``train.backend: pyro``: a Gaussian family's own modules as a Pyro model and guide, stepped by
the run's own torch optimizer (docs/pyro.md). Pyro is imported only here."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from vaebench.spec.config import RunConfig, VaebenchError


def import_pyro() -> Any:
    try:
        import pyro
    except ImportError:
        raise VaebenchError('train.backend: pyro needs Pyro (pip install -e ".[pyro]")') from None
    return pyro


def model_and_guide(
    model: torch.nn.Module, beta: float
) -> tuple[Callable[[torch.Tensor], None], Callable[[torch.Tensor], None]]:
    pyro = import_pyro()
    import pyro.distributions as dist
    from pyro import poutine

    def generative(x: torch.Tensor) -> None:
        batch = x.shape[0]
        with pyro.plate("data", batch):
            loc = x.new_zeros(batch, model.z_dim)
            with poutine.scale(scale=beta):
                z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            logits = model.decode(z).flatten(1)
            # grey levels are scored by BCE's formula (not a likelihood)
            pixels = dist.Bernoulli(logits=logits, validate_args=False).to_event(1)
            pyro.sample("x", pixels, obs=x.flatten(1))

    def guide(x: torch.Tensor) -> None:
        mu, logvar = model.encode(x)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=beta):
            pyro.sample("z", dist.Normal(mu, torch.exp(0.5 * logvar)).to_event(1))

    return generative, guide


def pyro_loss(model: torch.nn.Module, config: RunConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    pyro = import_pyro()
    pyro.clear_param_store()  # nothing of an earlier run's (the modules are not registered)
    generative, guide = model_and_guide(model, config.loss.beta)
    meanfield = config.train.pyro_elbo == "meanfield"
    elbo = pyro.infer.TraceMeanField_ELBO() if meanfield else pyro.infer.Trace_ELBO()
    return partial(elbo.differentiable_loss, generative, guide)
