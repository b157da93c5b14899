"""Benchmark: K runs trained as one stack against the same K runs one after another.

The model is pytorch/examples' VAE (784-400-20, BCE, Adam 1e-3, batch 128), or with ``arch``
``conv`` experiments/quick.yaml's conv VAE (the same loss, optimizer and batch); the K runs
differ in seed. Both ways run in the same process, epochs interleaved, and are reported as
seconds per model-epoch (an epoch of one run); a conv stack is timed in both of its layouts
(:class:`vaebench.stacked_layers.StackedSequential`: per member, the CPU's, and grouped,
CUDA's). Beside the MLP's figures, the floor: the epoch's matrix product FLOPs over the
matrix-product throughput measured here, on the same machine, and each figure's ratio to it.
``launches`` counts the operators a training step dispatches (from ``torch.profiler``): on a
GPU each is at least one kernel launch, the cost that stacking divides by K.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch

from vaebench.bench import CONV, REFERENCE, time_interleaved
from vaebench.config import RunConfig
from vaebench.data import Split, Splits, load_splits, resolve_root
from vaebench.losses import Objective
from vaebench.models import build_model
from vaebench.stacked import build_member, stacked_epoch, stacked_optimizer
from vaebench.stacked_layers import use_layout
from vaebench.stacked_model import StackedGaussianVAE
from vaebench.train import build_optimizer, train_epoch


def reference_configs(count: int, subset: int | None = None, arch: str = "mlp") -> list[RunConfig]:
    data = {"subset": subset} if subset else {}
    model = CONV["model"] if arch == "conv" else REFERENCE["model"]
    return [
        RunConfig.model_validate({**REFERENCE, "model": model, "data": data, "seed": seed})
        for seed in range(count)
    ]


def stacked_loop(
    configs: Sequence[RunConfig], splits: Splits, per_member: bool | None = None
) -> Callable[[], object]:
    """An epoch of ``configs`` as one stack, its layers ``per_member`` (None: the device's
    choice)."""
    device = torch.device("cpu")
    members = [build_member(config, splits, device) for config in configs]
    stack = use_layout(StackedGaussianVAE([m.model for m in members]), per_member)
    optimizer = stacked_optimizer(configs, stack)
    return lambda: stacked_epoch(stack, optimizer, members, splits).tolist()


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
    """Leaf operators per step of ``configs`` as one stack in the layout CUDA runs (batched,
    convolutions grouped)."""
    few = first_batches(splits, steps, configs[0].train.batch_size)
    return leaf_operators(stacked_loop(configs, few, per_member=False), steps)


def dispatched_per_step_alone(config: RunConfig, splits: Splits, steps: int = 3) -> float:
    """The same count for vaebench's unstacked step (one run)."""
    few = first_batches(splits, steps, config.train.batch_size)
    return leaf_operators(sequential_loop([config], few), steps)


def timed_loops(configs: Sequence[RunConfig], splits: Splits) -> dict[str, Callable[[], object]]:
    """The ways to train ``configs`` that the benchmark times against each other."""
    loops = {"stacked": stacked_loop(configs, splits)}
    if configs[0].model.arch == "conv":  # "stacked" is per member on the CPU
        loops["stacked grouped"] = stacked_loop(configs, splits, per_member=False)
    loops["one after another"] = sequential_loop(configs, splits)
    return loops


MODELS = {
    "mlp": "MLP VAE 784-400-20 (pytorch/examples)",
    "conv": "conv VAE (channels 32, 64, z 20; experiments/quick.yaml)",
}


def main(
    data_root: str | None,
    sizes: Sequence[int],
    epochs: int = 3,
    subset: int | None = None,
    arch: str = "mlp",
    launch_sizes: Sequence[int] = (1, 4, 16, 64),
) -> int:
    root = resolve_root(data_root)
    largest = reference_configs(max(sizes), subset, arch)
    splits = load_splits(largest[0].data, root, torch.device("cpu"))
    images = len(splits.train)
    print(
        f"{MODELS[arch]}, BCE, Adam 1e-3, batch 128, {images} training images, CPU, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; K runs differing in "
        f"seed, stacked against one after another; {epochs} timed epochs each after 1 warm-up, "
        "interleaved; seconds per model-epoch (median)"
    )
    if arch == "conv":
        print("stacked: each member through its layers in turn (the CPU's way); stacked "
              "grouped: the members' convolutions as one grouped convolution (CUDA's way)")
    floor = None
    if arch == "mlp":
        floor = epoch_matmul_flops(largest[0], images) / matmul_throughput()
        print(f"floor: matrix-product FLOPs of a model-epoch / measured GEMM rate = {floor:.3f} s")
    alone = None
    for size in sorted({1, *sizes}):
        loops = timed_loops(largest[:size], splits)
        timings = {t.name: t.median / size for t in time_interleaved(loops, epochs)}
        alone = alone or timings["one after another"]  # K = 1 comes first
        line = ", ".join(
            f"{name} {t:.3f} s" + (f" ({t / floor:.1f}x floor)" if floor else "")
            for name, t in timings.items()
        )
        print(f"K = {size:3d}: {line}; stacked / one run alone = {timings['stacked'] / alone:.2f}")
    one = dispatched_per_step_alone(largest[0], splits)
    print(f"operators dispatched per training step, one run unstacked: {one:.0f}; stacked "
          "as on CUDA (batched, convolutions grouped):")
    for size in launch_sizes:
        count = dispatched_per_step(reference_configs(size, subset, arch), splits)
        print(
            f"K = {size:3d} stacked: {count:.0f} per step, {count / size:.1f} per model-step "
            f"({count / size / one:.3f} of one run's)"
        )
    return 0
