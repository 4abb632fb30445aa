"""Holding ``target: {latency: f}`` end to end: plan, measure the whole exported model, correct.

The per-layer cost model (:mod:`compressor.latency`) adds up one-layer timings; inside a whole
model ONNX Runtime fuses, reorders and caches differently, so a plan at a predicted ``f`` measured
0.77 when 0.70 was asked. After each plan the rewritten model (factors of the planned shapes with
random values: dense kernels do not care about the values) is exported and timed against the
original, alternating, in one session per model; when the measured ratio ``m`` is more than
:data:`TOLERANCE` (relative) away from ``f``, the solver is asked for ``solve_for * f / m`` instead
and the plan is measured again, at most :data:`MAX_CORRECTIONS` times. Every attempt is recorded.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from compressor import bench
from compressor.allocate import assign_ranks
from compressor.errors import RankError
from compressor.export import export_onnx
from compressor.latency import LatencyCost, random_factors
from compressor.methods import METHODS
from compressor.passes import LayerPlan, rewrite_

TOLERANCE = 0.05
MAX_CORRECTIONS = 4


def planned_structure(module: nn.Module, plans: Sequence[LayerPlan]) -> nn.Module:
    """A copy of ``module`` with every planned rewrite in place, random factors of the planned shapes."""
    replacements = {}
    for plan in plans:
        if plan.rewrites:
            method, conv = METHODS[plan.method], module.get_submodule(plan.name)
            replacements[plan.name] = method.build(conv, random_factors(method, conv, plan.rank, plan.groups), plan.groups)
    return rewrite_(copy.deepcopy(module), replacements).eval()


def measure_ratio(original: nn.Module, candidate: nn.Module, example_input: torch.Tensor, recipe, threads: int) -> dict:
    """Both models exported and timed alternately: their medians and the ratio."""
    settings = recipe.bench
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as folder:
        paths = {
            "original": export_onnx(original, example_input, Path(folder) / "original.onnx", recipe.export.opset),
            "compressed": export_onnx(candidate, example_input, Path(folder) / "compressed.onnx", recipe.export.opset),
        }
        timed = bench.time_models(
            paths, tuple(example_input.shape), threads=threads, runs=max(settings.runs, settings.layer_runs),
            warmup=settings.warmup, providers=settings.providers,
        )
    original_ms, compressed_ms = timed["original"]["median_ms"], timed["compressed"]["median_ms"]
    return {"original_ms": original_ms, "compressed_ms": compressed_ms, "ratio": compressed_ms / original_ms}


def hold_latency_target(
    plans: Sequence[LayerPlan],
    module: nn.Module,
    profiles: dict,
    recipe,
    statistics: dict,
    latency: LatencyCost,
    example_input: torch.Tensor,
) -> dict:
    """:func:`~compressor.allocate.assign_ranks` under a latency target, corrected by end-to-end
    measurement; the budget record gains ``measured_ratio``, ``held`` and ``corrections``."""
    wanted = recipe.target.fraction
    threads = latency.table.threads
    solve_for, attempts, record = wanted, [], None
    for _ in range(MAX_CORRECTIONS + 1):
        try:
            record = assign_ranks(plans, module, profiles, recipe, statistics, latency, fraction=solve_for)
        except RankError as err:
            if record is None:
                raise
            attempts.append({"solved_for": solve_for, "unreachable": str(err)})
            break  # the previous plan (still in place: a refused solve changes nothing) stands
        measured = measure_ratio(module, planned_structure(module, plans), example_input, recipe, threads)
        attempts.append({"solved_for": solve_for, "planned_ratio": record["planned_ratio"], **measured})
        if abs(measured["ratio"] - wanted) <= TOLERANCE * wanted:
            break
        solve_for = min(1.0, solve_for * wanted / measured["ratio"])
    final = next(a for a in reversed(attempts) if "ratio" in a)  # a refused solve leaves this plan in place
    record.update(
        fraction=wanted,
        measured_ratio=final["ratio"],
        measured_threads=threads,
        held=abs(final["ratio"] - wanted) <= TOLERANCE * wanted,
        corrections=attempts,
    )
    return record
