"""ONNX Runtime latency: what a compressed model buys on the device, measured rather than counted.

Models are timed in the same process, *alternating* one run of each per round, so that a slow
phase of the machine (another process, frequency scaling, a warm or cold cache) hits all of them
alike and the speedup ratio stays honest even when absolute times drift.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from compressor.errors import CompressorError, ExportError
from compressor.progress import layers as progress_bar

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)

_NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def check_providers(providers: Sequence[str]) -> list[str]:
    """The providers, in order, or a ``CompressorError`` naming the ones this onnxruntime lacks."""
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing or not providers:
        raise CompressorError(
            f"execution provider(s) {', '.join(missing) or '(none given)'} not available in this onnxruntime "
            f"{ort.__version__}; available: {', '.join(available)}"
        )
    return list(providers)


def session(
    path: str | Path | bytes, *, threads: int = 1, providers: Sequence[str] = DEFAULT_PROVIDERS, spinning: bool = True
) -> ort.InferenceSession:
    """A session as deployment would create it: all graph optimizations, ``threads`` intra-op threads
    (0: onnxruntime's default, one per physical core), one inter-op thread (CNNs are one chain)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:  # worker threads sleep between ops instead of busy-waiting (ORT's default is to spin)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options, providers=list(providers))
    except Exception as err:
        shown = "an in-memory model" if isinstance(path, bytes) else path
        raise ExportError(f"ONNX Runtime could not load {shown}: {' '.join(str(err).split())}") from err


def model_input_shape(path: str | Path, batch: int | None = None) -> tuple[int, ...]:
    """The first input's shape read from the file; a symbolic batch dim becomes ``batch`` (default 1).

    Raises ``CompressorError`` when another dimension is symbolic: it cannot be guessed.
    """
    sess = session(path)
    declared = sess.get_inputs()[0].shape
    shape = []
    for i, dim in enumerate(declared):
        if isinstance(dim, int) and dim > 0:
            shape.append(batch if i == 0 and batch is not None else dim)
        elif i == 0:
            shape.append(batch or 1)
        else:
            raise CompressorError(
                f"{path}: input dimension {i} is symbolic ({dim!r}); pass --input-shape N,C,H,W"
            )
    return tuple(shape)


def _check_fits(sess: ort.InferenceSession, shape: Sequence[int], path) -> None:
    """Refuse an input shape the model's fixed dimensions reject, before timing: ONNX Runtime would
    fail mid-run with a multi-line InvalidArgument (e.g. two models built for different sizes)."""
    declared = sess.get_inputs()[0].shape
    fixed = [(i, dim) for i, dim in enumerate(declared) if isinstance(dim, int) and dim > 0]
    if len(declared) != len(shape) or any(shape[i] != dim for i, dim in fixed):
        shown = "[" + ", ".join(str(d) if isinstance(d, int) and d > 0 else "N" for d in declared) + "]"
        raise CompressorError(
            f"{path} takes input {shown}, not {list(shape)}: the models to compare must take the same input "
            "(pass --input-shape for symbolic dimensions)"
        )


def _feed(sess: ort.InferenceSession, shape: Sequence[int], seed: int = 0) -> dict[str, np.ndarray]:
    first = sess.get_inputs()[0]
    dtype = _NUMPY_TYPES.get(first.type)
    if dtype is None:
        raise CompressorError(f"cannot benchmark a model whose input is {first.type}")
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        data = rng.standard_normal(tuple(shape)).astype(dtype)
    else:
        data = rng.integers(0, 127, size=tuple(shape)).astype(dtype)
    return {first.name: data}


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), ``q`` in [0, 100]."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def time_models(
    paths: Mapping[str, str | Path],
    input_shape: Sequence[int],
    *,
    threads: int = 1,
    runs: int = 50,
    warmup: int = 5,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
) -> dict[str, dict[str, float]]:
    """Median and p90 milliseconds of one ``session.run`` per model, alternating models every round.

    Every model gets ``warmup`` untimed runs first (allocations, kernel selection, caches).
    """
    if runs < 1:
        raise ValueError(f"Expected runs >= 1, got {runs}")
    sessions = {name: session(path, threads=threads, providers=providers) for name, path in paths.items()}
    for name, sess in sessions.items():
        _check_fits(sess, input_shape, paths[name])
    feeds = {name: _feed(sess, input_shape) for name, sess in sessions.items()}
    for name, sess in sessions.items():
        for _ in range(warmup):
            sess.run(None, feeds[name])
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, sess in sessions.items():
            started = time.perf_counter()
            sess.run(None, feeds[name])
            times[name].append((time.perf_counter() - started) * 1e3)
    return {
        name: {"median_ms": statistics.median(values), "p90_ms": percentile(values, 90), "min_ms": min(values)}
        for name, values in times.items()
    }


