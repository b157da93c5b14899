"""Subnormal floats flushed to zero in every thread that computes a run's tensors, torch's
intra-op pool included (vaebench.subnormals), unless $VAEBENCH_SUBNORMALS=keep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vaebench.spec.config import VaebenchError
from vaebench.subnormals import SUBNORMALS_ENV, wanted

# a fresh process, two intra-op threads: inside the block `run` and `tune` work in, an operation
# large enough for torch to split over both threads (whose pool starts in it) multiplies
# subnormals by one; after the block, this thread's mode is as it was. With "started", torch's
# pool starts before the block, as in a notebook that used torch before calling the command.
PROBE = """
import sys
import torch
torch.set_num_threads(2)
from vaebench.subnormals import SMALLEST_NORMAL, SUBNORMAL_BITS, subnormals_mode, subnormals_set
from vaebench.subnormals import this_thread_flushes
import numpy as np
# subnormal bit patterns (exponent 0), made by numpy: no float conversion flushes them and no
# torch operation starts torch's threads before the block (as in the command line's process)
bits = np.full(1 << 22, SUBNORMAL_BITS, dtype=np.int32).view(np.float32)
assert (bits != 0).all() and bits.max() < SMALLEST_NORMAL  # subnormal
x = torch.from_numpy(bits)
if sys.argv[1] == "started":
    x * 2.0
with subnormals_set():
    product = x * 1.0
    inside = subnormals_mode()
print(int((product.view(torch.int32) == 0).sum()), product.numel(), inside, subnormals_mode(),
      this_thread_flushes())
"""


def probe(env_value: str | None, pool: str = "fresh") -> tuple[int, int, str, str, str]:
    env = {k: v for k, v in os.environ.items() if k != SUBNORMALS_ENV}
    if env_value is not None:
        env[SUBNORMALS_ENV] = env_value
    env["PYTHONPATH"] = str(Path(__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", PROBE, pool], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    zeros, size, inside, after, flushes_after = out.stdout.split()
    return int(zeros), int(size), inside, after, flushes_after


x86 = pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86's FTZ/DAZ")


@x86
def test_every_thread_flushes_by_default_and_keeps_when_asked():
    zeros, size, inside, after, flushes_after = probe(None)
    assert (zeros, inside) == (size, "flushed")  # both threads' halves are zero
    # this thread is put back; torch's second thread, started in the block, keeps flushing
    assert (after, flushes_after) == ("mixed", "False")
    kept = probe("keep")
    assert kept[0] == 0 and kept[2:] == ("kept", "kept", "False")


@x86
def test_a_pool_started_before_the_block_is_told_apart():
    """Its thread keeps its mode: the run's tag says so ("mixed"), not "flushed"."""
    zeros, size, inside, after, flushes_after = probe(None, "started")
    assert 0 < zeros < size  # the calling thread's half flushed, the pool thread's not
    assert (inside, after, flushes_after) == ("mixed", "kept", "False")


def test_an_unknown_choice_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(SUBNORMALS_ENV, "sometimes")
    with pytest.raises(VaebenchError, match=r"VAEBENCH_SUBNORMALS is 'sometimes': choose flush"):
        wanted()
    monkeypatch.setenv(SUBNORMALS_ENV, " Keep ")
    assert wanted() == "keep"
    monkeypatch.delenv(SUBNORMALS_ENV)
    assert wanted() == "flush"
