"""What the CPU this runs on prefers: the channel block of ONNX Runtime's NCHWc kernels.

ONNX Runtime's CPU provider (MLAS) reorders conv activations into blocks of 8 channels with AVX2
and of 16 with AVX-512F; a conv whose channel count is not a whole number of blocks is padded up to
one, so a width of 9 costs what 16 does. Other CPUs (ARM, or x86 without AVX2) get no NCHWc
transform, and no rounding.
"""

from __future__ import annotations

import functools
from pathlib import Path

_CPUINFO = Path("/proc/cpuinfo")


def _flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def nchwc_block_from_flags(flags: set[str]) -> int | None:
    if "avx512f" in flags:
        return 16
    if "avx2" in flags:
        return 8
    return None


@functools.cache
def nchwc_block() -> int | None:
    """16 with AVX-512F, 8 with AVX2, ``None`` otherwise (or where the CPU's flags cannot be read)."""
    try:
        text = _CPUINFO.read_text()
    except OSError:
        return None
    return nchwc_block_from_flags(_flags(text))
