"""CP method: exact full-rank stacks, MACs formula, error vs rank, whitening, degeneracy, determinism."""

import importlib
import itertools

import pytest
import torch
from torch import nn

from compressor import decompose
from compressor.decompose.whiten import whitening
from compressor.methods import METHODS, factorize
from compressor.profile import CallShape, profile_model, totals

cp_module = importlib.import_module("compressor.decompose.cp")  # `compressor.decompose.cp` is the function
cp_full_rank = cp_module.cp_full_rank
CP = METHODS["cp"]

IN_CHANNELS, OUT_CHANNELS = 5, 7
OUTPUT_TOLERANCE = 2e-5  # float32 layers; factor math is float64, the stack runs in float32


def _rel(approx, reference):
    return ((approx.double() - reference.double()).norm() / reference.double().norm()).item()


def _cp_error(weight, rank):
    return _rel(decompose.cp_reconstruct(*decompose.cp(weight, rank)), weight)


def _full_rank_cases():
    kernels = [(3, 3), (1, 5), (5, 1)]
    strides = [1, 2, (2, 1)]
    paddings = [0, 1, "same"]
    for kernel, stride, padding, dilation, bias in itertools.product(kernels, strides, paddings, [1, 2], [True, False]):
        if padding == "same" and stride != 1:
            continue  # torch refuses padding='same' with stride != 1
        yield pytest.param(
            kernel, stride, padding, dilation, bias,
            id=f"k{kernel[0]}x{kernel[1]}-s{stride}-p{padding}-d{dilation}-{'bias' if bias else 'nobias'}",
        )


@pytest.mark.parametrize("kernel, stride, padding, dilation, bias", list(_full_rank_cases()))
def test_full_rank_stack_reproduces_conv(kernel, stride, padding, dilation, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(IN_CHANNELS, OUT_CHANNELS, kernel, stride=stride, padding=padding, dilation=dilation, bias=bias)
    rank = CP.full_rank(conv, 1)
    stack, weight_error = factorize(CP, conv, rank, 1)
    x = torch.randn(2, IN_CHANNELS, 17, 19)
    with torch.no_grad():
        expected, got = conv(x), stack(x)
    assert got.shape == expected.shape, f"output shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
    error = _rel(got, expected)
    assert error < OUTPUT_TOLERANCE, f"rank {rank}: output relative error {error:.3e} (weight error {weight_error:.3e})"
    assert weight_error < 1e-6, f"rank {rank}: weight relative error {weight_error:.3e}"
    assert [type(m) for m in stack] == [nn.Conv2d] * 4, f"stack holds {[type(m).__name__ for m in stack]}"
    assert [m.groups for m in stack] == [1, rank, rank, 1], f"groups {[m.groups for m in stack]}"
    assert [m.bias is not None for m in stack] == [False, False, False, bias]


@pytest.mark.parametrize("shape", [(16, 8, 3, 3), (13, 7, 3, 5), (5, 11, 1, 5), (9, 6, 7, 1), (3, 2, 5, 5)])
def test_full_rank_formula_is_exact_in_float64(shape):
    out_channels, in_channels, kh, kw = shape
    expected = min(
        in_channels * kh * min(out_channels, kw),
        in_channels * kw * min(out_channels, kh),
        out_channels * kh * min(in_channels, kw),
        out_channels * kw * min(in_channels, kh),
    )
    rank = cp_full_rank(*shape)
    assert rank == expected
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    factors = decompose.cp(weight, rank)
    error = _rel(decompose.cp_reconstruct(*factors), weight)
    assert error < 1e-12, f"full rank {rank} on {shape}: relative error {error:.3e}"
    ratio = cp_module.degeneracy_ratio(*factors)
    assert abs(ratio - 1) < 1e-9, f"the construction's terms should be orthogonal: ratio {ratio}"


def _count_macs(stack: nn.Sequential, x: torch.Tensor) -> int:
    """MACs per sample of one forward, counted by the same hooks the pipeline's totals use."""
    return totals(profile_model(stack, x))["macs"]


@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, hw",
    [
        ((3, 3), 1, 1, 1, (16, 16)),
        ((3, 3), 2, 0, 1, (15, 18)),
        ((5, 1), (2, 1), (2, 0), 1, (13, 11)),
        ((1, 5), 1, "same", 2, (9, 14)),
        ((3, 5), (1, 2), (1, 2), (2, 1), (12, 17)),
    ],
)
@pytest.mark.parametrize("rank", [3, 10])
def test_macs_formula_matches_the_built_stack(kernel, stride, padding, dilation, hw, rank):
    conv = nn.Conv2d(6, 9, kernel, stride=stride, padding=padding, dilation=dilation, bias=True)
    kh, kw = kernel
    factors = (torch.randn(rank, 6), torch.randn(rank, kh), torch.randn(rank, kw), torch.randn(9, rank))
    stack = CP.build(conv, factors, 1)  # MACs depend on shapes only: no need to decompose
    x = torch.randn(2, 6, *hw)
    with torch.no_grad():
        output_hw = tuple(conv(x).shape[-2:])
    calls = [CallShape(hw, output_hw), CallShape(hw, output_hw)]  # a conv called twice counts twice
    predicted = CP.macs(conv, calls, rank, 1)
    counted = 2 * _count_macs(stack, x)
    assert predicted == counted, f"formula {predicted} MACs, hooks counted {counted} on {hw} -> {output_hw}"
    params = sum(p.numel() for p in stack.parameters())
    assert CP.params(conv, rank, 1) == params, f"formula {CP.params(conv, rank, 1)} params, stack has {params}"


