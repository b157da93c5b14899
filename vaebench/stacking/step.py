"""One training step of a stack: each member's inputs drawn as its run alone draws them, one
backward pass, the update; on CUDA captured once as a graph (docs/scaling.md#cuda-graphs).

Measured on an H200, a step of a stack of small VAEs took about 2.5 ms whether it held 1 member
or 16: launch-bound, which the graph's one launch removes.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vaebench.data import Splits
from vaebench.models.gumbel import gumbel_noise
from vaebench.models.losses import Objective, draws_per_image, first_kind_members, terms_of
from vaebench.stacking.model import StackedGaussianVAE
from vaebench.stacking.optim import StackedOptimizer
from vaebench.training.trainer import steps_per_epoch

WARMUP_STEPS = 3  # eager steps before capture (cuBLAS and the allocator settle in them)
CUDA_GRAPHS_ENV = "VAEBENCH_CUDA_GRAPHS"


@dataclass
class StepInputs:
    x: torch.Tensor
    noise: torch.Tensor
    y: torch.Tensor | None = None
    gumbel: torch.Tensor | None = None
    tau: float = 1.0


class Graph(Protocol):
    """:class:`CudaGraph`, or in tests a stand-in that replays eagerly."""

    def capture(self, step: Callable[[], Any]) -> None: ...

    def replay(self) -> None: ...


class CudaGraph:
    """Captured on the warm-up's ``stream`` (cuBLAS keeps its handles and workspaces per
    stream); only this thread's work is captured (a digest's copy, say, goes on outside)."""

    def __init__(self, stream: torch.cuda.Stream) -> None:
        self.graph = torch.cuda.CUDAGraph()
        self.stream = stream

    def capture(self, step: Callable[[], Any]) -> None:
        with torch.cuda.graph(self.graph, stream=self.stream, capture_error_mode="thread_local"):
            step()

    def replay(self) -> None:
        self.graph.replay()


class StackSteps:
    """The steps of one stack (made anew when members leave it). ``graph`` makes the graph,
    captured at the first full batch after the warm-up (None: always eager)."""

    def __init__(
        self, stack: StackedGaussianVAE, optimizer: StackedOptimizer, members: Sequence[Any],
        splits: Splits, graph: Callable[[torch.cuda.Stream | None], Graph] | None = None,
    ):
        self.stack, self.optimizer, self.members = stack, optimizer, list(members)
        self.config = members[0].config
        self.device = splits.train.images.device
        betas = torch.tensor([m.config.loss.beta for m in members], device=self.device)
        self.objective = Objective(self.config.loss, stack.categories or None, beta=betas)
        self.samples = draws_per_image(self.config.loss)  # z per image: iwae_k, else 1
        self.kinds = [m.config.loss.recon for m in members]
        self.first_kind = first_kind_members(self.kinds, self.device)  # made once, not per step
        self.images, self.labels = splits.train.images, splits.train.labels
        self.image_shape = tuple(self.images.shape[1:])
        self.binarize = splits.dynamic_binarize  # the pixels drawn anew each step
        train = self.config.train
        self.total_steps = train.epochs * steps_per_epoch(len(splits.train), train.batch_size)
        self.graph = graph
        on_cuda = graph and self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if on_cuda else None  # warm-up, capture
        self.steps_taken = 0
        self.captured: CapturedStep | None = None

    def __call__(self, index: torch.Tensor, step: int) -> torch.Tensor:
        """Member k's batch rows ``index[k]`` (K, B): each member's summed objective (K,)."""
        self.steps_taken += 1
        full = index.shape[1] == self.config.train.batch_size
        if self.graph is not None and full and self.steps_taken > WARMUP_STEPS:
            if self.captured is None:
                self.captured = CapturedStep(self, self.graph(self.stream))
                loss = self.captured.first(index, step)
                if self.captured.failed is not None:
                    warnings.warn(
                        f"vaebench: this stack trains without a CUDA graph: {self.captured.failed}",
                        RuntimeWarning, stacklevel=2,
                    )
                    self.graph = self.captured = None  # its memory goes back too
                return loss
            return self.captured.replay(index, step)
        with self._side_stream(full):
            return self.train(self.inputs(index, step), index.shape[1], step)

    def inputs(self, index: torch.Tensor, step: int, out: StepInputs | None = None) -> StepInputs:
        count, batch = index.shape
        flat, rows = index.flatten(), (count * batch, *self.image_shape)
        x = out.x if out is not None else self.images.new_empty(rows)
        torch.index_select(self.images, 0, flat, out=x.view(rows))
        x = x.view(count, batch, *self.image_shape)
        members = self.members
        if self.binarize:
            x = torch.stack(
                [torch.bernoulli(x[k], generator=m.draw_rng) for k, m in enumerate(members)]
            )
        shape = self.stack.noise_shape(self.samples * batch)
        noise = out.noise if out is not None else x.new_empty((count, *shape))
        for k, member in enumerate(members):
            torch.randn(shape, generator=member.draw_rng, device=self.device, out=noise[k])
        y = self.labels.index_select(0, flat).view(count, batch) if self.stack.conditional else None
        for member in members:
            member.model.anneal(step, self.total_steps)  # e.g. its tau
        gumbel = None
        if self.stack.joint:  # drawn from each member's generator after its z noise, as alone
            shape, weight = (batch, self.stack.categories), self.stack.head.weight
            gumbel = torch.stack([gumbel_noise(shape, weight, m.draw_rng) for m in members])
        tau = float(getattr(members[0].model, "tau", 1.0))  # one schedule: the members share it
        return StepInputs(x, noise, y, gumbel, tau)

    def train(self, inputs: StepInputs, batch: int, step: int = 0) -> torch.Tensor:
        """The members' objectives summed before one backward pass: no parameter is shared,
        so each member's gradient is its own."""
        stack = self.stack
        out = stack(inputs.x, inputs.noise, inputs.y, inputs.gumbel, inputs.tau)
        terms = terms_of(stack.kl_terms, out, inputs.x, self.kinds, self.first_kind)
        loss = self.objective(terms, batch, step)
        self.optimizer.zero_grad()
        (loss.sum() / batch).backward()
        self.optimizer.step()
        return loss.detach()

    @contextlib.contextmanager
    def _side_stream(self, full: bool) -> Iterator[None]:
        side = self.stream
        if side is None or self.graph is None or not full or self.captured is not None:
            yield
            return
        current = torch.cuda.current_stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            yield
        current.wait_stream(side)


