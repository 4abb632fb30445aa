"""report.json ``seconds``: phases and the whole-run ``total``; progress logged for API users."""

from __future__ import annotations

import logging
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

import compressor
from compressor.phases import PHASES, release_freed_memory
from tests.models_for_cli import INPUT_SHAPE, tiny_net

RECIPE = {
    "rules": [{"match": "*", "method": "spatial_separable", "rank": 2, "min_kernel_size": 3}],
    "bench": {"threads": [1], "runs": 5},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    result = compressor.compress(tiny_net(), RECIPE, torch.randn(INPUT_SHAPE))
    result.save(tmp_path_factory.mktemp("phases"))
    return result.report


def test_total_is_the_whole_run_and_comes_last(saved):
    seconds = saved["seconds"]
    assert list(seconds)[-1] == "total", list(seconds)
    phases = {key: value for key, value in seconds.items() if key != "total"}
    assert {"export", "verify", "latency"} <= set(phases), seconds
    # The phases are disjoint slices of compress() and save(): the whole run cannot take less.
    assert seconds["total"] >= sum(phases.values()), f"total {seconds['total']:.3f}s < sum of phases {sum(phases.values()):.3f}s: {seconds}"


def test_phases_are_known_and_in_run_order(saved):
    phases = [key for key in saved["seconds"] if key != "total"]
    assert phases == sorted(phases, key=PHASES.index), phases


def test_compress_logs_each_phase_once_for_api_users(caplog):
    caplog.set_level(logging.INFO, logger="compressor")
    compressor.compress(tiny_net(), RECIPE, torch.randn(INPUT_SHAPE))
    started = [r.getMessage() for r in caplog.records if r.getMessage().endswith(" started")]
    assert started == ["trace started", "ranks started", "decompose started", "evaluate started"], started
    assert any(r.getMessage().startswith("compressed in ") for r in caplog.records), [r.getMessage() for r in caplog.records]


@pytest.mark.skipif(not sys.platform.startswith("linux") or not platform.libc_ver()[0] == "glibc", reason="malloc_trim is glibc's")
def test_release_freed_memory_hands_freed_heap_blocks_back():
    """Blocks under glibc's mmap threshold stay in the heap when freed (RSS unchanged) until released."""

    def resident_mib() -> float:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [torch.ones(25_000) for _ in range(4000)]  # 100 KB each: heap, not mmap
    kept = blocks[::50]  # a few live blocks in between keep the heap from shrinking by itself
    del blocks
    freed = resident_mib()
    release_freed_memory()
    released = resident_mib()
    assert freed - released > 200, f"RSS {freed:.0f} MiB after freeing ~390 MiB of blocks, {released:.0f} MiB after release"
    assert len(kept) == 80