def _low_rank_plus_noise(shape, rank, noise, seed):
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.randn(n, rank, generator=generator, dtype=torch.float64) for n in shape]
    clean = torch.einsum("or,cr,ir,jr->ocij", *factors)
    scale = noise * clean.norm() / clean.numel() ** 0.5
    return clean + scale * torch.randn(shape, generator=generator, dtype=torch.float64)


RANKS = [1, 2, 4, 6, 8, 16, 32, 48]
SLACK = 1e-3  # ALS is not guaranteed monotone in rank; allow this much relative-error increase


@pytest.mark.parametrize("kind", ["random", "low_rank_plus_noise"])
def test_reduced_rank_error_decreases_with_rank(kind):
    shape = (12, 10, 3, 3)
    if kind == "random":
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    else:
        weight = _low_rank_plus_noise(shape, 6, 0.05, seed=2)
    errors = [_cp_error(weight, rank) for rank in RANKS]
    pairs = list(zip(RANKS, [round(e, 5) for e in errors]))
    assert all(b <= a + SLACK for a, b in zip(errors, errors[1:])), f"{kind}: error not monotone in rank: {pairs}"
    assert errors[0] > 0.3, f"{kind}: rank 1 should be lossy: {pairs}"
    if kind == "random":
        assert errors[-1] < 0.2, f"random: rank 48 of 90 should fit well: {pairs}"
    else:
        planted = errors[RANKS.index(6)]
        assert planted < 0.06, f"low rank plus 5% noise: the planted rank 6 should fit to the noise level: {pairs}"
    for rank, error in zip(RANKS, errors):
        floor = cp_module.truncated_construction_error(weight, rank)
        assert error <= floor + 1e-9, f"{kind}: rank {rank}: error {error:.4f} > truncated construction {floor:.4f}"


def test_whitening_reduces_output_error_on_correlated_inputs():
    generator = torch.Generator().manual_seed(3)
    in_channels, out_channels, rank = 8, 12, 8
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64))
    # Strongly correlated channels: a random rotation times singular values spanning 1 .. 1e-3.
    basis, _ = torch.linalg.qr(torch.randn(in_channels, in_channels, generator=generator, dtype=torch.float64))
    mixing = basis * torch.logspace(0, -3, in_channels, dtype=torch.float64)

    def sample(count):
        z = torch.randn(count, in_channels, 12, 12, generator=generator, dtype=torch.float64)
        return torch.einsum("cd,ndhw->nchw", mixing, z)

    calibration = sample(64)
    covariance = torch.einsum("nchw,ndhw->cd", calibration, calibration) / (calibration.numel() / in_channels)
    white = whitening(covariance)
    x = sample(16)
    errors = {}
    for name, transform in (("plain", None), ("whitened", white)):
        factors = CP.decompose(conv.weight.detach(), rank, 1, input_whitening=transform)
        stack = CP.build(conv, factors, 1)
        with torch.no_grad():
            errors[name] = _rel(stack(x), conv(x))
    ratio = errors["whitened"] / errors["plain"]
    message = f"output error whitened {errors['whitened']:.4f}, plain {errors['plain']:.4f}, ratio {ratio:.4f}"
    print(message)
    assert ratio < 0.9, message


