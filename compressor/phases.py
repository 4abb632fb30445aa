"""Wall time per phase of a run (report.json ``seconds``), so users and benchmarks see where it goes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

#: The phases in the order a run meets them. report.json's ``seconds`` also has ``total``: compress()
#: end to end, which excludes the last four (they run in Result.save()).
PHASES = ("trace", "calibrate", "ranks", "decompose", "refit", "finetune", "evaluate", "export", "verify", "int8", "latency")


@contextmanager
def timed(seconds: dict[str, float], phase: str) -> Iterator[None]:
    """Add the wall time of the ``with`` body to ``seconds[phase]`` (also when it raises)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases: {', '.join(PHASES)}")
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[phase] = seconds.get(phase, 0.0) + time.perf_counter() - started
