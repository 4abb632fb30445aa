"""Budget solver: brute-force agreement, exact fills, infeasible budgets, degenerate groups, speed."""

import itertools
import math
import random
import time

import numpy as np
import pytest

from compressor.budget import Candidate, minimum_cost, solve
from compressor.errors import RankError


def _cost(choices, picks):
    return math.fsum(group[i].cost for group, i in zip(choices, picks))


def _error(choices, picks):
    return math.fsum(group[i].error for group, i in zip(choices, picks))


def _brute(choices, budget):
    """Least error among all selections costing at most ``budget`` (None if there is none)."""
    best = None
    for picks in itertools.product(*(range(len(group)) for group in choices)):
        if _cost(choices, picks) <= budget:
            error = _error(choices, picks)
            best = error if best is None else min(best, error)
    return best


def _random_instance(rng, integer=False):
    groups = rng.randint(2, 5)
    choices = []
    for _ in range(groups):
        size = rng.randint(1, 5)
        if integer:
            choices.append([Candidate(rng.randint(0, 20), rng.randint(0, 30), k) for k in range(size)])
        else:
            choices.append([Candidate(rng.uniform(0, 10), rng.uniform(0, 5), k) for k in range(size)])
    low = minimum_cost(choices)
    high = math.fsum(max(c.cost for c in group) for group in choices)
    budget = rng.uniform(low, high) if high > low else low
    return choices, (round(budget) if integer and budget >= math.ceil(low) else budget)


@pytest.mark.parametrize("resolution", [4000, 50])
def test_matches_brute_force_on_random_instances(resolution):
    exact = near = 0
    for seed in range(200):
        rng = random.Random(seed)
        choices, budget = _random_instance(rng)
        picks = solve(choices, budget, resolution=resolution)
        cost, error = _cost(choices, picks), _error(choices, picks)
        ctx = f"seed {seed}, resolution {resolution}, budget {budget!r}: picks {picks}, cost {cost!r}, error {error!r}"
        assert len(picks) == len(choices) and all(0 <= i < len(g) for g, i in zip(choices, picks)), ctx
        assert cost <= budget, f"over budget: {ctx}"
        optimum = _brute(choices, budget)
        assert error >= optimum - 1e-9, f"better than brute force ({optimum!r})?: {ctx}"
        # The guarantee: no worse than any selection that fits with one bucket of margin per group.
        bucket = (budget - minimum_cost(choices)) / resolution
        margin_optimum = _brute(choices, budget - len(choices) * bucket)
        if margin_optimum is not None:
            assert error <= margin_optimum + 1e-9, f"worse than the margin optimum {margin_optimum!r}: {ctx}"
        exact += abs(error - optimum) <= 1e-9
        near += margin_optimum is not None and abs(margin_optimum - optimum) <= 1e-9
    print(f"resolution {resolution}: optimal on {exact}/200 random instances ({near} guaranteed by the margin)")
    if resolution == 4000:
        assert exact >= 195, f"resolution 4000 found the brute-force optimum on only {exact}/200 instances"


def test_integer_costs_are_solved_exactly():
    for seed in range(200):
        rng = random.Random(1000 + seed)
        choices, budget = _random_instance(rng, integer=True)
        if budget < minimum_cost(choices):
            continue
        picks = solve(choices, budget)
        cost, error, optimum = _cost(choices, picks), _error(choices, picks), _brute(choices, budget)
        assert cost <= budget and abs(error - optimum) <= 1e-9, (
            f"seed {seed}, integer budget {budget}: picks {picks}, cost {cost}, error {error}, optimum {optimum}"
        )


def test_budget_met_exactly():
    # Only one selection fills the budget to the unit, and it is the only one with zero error.
    choices = [
        [Candidate(10, 9.0), Candidate(17, 0.0), Candidate(18, 5.0)],
        [Candidate(3, 9.0), Candidate(29, 0.0), Candidate(31, 1.0)],
        [Candidate(1, 9.0), Candidate(54, 0.0), Candidate(60, 0.5)],
    ]
    picks = solve(choices, 100)
    assert picks == [1, 1, 1] and _cost(choices, picks) == 100, f"picks {picks}, cost {_cost(choices, picks)}"


def test_budget_met_exactly_with_unaligned_costs():
    # Costs are not multiples of budget/resolution and have no useful gcd: rounding up alone would
    # miss the exact fill; the repair pass must find it.
    choices = [
        [Candidate(0.0, 3.0), Candidate(1.3, 0.0)],
        [Candidate(0.0, 3.0), Candidate(2.9, 0.0)],
        [Candidate(0.0, 3.0), Candidate(4.1, 0.0)],
    ]
    budget = 1.3 + 2.9 + 4.1
    for resolution in (7, 100, 4000):
        picks = solve(choices, budget, resolution=resolution)
        cost = _cost(choices, picks)
        assert picks == [1, 1, 1] and cost <= budget, f"resolution {resolution}: picks {picks}, cost {cost!r}"