class CapturedStep:

    def __init__(self, steps: StackSteps, graph: Graph):
        self.steps, self.graph = steps, graph
        self.failed: str | None = None
        count, batch = len(steps.members), steps.config.train.batch_size
        self.static = StepInputs(
            x=torch.empty((count, batch, *steps.image_shape), device=steps.device),
            noise=torch.empty((count, *steps.stack.noise_shape(steps.samples * batch)),
                              device=steps.device),
        )
        self.loss = torch.zeros(count, device=steps.device)

    def first(self, index: torch.Tensor, step: int) -> torch.Tensor:
        """Capture, then take this step eagerly on a copy of the state and by replay; keep the
        replay where the two agree, else the eager step."""
        self.steps.inputs(index, step, out=self.static)
        steps, optimizer = self.steps, self.steps.optimizer
        before = _snapshot(steps)
        batch = steps.config.train.batch_size
        eager = steps.train(self.static, batch)  # the reference
        expected = _snapshot(steps)
        _restore(steps, before)
        try:
            optimizer.zero_grad()  # the graph's backward makes the gradients it writes
            self.graph.capture(lambda: self.loss.copy_(steps.train(self.static, batch)))
            optimizer.steps = before[1]  # capture ran the step's Python, none of its kernels
            self._replay()
            difference = _difference(_snapshot(steps), expected)
        except RuntimeError as exc:  # capture refused (an operation it cannot record)
            difference = f"capture failed ({str(exc).splitlines()[0]})"
        if difference is not None:
            self.failed = f"its graph's step differs from the eager step: {difference}"
            _restore(steps, expected)
            return eager
        return self.loss

    def replay(self, index: torch.Tensor, step: int) -> torch.Tensor:
        self.steps.inputs(index, step, out=self.static)
        self._replay()
        return self.loss

    def _replay(self) -> None:
        """The graph cannot advance the optimizer's step count."""
        optimizer = self.steps.optimizer
        count = optimizer.steps
        self.graph.replay()
        optimizer.steps = count + 1


_Snapshot = tuple[list[torch.Tensor], int]  # the state tensors' copies, the step count


def _state_tensors(steps: StackSteps) -> list[torch.Tensor]:
    optimizer = steps.optimizer
    state = [t for tensors in optimizer.state.values() for t in tensors]
    count = [optimizer.step_count] if hasattr(optimizer, "step_count") else []
    return [*steps.stack.parameters(), *steps.stack.buffers(), *state, *count]


def _snapshot(steps: StackSteps) -> _Snapshot:
    with torch.no_grad():
        return [t.detach().clone() for t in _state_tensors(steps)], steps.optimizer.steps


def _restore(steps: StackSteps, snapshot: _Snapshot) -> None:
    tensors, steps.optimizer.steps = snapshot
    with torch.no_grad():
        for tensor, saved in zip(_state_tensors(steps), tensors, strict=True):
            tensor.copy_(saved)


def _difference(got: _Snapshot, expected: _Snapshot) -> str | None:
    (tensors, count), (wanted, wanted_count) = got, expected
    for number, (a, b) in enumerate(zip(tensors, wanted, strict=True)):
        if not torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-12):
            return f"state tensor {number} of {len(tensors)}"
    return None if count == wanted_count else "the step count"


def cuda_graph_for(
    stack: StackedGaussianVAE, splits: Splits, objective: str = "elbo"
) -> Callable[[torch.cuda.Stream | None], Graph] | None:
    return CudaGraph if graphable(stack, splits, objective) else None


def graphable(stack: StackedGaussianVAE, splits: Splits, objective: str = "elbo") -> bool:
    """Only the noise drawn (no binarized pixels, no Gumbel noise), no schedule (a temperature,
    capacity targets), no labels (one-hot codes check them on the host), convolutions grouped."""
    if splits.train.images.device.type != "cuda" or os.environ.get(CUDA_GRAPHS_ENV) == "0":
        return False
    per_member = [getattr(net, "per_member", False) for net in (stack.encoder, stack.decoder)]
    drawn = splits.dynamic_binarize or stack.categories or stack.conditional
    return not (drawn or objective != "elbo" or any(per_member))
