"""Rank selection: energy boundaries, EVBMF recovering planted ranks, the VBMF floor, rounding."""

import math

import pytest
import torch

from compressor.decompose.rank import energy_rank, evbmf_rank, guarded_rank, round_rank


def _s(*values):
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- energy_rank

# Energies (s**2) 16, 9, 4, 1 / 30: cumulative fractions 16/30, 25/30, 29/30, 1.
ENERGY_CASES = [
    (0.5, 1),
    (16 / 30, 1),  # met exactly by the first component
    (16 / 30 + 1e-6, 2),
    (25 / 30, 2),  # exact boundary, must not spill to 3
    (0.9, 3),
    (29 / 30, 3),
    (0.99, 4),
    (1.0, 4),
]


@pytest.mark.parametrize("fraction,expected", ENERGY_CASES)
def test_energy_rank_boundaries(fraction, expected):
    got = energy_rank(_s(4.0, 3.0, 2.0, 1.0), fraction)
    assert got == expected, f"fraction {fraction!r}: expected rank {expected}, got {got}"


def test_energy_rank_sorts_its_input():
    got = energy_rank(_s(1.0, 4.0, 2.0, 3.0), 25 / 30)
    assert got == 2, f"unsorted spectrum: expected 2, got {got}"


def test_energy_rank_exact_boundary_survives_rounding():
    # 10 equal components: fraction k/10 reached exactly at k, though k/10 is inexact in binary.
    s = torch.full((10,), 0.1, dtype=torch.float64)
    got = [energy_rank(s, k / 10) for k in range(1, 11)]
    assert got == list(range(1, 11)), f"equal spectrum, fractions 0.1..1.0: got {got}"


def test_energy_rank_fraction_one_ignores_trailing_zeros():
    got = energy_rank(_s(3.0, 2.0, 1e-9, 0.0, 0.0), 1.0)
    assert got == 3, f"fraction 1 with 3 nonzero values: expected 3, got {got}"
    got = energy_rank(_s(3.0, 2.0, 0.0, 0.0), 0.999999999999)
    assert got == 2, f"fraction just below 1, 2 nonzero values: expected 2, got {got}"


def test_energy_rank_all_zeros_is_one():
    for fraction in (0.1, 0.9, 1.0):
        got = energy_rank(torch.zeros(6, dtype=torch.float64), fraction)
        assert got == 1, f"all-zero spectrum at fraction {fraction}: expected 1, got {got}"


def test_energy_rank_keeps_float32_input():
    got = energy_rank(_s(4.0, 3.0, 2.0, 1.0).float(), 25 / 30)
    assert got == 2, f"float32 spectrum: expected 2, got {got}"


@pytest.mark.parametrize(
    "values,fraction,match",
    [
        (torch.ones(2, 2), 0.5, "1-d tensor"),
        (torch.ones(0), 0.5, "1-d tensor"),
        (torch.ones(3), 0.0, r"fraction in \(0, 1\]"),
        (torch.ones(3), 1.5, r"fraction in \(0, 1\]"),
        (torch.tensor([1.0, -1.0]), 0.5, "non-negative"),
        (torch.tensor([1.0, float("nan")]), 0.5, "finite"),
    ],
)
def test_energy_rank_refuses(values, fraction, match):
    with pytest.raises(ValueError, match=match):
        energy_rank(values, fraction)


# ---------------------------------------------------------------- evbmf_rank


def _planted(rows, cols, rank, noise, seed, scale=1.0):
    """Rank-``rank`` matrix with entries of RMS 1, plus Gaussian noise of std ``noise``."""
    generator = torch.Generator().manual_seed(seed)
    signal = torch.randn(rows, rank, generator=generator, dtype=torch.float64) @ torch.randn(
        rank, cols, generator=generator, dtype=torch.float64
    )
    signal = signal / signal.norm() * math.sqrt(rows * cols)
    return scale * (signal + noise * torch.randn(rows, cols, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(100, 80), (80, 100), (64, 576), (576, 64), (30, 300)], ids=str)
@pytest.mark.parametrize("rank", [1, 5, 10])
def test_evbmf_recovers_planted_rank(shape, rank):
    got = [evbmf_rank(_planted(*shape, rank, 0.1, seed)) for seed in range(3)]
    assert all(abs(r - rank) <= 1 for r in got), f"{shape} rank {rank}, noise 0.1: EVBMF ranks {got}"


def test_evbmf_is_transpose_and_scale_invariant():
    matrix = _planted(100, 80, 10, 0.3, 0)
    ranks = {(t, scale): evbmf_rank((matrix.T if t else matrix) * scale) for t in (0, 1) for scale in (1e-4, 1.0, 1e3)}
    assert set(ranks.values()) == {10}, f"rank 10, noise 0.3, transposed/scaled: {ranks}"


def test_evbmf_pure_noise_is_zero():
    got = [evbmf_rank(torch.randn(*shape, generator=torch.Generator().manual_seed(s), dtype=torch.float64))
           for shape in ((100, 80), (64, 576), (576, 64)) for s in range(2)]
    assert max(got) <= 1, f"pure Gaussian noise: EVBMF ranks {got}"