def test_large_integer_costs_fill_the_budget():
    # MAC-sized costs sharing a gcd: exact weights, so the tight budget is met to the MAC.
    rng = random.Random(7)
    choices = [[Candidate(9216 * rng.randint(1, 400), rng.random()) for _ in range(6)] for _ in range(12)]
    target = [rng.randrange(6) for _ in choices]
    budget = int(_cost(choices, target))
    picks = solve(choices, budget)
    assert _cost(choices, picks) <= budget, f"cost {_cost(choices, picks)} over budget {budget}"
    assert _error(choices, picks) <= _error(choices, target) + 1e-12, (
        f"error {_error(choices, picks)} worse than a selection that fits, {_error(choices, target)}"
    )


def test_infeasible_budget_raises_with_the_minimum():
    choices = [[Candidate(5, 1.0), Candidate(8, 0.0)], [Candidate(7, 2.0), Candidate(3.5, 4.0)]]
    assert minimum_cost(choices) == 8.5
    with pytest.raises(RankError, match=r"Budget 8\.4 is below the minimum reachable cost 8\.5") as raised:
        solve(choices, 8.4)
    assert "\n" not in str(raised.value), f"message must be one line: {str(raised.value)!r}"
    picks = solve(choices, 8.5)
    assert picks == [0, 1], f"budget equal to the minimum: expected the cheapest picks [0, 1], got {picks}"


def test_single_group():
    group = [Candidate(10, 0.0, "full"), Candidate(6, 0.2, "r6"), Candidate(3, 0.9, "r3"), Candidate(1, 2.0, "r1")]
    got = {budget: solve([group], budget) for budget in (1, 2.9, 3, 5.99, 6, 9, 10, 1e9, math.inf)}
    expected = {1: [3], 2.9: [3], 3: [2], 5.99: [2], 6: [1], 9: [1], 10: [0], 1e9: [0], math.inf: [0]}
    assert got == expected, f"single group by budget: {got}"


def test_zero_cost_candidates():
    choices = [
        [Candidate(0, 1.0), Candidate(0, 0.5), Candidate(4, 0.0)],
        [Candidate(0, 0.0)],
        [Candidate(0, 2.0), Candidate(3, 1.0)],
    ]
    got = {budget: solve(choices, budget) for budget in (0, 3, 4, 7)}
    expected = {0: [1, 0, 0], 3: [1, 0, 1], 4: [1, 0, 1], 7: [2, 0, 1]}  # 4: 0.5 + 1 beats 0 + 2
    assert got == expected, f"zero-cost candidates by budget: {got}"
    all_free = [[Candidate(0, 3.0), Candidate(0, 1.0)], [Candidate(0, 0.0)]]
    assert solve(all_free, 0) == [1, 0], f"all free: got {solve(all_free, 0)}"


def test_ties_are_deterministic_and_cheaper():
    group = [Candidate(5, 1.0, "a"), Candidate(3, 1.0, "b"), Candidate(3, 1.0, "c")]
    picks = [solve([group, group], 100)[0] for _ in range(3)]
    assert picks == [1, 1, 1], f"equal errors: expected the cheaper, lower index (1), got {picks}"


def test_empty_and_malformed():
    assert solve([], 0) == [], "no groups"
    with pytest.raises(ValueError, match="at least one candidate in every group, got none in group 1"):
        solve([[Candidate(1, 1)], []], 5)
    with pytest.raises(ValueError, match="non-negative candidate cost"):
        Candidate(-1, 0)
    with pytest.raises(ValueError, match="non-negative candidate error"):
        Candidate(1, float("nan"))
    with pytest.raises(ValueError, match="positive integer resolution"):
        solve([[Candidate(1, 1)]], 5, resolution=0)


def test_speed_60_groups_100_candidates():
    rng = np.random.default_rng(0)
    choices = []
    for _ in range(60):
        ranks = np.arange(1, 101)
        macs = ranks * rng.integers(1000, 50000) + rng.random(100) * 100  # unaligned, no common gcd
        errors = np.exp(-ranks / rng.uniform(5, 40)) * rng.uniform(0.1, 2)
        choices.append([Candidate(float(c), float(e), int(r)) for c, e, r in zip(macs, errors, ranks)])
    total = math.fsum(max(c.cost for c in group) for group in choices)
    budget = 0.3 * total
    solve(choices, budget)  # warm-up (imports, allocation)
    start = time.perf_counter()
    picks = solve(choices, budget)
    elapsed = time.perf_counter() - start
    cost = _cost(choices, picks)
    cheapest = [0] * 60
    print(f"60 groups x 100 candidates: {elapsed * 1000:.1f} ms, cost {cost / budget:.6f} of budget, "
          f"error {_error(choices, picks):.4f} (all-cheapest {_error(choices, cheapest):.4f})")
    assert cost <= budget, f"over budget: {cost!r} > {budget!r}"
    assert _error(choices, picks) < _error(choices, cheapest), "the solver should spend the budget"
    assert elapsed < 10, f"60x100 took {elapsed:.2f} s"
