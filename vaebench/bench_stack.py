"""Benchmark: K runs trained as one stack against the same K runs one after another.

The model is pytorch/examples' VAE (784-400-20, BCE, Adam 1e-3, batch 128); the K runs
differ in seed. Both ways run in the same process, epochs interleaved, and are reported as
seconds per model-epoch (an epoch of one run). Beside them, the floor: the epoch's matrix
product FLOPs over the matrix-product throughput measured here, on the same machine, and
each figure's ratio to it. ``launches`` counts the operators a training step dispatches
(from ``torch.profiler``): on a GPU each is at least one kernel launch, the cost that
stacking divides by K.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from vaebench.bench import REFERENCE, time_interleaved
from vaebench.config import RunConfig
from vaebench.data import Split, Splits, load_splits, resolve_root
from vaebench.losses import Objective
from vaebench.models import build_model
from vaebench.stacked import build_member, stacked_epoch, stacked_optimizer
from vaebench.stacked_model import StackedGaussianVAE
from vaebench.train import build_optimizer, train_epoch


def reference_configs(count: int, subset: int | None = None) -> list[RunConfig]:
    data = {"subset": subset} if subset else {}
    return [
        RunConfig.model_validate({**REFERENCE, "data": data, "seed": seed})
        for seed in range(count)
    ]


def stacked_loop(configs: Sequence[RunConfig], splits: Splits) -> Callable[[], object]:
    device = torch.device("cpu")
    members = [build_member(config, splits, device) for config in configs]
    stack = StackedGaussianVAE([m.model for m in members])
    optimizer = stacked_optimizer(configs, stack)
    live = torch.ones(len(members), dtype=torch.bool)
    return lambda: stacked_epoch(stack, optimizer, members, splits, live).tolist()


def sequential_loop(configs: Sequence[RunConfig], splits: Splits) -> Callable[[], object]:
    """The K runs one after another, an epoch each, as vaebench trains them unstacked."""
    runs = []
    for config in configs:
        torch.manual_seed(config.seed)
        model = build_model(config.model, splits.image_shape)
        generator = torch.Generator().manual_seed(config.seed)
        runs.append((model, build_optimizer(config.optim, model.parameters()), generator, config))

    def epoch() -> list[float]:
        return [
            train_epoch(model, optimizer, Objective(config.loss), config, splits, generator).item()
            for model, optimizer, generator, config in runs
        ]

    return epoch


def epoch_matmul_flops(config: RunConfig, images: int) -> float:
    """Multiply-adds x 2 of the linear layers in one training epoch of one run: forward, the
    gradient of the weights and (but for the first layer) of the inputs."""
    widths = [784, *config.model.hidden]
    encoder = list(zip(widths, widths[1:], strict=False)) + [(widths[-1], 2 * config.model.z_dim)]
    decoder_widths = [config.model.z_dim, *reversed(config.model.hidden), 784]
    layers = encoder + list(zip(decoder_widths, decoder_widths[1:], strict=False))
    products = sum(3 * fan_in * fan_out for fan_in, fan_out in layers) - 784 * widths[1]
    return 2.0 * images * products


def matmul_throughput(size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a large float32 matrix product on this machine (the best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def first_batches(splits: Splits, batches: int, batch_size: int) -> Splits:
    """The first ``batches`` batches of the training split, nothing to validate."""
    count = batches * batch_size
    train = Split(splits.train.images[:count], splits.train.labels[:count])
    return Splits(train=train, validation=None, test=splits.test)


def leaf_operators(epoch: Callable[[], object], steps: int) -> float:
    """Operators with no operator below them (on a GPU, each at least one kernel launch) that
    ``epoch``, a training epoch of ``steps`` steps, dispatches per step (``torch.profiler``)."""
    from torch.profiler import ProfilerActivity, profile

    epoch()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        epoch()
    leaves = [e for e in prof.events() if e.name.startswith("aten::") and not e.cpu_children]
    return len(leaves) / steps


def dispatched_per_step(configs: Sequence[RunConfig], splits: Splits, steps: int = 3) -> float:
    """Leaf operators per step of ``configs`` as one stack (or, one config, alone)."""
    few = first_batches(splits, steps, configs[0].train.batch_size)
    return leaf_operators(stacked_loop(configs, few), steps)


def dispatched_per_step_alone(config: RunConfig, splits: Splits, steps: int = 3) -> float:
    """The same count for vaebench's unstacked step (one run)."""
    few = first_batches(splits, steps, config.train.batch_size)
    return leaf_operators(sequential_loop([config], few), steps)


def main(
    data_root: str | None,
    sizes: Sequence[int],
    epochs: int = 3,
    subset: int | None = None,
    launch_sizes: Sequence[int] = (1, 4, 16, 64),
) -> int:
    root = resolve_root(data_root)
    largest = reference_configs(max(sizes), subset)
    splits = load_splits(largest[0].data, root, torch.device("cpu"))
    images = len(splits.train)
    print(
        f"MLP VAE 784-400-20, BCE, Adam 1e-3, batch 128, {images} training images, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; K runs differing in "
        f"seed, stacked against one after another; {epochs} timed epochs each after 1 warm-up, "
        "interleaved; seconds per model-epoch (median)"
    )
    floor = epoch_matmul_flops(largest[0], images) / matmul_throughput()
    print(f"floor: matrix-product FLOPs of a model-epoch / measured GEMM rate = {floor:.3f} s")
    alone = None
    for size in sorted({1, *sizes}):
        configs = largest[:size]
        loops = {"stacked": stacked_loop(configs, splits),
                 "one after another": sequential_loop(configs, splits)}
        timings = {t.name: t.median / size for t in time_interleaved(loops, epochs)}
        alone = alone or timings["one after another"]  # K = 1 comes first
        line = ", ".join(f"{name} {t:.3f} s ({t / floor:.1f}x floor)"
                         for name, t in timings.items())
        print(f"K = {size:3d}: {line}; stacked / one run alone = {timings['stacked'] / alone:.2f}")
    one = dispatched_per_step_alone(largest[0], splits)
    print(f"operators dispatched per training step, one run unstacked: {one:.0f}")
    for size in launch_sizes:
        count = dispatched_per_step(reference_configs(size, subset), splits)
        print(
            f"K = {size:3d} stacked: {count:.0f} per step, {count / size:.1f} per model-step "
            f"({count / size / one:.3f} of one run's)"
        )
    return 0
