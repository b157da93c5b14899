"""Benchmark: K runs (differing in seed) trained as one stack against the same K runs one
after another, beside the MLP's matrix-product floor, and the operators (on a GPU, kernel
launches) a training step dispatches. Measured figures: docs/performance.md#stacked-runs."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.autograd import DeviceType

from vaebench.bench.timing import CONV, REFERENCE, time_interleaved
from vaebench.data import Split, Splits, load_splits, resolve_root
from vaebench.spec.config import RunConfig
from vaebench.stacking.fit import build_member, stacked_epoch, stacked_optimizer
from vaebench.stacking.layers import use_layout
from vaebench.stacking.model import StackedGaussianVAE
from vaebench.stacking.step import StackSteps, cuda_graph_for
from vaebench.training.trainer import ModelTrainee, resolve_device, train_epoch


def reference_configs(
    count: int, subset: int | None = None, arch: str = "mlp", device: str = "cpu"
) -> list[RunConfig]:
    base = {
        **(CONV if arch == "conv" else REFERENCE), "data": {"subset": subset} if subset else {},
        "train": {**REFERENCE["train"], "device": device},
    }
    return [RunConfig.model_validate({**base, "seed": seed}) for seed in range(count)]


def stacked_loop(
    configs: Sequence[RunConfig], splits: Splits, per_member: bool | None = None,
    graphs: bool = True,
) -> Callable[[], object]:
    """An epoch of ``configs`` as one stack, on the device that holds ``splits``, its layers
    ``per_member`` (None: the device's choice), its step a CUDA graph where ``graphs`` and
    the stack allows (:func:`vaebench.stacking.step.graphable`)."""
    device = _device(splits)
    members = [build_member(config, splits, device) for config in configs]
    stack = use_layout(StackedGaussianVAE([m.model for m in members]), per_member)
    optimizer = stacked_optimizer(configs, stack)
    graph = cuda_graph_for(stack, splits) if graphs else None
    steps = StackSteps(stack, optimizer, members, splits, graph)
    return lambda: stacked_epoch(steps, splits).tolist()


def sequential_loop(configs: Sequence[RunConfig], splits: Splits) -> Callable[[], object]:
    """The K runs one after another, an epoch each, as vaebench trains them unstacked."""
    runs = [ModelTrainee(config, splits, _device(splits)) for config in configs]
    return lambda: [  # its epoch's sum read as is: ModelTrainee.epoch would add a reshape
        train_epoch(r.model, r.optimizer, r.objective, r.config, splits, r.generator).item()
        for r in runs
    ]


def epoch_matmul_flops(config: RunConfig, images: int) -> float:
    """Multiply-adds x 2 of the linear layers in one training epoch of one run: forward, the
    gradient of the weights and (but for the first layer) of the inputs."""
    widths = [784, *config.model.hidden]
    encoder = list(zip(widths, widths[1:], strict=False)) + [(widths[-1], 2 * config.model.z_dim)]
    decoder_widths = [config.model.z_dim, *reversed(config.model.hidden), 784]
    layers = encoder + list(zip(decoder_widths, decoder_widths[1:], strict=False))
    products = sum(3 * fan_in * fan_out for fan_in, fan_out in layers) - 784 * widths[1]
    return 2.0 * images * products


def matmul_throughput(device: torch.device, size: int = 1024, repeats: int = 20) -> float:
    """FLOP/s of a large float32 matrix product on ``device`` (the best of ``repeats``)."""
    if device.type == "cuda":
        size *= 8  # a GPU needs a larger product to reach its rate
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2.0 * size**3 / best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Dispatched:
    """What a training step dispatches: leaf operators (with no operator below them; on a GPU
    each at least one kernel launch), and, profiled on a GPU, the kernels it ran."""

    operators: float
    kernels: float | None

    def __str__(self) -> str:
        text = f"{self.operators:.0f} operators"
        return text + (f", {self.kernels:.0f} CUDA kernels" if self.kernels is not None else "")


def dispatched_per_step(
    configs: Sequence[RunConfig], splits: Splits, stacked: bool = True, steps: int = 3
) -> Dispatched:
    """What a training step of ``configs`` dispatches (``torch.profiler`` over ``steps``
    steps): ``stacked``, as one stack in the layout CUDA runs (batched, convolutions grouped)
    without a CUDA graph (with one, a step launches the graph, the batch's gather and each
    member's noise); else as vaebench's unstacked steps."""
    from torch.profiler import ProfilerActivity, profile

    count = steps * configs[0].train.batch_size  # the first batches, nothing to validate
    train = Split(splits.train.images[:count], splits.train.labels[:count])
    few = Splits(train=train, validation=None, test=splits.test)
    if stacked:
        epoch = stacked_loop(configs, few, per_member=False, graphs=False)
    else:
        epoch = sequential_loop(configs, few)
    on_cuda = _device(splits).type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]
    epoch()  # warm-up
    with profile(activities=activities) as prof:
        epoch()
    events = prof.events()
    leaves = [e for e in events if e.name.startswith("aten::") and not e.cpu_children]
    kernels = sum(e.device_type == DeviceType.CUDA for e in events) / steps
    return Dispatched(len(leaves) / steps, kernels if on_cuda else None)


def _device(splits: Splits) -> torch.device:
    return splits.train.images.device


def timed_loops(configs: Sequence[RunConfig], splits: Splits) -> dict[str, Callable[[], object]]:
    loops = {"stacked": stacked_loop(configs, splits)}
    if configs[0].model.arch == "conv" and _device(splits).type == "cpu":  # per member there
        loops["stacked grouped"] = stacked_loop(configs, splits, per_member=False)
    if _device(splits).type == "cuda":
        loops["stacked without graph"] = stacked_loop(configs, splits, graphs=False)
    loops["one after another"] = sequential_loop(configs, splits)
    return loops


MODELS = {
    "mlp": "MLP VAE 784-400-20 (pytorch/examples)",
    "conv": "conv VAE (channels 32, 64, z 20; experiments/quick.yaml)",
}


def main(
    data_root: str | None, sizes: Sequence[int], epochs: int = 3, subset: int | None = None,
    arch: str = "mlp", launch_sizes: Sequence[int] = (1, 4, 16, 64), device_name: str = "cpu",
) -> int:
    device = resolve_device(device_name)
    largest = reference_configs(max(sizes), subset, arch, device_name)
    splits = load_splits(largest[0].data, resolve_root(data_root), device)
    images = len(splits.train)
    machine = f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    print(
        f"{MODELS[arch]}, BCE, Adam 1e-3, batch 128, {images} training images, "
        f"{machine}, torch {torch.__version__}; K runs differing in "
        f"seed, stacked against one after another; {epochs} timed epochs each after 1 warm-up, "
        "interleaved; seconds per model-epoch (median)"
    )
    if arch == "conv" and device.type == "cpu":
        print("stacked: each member through its layers in turn (the CPU's way); stacked "
              "grouped: the members' convolutions as one grouped convolution (CUDA's way)")
    floor = None
    if arch == "mlp":
        floor = epoch_matmul_flops(largest[0], images) / matmul_throughput(device)
        print(f"floor: matrix-product FLOPs of a model-epoch / measured GEMM rate = {floor:.3f} s")
    alone = None
    for size in sorted({1, *sizes}):
        loops = time_interleaved(timed_loops(largest[:size], splits), epochs)
        timings = {t.name: t.median / size for t in loops}
        alone = alone or timings["one after another"]  # K = 1 comes first
        line = ", ".join(
            f"{name} {t:.3f} s" + (f" ({t / floor:.1f}x floor)" if floor else "")
            for name, t in timings.items()
        )
        print(f"K = {size:3d}: {line}; stacked / one run alone = {timings['stacked'] / alone:.2f}")
    one = dispatched_per_step(largest[:1], splits, stacked=False)
    where = "CUDA's layout" if device.type == "cpu" else "on this GPU"
    print(f"per training step, one run unstacked: {one}; stacked ({where}: batched, "
          "convolutions grouped):")
    for size in launch_sizes:
        count = dispatched_per_step(reference_configs(size, subset, arch, device_name), splits)
        line = f"K = {size:3d} stacked: {count}; per model-step "
        line += f"{count.operators / size / one.operators:.3f} of one run's operators"
        if count.kernels is not None and one.kernels:
            line += f", {count.kernels / size / one.kernels:.3f} of its kernels"
        print(line)
    return 0
