"""Factor math: exact at full rank, error falling with rank, dtype kept, bad ranks refused."""

import pytest
import torch

from compressor import decompose
from compressor.decompose.block_term import block_term_full_rank
from compressor.decompose.depthwise import depthwise_separable_full_rank
from compressor.decompose.grouped_tucker import grouped_tucker2_full_rank
from compressor.decompose.low_rank import low_rank_full_rank
from compressor.decompose.spatial import spatial_separable_full_rank

SHAPES = [(16, 8, 3, 3), (13, 7, 3, 5), (5, 11, 1, 5), (9, 6, 7, 1), (6, 4, 5, 5), (7, 9, 1, 1)]


def _rel(approx, weight):
    return (torch.linalg.norm(approx.double() - weight.double()) / torch.linalg.norm(weight.double())).item()


def _depthwise(weight, rank):
    return decompose.depthwise_separable_reconstruct(*decompose.depthwise_separable(weight, rank), weight.shape[1])


def _spatial(weight, rank):
    return decompose.spatial_separable_reconstruct(*decompose.spatial_separable(weight, rank))


def _low_rank(weight, rank):
    return decompose.low_rank_reconstruct(*decompose.low_rank(weight, rank))


def _block_term(groups):
    def run(weight, rank):
        return decompose.block_term_reconstruct(*decompose.block_term(weight, rank, groups), groups)

    return run


FULL_RANK = {
    "depthwise": lambda o, i, kh, kw: depthwise_separable_full_rank(o, kh, kw),
    "spatial": lambda o, i, kh, kw: spatial_separable_full_rank(o, i, kh, kw),
    "low_rank": lambda o, i, kh, kw: low_rank_full_rank(o, i, kh, kw),
    "tucker": lambda o, i, kh, kw: block_term_full_rank(o, i, kh, kw, 1),
    "btd2": lambda o, i, kh, kw: block_term_full_rank(o, i, kh, kw, 2),
    "btd3": lambda o, i, kh, kw: block_term_full_rank(o, i, kh, kw, 3),
}
RUN = {"depthwise": _depthwise, "spatial": _spatial, "low_rank": _low_rank, "tucker": _block_term(1), "btd2": _block_term(2), "btd3": _block_term(3)}
STEP = {"depthwise": 1, "spatial": 1, "low_rank": 1, "tucker": 1, "btd2": 2, "btd3": 3}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("method", list(RUN))
def test_full_rank_is_exact(method, shape):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rank = FULL_RANK[method](*shape)
    error = _rel(RUN[method](weight, rank), weight)
    assert error < 1e-10, f"{method} at full rank {rank} on {shape}: relative error {error:.3e}"


@pytest.mark.parametrize("method", list(RUN))
def test_error_decreases_with_rank(method):
    shape = (12, 10, 3, 3)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    full, step = FULL_RANK[method](*shape), STEP[method]
    ranks = list(range(step, full + 1, step))
    errors = [_rel(RUN[method](weight, rank), weight) for rank in ranks]
    pairs = list(zip(ranks, [round(e, 6) for e in errors]))
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])), f"{method}: error not monotone in rank: {pairs}"
    assert errors[0] > 0.1 and errors[-1] < 1e-10, f"{method}: expected lossy low rank and exact full rank: {pairs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_keep_dtype(dtype):
    weight = torch.randn(8, 4, 3, 3, dtype=dtype)
    for factors in (
        decompose.depthwise_separable(weight, 2),
        decompose.spatial_separable(weight, 3),
        decompose.low_rank(weight, 5),
        decompose.tucker2(weight, 4, 4),
        decompose.block_term(weight, 4, 2),
    ):
        got = {f.dtype for f in factors}
        assert got == {dtype}, f"factors came back as {got}, expected {dtype}"


def test_spatial_separable_is_the_optimal_rank_r_unfolding():
    """Eckart-Young: the error at rank R is the tail of the unfolding's singular values."""
    weight = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    singular = torch.linalg.svdvals(weight.permute(1, 2, 0, 3).reshape(15, 18))
    for rank in (1, 4, 9):
        expected = (singular[rank:].norm() / singular.norm()).item()
        got = _rel(_spatial(weight, rank), weight)
        assert abs(got - expected) < 1e-10, f"rank {rank}: error {got:.6f}, Eckart-Young tail {expected:.6f}"