def test_evbmf_heavy_noise_keeps_fewer():
    light, heavy = evbmf_rank(_planted(100, 80, 20, 0.1, 0)), evbmf_rank(_planted(100, 80, 20, 1.0, 0))
    assert light == 20 and heavy < light, f"rank 20: noise 0.1 -> {light}, noise 1.0 -> {heavy}"


def test_evbmf_noise_free_and_degenerate():
    exact = evbmf_rank(_planted(100, 80, 5, 0.0, 0))
    assert exact == 5, f"exactly rank 5, no noise: got {exact}"
    zero = evbmf_rank(torch.zeros(20, 30, dtype=torch.float64))
    assert zero == 0, f"zero matrix: got {zero}"
    row = evbmf_rank(torch.randn(1, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    assert row in (0, 1), f"single row: got {row}"


def test_evbmf_known_sigma2():
    matrix = _planted(100, 80, 5, 0.1, 1)
    right = evbmf_rank(matrix, sigma2=0.01)  # the true per-entry noise variance
    huge = evbmf_rank(matrix, sigma2=100.0)
    assert right == 5 and huge == 0, f"sigma2 = 0.01 -> {right} (want 5), sigma2 = 100 -> {huge} (want 0)"


def test_evbmf_float32_matches_float64():
    matrix = _planted(64, 576, 10, 0.1, 2)
    got = (evbmf_rank(matrix), evbmf_rank(matrix.float()))
    assert got == (10, 10), f"float64, float32 ranks: {got}"


@pytest.mark.parametrize(
    "matrix,sigma2,match",
    [
        (torch.ones(3), None, "2-d matrix"),
        (torch.ones(3, 0), None, "2-d matrix"),
        (torch.ones(3, 3), 0.0, "positive finite noise variance"),
        (torch.tensor([[1.0, float("inf")]]), None, "finite matrix"),
    ],
)
def test_evbmf_refuses(matrix, sigma2, match):
    with pytest.raises(ValueError, match=match):
        evbmf_rank(matrix, sigma2)


# ---------------------------------------------------------------- guarded_rank


GUARD_CASES = [
    # raw, full, kwargs, expected rank, note fragment (None: no note)
    (0, 24, {}, 3, "VBMF found rank 0 (noise dominates); using 1/8 of full rank 24 = 3"),
    (1, 24, {}, 3, "VBMF found rank 1 (below the floor of 3); using 1/8 of full rank 24 = 3"),
    (3, 24, {}, 3, None),
    (17, 24, {}, 17, None),
    (24, 24, {}, 24, None),
    (30, 24, {}, 24, "above full rank 24"),
    (0, 10, {}, 2, "1/8 of full rank 10 = 2"),  # ceil(1.25)
    (0, 4, {}, 1, "1/8 of full rank 4 = 1"),
    (1, 4, {}, 1, None),
    (0, 1, {}, 1, "full rank 1 = 1"),
    (0, 64, {"minimum_fraction": 0.25}, 16, "1/4 of full rank 64 = 16"),
    (5, 64, {"minimum_fraction": 0.3}, 20, "0.3 of full rank 64 = 20"),
]


@pytest.mark.parametrize("raw,full,kwargs,expected,note", GUARD_CASES)
def test_guarded_rank(raw, full, kwargs, expected, note):
    rank, got_note = guarded_rank(raw, full, **kwargs)
    assert rank == expected, f"guarded_rank({raw}, {full}, {kwargs}): expected {expected}, got {rank} ({got_note!r})"
    if note is None:
        assert got_note is None, f"guarded_rank({raw}, {full}): expected no note, got {got_note!r}"
    else:
        assert got_note is not None and note in got_note, f"expected note containing {note!r}, got {got_note!r}"


@pytest.mark.parametrize(
    "args,kwargs,match",
    [((-1, 8), {}, "non-negative integer raw rank"), ((2, 0), {}, "positive integer full rank"),
     ((2, 8), {"minimum_fraction": 0.0}, r"minimum_fraction in \(0, 1\]")],
)
def test_guarded_rank_refuses(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        guarded_rank(*args, **kwargs)


# ---------------------------------------------------------------- round_rank

ROUND_CASES = [
    # rank, multiple, full, step, expected
    (12, 8, 64, 1, 16),  # tie rounds up
    (11, 8, 64, 1, 8),
    (13, 8, 64, 1, 16),
    (3, 8, 64, 1, 8),  # nearest is 0: at least one multiple
    (0, 8, 64, 1, 8),
    (64, 8, 64, 1, 64),
    (70, 8, 64, 1, 64),  # clamp to full
    (60, 8, 62, 1, 62),  # nearest 64 > full 62: clamp to full
    (57, 8, 62, 1, 56),
    (3, 8, 6, 1, 6),  # full below one multiple: full itself
    (3, 8, 7, 2, 6),  # ... rounded down to step
    (5, 1, 10, 1, 5),  # multiple 1: identity inside [1, full]
    (0, 1, 10, 1, 1),
    (11, 1, 10, 1, 10),
    (7, 1, 12, 3, 6),  # multiple 1, step 3: nearest multiple of 3
    (8, 1, 12, 3, 9),
    (20, 8, 96, 3, 24),  # lcm(8, 3) = 24
    (40, 8, 96, 3, 48),
    (35, 8, 96, 3, 24),
    (30, 4, 64, 2, 32),  # lcm(4, 2) = 4: 30 is a tie between 28 and 32
    (100, 8, 50, 3, 48),  # full 50 rounded down to step 3 = 48
]


@pytest.mark.parametrize("rank,multiple,full,step,expected", ROUND_CASES)
def test_round_rank(rank, multiple, full, step, expected):
    got = round_rank(rank, multiple, full, step)
    assert got == expected, f"round_rank({rank}, {multiple}, {full}, step={step}): expected {expected}, got {got}"
    assert got >= 1 and got <= full and got % step == 0, f"round_rank result {got} breaks its contract"


def test_round_rank_contract_exhaustive():
    for full in range(1, 40):
        for step in (1, 2, 3):
            if full < step:
                continue
            for multiple in (1, 4, 8):
                unit = math.lcm(multiple, step)
                for rank in range(0, 50):
                    got = round_rank(rank, multiple, full, step)
                    ctx = f"round_rank({rank}, {multiple}, {full}, {step}) = {got}"
                    assert 1 <= got <= full and got % step == 0, ctx
                    if full >= unit and got != full // step * step:
                        assert got % unit == 0, ctx


@pytest.mark.parametrize(
    "args,match",
    [((-1, 8, 64), "non-negative integer rank"), ((4, 0, 64), "positive integer multiple"),
     ((4, 8, 0), "positive integer full rank"), ((4, 8, 64, 0), "positive integer step"),
     ((4, 8, 2, 3), "full rank >= step 3")],
)
def test_round_rank_refuses(args, match):
    with pytest.raises(ValueError, match=match):
        round_rank(*args)


@pytest.mark.parametrize(
    "method_name, in_channels, groups, round_to, expected",
    [
        ("depthwise_separable", 16, 1, 8, 1),  # 16 x M channels: every multiplier is a multiple of 8
        ("depthwise_separable", 4, 1, 8, 2),
        ("depthwise_separable", 3, 1, 8, 8),
        ("spatial_separable", 16, 1, 8, 8),
        ("grouped", 16, 4, 8, 8),
        ("grouped", 16, 3, 8, 24),
        ("cp", 16, 1, 16, 16),
        ("spatial_separable", 16, 1, None, 1),
    ],
)
def test_round_to_applies_to_the_intermediate_channel_count(method_name, in_channels, groups, round_to, expected):
    from torch import nn

    from compressor.methods import METHODS
    from compressor.ranks import rank_multiple

    conv = nn.Conv2d(in_channels, 24, 3)
    got = rank_multiple(METHODS[method_name], conv, groups, round_to)
    assert got == expected, f"{method_name} in={in_channels} groups={groups} round_to={round_to}: multiple {got}, expected {expected}"


@pytest.mark.parametrize(
    "method_name, groups, round_small, expected",
    [
        ("low_rank", 1, False, [8, 16, 24]),
        ("low_rank", 1, True, [1, 2, 3, 4, 5, 6, 7, 8, 16, 24]),  # below one block: every rank
        ("grouped", 2, True, [2, 4, 6, 8, 16, 24, 32]),  # the groups step still holds below the block
    ],
)
def test_auto_rounding_keeps_ranks_below_one_block(method_name, groups, round_small, expected):
    from torch import nn

    from compressor.methods import METHODS
    from compressor.ranks import allowed_ranks

    conv = nn.Conv2d(16, 24, 3)
    got = allowed_ranks(METHODS[method_name], conv, groups, 8, round_small)
    assert got == expected, f"{method_name} groups={groups} round_small={round_small}: {got}"


@pytest.mark.parametrize("groups", [1, 2])
def test_vbmf_finds_a_planted_rank_of_each_group_for_low_rank(groups):
    """low_rank's rank is the rank of each group's out x (in*kh*kw) kernel; VBMF must read that
    matrix (the depthwise per-channel slices gave rank 1 on a grouped conv)."""
    from torch import nn

    from compressor.methods import METHODS
    from compressor.ranks import resolve_rank

    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(16 * groups, 24 * groups, 3, groups=groups, bias=False)
    blocks = [torch.randn(24, 3, generator=generator) @ torch.randn(3, 16 * 9, generator=generator) for _ in range(groups)]
    planted = torch.cat(blocks) + 1e-3 * torch.randn(24 * groups, 16 * 9, generator=generator)
    with torch.no_grad():
        conv.weight.copy_(planted.reshape(conv.weight.shape))
    rank, note = resolve_rank(METHODS["low_rank"], conv, [], "vbmf", groups, "layer")
    assert rank == 3, f"groups={groups}: vbmf rank {rank} ({note}), planted 3 per group"
