"""A trained run's model as MLflow serves it: one tensor in (a row an image, and the label for a
conditional family), one tensor out (see docs/tracking.md#registered-models)."""

from __future__ import annotations

import io

import torch
import yaml
from torch import nn

from vaebench.models import build_model
from vaebench.spec.config import RunConfig

IMAGE_SHAPE = (1, 28, 28)  # every MNIST-family dataset's images


class ServedVAE(nn.Module):
    def __init__(self, model: nn.Module, image_shape: tuple[int, int, int] = IMAGE_SHAPE):
        super().__init__()
        self.model = model
        self.image_shape = tuple(image_shape)
        self.pixels = int(torch.tensor(image_shape).prod())
        self.conditional = bool(getattr(model, "uses_labels", False))

    @property
    def columns(self) -> int:
        return self.pixels + int(self.conditional)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Input rows -> (images (n, C, H, W), labels or None)."""
        if rows.dim() != 2 or rows.shape[1] != self.columns:
            what = "pixels and a label" if self.conditional else "pixels"
            raise ValueError(
                f"expected rows of {self.columns} values ({what}), got shape {tuple(rows.shape)}"
            )
        images = rows[:, : self.pixels].reshape(-1, *self.image_shape)
        labels = rows[:, self.pixels].long() if self.conditional else None
        return images, labels

    def rows(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of :meth:`split`."""
        flat = images.reshape(images.shape[0], -1).float()
        if not self.conditional:
            return flat
        assert labels is not None, "a conditional model's rows carry the label"
        return torch.cat([flat, labels.reshape(-1, 1).float()], dim=1)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.reconstruct(*self.split(rows))).flatten(1)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """The posterior means E[z|x] (the Gaussian part, for families with a category)."""
        return self.model.encode(*self.split(rows))[0]

    def decode(
        self, z: torch.Tensor, c: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Pixel probabilities (n, C*H*W) of latent draws z (with the one-hot category c, or
        the label y, where the family decodes them)."""
        return torch.sigmoid(self.model.decode_sample(z, c, y)).flatten(1)

    def sample(self, n: int, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator(device=self.model.device).manual_seed(seed)
        return torch.sigmoid(self.model.sample_prior(n, generator=generator)).flatten(1)


def run_config(text: str) -> RunConfig:
    return RunConfig.model_validate(yaml.safe_load(text))


def served_model(config: RunConfig, state_dict: bytes) -> ServedVAE:
    """The run's trained model, on the CPU in eval mode, from its ``state_dict.pt``'s bytes."""
    model = build_model(config.model, IMAGE_SHAPE)
    weights = torch.load(io.BytesIO(state_dict), map_location="cpu", weights_only=True)
    model.load_state_dict(weights)
    return ServedVAE(model).eval()
