"""Subnormal floats (below 1.2e-38 in float32) flushed to zero on the CPU, by default.

An x86 core computes with a subnormal operand tens of times slower than with a normal one. Every
component of a mixture model is decoded, each decoding's gradient scaled by its weight q(c|x),
and a trained model gives the components an image does not belong to tiny weights (some
already subnormal): the backward pass through the decoder computes with subnormal gradients.
The published GMVAE runs' epochs grew from 12 to 58 s over 50 epochs on this project's CPU;
flushed, the same run's stayed near 9 s and it logged the same numbers to the last digit
(docs/performance.md#subnormal-floats). Flushing (x86's FTZ and DAZ modes, through
:func:`torch.set_flush_denormal`) changes a value only where it is below that bound.

The mode is a thread's own, and a thread starts with the mode of the thread that starts it.
vaebench sets it for the work of ``run`` and ``tune`` (:func:`subnormals_set`) before torch
starts the threads of its intra-op pool at its first parallel operation, so that they flush too
(set later, only the calling thread would), and in each worker process and Ray task it starts.
After the work the calling thread's mode is put back, so that calling the command line from
Python (a notebook, a test) leaves that thread as it was. ``$VAEBENCH_SUBNORMALS=keep``
computes with them (IEEE gradual underflow); each CPU run's ``vaebench.subnormals`` tag says
which way it computed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from vaebench.spec.config import VaebenchError

SUBNORMALS_ENV = "VAEBENCH_SUBNORMALS"
CHOICES = ("flush", "keep")
SMALLEST_NORMAL = torch.finfo(torch.float32).tiny


def wanted() -> str:
    """``$VAEBENCH_SUBNORMALS``: flush (the default) or keep."""
    choice = os.environ.get(SUBNORMALS_ENV, "").strip().lower() or "flush"
    if choice not in CHOICES:
        raise VaebenchError(
            f"${SUBNORMALS_ENV} is {os.environ[SUBNORMALS_ENV]!r}: choose flush or keep"
        )
    return choice


@contextlib.contextmanager
def subnormals_set() -> Iterator[None]:
    """This thread's mode, and that of the threads it starts meanwhile, as
    ``$VAEBENCH_SUBNORMALS`` asks, for the block (on a processor without the modes nothing
    changes); then this thread's mode as it was."""
    before = this_thread_flushes()
    torch.set_flush_denormal(wanted() == "flush")
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


# torch splits an elementwise operation into pieces of at least this many elements, one per
# intra-op thread at most
GRAIN = 1 << 15


# a float32's bits with exponent 0 and a fraction: a subnormal (2^-128), made from its bits so
# that no float conversion on a flushing thread zeroes it first
SUBNORMAL_BITS = 1 << 21


def _subnormal_products(size: int) -> torch.Tensor:
    """``size`` subnormals times one, as the products' bits (0: flushed)."""
    operands = torch.full((size,), SUBNORMAL_BITS, dtype=torch.int32).view(torch.float32)
    return (operands * 1.0).view(torch.int32)


def this_thread_flushes() -> bool:
    """One element: computed on this thread alone, so torch's pool does not start here."""
    return int(_subnormal_products(1)) == 0


def subnormals_mode() -> str:
    """How this thread and torch's intra-op threads compute: "flushed" where each reads a
    subnormal operand as zero, "kept" where none does, "mixed" where some do (a thread takes
    its mode from the thread that starts it: the pool started before the mode was set, or a
    call from Python with the other mode after one that started it). The test multiplies
    enough subnormals by one for every thread to take a piece, and reads the products' bits
    (a comparison would read them as zero on a flushing thread)."""
    size = GRAIN * max(8, torch.get_num_threads())
    zeros = int(_subnormal_products(size).eq(0).sum())
    return "flushed" if zeros == size else "kept" if zeros == 0 else "mixed"