def test_block_term_sweeps_do_not_lose_to_greedy():
    weight = torch.randn(24, 20, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    greedy = _rel(decompose.block_term_reconstruct(*decompose.block_term(weight, 16, 4, sweeps=0), 4), weight)
    refined = _rel(decompose.block_term_reconstruct(*decompose.block_term(weight, 16, 4), 4), weight)
    assert refined <= greedy + 1e-12, f"ALS sweeps made it worse: greedy {greedy:.6f}, refined {refined:.6f}"


def test_block_term_is_deterministic():
    weight = torch.randn(10, 8, 3, 3, dtype=torch.float64)
    first = decompose.block_term(weight, 6, 2)
    second = decompose.block_term(weight, 6, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, second)), "two runs gave different factors"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: decompose.depthwise_separable(w, 10), "depth multiplier <= 9"),
        (lambda w: decompose.depthwise_separable(w, 0), "positive integer"),
        (lambda w: decompose.spatial_separable(w, 25), "rank <= 24"),
        (lambda w: decompose.low_rank(w, 17), "rank <= 16"),
        (lambda w: decompose.block_term(w, 5, 2), "divisible by groups=2"),
        (lambda w: decompose.spatial_separable(w[0], 1), "4-d conv kernel"),
    ],
)
def test_bad_arguments_are_refused(call, message):
    weight = torch.randn(16, 8, 3, 3)
    with pytest.raises(ValueError) as info:
        call(weight)
    assert message in str(info.value), f"message was: {info.value}"


GROUPED_SHAPES = [((16, 4, 3, 3), 4), ((12, 6, 1, 1), 2), ((6, 8, 3, 1), 3)]  # (out, in/G, kh, kw), G


@pytest.mark.parametrize("whitened", [False, True], ids=["plain", "whitened"])
@pytest.mark.parametrize("shape, groups", GROUPED_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
def test_grouped_tucker2_is_exact_at_full_rank_and_keeps_groups(shape, groups, whitened):
    torch.manual_seed(7)
    weight = torch.randn(*shape, dtype=torch.float64)
    out_channels, in_per_group, kh, kw = shape
    whitening = None
    if whitened:
        samples = torch.randn(groups, in_per_group, 3 * in_per_group, dtype=torch.float64)
        whitening = decompose.whiten.whitening(samples @ samples.transpose(1, 2))
    full = grouped_tucker2_full_rank(out_channels, in_per_group * groups, kh, kw, groups)
    first, core, last = decompose.grouped_tucker2(weight, full, groups, whitening=whitening)
    expected = (full, in_per_group), (full, full // groups, kh, kw), (out_channels, full // groups)
    assert (first.shape, core.shape, last.shape) == expected, f"shapes {first.shape, core.shape, last.shape}"
    error = _rel(decompose.grouped_tucker2_reconstruct(first, core, last, groups), weight)
    assert error < 1e-10, f"full rank {full}: relative error {error:.3e}"


def test_grouped_tucker2_error_falls_with_rank_and_equals_one_tucker2_per_group():
    torch.manual_seed(8)
    weight, groups = torch.randn(16, 4, 3, 3, dtype=torch.float64), 4
    errors = [
        _rel(decompose.grouped_tucker2_reconstruct(*decompose.grouped_tucker2(weight, r, groups), groups), weight)
        for r in range(groups, grouped_tucker2_full_rank(16, 16, 3, 3, groups) + 1, groups)
    ]
    assert all(b <= a + 1e-9 for a, b in zip(errors, errors[1:])) and errors[0] > 0.1, f"errors by rank {errors}"
    alone = decompose.tucker2_reconstruct(*decompose.tucker2(weight[4:8], 2, 2))
    together = decompose.grouped_tucker2_reconstruct(*decompose.grouped_tucker2(weight, 8, groups), groups)[4:8]
    assert torch.allclose(alone, together), f"group 1 differs from its own Tucker-2 by {(alone - together).abs().max():.3e}"


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda w: decompose.grouped_tucker2(w, 6, 4), "divisible by groups=4"),
        (lambda w: decompose.grouped_tucker2(w, 8, 3), "out_channels divisible by groups=3"),
        (lambda w: decompose.grouped_tucker2(w[0], 4, 4), "4-d conv kernel"),
    ],
)
def test_grouped_tucker2_refuses_bad_arguments(call, message):
    with pytest.raises(ValueError) as info:
        call(torch.randn(16, 4, 3, 3))
    assert message in str(info.value), f"message was: {info.value}"
