"""K same-shape VAEs (``mlp``, ``conv``, ``cvae``, ``gumbel``, ``gmvae``) as one model whose
every weight has a leading member axis (its layers: :mod:`vaebench.stacking.layers`), and each
member's loss terms.

A stacked parameter is ``(K, *the member's shape)`` and has the member's parameter name, so
member k's ``state_dict`` is ``{name: p[k]}`` and loads into the model the run would have
trained alone. Activations are member-major, ``(K, B, ...)``.

This module imports neither mlflow nor optuna.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vaebench.models.base import GaussianVAE, gaussian_kl_terms
from vaebench.models.cvae import NUM_CLASSES, ConditionalVAE
from vaebench.models.gmvae import GaussianMixtureVAE, gaussian_kl_between
from vaebench.models.gumbel import JointVAE, categorical_kl_uniform
from vaebench.models.losses import batch_marginal_kl, expected_reconstruction, pixel_costs
from vaebench.stacking.layers import (
    STACKABLE_LAYERS,
    StackedLinear,
    StackedSequential,
    stacked_parameter,
)


def first_kind_members(kinds: Sequence[str], device: torch.device) -> torch.Tensor:
    """Which members' reconstruction is of the first member's kind (K,), on ``device``."""
    return torch.tensor([kind == kinds[0] for kind in kinds], device=device)


def member_reconstruction(
    logits: torch.Tensor,
    x: torch.Tensor,
    kinds: Sequence[str],
    weights: torch.Tensor | None = None,
    first_kind: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each member's reconstruction cost (K,) summed over its batch, member k's of the kind
    ``kinds[k]`` (``bce`` or ``mse``); for mixture members (``gmvae``), ``weights`` (K, B, C)
    are q(c|x) and ``logits`` hold each member's decoding per component, the cost averaged
    over them exactly. With members of both kinds both are computed and each member takes
    its own (``torch.where``: no gradient from the other kind reaches it), ``first_kind``
    (:func:`first_kind_members`, made once by a caller that steps many times) saying which."""
    members = logits.shape[0]

    def cost(kind: str) -> torch.Tensor:
        if weights is not None:
            return expected_reconstruction(logits, x, weights, kind)
        return pixel_costs(logits, x, kind, "none").reshape(members, -1).sum(1)

    costs = {kind: cost(kind) for kind in dict.fromkeys(kinds)}
    if len(costs) == 1:
        return next(iter(costs.values()))
    first = kinds[0]
    if first_kind is None:
        first_kind = first_kind_members(kinds, logits.device)
    other = next(cost for kind, cost in costs.items() if kind != first)
    return torch.where(first_kind, costs[first], other)


def stack_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be a member of a stack, or None if it can."""
    if type(model) not in (GaussianVAE, ConditionalVAE, JointVAE, GaussianMixtureVAE):
        return f"{type(model).__name__} models are trained one by one"
    for net in (model.encoder, model.decoder):
        for layer in net:
            if not isinstance(layer, STACKABLE_LAYERS):
                return f"{type(layer).__name__} layers are trained one by one"
    return None


class StackOutput(NamedTuple):
    """A stack's forward: each member's decoder logits, posterior mean and log-variance, and
    category logits for joint and mixture members (each with the member axis first); for
    mixture members, mean and log-variance are each component's (K, B, C, z_dim) and the
    components' priors come along."""

    logits: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    category_logits: torch.Tensor | None = None
    prior_mu: torch.Tensor | None = None
    prior_logvar: torch.Tensor | None = None


def member_kl_z(out: StackOutput) -> torch.Tensor:
    """Each member's KL of z summed over its batch (K,): from N(0, I), or for mixture members
    each component's KL from its prior p(z|c), weighed by q(c|x)."""
    if out.prior_mu is not None:
        per_component = gaussian_kl_between(
            out.mu, out.logvar, out.prior_mu[:, None], out.prior_logvar[:, None]
        )
        return (mixture_weights(out) * per_component).sum((1, 2))
    kl = gaussian_kl_terms(out.mu, out.logvar)
    return kl.reshape(kl.shape[0], -1).sum(1)


def mixture_weights(out: StackOutput) -> torch.Tensor:
    """q(c|x) of mixture members (K, B, C)."""
    return F.softmax(out.category_logits, dim=-1)


