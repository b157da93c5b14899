"""A stack's layers: K same-shape layers as one whose parameters, ``(K, *the member's shape)``,
keep the member's names; activations are member-major ``(K, B, ...)``. Convolutions run grouped
on CUDA and per member on the CPU, where that was measured faster (docs/scaling.md#stacked-runs;
``python -m vaebench bench --stack 1,4,8 --arch conv`` times both)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


def stacked_parameter(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]).contiguous())


class BatchedLinear(torch.autograd.Function):
    """``x @ weight^T + bias`` per member, whose backward gives the weight's gradient in the
    weight's own layout ``(K, out, in)``: autograd's default forms it as ``(K, in, out)`` and
    copies it across, a strided copy that cost about as much as the products on the CPU."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, _ = inputs
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        return grad_x, torch.bmm(grad.transpose(1, 2), x), grad.sum(1)


class StackedLinear(nn.Module):

    grouped = False

    def __init__(self, members: Sequence[nn.Linear]):
        super().__init__()
        self.weight = stacked_parameter([m.weight for m in members])  # (K, out, in)
        self.bias = stacked_parameter([m.bias for m in members])  # (K, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BatchedLinear.apply(x, self.weight, self.bias)

    def member_layers(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        pairs = zip(self.weight.unbind(0), self.bias.unbind(0), strict=True)
        return [partial(F.linear, weight=w, bias=b) for w, b in pairs]


class StackedConv(nn.Module):
    """K ``Conv2d`` (or ``ConvTranspose2d``) layers as one grouped convolution."""

    grouped = True

    def __init__(self, members: Sequence[nn.Conv2d | nn.ConvTranspose2d]):
        super().__init__()
        first = members[0]
        self.transposed = isinstance(first, nn.ConvTranspose2d)
        self.stride, self.padding = first.stride, first.padding
        self.output_padding = getattr(first, "output_padding", 0)
        self.weight = stacked_parameter([m.weight for m in members])  # (K, *member weight)
        self.bias = stacked_parameter([m.bias for m in members])  # (K, C_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        members = self.weight.shape[0]
        weight = self.weight.flatten(0, 1)  # grouped: the members' weights one after another
        return self._convolve(x, weight, self.bias.flatten(), members)

    def member_layers(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        pairs = zip(self.weight.unbind(0), self.bias.unbind(0), strict=True)
        return [partial(self._convolve, weight=w, bias=b, groups=1) for w, b in pairs]

    def _convolve(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int
    ) -> torch.Tensor:
        if self.transposed:
            return F.conv_transpose2d(
                x, weight, bias, self.stride, self.padding, self.output_padding, groups
            )
        return F.conv2d(x, weight, bias, self.stride, self.padding, 1, groups)


class StackedBatchNorm(nn.Module):
    """K ``BatchNorm2d`` layers (after convolutions) as one on the grouped layout ``(B, K * C,
    H, W)``: there channel ``k * C + c`` is member k's channel c over the same batch and
    pixels, so one batch norm over the K * C channels normalises each member's channels by
    its own batch statistics and updates its own running statistics (``(K, C)`` buffers,
    flattened views of which are updated in place)."""

    grouped = True

    def __init__(self, members: Sequence[nn.BatchNorm2d]):
        super().__init__()
        first = members[0]
        self.momentum, self.eps = first.momentum, first.eps
        self.weight = stacked_parameter([m.weight for m in members])  # (K, C)
        self.bias = stacked_parameter([m.bias for m in members])
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, torch.stack([getattr(m, name) for m in members]).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._normalise(*(part.view(-1) for part in self._parts()), x)

    def member_layers(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        members = zip(*(part.unbind(0) for part in self._parts()), strict=True)
        return [partial(self._normalise, *member) for member in members]

    def _parts(self) -> tuple[torch.Tensor, ...]:
        """A training pass counts its batch."""
        if self.training:
            self.num_batches_tracked.add_(1)
        return self.running_mean, self.running_var, self.weight, self.bias

    def _normalise(self, *tensors: torch.Tensor) -> torch.Tensor:
        mean, var, weight, bias, x = tensors
        return F.batch_norm(x, mean, var, weight, bias, self.training, self.momentum, self.eps)


class MemberShape(nn.Module):
    """A member's ``Flatten(1)`` or ``Unflatten(1, shape)``, one axis later (after K)."""

    grouped = False

    def __init__(self, members: Sequence[nn.Flatten | nn.Unflatten]):
        super().__init__()
        unflatten = isinstance(members[0], nn.Unflatten)
        self.unflatten = tuple(members[0].unflattened_size) if unflatten else None
        self.members = len(members)

    def forward(self, x: torch.Tensor, dim: int = 2) -> torch.Tensor:
        return x.flatten(dim) if self.unflatten is None else x.unflatten(dim, self.unflatten)

    def member_layers(self) -> list[Callable[[torch.Tensor], torch.Tensor]]:
        return [partial(self.forward, dim=1)] * self.members


def to_grouped(x: torch.Tensor) -> torch.Tensor:
    members, batch, channels = x.shape[:3]
    return x.transpose(0, 1).reshape(batch, members * channels, *x.shape[3:])


def from_grouped(x: torch.Tensor, members: int) -> torch.Tensor:
    batch, channels = x.shape[:2]
    return x.view(batch, members, channels // members, *x.shape[2:]).transpose(0, 1)


class StackedSequential(nn.Sequential):
    """The members' ``nn.Sequential`` nets layer by layer (same indices, so the same parameter
    names); converts between the member-major and grouped layouts where the layers ask."""

    # each member through its layers in turn (True), all at once (False), or as the device
    # suits (None: per member on the CPU where the net has convolutions)
    per_member: bool | None = None

    def __init__(self, members: Sequence[nn.Sequential]):
        layers: list[nn.Module] = []
        for parts in zip(*members, strict=True):
            kinds = [make for kind, make in STACKED_LAYERS.items() if isinstance(parts[0], kind)]
            if not kinds:
                raise ValueError(f"cannot stack {type(parts[0]).__name__} layers")
            layers.append(kinds[0](parts))
        super().__init__(*layers)
        self.members = len(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        per_member = self.per_member
        if per_member is None:
            per_member = x.device.type == "cpu" and any(getattr(m, "grouped", False) for m in self)
        if per_member:  # each member through all its layers before the next (cache-warm)
            layers = [
                layer.member_layers() if hasattr(layer, "member_layers") else [layer] * self.members
                for layer in self
            ]
            outputs = []
            for k, h in enumerate(x.unbind(0)):
                for member_layers in layers:
                    h = member_layers[k](h)
                outputs.append(h)
            return torch.stack(outputs)
        grouped = False
        for layer in self:
            wants = getattr(layer, "grouped", grouped)  # ReLU works in either layout
            if wants and not grouped:
                x = to_grouped(x)
            elif grouped and not wants:
                x = from_grouped(x, self.members)
            grouped = wants
            x = layer(x)
        return from_grouped(x, self.members) if grouped else x


# the member layers this module stacks, each with its stacked layer's maker; anything else
# keeps a run out of a stack
STACKED_LAYERS: dict[type[nn.Module], Callable[[Sequence[nn.Module]], nn.Module]] = {
    nn.Linear: StackedLinear, nn.Conv2d: StackedConv, nn.ConvTranspose2d: StackedConv,
    nn.BatchNorm2d: StackedBatchNorm, nn.Flatten: MemberShape, nn.Unflatten: MemberShape,
    nn.ReLU: lambda parts: nn.ReLU(),
}
STACKABLE_LAYERS = tuple(STACKED_LAYERS)


def use_layout(stack: nn.Module, per_member: bool | None) -> nn.Module:
    """For benchmarks and tests of a layout on another device."""
    for net in stack.modules():
        if isinstance(net, StackedSequential):
            net.per_member = per_member
    return stack
