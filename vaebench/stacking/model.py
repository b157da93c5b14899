"""K same-shape VAEs as one model whose weights have a leading member axis, its forward and KL
terms the families' own formulas; member k's ``state_dict`` is ``{name: p[k]}``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vaebench.models.base import GaussianVAE, Mixture, Posterior, VAEOutput, reparameterize
from vaebench.models.cvae import ConditionalVAE, with_label
from vaebench.models.gmvae import GaussianMixtureVAE, decode_components, mixture_components
from vaebench.models.gumbel import JointVAE, relaxed_category
from vaebench.stacking.layers import (
    STACKABLE_LAYERS,
    StackedLinear,
    StackedSequential,
    stacked_parameter,
)


def stack_problem(model: nn.Module) -> str | None:
    """Why ``model`` cannot be a member of a stack, or None if it can."""
    if type(model) not in (GaussianVAE, ConditionalVAE, JointVAE, GaussianMixtureVAE):
        return f"{type(model).__name__} models are trained one by one"
    for net in (model.encoder, model.decoder):
        for layer in net:
            if not isinstance(layer, STACKABLE_LAYERS):
                return f"{type(layer).__name__} layers are trained one by one"
    return None


class StackedGaussianVAE(nn.Module):

    def __init__(self, members: Sequence[GaussianVAE]):
        super().__init__()
        if problem := next(filter(None, map(stack_problem, members)), None):
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
        self.kl_terms = type(members[0]).kl_terms  # the family's formulas, per member
        names = [name for name, _ in members[0].named_parameters()]
        if [name for name, _ in self.named_parameters()] != names:  # optimizer states align
            raise ValueError("the stack's parameters are not the members' in their order")

    def forward(
        self, x: torch.Tensor, noise: torch.Tensor, y: torch.Tensor | None = None,
        gumbel: torch.Tensor | None = None, tau: float = 1.0,
    ) -> VAEOutput:
        """Each member's own forward, the member axis first; its draws given: ``noise`` (K,
        *:meth:`noise_shape`), joint members' ``gumbel`` (K, B, categories)."""
        features = self._features(x, y)
        head = self.head(features)
        head = mixture_components(head, self.component_offset) if self.mixture else head
        mu, logvar = head.chunk(2, dim=-1)
        z = reparameterize(mu, logvar, noise)
        if self.mixture:
            mixture = Mixture(mu, logvar, self.prior_mu, self.prior_logvar)
            logits = decode_components(self.decoder, z)
            return VAEOutput(mu, logvar, self.category_head(features), mixture, logits=logits, z=z)
        if not self.categories:
            return VAEOutput(mu, logvar, logits=self.decode(z, y), z=z)
        if gumbel is None:
            raise ValueError("a joint VAE's stack needs Gumbel noise")
        category_logits = self.category_head(features)
        c = relaxed_category(category_logits, gumbel, tau, self.hard)
        logits = self.decoder(torch.cat([z, c], dim=-1))
        return VAEOutput(mu, logvar, category_logits, logits=logits, z=z)

    def noise_shape(self, batch: int) -> tuple[int, ...]:
        return (batch, self.categories, self.z_dim) if self.mixture else (batch, self.z_dim)

    def posterior(self, x: torch.Tensor, y: torch.Tensor) -> Posterior:
        if self.categories:
            raise ValueError("joint and mixture members' posteriors are evaluated alone")
        features = self._features(x.expand(self.members, *x.shape), self._each(y))
        return Posterior(*self.head(features).chunk(2, dim=-1))

    def decode_sample(
        self, z: torch.Tensor, c: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decode(z, self._each(y))

    def _each(self, y: torch.Tensor | None) -> torch.Tensor | None:
        return None if y is None else y.expand(self.members, *y.shape)

    def _features(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        features = self.encoder(x)
        return with_label(features, y) if self.condition_encoder else features

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.decoder(with_label(z, y) if self.conditional else z)

    def member_state(self, index: int) -> dict[str, torch.Tensor]:
        """Member ``index``'s ``state_dict`` (copies), as its run alone would hold it."""
        tensors = [*self.named_parameters(), *self.named_buffers()]
        return {name: t[index].detach().clone() for name, t in tensors}
