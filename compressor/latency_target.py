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

from compressor import bench, tree
from compressor.allocate import assign_ranks
from compressor.errors import RankError
from compressor.export import export_onnx
from compressor.latency import LatencyCost, random_stack
from compressor.methods import METHODS
from compressor.passes import LayerPlan, rewrite_

TOLERANCE = 0.05
MAX_CORRECTIONS = 4


def planned_structure(module: nn.Module, plans: Sequence[LayerPlan]) -> nn.Module:
    """A copy of ``module`` with every planned rewrite in place, random factors of the planned shapes."""
    replacements = {
        plan.name: random_stack(METHODS[plan.method], module.get_submodule(plan.name), plan.rank, plan.groups)
        for plan in plans if plan.rewrites
    }
    return tree.set_training_(rewrite_(copy.deepcopy(module), replacements), False)


def measure_ratio(original: Path, candidate: nn.Module, example_input: torch.Tensor, recipe, threads: int) -> dict:
    """``candidate`` exported beside the ``original`` ONNX file and both timed alternately: their
    medians and the ratio."""
    settings = recipe.bench
    paths = {
        "original": original,
        "compressed": export_onnx(candidate, example_input, original.with_name("candidate.onnx"), recipe.export.opset),
    }
    timed = bench.time_models(
        paths, tuple(example_input.shape), threads=threads, runs=max(settings.runs, settings.layer_runs),
        warmup=settings.warmup, providers=settings.providers,
    )
    original_ms, compressed_ms = timed["original"]["median_ms"], timed["compressed"]["median_ms"]
    return {"original_ms": original_ms, "compressed_ms": compressed_ms, "ratio": compressed_ms / original_ms}


def _closeness(attempt: dict, wanted: float) -> tuple[bool, float]:
    """Sort key: attempts that hold the target first, then the one nearest to it (a plan faster than
    asked costs accuracy, one slower breaks the promise; both count by relative distance)."""
    off = abs(attempt["ratio"] - wanted) / wanted
    return (off > TOLERANCE, off)


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
    measurement; the budget record gains ``measured_ratio``, ``held`` and ``corrections``.

    A correction multiplies the fraction solved for by ``(f / m)``, limited to a factor of 2 either
    way so that one disturbed measurement cannot throw the plan far off; the plan kept is the
    measured attempt nearest the target (re-solved, which the cached layer timings make cheap).
    """
    wanted = recipe.target.fraction
    threads = latency.table.threads
    solve_for, attempts, records, seen = wanted, [], {}, {}
    with tempfile.TemporaryDirectory(prefix="compressor-latency-") as folder:
        original = export_onnx(module, example_input, Path(folder) / "original.onnx", recipe.export.opset)
        for _ in range(MAX_CORRECTIONS + 1):
            try:
                record = assign_ranks(plans, module, profiles, recipe, statistics, latency, fraction=solve_for)
            except RankError as err:
                if not records:
                    raise
                attempts.append({"solved_for": solve_for, "unreachable": str(err)})
                break
            signature = tuple((plan.name, plan.method, plan.rank) for plan in plans)
            if signature in seen:
                # The plans on either side of the target are both measured: no fraction in between
                # gives another plan, so the nearer of them is the answer.
                attempts.append({"solved_for": solve_for, "same_plan_as": seen[signature]})
                break
            measured = measure_ratio(original, planned_structure(module, plans), example_input, recipe, threads)
            seen[signature] = solve_for
            attempts.append({"solved_for": solve_for, "planned_ratio": record["planned_ratio"], **measured})
            records[solve_for] = record
            if abs(measured["ratio"] - wanted) <= TOLERANCE * wanted:
                break
            step = min(2.0, max(0.5, wanted / measured["ratio"]))
            solve_for = min(1.0, solve_for * step)
    best = min((a for a in attempts if "ratio" in a), key=lambda a: _closeness(a, wanted))
    last_solved = next(a for a in reversed(attempts) if "ratio" in a)
    if best is not last_solved:
        assign_ranks(plans, module, profiles, recipe, statistics, latency, fraction=best["solved_for"])
    record = records[best["solved_for"]]
    best["kept"] = True
    record.update(
        fraction=wanted,
        measured_ratio=best["ratio"],
        measured_threads=threads,
        held=abs(best["ratio"] - wanted) <= TOLERANCE * wanted,
        corrections=attempts,
    )
    return record
