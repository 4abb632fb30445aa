"""Ranks for every planned layer: the rule's own rank, or the global budget's choice.

Under a recipe ``target``, each layer whose rule leaves the rank open gets candidates (method x
rank, plus keep when the rule lists it) with their cost (MACs or params) and predicted error: the
relative output error on the calibration statistics when there are any (whitened spectra, or
whitened residuals for methods without a closed form), the relative weight error otherwise. Errors
are squared before summing: a layer's squared relative error is the fraction of its output energy
replaced by noise, and independent noise adds in energy. With calibration data each layer's squared
error is weighed by its end-to-end sensitivity (:mod:`compressor.sensitivity`), so the sum predicts
how far the network's output moves, not only each layer's own. The multiple-choice knapsack
(:func:`compressor.budget.solve`) then picks one candidate per layer, never above the budget.

With ``target: {latency: f}`` a candidate's cost is its measured single-layer ONNX Runtime time
(:mod:`compressor.latency`, which also defines what the fraction is of); only timed ranks are
candidates there (:data:`compressor.latency.LATENCY_CANDIDATES` per method and layer).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from compressor import estimate
from compressor.budget import Candidate, minimum_cost, solve
from compressor.latency import LATENCY_CANDIDATES
from compressor.layers import conv_view
from compressor.calibrate import LayerStatistics
from compressor.decompose.whiten import Whitening, whitening
from compressor.errors import RankError
from compressor.methods import METHODS, Method, conv_macs, conv_params
from compressor.passes.match import LayerPlan
from compressor.profile import LayerProfile, totals
from compressor.progress import layers as layer_bar
from compressor.ranks import allowed_ranks, resolve_rank

#: Candidate ranks per method and layer: spectra give every rank's error at once; the iterative
#: decompositions (grouped, cp) read theirs from cheap estimates (compressor.estimate), one small
#: eigendecomposition or a few per rank, so they get a somewhat coarser grid.
SPECTRAL_CANDIDATES = 64
ITERATIVE_CANDIDATES = 32


def whitening_for(method: Method, statistics: LayerStatistics | None, conv_groups: int = 1) -> Whitening | None:
    """The whitening ``method`` decomposes with; per group (the covariance's diagonal blocks) for a
    grouped conv, whose groups never see each other's inputs."""
    if statistics is None or method.statistic not in statistics.sums:
        return None
    if conv_groups == 1:
        return statistics.whitening(method.statistic)
    covariance = statistics.covariance(method.statistic)
    size = covariance.shape[0] // conv_groups
    blocks = [covariance[g * size:(g + 1) * size, g * size:(g + 1) * size] for g in range(conv_groups)]
    return whitening(torch.stack(blocks))


#: Cheap error estimates over the rank grid (see compressor.estimate) for the methods whose
#: ``predicted_errors`` would run the full iterative decomposition once per candidate rank.
_ESTIMATES = {
    "grouped": estimate.block_term_errors,
    "cp": lambda weight, ranks, groups: estimate.cp_errors(weight, ranks),
}


def _predicted_errors(method: Method, conv: nn.Conv2d, ranks: list[int], groups: int, whitening) -> list[float]:
    estimator = _ESTIMATES.get(method.name)
    # A grouped conv's estimate is per conv group (the method's own); _ESTIMATES read a dense kernel.
    if estimator is None or conv.groups > 1 or method.spectrum(conv.weight.detach(), groups, whitening) is not None:
        return method.predicted_errors(conv, ranks, groups, whitening)
    return estimator(method.whitened_weight(conv.weight, whitening), ranks, groups)


def _cost(metric: str, method: Method, conv: nn.Conv2d, profile: LayerProfile, rank: int, groups: int, latency=None) -> float:
    if metric == "macs":
        return method.macs(conv, profile.calls, rank, groups)
    if metric == "latency":
        return latency.candidate(method, conv, profile.calls, rank, groups)
    return method.params(conv, rank, groups)


def _original_cost(metric: str, conv: nn.Conv2d, profile: LayerProfile, latency=None) -> float:
    if metric == "latency":
        return latency.original(conv, profile.calls)
    return conv_macs(conv, profile.calls) if metric == "macs" else conv_params(conv)


def _spread(ranks: list[int], count: int) -> list[int]:
    if len(ranks) <= count:
        return ranks
    picks = {ranks[round(i * (len(ranks) - 1) / (count - 1))] for i in range(count)}
    return sorted(picks)


def _set_choice(plan: LayerPlan, method: Method, conv: nn.Conv2d, profile: LayerProfile, rank: int) -> None:
    plan.method, plan.rank = method.name, rank
    plan.macs_after = method.macs(conv, profile.calls, rank, plan.groups)
    plan.params_after = method.params(conv, rank, plan.groups)


def _fixed_rank(plan: LayerPlan, rule, conv, profile, statistics) -> None:
    method = METHODS[plan.method]
    whitening = whitening_for(method, statistics, conv.groups)
    rank, note = resolve_rank(
        method, conv, profile.calls, rule.rank, plan.groups, plan.name, round_to=plan.round_to, round_small=plan.round_small, whitening=whitening
    )
    _set_choice(plan, method, conv, profile, rank)
    plan.add_note(note)
    if method.spectrum(conv.weight.detach(), plan.groups, whitening) is not None:
        plan.predicted_error = method.predicted_errors(conv, [rank], plan.groups, whitening)[0]


def _candidates(plan: LayerPlan, conv, profile, metric: str, statistics, latency=None) -> list[Candidate]:
    original = _original_cost(metric, conv, profile, latency)
    keep_allowed = "keep" in plan.choices
    found = [Candidate(original, 0.0, ("keep", None, None))] if keep_allowed else []
    for name in plan.choices:
        if name == "keep":
            continue
        method = METHODS[name]
        whitening = whitening_for(method, statistics, conv.groups)
        ranks = allowed_ranks(method, conv, plan.groups, plan.round_to, plan.round_small)
        spectral = method.spectrum(conv.weight.detach(), plan.groups, whitening) is not None
        if metric == "latency":  # every rank timed is a session: time a spread, then filter
            ranks = _spread(ranks, LATENCY_CANDIDATES)
            costs = {r: _cost(metric, method, conv, profile, r, plan.groups, latency) for r in ranks}
        else:
            costs = None
        if keep_allowed:  # a rewrite that costs more than the original never beats keeping it
            ranks = [
                r for r in ranks
                if (costs[r] if costs else _cost(metric, method, conv, profile, r, plan.groups)) < original
            ] or ranks[:0]
        ranks = _spread(ranks, SPECTRAL_CANDIDATES if spectral else ITERATIVE_CANDIDATES)
        if not ranks:
            continue
        errors = _predicted_errors(method, conv, ranks, plan.groups, whitening)
        weight = 1.0 if plan.sensitivity is None else plan.sensitivity
        for rank, error in zip(ranks, errors):
            cost = costs[rank] if costs else _cost(metric, method, conv, profile, rank, plan.groups)
            found.append(Candidate(cost, weight * error**2, (name, rank, error)))
    return found


def _spend_leftover(
    solved: Sequence[LayerPlan], module: nn.Module, profiles: dict[str, LayerProfile], metric: str, budget: float, planned: float
) -> float:
    """Raise the ranks the coarse grid of the iterative methods left short, within the budget.

    Their candidates skip ranks (each costs a decomposition), so the solver can stop well under
    the budget. A higher rank of the same method does not fit worse, so the leftover goes, layer by
    layer from the largest predicted error, to the largest rank that still fits; the recorded
    ``predicted_error`` stays that of the grid rank (an upper bound).
    """
    coarse = [
        plan for plan in solved
        if plan.method in METHODS and METHODS[plan.method].spectrum(conv_view(module.get_submodule(plan.name)).weight.detach(), plan.groups, None) is None
    ]
    for plan in sorted(coarse, key=lambda p: -(p.predicted_error or 0.0)):
        method, conv, profile = METHODS[plan.method], conv_view(module.get_submodule(plan.name)), profiles[plan.name]
        current = _cost(metric, method, conv, profile, plan.rank, plan.groups)
        fitting = [
            rank for rank in allowed_ranks(method, conv, plan.groups, plan.round_to, plan.round_small)
            if rank > plan.rank and planned - current + _cost(metric, method, conv, profile, rank, plan.groups) <= budget
            and _cost(metric, method, conv, profile, rank, plan.groups) < _original_cost(metric, conv, profile)
        ]
        if fitting:
            planned += _cost(metric, method, conv, profile, fitting[-1], plan.groups) - current
            _set_choice(plan, method, conv, profile, fitting[-1])
    return planned


def assign_ranks(
    plans: Sequence[LayerPlan],
    module: nn.Module,
    profiles: dict[str, LayerProfile],
    recipe,
    statistics: dict[str, LayerStatistics] | None = None,
    latency=None,
    fraction: float | None = None,
    progress: bool | None = None,
) -> dict | None:
    """Fill in method, rank and costs of every rewriting plan; return the budget record, if any.

    ``progress``: a bar over the solved layers (default: when stderr is a terminal).

    ``latency`` (a :class:`compressor.latency.LatencyCost`) is required for ``target: {latency: f}``.
    ``fraction`` replaces the target's own (the latency target's end-to-end correction solves for
    another fraction than it promises).

    ``statistics`` (from :func:`compressor.calibrate.collect_statistics`) makes spectral ranks
    and the budget's errors data-aware. Raises ``RankError`` for a rank that does not fit and for a
    target below the smallest reachable cost.
    """
    statistics = statistics or {}
    solved = [plan for plan in plans if plan.choices]
    for plan in plans:
        if plan.rewrites and not plan.choices:
            conv, profile = conv_view(module.get_submodule(plan.name)), profiles[plan.name]
            _fixed_rank(plan, recipe.rules[plan.rule], conv, profile, statistics.get(plan.name))
    if recipe.target is None:
        return None
    metric = recipe.target.metric
    fraction = recipe.target.fraction if fraction is None else fraction
    if metric == "latency":
        if latency is None:
            raise ValueError("target {latency: f} needs a latency cost model (compressor.latency.latency_cost_for)")
        total, fixed_after, layer_ms = _latency_fixed(plans, solved, module, profiles, latency)
    else:
        total = totals(profiles)[metric]
        fixed_after = total + sum(
            (getattr(p, f"{metric}_after") or 0) - (getattr(p, f"{metric}_before") or 0) for p in plans if not p.choices
        )
        fixed_after -= sum(getattr(p, f"{metric}_before") for p in solved)
    budget = fraction * total
    choices = []
    with layer_bar("ranks", len(solved), progress) as bar:
        for plan in solved:
            bar.advance(plan.name)
            conv = conv_view(module.get_submodule(plan.name))
            choices.append(_candidates(plan, conv, profiles[plan.name], metric, statistics.get(plan.name), latency))
    reachable = fixed_after + (minimum_cost(choices) if choices else 0)
    if reachable > budget:
        amount = (lambda v: f"{v:.3f} ms") if metric == "latency" else (lambda v: f"{int(v)} {metric}")
        raise RankError(
            f"target {{{metric}: {fraction}}} asks for at most {amount(budget)} of {amount(total)}, but the smallest "
            f"reachable with these rules is {amount(reachable)} ({reachable / max(total, 1e-12):.3f} of the original); "
            "raise the target or let more layers be rewritten"
        )
    picks = solve(choices, budget - fixed_after) if choices else []
    predicted_total = 0.0
    for plan, options, index in zip(solved, choices, picks):
        name, rank, error = options[index].label
        conv, profile = conv_view(module.get_submodule(plan.name)), profiles[plan.name]
        if name == "keep":
            plan.method, plan.rank = "keep", None
            plan.macs_after, plan.params_after = plan.macs_before, plan.params_before
            plan.skipped_reason = "kept: the budget solver found no cheaper candidate worth its error"
            plan.predicted_error = 0.0
        else:
            _set_choice(plan, METHODS[name], conv, profile, rank)
            plan.predicted_error = error
        predicted_total += options[index].error
    planned = fixed_after + sum(options[index].cost for options, index in zip(choices, picks))
    if metric != "latency":  # untimed ranks have no latency to spend against
        planned = _spend_leftover(solved, module, profiles, metric, budget, planned)
    record = {
        "metric": metric,
        "fraction": fraction,
        "budget": budget,
        "original": total,
        "planned": planned,
        "planned_ratio": planned / max(total, 1e-12) if metric == "latency" else planned / max(total, 1),
        "predicted_squared_error": predicted_total,
        "solved_layers": len(solved),
        "error_source": "calibration" if statistics else "weights",
        # Whether each layer's squared error was weighed by its end-to-end sensitivity (then the
        # predicted total is a distillation-loss increase, not a plain sum of squared errors).
        "weighted_by": "output sensitivity" if any(p.sensitivity is not None for p in solved) else None,
        "curves": _error_curves(solved, choices),
    }
    if metric == "latency":
        for plan, options, index in zip(solved, choices, picks):
            layer_ms[plan.name]["after_ms"] = options[index].cost
        record.update(
            fixed_ms=total - sum(ms["before_ms"] for ms in layer_ms.values()),
            layers_ms=layer_ms,
            **latency.table.summary(),
        )
    return record


#: How many of the solved layers (largest original cost first) get their error-vs-rank curve in the report.
CURVE_LAYERS = 6


def _error_curves(solved: Sequence[LayerPlan], choices: Sequence[Sequence[Candidate]]) -> list[dict]:
    """Predicted error against rank per method, for the layers with the largest original cost."""
    largest = sorted(zip(solved, choices), key=lambda pair: -(pair[0].macs_before or 0))[:CURVE_LAYERS]
    curves = []
    for plan, options in largest:
        methods: dict[str, list] = {}
        for option in options:
            name, rank, error = option.label
            if name != "keep":
                methods.setdefault(name, []).append([rank, error, option.cost])
        curves.append({"name": plan.name, "chosen": [plan.method, plan.rank], "methods": methods})
    return curves


def _latency_fixed(plans, solved, module, profiles, latency) -> tuple[float, float, dict]:
    """End-to-end original ms, the ms outside the solved layers (fixed rewrites at their new cost),
    and each timed layer's before/after ms."""
    total = latency.model_ms
    fixed_after = total
    layer_ms: dict[str, dict] = {}
    for plan in plans:
        if not plan.choices and not plan.rewrites:
            continue
        conv, profile = conv_view(module.get_submodule(plan.name)), profiles[plan.name]
        before = latency.original(conv, profile.calls)
        entry = {"before_ms": before, "solved": bool(plan.choices)}
        if plan.choices:
            fixed_after -= before
        else:
            entry["after_ms"] = latency.candidate(METHODS[plan.method], conv, profile.calls, plan.rank, plan.groups)
            fixed_after += entry["after_ms"] - before
        layer_ms[plan.name] = entry
    return total, fixed_after, layer_ms
