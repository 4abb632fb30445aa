"""Wall time per phase of a run (report.json ``seconds``), so users and benchmarks see where it goes."""

from __future__ import annotations

import ctypes
import logging
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

#: Progress for API users, who see no terminal output: ``logging.basicConfig(level=logging.INFO)``
#: shows each phase as it starts; DEBUG adds every timed step's duration.
log = logging.getLogger("compressor")

#: The phases in the order a run meets them. report.json's ``seconds`` also has ``total``, last: the
#: whole run, compress() and Result.save() together (loading the model and data files excluded).
PHASES = ("trace", "calibrate", "ranks", "decompose", "refit", "reconstruct", "finetune", "evaluate", "export", "verify", "int8", "latency")


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``seconds[phase]`` (also when it raises)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
    if phase not in seconds:  # decompose and refit are timed once per layer: announce each phase once
        log.info("%s started", phase)
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        seconds[phase] = seconds.get(phase, 0.0) + elapsed
        log.debug("%s step took %.2fs (%.2fs so far)", phase, elapsed, seconds[phase])


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far, in MiB (report.json ``peak_memory_mib``).

    ``ru_maxrss`` never decreases, so the value read at the end of a run covers every phase;
    it includes the Python interpreter and torch themselves (a few hundred MiB).
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)  # bytes on macOS, KiB on Linux


def release_freed_memory() -> None:
    """Hand the memory a phase freed back to the OS, so the next phase's peak does not come on top of it
    (glibc's ``malloc_trim``; a no-op elsewhere).

    glibc keeps freed blocks under its mmap threshold (which rises to 32 MiB as large blocks are freed)
    in its heaps for reuse, while the refit's activation lists are mmapped beside them: for ResNet-50 at
    224 the calibration Grams, the sensitivity backward pass and the whitenings left 4 GB of free heap
    under the refit (RSS 4.6 GB at its start with 0.5 GB of tensors alive), measured.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass
