"""Measured latency as a budget metric: single layers timed in ONNX Runtime, cached on disk.

``target: {latency: f}`` asks that the compressed model run in at most ``f`` of the original's
ONNX Runtime time. The solver needs an additive cost per layer, so the model is

    predicted(choice) = fixed + sum over candidate layers of t(layer's choice)

where ``t`` is the median time of a one-layer ONNX model (the original conv, or the candidate
stack with random weights of the right shapes; dense kernels do not care about the values) run at
the layer's real input shape, batch, provider and thread count, and ``fixed`` is *measured*: the
original model's end-to-end median minus the sum of its candidate layers' ``t``. So the fraction
refers to the whole model (pooling, the classifier, layers no rule rewrites, graph overheads), the
prediction is exact when every layer is kept, and each rewrite changes it by what it measured.

What this does not see: a one-layer model pays a session call and, in ORT's NCHWc layout, a
reorder in and out, that a layer inside the model does not; ``fixed`` absorbs those for the
original layers (it may even come out negative on small models), and a candidate stack pays them
once as well, so they largely cancel. report.json records the prediction beside the end-to-end
measurement so that the remaining gap is visible.

Timings are cached as one JSON file per measurement, keyed by the stack's conv geometry, the input
shape, provider, threads, onnxruntime version and the machine, so repeated runs (and the repeated
block shapes of ResNets) cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compressor import bench, layers
from compressor.export import export_onnx
from compressor.methods import Method
from compressor.profile import CallShape

#: Ranks timed per method and layer (spread over the allowed ones): each is a session and its runs.
LATENCY_CANDIDATES = 12
_WARMUP = 3
_CACHE_VERSION = 2  # 2: depthwise multipliers above 1 timed in their branched form


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compressor" / "latency"


def random_factors(method: Method, conv: nn.Conv2d, rank: int, groups: int) -> tuple[torch.Tensor, ...]:
    """Factors of the shapes ``method.decompose`` returns at ``rank``, with random values."""
    generator = torch.Generator().manual_seed(0)
    out_channels, in_channels = conv.out_channels, conv.in_channels
    kh, kw = conv.kernel_size
    # A grouped conv's factors keep its groups: low_rank's rank counts per group, grouped's is the total.
    per_group_in = in_channels // conv.groups
    expand_in = rank // groups if conv.groups > 1 else rank
    shapes = {
        "depthwise_separable": [(in_channels * rank, 1, kh, kw), (out_channels, in_channels * rank, 1, 1)],
        "spatial_separable": [(rank, in_channels, kh, 1), (out_channels, rank, 1, kw)],
        "low_rank": [(conv.groups * rank, per_group_in, kh, kw), (out_channels, rank, 1, 1)],
        "grouped": [(rank, per_group_in), (rank, rank // groups, kh, kw), (out_channels, expand_in)],
        "cp": [(rank, in_channels), (rank, kh), (rank, kw), (out_channels, rank)],
    }[method.name]
    return tuple(torch.randn(shape, generator=generator, dtype=conv.weight.dtype) for shape in shapes)


def _pads(conv: nn.Conv2d) -> list[int]:
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":  # PyTorch puts the odd pixel at the end
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        begin = [t // 2 for t in totals]
        return [*begin, *(t - b for t, b in zip(totals, begin))]
    ph, pw = conv.padding
    return [ph, pw, ph, pw]


def random_stack(method: Method, conv: nn.Module, rank: int, groups: int) -> nn.Module:
    """``method``'s stack for ``conv`` at ``rank`` with random factors: what timing needs, no decomposition.
    An ``nn.Linear`` gets the Linear layers that replace it."""
    view = layers.conv_view(conv)
    stack = method.build(view, random_factors(method, view, rank, groups), groups)
    return layers.as_linear_stack(conv, stack) if isinstance(conv, nn.Linear) else stack


def conv_geometry(conv: nn.Conv2d) -> dict:
    """Everything about a conv that its run time depends on (not its values)."""
    return {
        "in": conv.in_channels,
        "out": conv.out_channels,
        "kernel": list(conv.kernel_size),
        "stride": list(conv.stride),
        "pads": _pads(conv),
        "dilation": list(conv.dilation),
        "groups": conv.groups,
        "bias": conv.bias is not None,
    }


def convs_model(geometries: Sequence[dict], input_shape: Sequence[int], opset: int = 17) -> bytes:
    """An ONNX model chaining Conv nodes of these geometries, random weights, NCHW float input."""
    rng = np.random.default_rng(0)
    nodes, initializers = [], []
    previous = "input"
    for i, g in enumerate(geometries):
        weight = rng.standard_normal((g["out"], g["in"] // g["groups"], *g["kernel"])).astype(np.float32)
        inputs = [previous, f"w{i}"]
        initializers.append(numpy_helper.from_array(weight, f"w{i}"))
        if g["bias"]:
            initializers.append(numpy_helper.from_array(rng.standard_normal(g["out"]).astype(np.float32), f"b{i}"))
            inputs.append(f"b{i}")
        output = "output" if i == len(geometries) - 1 else f"x{i}"
        nodes.append(helper.make_node(
            "Conv", inputs, [output], kernel_shape=g["kernel"], strides=g["stride"], pads=g["pads"],
            dilations=g["dilation"], group=g["groups"],
        ))
        previous = output
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 8)
    return model.SerializeToString()


def _plain_chain(stack: nn.Module | None) -> bool:
    return stack is None or (type(stack) is nn.Sequential and all(type(m) is nn.Conv2d for m in stack))


def _exported(stack: nn.Module, input_shape: Sequence[int], opset: int = 17) -> bytes:
    """A stack with a forward of its own (``layers.DecoupledSeparable``), as the tool exports models."""
    example = torch.randn(tuple(input_shape), dtype=next(stack.parameters()).dtype)
    with tempfile.TemporaryDirectory(prefix="compressor-layer-") as folder:
        return export_onnx(stack, example, Path(folder) / "stack.onnx", opset).read_bytes()


class LatencyTable:
    """Median single-layer latencies (ms), measured once per key and kept in ``cache_dir``."""

    def __init__(
        self,
        cache_dir: str | Path | None = None,
        *,
        threads: int = 1,
        providers: Sequence[str] = bench.DEFAULT_PROVIDERS,
        runs: int = 20,
    ) -> None:
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.threads = threads
        self.providers = bench.check_providers(providers)
        self.runs = runs
        self.hits = 0
        self.measured = 0
        self.seconds = 0.0

    def _key(self, geometries: Sequence[dict], input_shape: Sequence[int], label: dict) -> dict:
        return {
            "version": _CACHE_VERSION,
            "convs": list(geometries),
            "input_shape": list(input_shape),
            "provider": self.providers[0],
            "threads": self.threads,
            "onnxruntime": ort.__version__,
            "machine": [platform.machine(), platform.processor(), os.cpu_count()],
            **label,
        }

    def _path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        return self.cache_dir / f"{digest}.json"

    def stack_ms(self, modules: Sequence[nn.Conv2d] | nn.Module, input_shape: Sequence[int], label: dict | None = None) -> float:
        """Median ms of running these convs in sequence (or this stack module, as it exports) on
        ``input_shape``; cached."""
        stack = modules if isinstance(modules, nn.Module) else None
        convs = [m for m in nn.Module.modules(stack) if isinstance(m, nn.Conv2d)] if stack is not None else list(modules)
        geometries = [conv_geometry(m) for m in convs]
        if stack is not None:
            label = {**(label or {}), "form": type(stack).__name__}
        key = self._key(geometries, input_shape, label or {})
        path = self._path(key)
        try:
            record = json.loads(path.read_text())
            if record.get("key") == key:
                self.hits += 1
                return float(record["median_ms"])
        except (OSError, ValueError, KeyError):
            pass
        started = time.perf_counter()
        onnx_model = convs_model(geometries, input_shape) if _plain_chain(stack) else _exported(stack, input_shape)
        sess = bench.session(onnx_model, threads=self.threads, providers=self.providers)
        feed = {"input": np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)}
        for _ in range(_WARMUP):
            sess.run(None, feed)
        times = []
        for _ in range(self.runs):
            begun = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - begun) * 1e3)
        median = statistics.median(times)
        self.measured += 1
        self.seconds += time.perf_counter() - started
        self._store(path, {"key": key, "median_ms": median, "p90_ms": bench.percentile(times, 90), "runs": self.runs})
        return median

    def _store(self, path: Path, record: dict) -> None:
        # Write-then-rename: a concurrent run reads a whole record or none.
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
            with os.fdopen(handle, "w") as file:
                json.dump(record, file)
            os.replace(temporary, path)
        except OSError:
            pass  # an unwritable cache only costs time

    def _calls_ms(self, modules: Sequence[nn.Conv2d] | nn.Module, conv: nn.Conv2d, calls: Sequence[CallShape], batch: int, label: dict) -> float:
        return sum(self.stack_ms(modules, (batch, conv.in_channels, *call.input_hw), label) for call in calls)

    def original_ms(self, conv: nn.Conv2d, calls: Sequence[CallShape], batch: int) -> float:
        return self._calls_ms([conv], conv, calls, batch, {"method": "keep"})

    def candidate_ms(self, method: Method, conv: nn.Conv2d, calls: Sequence[CallShape], batch: int, rank: int, groups: int) -> float:
        stack = random_stack(method, conv, rank, groups)
        return self._calls_ms(stack, conv, calls, batch, {"method": method.name, "rank": rank, "groups": groups})

    def summary(self) -> dict:
        return {
            "cache": str(self.cache_dir),
            "cache_hits": self.hits,
            "measured": self.measured,
            "measure_seconds": self.seconds,
            "threads": self.threads,
            "provider": self.providers[0],
            "layer_runs": self.runs,
        }


class LatencyCost:
    """The budget's view: per-layer costs in ms plus the measured end-to-end original latency."""

    def __init__(self, table: LatencyTable, batch: int, model_ms: float) -> None:
        self.table = table
        self.batch = batch
        self.model_ms = model_ms

    def original(self, conv: nn.Conv2d, calls: Sequence[CallShape]) -> float:
        return self.table.original_ms(conv, calls, self.batch)

    def candidate(self, method: Method, conv: nn.Conv2d, calls: Sequence[CallShape], rank: int, groups: int) -> float:
        return self.table.candidate_ms(method, conv, calls, self.batch, rank, groups)


def latency_cost_for(module: nn.Module, example_input: torch.Tensor, recipe, opset: int = 17) -> LatencyCost:
    """Measure the original model end to end (ONNX, same settings as its layers) and wrap the table.

    The thread count is the recipe's first ``bench.threads`` entry (1 when the list is empty): one
    setting, since a plan can only be optimal for one.
    """
    settings = recipe.bench
    threads = settings.threads[0] if settings.threads else 1
    table = LatencyTable(settings.cache, threads=threads, providers=settings.providers, runs=settings.layer_runs)
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as folder:
        path = export_onnx(module, example_input, Path(folder) / "original.onnx", opset)
        timed = bench.time_models(
            {"original": path}, tuple(example_input.shape), threads=threads,
            runs=max(settings.runs, settings.layer_runs), warmup=settings.warmup, providers=table.providers,
        )
    return LatencyCost(table, int(example_input.shape[0]), timed["original"]["median_ms"])
