"""A deterministic stand-in for ONNX Runtime timings: a module's "milliseconds" are its FLOPs.

Tests of a latency target's *logic* (which plan is kept, which way a correction goes, the shape of a
shipped recipe's plan) must not depend on how busy the machine is; real timings are the benchmarks' job.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from compressor import latency, latency_target, pipeline

FLOPS_PER_MS = 1e6


def flop_ms(module: nn.Module, input_shape: Sequence[int]) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(torch.zeros(tuple(input_shape)))
    return counter.get_total_flops() / FLOPS_PER_MS


def _stack_ms(self, modules, input_shape, label=None) -> float:
    stack = modules if isinstance(modules, nn.Module) else nn.Sequential(*modules)
    return flop_ms(stack, input_shape)


def use_flop_latency(monkeypatch, end_to_end: bool = True) -> None:
    """Layer timings, the original's end-to-end time and (with ``end_to_end``) the measured ratio of
    a candidate plan all become FLOP counts."""
    originals: list[float] = []

    def cost_for(module, example_input, recipe, opset=17):
        table = latency.LatencyTable(recipe.bench.cache, threads=1, runs=recipe.bench.layer_runs)
        originals.append(flop_ms(module, example_input.shape))
        return latency.LatencyCost(table, int(example_input.shape[0]), originals[-1])

    def measured(original, candidate, example_input, recipe, threads):
        compressed = flop_ms(candidate, example_input.shape)
        return {"original_ms": originals[-1], "compressed_ms": compressed, "ratio": compressed / originals[-1]}

    monkeypatch.setattr(latency.LatencyTable, "stack_ms", _stack_ms)
    monkeypatch.setattr(pipeline, "latency_cost_for", cost_for)
    if end_to_end:
        monkeypatch.setattr(latency_target, "measure_ratio", measured)
