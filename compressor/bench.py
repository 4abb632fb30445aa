"""ONNX Runtime latency: median over repeats, one thread, so that ratios are comparable."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort


def onnx_latency_ms(path: str | Path, input_shape: tuple[int, ...], *, repeats: int = 50, warmup: int = 5, threads: int = 1) -> float:
    """Median wall time in milliseconds of one ``session.run`` on a random float32 batch.

    ``threads`` fixes intra-op parallelism: an edge target rarely has the cores of a dev machine,
    and a fixed count keeps original-vs-compressed ratios from depending on the scheduler.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32)}
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)