def test_whitened_full_rank_is_still_exact():
    weight = torch.randn(6, 4, 3, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mixing = torch.randn(4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    factors = decompose.cp(weight, cp_full_rank(6, 4, 3, 3), input_whitening=whitening(mixing @ mixing.T))
    error = _rel(decompose.cp_reconstruct(*factors), weight)
    assert error < 1e-10, f"whitened full rank: relative error {error:.3e}"


def _cancelling_factors(epsilon):
    """Two terms ``(a + eps b)^(x)4 / eps - a^(x)4 / eps``: each huge, their sum ~ the 4 'one b' terms."""
    generator = torch.Generator().manual_seed(6)
    shape = (5, 4, 3, 3)
    a = [torch.randn(n, generator=generator, dtype=torch.float64) for n in shape]
    b = [torch.randn(n, generator=generator, dtype=torch.float64) for n in shape]
    scale = epsilon ** -0.25
    modes = [torch.stack([(x + epsilon * y) * scale, -x * scale if m == 0 else x * scale], dim=1)
             for m, (x, y) in enumerate(zip(a, b))]
    last, first, vertical, horizontal = modes[0], modes[1].T, modes[2].T, modes[3].T
    return first, vertical, horizontal, last


def test_degeneracy_check_flags_hand_built_cancelling_terms():
    first, vertical, horizontal, last = _cancelling_factors(1e-3)
    target = decompose.cp_reconstruct(first, vertical, horizontal, last)
    ratio = cp_module.degeneracy_ratio(first, vertical, horizontal, last)
    assert ratio > 1e5, f"two terms of norm ~1/eps cancelling to O(1): ratio {ratio:.3g}"
    with pytest.raises(decompose.CPDegenerateError, match="cancel") as info:
        cp_module.check_degeneracy(target, first, vertical, horizontal, last)
    assert f"{ratio:.3g}" in str(info.value), f"message should state the ratio: {info.value}"
    mild = _cancelling_factors(0.5)
    ratio_mild, error = cp_module.check_degeneracy(decompose.cp_reconstruct(*mild), *mild)
    assert ratio_mild < cp_module.DEGENERACY_RATIO and error < 1e-12, (ratio_mild, error)


def test_degeneracy_check_flags_non_finite_and_bad_fits():
    weight = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    first, vertical, horizontal, last = decompose.cp(weight, 3)
    broken = first.clone()
    broken[0, 0] = float("nan")
    with pytest.raises(decompose.CPDegenerateError, match="not finite"):
        cp_module.check_degeneracy(weight, broken, vertical, horizontal, last)
    with pytest.raises(decompose.CPDegenerateError, match="worse than"):
        cp_module.check_degeneracy(weight, first, vertical, -horizontal, last)  # the negated fit: error > 1


def test_a_degenerate_svd_start_falls_back_to_the_construction():
    """A random 8x6x3x3 kernel at rank 53 (full rank 54): ALS from the SVD start fits it with
    cancelling terms; from the truncated construction it fits it exactly with orthogonal-like terms."""
    weight = torch.randn(8, 6, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    start = cp_module._als(weight, 53, cp_module._svd_start(weight, 53))
    last, first, vertical, horizontal = cp_module._balance(start)
    with pytest.raises(decompose.CPDegenerateError, match="degenerate CP at rank 53") as info:
        cp_module.check_degeneracy(weight, first.T, vertical.T, horizontal.T, last)
    factors = decompose.cp(weight, 53)
    ratio = cp_module.degeneracy_ratio(*factors)
    error = _rel(decompose.cp_reconstruct(*factors), weight)
    message = f"SVD start: {info.value}; fallback: degeneracy ratio {ratio:.3f}, error {error:.3e}"
    assert ratio < 2 and error < 1e-6, message


def test_als_beats_the_truncation_floor_by_a_wide_margin():
    """ALS must beat the truncated-construction floor by a margin: a random 48x40x3x3 kernel at 1/3 of its MACs."""
    weight = torch.randn(48, 40, 3, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    rank = 48 * 40 * 9 // (3 * (48 + 40 + 6))
    error = _rel(decompose.cp_reconstruct(*decompose.cp(weight, rank)), weight)
    floor = cp_module.truncated_construction_error(weight, rank)
    assert error < 0.85 * floor, f"rank {rank}: ALS error {error:.4f}, truncation floor {floor:.4f}"


def test_degenerate_als_result_reaches_the_caller(monkeypatch):
    first, vertical, horizontal, last = _cancelling_factors(1e-3)
    target = decompose.cp_reconstruct(first, vertical, horizontal, last)
    monkeypatch.setattr(cp_module, "_als", lambda tensor, rank, start: [last, first.T, vertical.T, horizontal.T])
    with pytest.raises(decompose.CPDegenerateError, match="cancel"):
        decompose.cp(target, 2)


def test_cp_is_deterministic():
    weight = torch.randn(16, 12, 3, 3, generator=torch.Generator().manual_seed(8))
    threads = torch.get_num_threads()
    once = decompose.cp(weight, 10)
    again = decompose.cp(weight, 10)
    assert all(torch.equal(a, b) for a, b in zip(once, again)), "two runs gave different factors"
    assert torch.get_num_threads() == threads, f"cp left torch at {torch.get_num_threads()} threads, was {threads}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factors_keep_dtype_and_are_balanced(dtype):
    weight = torch.randn(8, 6, 3, 5, generator=torch.Generator().manual_seed(9)).to(dtype)
    for rank in (4, cp_full_rank(8, 6, 3, 5)):
        factors = decompose.cp(weight, rank)
        assert [f.dtype for f in factors] == [dtype] * 4, f"rank {rank}: dtypes {[f.dtype for f in factors]}"
        assert [tuple(f.shape) for f in factors] == [(rank, 6), (rank, 3), (rank, 5), (8, rank)]
        assert decompose.cp_reconstruct(*factors).dtype == dtype
        first, vertical, horizontal, last = (f.double() for f in factors)
        norms = torch.stack([first.norm(dim=1), vertical.norm(dim=1), horizontal.norm(dim=1), last.norm(dim=0)])
        spread = (norms.max(0).values / norms.min(0).values.clamp_min(1e-30)).max().item()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        assert spread < 1 + tolerance, f"rank {rank}: factor column norms differ by {spread:.6f}x within a term"
    error = _rel(decompose.cp_reconstruct(*decompose.cp(weight, cp_full_rank(8, 6, 3, 5))), weight)
    assert error < (1e-6 if dtype == torch.float32 else 1e-12), f"{dtype} full rank: relative error {error:.3e}"


def test_bad_arguments_are_refused():
    weight = torch.randn(6, 4, 3, 3)
    with pytest.raises(ValueError, match=f"rank <= {cp_full_rank(6, 4, 3, 3)}"):
        decompose.cp(weight, cp_full_rank(6, 4, 3, 3) + 1)
    with pytest.raises(ValueError, match="positive integer"):
        decompose.cp(weight, 0)
    with pytest.raises(ValueError, match="size in=4"):
        decompose.cp(weight, 2, input_whitening=whitening(torch.eye(5)))
    with pytest.raises(ValueError, match="4-d conv kernel"):
        decompose.cp(weight[0], 2)


def test_zero_kernel_gives_zero_factors():
    factors = decompose.cp(torch.zeros(4, 3, 3, 3), 2)
    assert all(torch.count_nonzero(f) == 0 for f in factors)


def test_cp_skips_1x1():
    assert "1x1" in CP.skip_reason(nn.Conv2d(4, 4, 1))
    assert CP.skip_reason(nn.Conv2d(4, 4, 3)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_weight_gives_cuda_factors_and_stack():
    conv = nn.Conv2d(6, 8, 3, padding=1, device="cuda", dtype=torch.float64)  # float64: no TF32 rounding
    stack, weight_error = factorize(CP, conv, CP.full_rank(conv, 1), 1)
    assert {(m.weight.device.type, m.weight.dtype) for m in stack} == {("cuda", torch.float64)}
    x = torch.randn(2, 6, 10, 10, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        error = _rel(stack(x), conv(x))
    assert error < OUTPUT_TOLERANCE and weight_error < 1e-6, (error, weight_error)
