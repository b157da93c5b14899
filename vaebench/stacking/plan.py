"""Which runs of a grid train together as one stack, without torch, so that ``--dry-run``
shows it at once."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

from vaebench.spec.config import RunConfig, flatten

# the largest stack --stack auto forms unless --max-stack says otherwise
DEFAULT_MAX_STACK = 8
# measured with experiments/gmvae.yaml cut to 3 epochs on a 2-core CPU: 6.85 s per member-epoch
# stacked against 6.02 to 6.77 s alone (71.5 s against 65.7 s for the grid)
GMVAE_ON_CPU = (
    "gmvae runs stack on CUDA only: on the CPU, where their K decodings per image already "
    "fill the cores, a stack was measured slower than the runs one after another"
)
# the model families vaebench.stacking.model stacks
STACKED_ARCHS = ("mlp", "conv", "cvae", "gumbel", "gmvae")
# the settings members of one stack may differ in; all others are the stack's
MEMBER_KEYS = ("seed", "loss.beta", "loss.recon", "optim.lr")
# the optimizers vaebench.stacking.optim stacks (a test holds the two lists equal)
STACKED_OPTIMIZER_NAMES = ("adam", "rmsprop")
# optimizer options a stack reproduces (the defaults; a fused or foreach kernel does the
# same arithmetic)
STACKED_KWARGS = {"fused", "foreach"}


def config_problem(config: RunConfig, on_cpu: bool = False) -> str | None:
    """Why runs of ``config`` train one by one (``on_cpu``: there), or None."""
    if config.model.arch not in STACKED_ARCHS:
        return f"model.arch {config.model.arch} is trained one by one"
    if config.train.backend != "torch":
        return f"train.backend {config.train.backend} is trained one by one"
    if on_cpu and (slower := cpu_problem(config)):
        return slower
    optim = config.optim
    if optim.name not in STACKED_OPTIMIZER_NAMES or set(optim.kwargs) - STACKED_KWARGS:
        return "only Adam and RMSprop with their default options are stacked"
    return None


def stack_key(config: RunConfig) -> str:
    """Equal for configs that can share a stack: all settings but :data:`MEMBER_KEYS`."""
    flat = flatten(config.model_dump(mode="json"))
    shared = {  # optim.kwargs apart: fused or not, the same arithmetic
        key: value for key, value in flat.items() if key not in MEMBER_KEYS
        and key != "train.checkpoint_every" and not key.startswith("optim.kwargs")
    }
    canonical = json.dumps(shared, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def plan_stacks(
    configs: Sequence[RunConfig | None], max_stack: int,
    on_cpu: Callable[[RunConfig], bool] = lambda config: False,
) -> list[list[int]]:
    """The indices of ``configs`` in groups of one :func:`stack_key`, at most ``max_stack``
    each, in the order of each group's first run. A run given as None (it must train alone,
    e.g. continued) or with a :func:`config_problem` is a group of its own. ``on_cpu(config)``
    is asked only of runs that stack on CUDA only."""
    groups: list[list[int]] = []
    open_groups: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        if config is None or max_stack < 2 or config_problem(
            config, cpu_problem(config) is not None and on_cpu(config)
        ):
            groups.append([index])
            continue
        key = stack_key(config)
        group = open_groups.get(key)
        if group is None or len(group) >= max_stack:
            group = open_groups[key] = []
            groups.append(group)
        group.append(index)
    return groups


def cpu_problem(config: RunConfig) -> str | None:
    """Why runs of ``config`` stack on CUDA only (measured slower stacked on the CPU), or None."""
    return GMVAE_ON_CPU if config.model.arch == "gmvae" else None
