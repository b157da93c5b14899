"""What a run's numbers depend on beyond its config: a report treats runs of one config and seed
as reruns only when their device, processor and code agree too (docs/metrics.md#statistics)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import platform
import subprocess
from pathlib import Path

import torch

from vaebench.scoring.evaluation import LIKELIHOOD_SUBSET_SEED
from vaebench.spec.grid import RunSpec
from vaebench.subnormals import subnormals_mode
from vaebench.training.trainer import resolve_device

PACKAGE = Path(__file__).resolve().parents[1]  # vaebench's source folder
CODE_TAG = "vaebench.code"


@functools.cache
def code_version() -> str:
    """A hash of vaebench's own source files: equal exactly when the code that trains and
    scores is equal, whatever the repository's commit, working-tree edits or location."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(PACKAGE).as_posix().encode() + b"\0" + path.read_bytes())
    return f"src-{digest.hexdigest()[:12]}"


@functools.cache
def device_name(device: torch.device) -> str:
    """The processor that computes: the GPU's name, or the CPU's model (floating-point paths,
    and so the numbers of a chaotic training run, differ between them)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def base_tags(**extra: str) -> dict[str, str]:
    """Tags every run of an invocation carries."""
    tags = {
        **extra,
        "mlflow.source.name": "vaebench",  # the runs table's Source column
        "mlflow.source.type": "LOCAL",
        "vaebench.torch": torch.__version__,
        "vaebench.python": platform.python_version(),
        CODE_TAG: code_version(),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = ["git", "rev-parse", "HEAD"]
        out = subprocess.run(git, cwd=PACKAGE, capture_output=True, text=True, timeout=5)
        if out.returncode == 0 and out.stdout.strip():
            tags["mlflow.source.git.commit"] = out.stdout.strip()
    return tags


def run_tags(run: RunSpec) -> dict[str, str]:
    """What identifies one run's sample: its config key, seed, device and processor."""
    device = resolve_device(run.config.train.device)
    tags = {
        "vaebench.run_key": run.key,
        "vaebench.seed": str(run.config.seed),
        "vaebench.backend": run.config.train.backend,
        "vaebench.device": str(device),
        "vaebench.device_name": device_name(device),
    }
    if device.type == "cpu":  # flushed, kept or mixed (vaebench.subnormals); GPU kernels choose
        tags["vaebench.subnormals"] = subnormals_mode()
    evaluation = run.config.eval
    if evaluation.iwae_samples:  # which test images its likelihood estimate scores
        drawn = f"{evaluation.iwae_images} drawn with seed {LIKELIHOOD_SUBSET_SEED}"
        tags["vaebench.nll_images"] = "all" if evaluation.iwae_images is None else drawn
    return tags
