"""Torch intra-op threads for small linear algebra: one thread below a work threshold.

The tool's math on one conv kernel (ALS sweeps, normal equations, a few dozen small matmuls of a
few MFLOP each) costs intra-op threads more than they give, and when the cores are busy their
spin-waiting makes it 10-50x slower: a CP fit of a 64x64x3x3 kernel at rank 32 took 0.4 s on one
thread against 11-25 s on two on a loaded 2-core machine, and the spatial-separable ALS refits of
a width-4 ResNet-20 took 41 s on two threads against 1.2 s on one (load average 9). Large problems
(wide layers, whole-batch convolutions) keep torch's threads.
"""

from __future__ import annotations

import contextlib
import threading

import torch

SMALL_WORK = 1 << 25
"""Work (roughly, multiply-adds per step) below which :func:`small_work` runs on one thread."""

_LOCK = threading.Lock()


@contextlib.contextmanager
def small_work(work: int):
    """One torch intra-op thread while the body runs if ``work < SMALL_WORK``, restored afterwards.

    The setting is process-wide, so bodies are serialized by a lock while it is changed.
    """
    with _LOCK:
        previous = torch.get_num_threads()
        if work < SMALL_WORK:
            torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