def benchmark(
    original: str | Path,
    compressed: str | Path | None,
    input_shape: Sequence[int],
    *,
    threads: Sequence[int] = (1, 0),
    runs: int = 50,
    warmup: int = 5,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    extra: Mapping[str, str | Path] | None = None,
    started: Callable[[str], None] = lambda setting: None,
) -> list[dict]:
    """One record per thread setting: ``{threads, batch, original_ms, compressed_ms, speedup, ...}``.

    ``*_ms`` are medians, ``*_p90_ms`` 90th percentiles; ``speedup`` = original median / compressed
    median. ``extra`` models (e.g. ``{"int8": path}``) are timed in the same rounds and reported as
    ``int8_ms``, ``int8_p90_ms`` and ``int8_speedup`` (vs the original). Without ``compressed`` there
    is nothing to call original or compressed: the one model's times are ``model_ms``/``model_p90_ms``.
    Empty when ``runs`` is 0 or ``threads`` is empty.
    """
    providers = check_providers(providers)
    if runs <= 0 or not threads:
        return []
    baseline = "original" if compressed is not None else "model"
    paths: dict[str, str | Path] = {baseline: original}
    if compressed is not None:
        paths["compressed"] = compressed
    paths.update(extra or {})
    records = []
    for count in threads:
        started(f"{count or 'all'} thread{'s' if count != 1 else ''}: {', '.join(paths)}")
        timed = time_models(paths, input_shape, threads=count, runs=runs, warmup=warmup, providers=providers)
        record: dict = {
            "threads": count,
            "cores": os.cpu_count(),
            "batch": int(input_shape[0]),
            "runs": runs,
            "provider": providers[0],
        }
        for name, values in timed.items():
            record[f"{name}_ms"] = values["median_ms"]
            record[f"{name}_p90_ms"] = values["p90_ms"]
            if name != baseline:
                key = "speedup" if name == "compressed" else f"{name}_speedup"
                record[key] = timed[baseline]["median_ms"] / values["median_ms"]
        for key, value in record.items():
            if isinstance(value, float) and not (math.isfinite(value) and value > 0):
                raise CompressorError(f"latency benchmark measured {key} = {value}; the timer is not usable here")
        records.append(record)
    return records


def onnx_latency_ms(path: str | Path, input_shape: tuple[int, ...], *, repeats: int = 50, warmup: int = 5, threads: int = 1) -> float:
    """Median wall time in milliseconds of one ``session.run`` of a single model."""
    return time_models({"model": path}, input_shape, threads=threads, runs=repeats, warmup=warmup)["model"]["median_ms"]


def threads_label(threads: int) -> str:
    return f"all ({os.cpu_count()} cores)" if threads == 0 else str(threads)


def latency_step(report: dict, recipe, out: Path, int8_path: Path | None = None, progress: bool | None = None) -> None:
    """Benchmark ``out``/original.onnx vs compressed.onnx (and the INT8 model) as the recipe's
    ``bench`` says; record ``latency`` and, under a latency target, the measured ``achieved``.
    ``progress``: a bar per thread setting (default: when stderr is a terminal)."""
    settings = recipe.bench
    if settings.runs <= 0 or not settings.threads:
        report["latency_skipped"] = "bench.runs is 0 or bench.threads is empty"
        return
    extra = {"int8": int8_path} if int8_path is not None else None
    with progress_bar("latency", len(settings.threads), progress) as bar:
        report["latency"] = benchmark(
            out / "original.onnx", out / "compressed.onnx", report["input_shape"], threads=settings.threads,
            runs=settings.runs, warmup=settings.warmup, providers=settings.providers, extra=extra, started=bar.advance,
        )
    report["advice"] = deployment_advice(report["latency"])
    target = report.get("target")
    if target and target["metric"] == "latency":
        same = [r for r in report["latency"] if r["threads"] == target["threads"]]
        if same:
            target["measured_ms"] = same[0]["compressed_ms"]
            target["measured_original_ms"] = same[0]["original_ms"]
            target["achieved"] = same[0]["compressed_ms"] / same[0]["original_ms"]


def deployment_advice(latency: Sequence[dict]) -> dict:
    """What the measurements say to ship: the fastest thread count, float or INT8, and every
    setting where the compressed model is slower than the original (said plainly, not averaged)."""
    fastest = min(latency, key=lambda r: r["compressed_ms"])
    advice = {
        "threads": fastest["threads"],
        "compressed_ms": fastest["compressed_ms"],
        "slower_than_original": [r["threads"] for r in latency if r["speedup"] < 1.0],
    }
    if "int8_ms" in fastest:
        int8 = min(latency, key=lambda r: r["int8_ms"])
        advice["format"] = "int8" if int8["int8_ms"] < fastest["compressed_ms"] else "float"
        advice["int8_vs_float"] = fastest["compressed_ms"] / int8["int8_ms"]
    return advice