def member_kl_c(category_logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Each member's KL of its categorical latent from uniform (K,), over its batch: per image
    (``loss.kl_c: per_image``, summed) or of the batch's mean q(c) (``batch_marginal``, times
    the batch size), as :class:`vaebench.models.losses.Objective` weighs it for one run."""
    if kind == "per_image":
        return categorical_kl_uniform(category_logits)
    return batch_marginal_kl(category_logits)


class StackedGaussianVAE(nn.Module):
    """K Gaussian VAEs of one shape; ``forward`` takes each member's batch and noise (and, for
    conditional members, ``cvae``, each member's labels: their one-hot code joins the decoder's
    input and, with ``model.condition_encoder``, the encoder's features, as in
    :class:`~vaebench.models.cvae.ConditionalVAE`; for joint members, ``gumbel``, each
    member's Gumbel noise for its relaxed category, as in
    :class:`~vaebench.models.gumbel.JointVAE`)."""

    def __init__(self, members: Sequence[GaussianVAE]):
        super().__init__()
        for member in members:
            problem = stack_problem(member)
            if problem:
                raise ValueError(problem)
        self.members = len(members)
        self.z_dim = members[0].z_dim
        self.conditional = isinstance(members[0], ConditionalVAE)
        self.condition_encoder = bool(getattr(members[0], "condition_encoder", False))
        self.encoder = StackedSequential([m.encoder for m in members])
        self.head = StackedLinear([m.head for m in members])
        self.decoder = StackedSequential([m.decoder for m in members])
        self.categories = 0  # a joint (gumbel) or mixture (gmvae) VAE's categorical latent
        self.joint = isinstance(members[0], JointVAE)
        self.mixture = isinstance(members[0], GaussianMixtureVAE)
        if self.joint or self.mixture:
            self.category_head = StackedLinear([m.category_head for m in members])
            self.categories = members[0].categories
        if self.joint:
            self.hard = members[0].hard
        if self.mixture:  # each component's offset of q(z|x, c) and its prior p(z|c)
            self.component_offset = stacked_parameter([m.component_offset for m in members])
            self.prior_mu = stacked_parameter([m.prior_mu for m in members])
            self.prior_logvar = stacked_parameter([m.prior_logvar for m in members])
        names = [name for name, _ in members[0].named_parameters()]
        if [name for name, _ in self.named_parameters()] != names:  # optimizer states align
            raise ValueError("the stack's parameters are not the members' in their order")

    def forward(
        self,
        x: torch.Tensor,
        noise: torch.Tensor,
        y: torch.Tensor | None = None,
        gumbel: torch.Tensor | None = None,
        tau: float = 1.0,
    ) -> StackOutput:
        """What each member's own forward gives for images ``x`` (K, B, ...), standard normal
        ``noise`` (K, *:meth:`noise_shape`), labels ``y`` (K, B) of conditional members and,
        for joint members, Gumbel noise ``gumbel`` (K, B, categories) at temperature ``tau``:
        z = mu + noise * sigma and c = softmax((logits + gumbel) / tau) (one-hot forward, soft
        backward with ``model.hard``), as ``F.gumbel_softmax`` draws it alone."""
        features = self._features(x, y)
        if self.mixture:
            return self._mixture_forward(features, noise)
        mu, logvar = self.head(features).chunk(2, dim=-1)
        z = mu + noise * torch.exp(0.5 * logvar)
        if not self.categories:
            return StackOutput(self.decode(z, y), mu, logvar)
        if gumbel is None:
            raise ValueError("a joint VAE's stack needs Gumbel noise")
        category_logits = self.category_head(features)
        c = ((category_logits + gumbel) / tau).softmax(dim=-1)
        if self.hard:
            index = c.max(dim=-1, keepdim=True)[1]
            c = torch.zeros_like(c).scatter_(-1, index, 1.0) - c.detach() + c
        logits = self.decoder(torch.cat([z, c], dim=-1))
        return StackOutput(logits, mu, logvar, category_logits)

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        """The shape of one member's standard normal draws for a batch: a z per image, or for
        mixture members a z per image and component."""
        return (batch, self.categories, self.z_dim) if self.mixture else (batch, self.z_dim)

    def _mixture_forward(self, features: torch.Tensor, noise: torch.Tensor) -> StackOutput:
        """As :meth:`GaussianMixtureVAE.forward`: q(z|x, c) for every component c, a draw of
        z for each (``noise`` (K, B, C, z_dim)), every draw decoded (component-major)."""
        both = self.head(features)[:, :, None, :] + self.component_offset[:, None]
        mu, logvar = both.chunk(2, dim=-1)
        z = mu + noise * torch.exp(0.5 * logvar)
        decoded = self.decoder(z.transpose(1, 2).reshape(self.members, -1, self.z_dim))
        return StackOutput(
            decoded, mu, logvar, self.category_head(features), self.prior_mu, self.prior_logvar
        )

    def encode(
        self, x: torch.Tensor, y: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each member's posterior mean and log-variance (K, B, z_dim) of images (K, B, ...)."""
        if self.categories:
            raise ValueError("joint and mixture members' posteriors are evaluated alone")
        mu, logvar = self.head(self._features(x, y)).chunk(2, dim=-1)
        return mu, logvar

    def _features(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        features = self.encoder(x)
        if self.condition_encoder:
            features = torch.cat([features, self._one_hot(y, features.dtype)], dim=-1)
        return features

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Decoder logits of latents z (K, B, z_dim), with labels (K, B) if conditional."""
        if self.conditional:
            z = torch.cat([z, self._one_hot(y, z.dtype)], dim=-1)
        return self.decoder(z)

    def _one_hot(self, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        if y is None:
            raise ValueError("a conditional VAE needs labels")
        return F.one_hot(y, NUM_CLASSES).to(dtype)

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s ``state_dict``, as its run alone would hold it (copies):
        parameters and buffers (batch norm's running statistics)."""
        tensors = [*self.named_parameters(), *self.named_buffers()]
        return {name: t[index].detach().clone() for name, t in tensors}
