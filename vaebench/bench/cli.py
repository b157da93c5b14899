"""``python -m vaebench bench``: its arguments and which benchmark they choose (each module
imported when chosen)."""

from __future__ import annotations

import argparse

from vaebench.spec.config import VaebenchError

# the families `bench --stack` times (vaebench.bench.stack's reference configs)
STACK_ARCHS = ("mlp", "conv")


def stack_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise VaebenchError(f"--stack: comma-separated integers >= 1, not {text!r}")
    return sizes


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.add_argument("--epochs", type=int, default=5, help="timed epochs per loop (default: 5)")
    bench.add_argument("--subset", type=int, help="first N training images (default: all)")
    bench.add_argument(
        "--stack",
        help="comma-separated stack sizes K, e.g. 1,4,8,16: time K runs stacked against K runs "
        "one after another, and count the operators a step dispatches (K = 1, 4, 16, 64)",
    )
    bench.add_argument(
        "--arch", choices=STACK_ARCHS, default="mlp",
        help="--stack: pytorch/examples' MLP VAE (default), or experiments/quick.yaml's conv "
        "VAE, timed in both stacked layouts (per member, the CPU's; grouped, CUDA's)",
    )
    bench.add_argument(
        "--device", choices=("cpu", "cuda", "auto"), default="cpu",
        help="--stack: where to train (default: cpu; auto: CUDA when torch sees it); on CUDA "
        "the step's kernels are counted too",
    )
    bench.add_argument(
        "--process", action="store_true",
        help="time whole processes from a fresh folder: `vaebench run` of a 2-epoch grid "
        "against pytorch/examples' script, and `run --dry-run`",
    )
    bench.add_argument(
        "--repeats", type=int, default=3, help="--process: runs of each command (default: 3)"
    )
    bench.add_argument(
        "--layout", action="store_true",
        help="time a conv run's training epoch and validation pass with contiguous against "
        "channels-last weights (the CPU's choice)",
    )


def run(args: argparse.Namespace) -> int:
    if args.process:
        from vaebench.bench.process import main as bench_process_main

        return bench_process_main(args.data_root, repeats=args.repeats)
    if args.layout:
        from vaebench.bench.layout import main as bench_layout_main

        return bench_layout_main(args.data_root, args.epochs, args.subset)
    if args.stack:
        from vaebench.bench.stack import main as bench_stack_main

        return bench_stack_main(
            args.data_root, stack_sizes(args.stack), args.epochs, args.subset, args.arch,
            device_name=args.device,
        )
    from vaebench.bench.timing import main as bench_main

    return bench_main(args.data_root, args.epochs, args.subset)
