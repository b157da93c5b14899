"""The stacked step as a captured graph (vaebench.stacking.step): its bookkeeping, tested on the
CPU with a stand-in graph (capture records the step without running it, replay runs it), gives
each member exactly the steps of the eager stack; a graph whose step differs, or whose capture
fails, leaves the stack eager, with a warning, its numbers untouched. What the stand-in cannot
show is CUDA's own capture: on a GPU the first captured step is checked against the eager step
at run time (CapturedStep.first)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from test_stacked import CPU, FAMILIES, member_configs

from vaebench.data import load_splits
from vaebench.stacking.fit import build_member, stacked_epoch, stacked_optimizer
from vaebench.stacking.model import StackedGaussianVAE
from vaebench.stacking.step import WARMUP_STEPS, StackSteps, cuda_graph_for, graphable


class ReplayedStep:
    """A CUDA graph's stand-in: ``capture`` keeps the step and runs none of it, as CUDA's
    capture records kernels without running them; ``replay`` runs it."""

    def __init__(self, stream=None):
        assert stream is None  # streams are CUDA's

    def capture(self, step):
        self.step = step

    def replay(self) -> None:
        self.step()


class WrongReplay(ReplayedStep):
    """A graph whose replay does nothing: its step differs from the eager one."""

    def replay(self) -> None:
        pass


class RefusedCapture(ReplayedStep):
    def capture(self, step):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")


def train(model: dict, recon: str, optimizer: str, graph, mnist_root, epochs: int = 2):
    """Two epochs of 4 members (70 images of batch 16: 4 full batches and a smaller one)
    with ``graph`` making the step's graph (None: eager); the stack, its optimizer, the members
    and the epochs' totals."""
    configs = member_configs(model, 70, 16, epochs, recon)
    configs = [c.model_copy(update={"optim": c.optim.model_copy(update={"name": optimizer})})
               for c in configs]
    splits = load_splits(configs[0].data, mnist_root, CPU)
    members = [build_member(config, splits, CPU) for config in configs]
    stack = StackedGaussianVAE([m.model for m in members])
    optim = stacked_optimizer(configs, stack)
    steps = StackSteps(stack, optim, members, splits, graph)
    totals = [stacked_epoch(steps, splits, epoch * 5) for epoch in range(epochs)]
    return stack, optim, members, totals, steps


def assert_same_training(a, b) -> None:
    stack_a, optim_a, members_a, totals_a, _ = a
    stack_b, optim_b, members_b, totals_b, _ = b
    for x, y in zip(totals_a, totals_b, strict=True):
        assert torch.equal(x, y)
    for (name, x), (_, y) in zip(stack_a.state_dict().items(), stack_b.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name
    for name in optim_a.state:
        for x, y in zip(optim_a.state[name], optim_b.state[name], strict=True):
            assert torch.equal(x, y), name
    assert optim_a.steps == optim_b.steps == 10
    for m, n in zip(members_a, members_b, strict=True):  # the same draws, no more, no fewer
        assert torch.equal(m.draw_rng.get_state(), n.draw_rng.get_state())


@pytest.mark.parametrize(
    ("family", "recon", "optimizer"),
    [("mlp", "mixed", "adam"), ("mlp", "bce", "rmsprop"), ("conv-bn", "mse", "adam")],
)
def test_a_replayed_step_trains_each_member_exactly_as_the_eager_stack(
    family, recon, optimizer, mnist_root, monkeypatch
):
    from vaebench.stacking.layers import StackedSequential

    monkeypatch.setattr(StackedSequential, "per_member", False)  # CUDA's layout
    eager = train(FAMILIES[family], recon, optimizer, None, mnist_root)
    graphs = []

    def graph(stream):
        graphs.append(ReplayedStep(stream))
        return graphs[-1]

    replayed = train(FAMILIES[family], recon, optimizer, graph, mnist_root)
    assert_same_training(eager, replayed)
    # captured once, at the first full batch after the warm-up, then replayed: 8 full
    # batches in 2 epochs, the captured one checked by its replay
    assert len(graphs) == 1 and replayed[4].captured.failed is None
    assert replayed[4].steps_taken == 10 > WARMUP_STEPS


@pytest.mark.parametrize(("graph", "why"), [
    (WrongReplay, "its graph's step differs from the eager step: state tensor 0"),
    (RefusedCapture, "capture failed (operation not permitted when stream is capturing)"),
])
def test_a_graph_that_differs_or_fails_leaves_the_stack_eager_and_says_so(
    graph, why, mnist_root
):
    eager = train(FAMILIES["mlp"], "bce", "adam", None, mnist_root)
    with pytest.warns(RuntimeWarning, match="this stack trains without a CUDA graph") as caught:
        fallen_back = train(FAMILIES["mlp"], "bce", "adam", graph, mnist_root)
    assert len(caught) == 1 and why in str(caught[0].message)
    assert fallen_back[4].graph is None and fallen_back[4].captured is None
    assert_same_training(eager, fallen_back)


def stack_of(family: str, splits) -> StackedGaussianVAE:
    configs = member_configs(FAMILIES[family], 70, 16, 1)
    return StackedGaussianVAE([build_member(c, splits, CPU).model for c in configs])


def test_only_cuda_stacks_that_draw_only_their_noise_are_captured(mnist_root, monkeypatch):
    splits = load_splits(member_configs(FAMILIES["mlp"], 70, 16, 1)[0].data, mnist_root, CPU)
    mlp = stack_of("mlp", splits)
    assert not graphable(mlp, splits) and cuda_graph_for(mlp, splits) is None  # the CPU
    # what graphable reads of splits held on a GPU
    on_cuda = replace(splits, train=SimpleNamespace(
        images=SimpleNamespace(device=torch.device("cuda"))
    ))
    assert graphable(mlp, on_cuda) and graphable(stack_of("conv-bn", splits), on_cuda)
    assert not graphable(mlp, replace(on_cuda, dynamic_binarize=True))  # pixels drawn too
    monkeypatch.setenv("VAEBENCH_CUDA_GRAPHS", "0")
    assert not graphable(mlp, on_cuda)
    monkeypatch.delenv("VAEBENCH_CUDA_GRAPHS")
    # Gumbel noise and a temperature schedule; labels, whose one-hot codes are checked
    for family in ("gumbel", "gmvae", "cvae"):
        assert not graphable(stack_of(family, splits), on_cuda)
