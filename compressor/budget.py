"""The global budget solver: one candidate per layer, least summed error, total cost within budget.

This is the multiple-choice knapsack problem (Sinha, Zoltners, "The multiple-choice knapsack
problem", Operations Research 27(3), 1979; Kellerer, Pferschy, Pisinger, "Knapsack Problems",
Springer 2004, ch. 11), solved by dynamic programming over a discretized cost axis:

1. Every group's cheapest cost is paid up front; the DP spends only the *slack*
   ``budget - minimum_cost``. The cheapest candidate of every group then weighs exactly 0, so the DP
   can always fall back to it, and all of the resolution goes where the choices are.
2. Candidates dominated within their group (another one is no more expensive and no worse) are
   dropped; they can never be part of a unique optimum.
3. Extra costs become integer weights. When every extra cost is an integer and the slack, counted
   in units of their gcd, fits in ``resolution`` buckets, the weights are exact (no rounding at all).
   Otherwise one bucket is ``slack / resolution`` and weights are rounded UP, so any selection the DP
   accepts fits the true budget.
4. ``best[b]`` = least error of the groups so far within ``b`` buckets; one numpy pass per candidate
   over the whole budget axis, ``argmin`` over candidates, then a backtrack.
5. Repair: the true cost is checked with exact summation (``math.fsum``); should rounding ever leave
   it above budget, groups are downgraded (least error added per cost saved) until it fits. Then an
   improvement pass repeatedly applies the single-group change with the largest error decrease that
   still fits the true budget, which recovers what rounding up cost the DP (e.g. integer costs that
   fill the budget exactly).

Guarantees: the result always fits the budget (true costs, exact sum); its error is at most that of
any selection costing no more than ``budget - G * slack / resolution`` (``G`` groups; each rounded
weight is off by less than one bucket), and exactly optimal in the exact-weight case of step 3.
Deterministic: ties go to the cheaper candidate, then to the lower index.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from compressor.errors import RankError

DEFAULT_RESOLUTION = 4000


@dataclass(frozen=True)
class Candidate:
    """One way to treat one layer: its ``cost`` (e.g. MACs, >= 0), its predicted ``error`` (>= 0,
    additive across layers) and an opaque ``label`` handed back to the caller (method, rank, ...)."""

    cost: float
    error: float
    label: object = None

    def __post_init__(self) -> None:
        for what in ("cost", "error"):
            value = getattr(self, what)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"Expected a finite non-negative candidate {what}, got {value!r}")


def _check_choices(choices: Sequence[Sequence[Candidate]]) -> None:
    for index, group in enumerate(choices):
        if len(group) == 0:
            raise ValueError(f"Expected at least one candidate in every group, got none in group {index}")
        for candidate in group:
            if not isinstance(candidate, Candidate):
                raise ValueError(f"Expected Candidate objects, got {type(candidate).__name__} in group {index}")


def minimum_cost(choices: Sequence[Sequence[Candidate]]) -> float:
    """The least reachable total cost: the cheapest candidate of every group, summed exactly."""
    _check_choices(choices)
    return math.fsum(min(c.cost for c in group) for group in choices)


def _pareto(group: Sequence[Candidate]) -> list[int]:
    """Indices of the undominated candidates, by increasing cost (and so strictly decreasing error)."""
    order = sorted(range(len(group)), key=lambda i: (group[i].cost, group[i].error, i))
    kept: list[int] = []
    for i in order:
        if not kept or group[i].error < group[kept[-1]].error:
            kept.append(i)
    return kept


def _weights(extra: list[np.ndarray], slack: float, resolution: int) -> tuple[list[np.ndarray], int]:
    """Integer weights of the extra costs and the capacity in buckets (see the module docstring, 3.)."""
    values = np.concatenate(extra)
    positive = values[values > 0]
    if positive.size == 0:
        return [np.zeros(e.shape[0], dtype=np.int64) for e in extra], 0
    if np.all(positive == np.floor(positive)) and positive.max() < 2**53:
        unit = reduce(math.gcd, (int(v) for v in np.unique(positive)))
        capacity = math.floor(slack / unit)
        if capacity <= resolution:
            return [(e / unit).round().astype(np.int64) for e in extra], capacity
    bucket = slack / resolution
    weights = []
    for e in extra:
        w = np.ceil(e / bucket)
        w[w * bucket < e] += 1  # the division may round a hair low; the bound must hold
        weights.append(np.minimum(w, resolution + 1).astype(np.int64))
    return weights, resolution


def _dp(weights: list[np.ndarray], errors: list[np.ndarray], capacity: int) -> list[int]:
    """Positions (into each group's pruned list) minimizing the error within ``capacity`` buckets."""
    best = np.zeros(capacity + 1)
    picks = np.empty((len(weights), capacity + 1), dtype=np.int32)
    for g, (w, e) in enumerate(zip(weights, errors)):
        table = np.full((w.shape[0], capacity + 1), np.inf)
        for j in range(w.shape[0]):
            if w[j] <= capacity:
                table[j, w[j] :] = best[: capacity + 1 - w[j]] + e[j]
        picks[g] = np.argmin(table, axis=0)  # first minimum: the cheaper candidate wins ties
        best = table[picks[g], np.arange(capacity + 1)]
    chosen = [0] * len(weights)
    room = capacity
    for g in range(len(weights) - 1, -1, -1):
        chosen[g] = int(picks[g, room])
        room -= int(weights[g][chosen[g]])
    return chosen


def _repair(costs: np.ndarray, errors: np.ndarray, chosen: np.ndarray, budget: float) -> np.ndarray:
    """Make the selection fit (downgrades), then apply the best fitting single-group upgrades.

    ``costs``/``errors`` are (groups, width) with ``inf`` padding; ``chosen`` holds column indices;
    column 0 of every group is its cheapest candidate, and all of them together fit the budget.
    """
    rows = np.arange(costs.shape[0])
    chosen = chosen.copy()
    while math.fsum(costs[rows, chosen]) > budget:
        saved = costs[rows, chosen][:, None] - costs
        added = errors - errors[rows, chosen][:, None]
        with np.errstate(invalid="ignore"):
            ratio = np.where(saved > 0, added / np.where(saved > 0, saved, 1.0), np.inf)
        flat = int(np.argmin(ratio))
        if not np.isfinite(ratio.flat[flat]):  # unreachable: all-cheapest fits; kept as a stop
            chosen[:] = 0
            break
        chosen[flat // costs.shape[1]] = flat % costs.shape[1]
    blocked = np.zeros(costs.shape, dtype=bool)
    for _ in range(costs.size + 1):  # every applied step lowers the total error: this always ends
        total = math.fsum(costs[rows, chosen])
        gain = errors[rows, chosen][:, None] - errors
        fits = (total - costs[rows, chosen][:, None]) + costs <= budget
        gain = np.where(fits & ~blocked & (gain > 0), gain, 0.0)
        flat = int(np.argmax(gain))  # first maximum: lowest group, then cheapest candidate
        if gain.flat[flat] <= 0:
            break
        g, j = divmod(flat, costs.shape[1])
        previous, chosen[g] = chosen[g], j
        if math.fsum(costs[rows, chosen]) > budget:  # the vectorized total above is not an exact sum
            chosen[g] = previous
            blocked[g, j] = True
    return chosen


def solve(
    choices: Sequence[Sequence[Candidate]], budget: float, *, resolution: int = DEFAULT_RESOLUTION
) -> list[int]:
    """Pick one candidate index per group minimizing the summed error subject to sum(cost) <= budget.

    See the module docstring for the method and its guarantees. Raises ``RankError`` when even the
    cheapest candidate of every group exceeds the budget; ``ValueError`` for malformed input.
    """
    _check_choices(choices)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or math.isnan(budget):
        raise ValueError(f"Expected a numeric budget, got {budget!r}")
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"Expected a positive integer resolution, got {resolution!r}")
    if not choices:
        if budget < 0:
            raise RankError(f"Budget {budget:.12g} is below the minimum reachable cost 0 (no groups)")
        return []
    floor = minimum_cost(choices)
    if floor > budget:
        raise RankError(
            f"Budget {budget:.12g} is below the minimum reachable cost {floor:.12g} "
            f"(the cheapest candidate of each of {len(choices)} groups)"
        )
    kept = [_pareto(group) for group in choices]
    width = max(len(k) for k in kept)
    costs = np.full((len(choices), width), np.inf)
    errors = np.full((len(choices), width), np.inf)
    for g, (group, indices) in enumerate(zip(choices, kept)):
        costs[g, : len(indices)] = [group[i].cost for i in indices]
        errors[g, : len(indices)] = [group[i].error for i in indices]
    if math.isinf(budget):  # no constraint: the least error of each group (the cheapest on ties)
        return [indices[-1] for indices in kept]
    slack = budget - floor
    extra = [costs[g, : len(k)] - costs[g, 0] for g, k in enumerate(kept)]
    if slack <= 0:
        chosen = np.zeros(len(choices), dtype=np.int64)
    else:
        weights, capacity = _weights(extra, slack, resolution)
        chosen = np.array(_dp(weights, [errors[g, : len(k)] for g, k in enumerate(kept)], capacity), dtype=np.int64)
    chosen = _repair(costs, errors, chosen, budget)
    return [kept[g][int(j)] for g, j in enumerate(chosen)]
