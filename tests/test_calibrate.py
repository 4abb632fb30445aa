"""Data-aware initialization: streaming statistics, whitened decompositions, least-squares refits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import layers
from compressor.calibrate import collect_statistics, refit_last_factor_
from compressor.decompose.whiten import whitening
from compressor.methods import METHODS, factorize
from compressor.passes import swap_

REDUCED_RANK = {"depthwise_separable": 2, "spatial_separable": 6, "grouped": 5, "cp": 12}


def correlated_inputs(samples: int = 48, channels: int = 8, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Channels mixed by an ill-conditioned matrix and pixels smoothed: strongly correlated patches."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(samples, channels, size, size, generator=generator)
    scales = torch.logspace(0, -2, channels)
    mixing = torch.linalg.qr(torch.randn(channels, channels, generator=generator))[0] * scales
    mixed = torch.einsum("dc,nchw->ndhw", mixing, latent)
    smooth = torch.ones(channels, 1, 3, 3) / 9
    return F.conv2d(mixed, smooth, padding=1, groups=channels) + 0.3


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (torch.linalg.norm(got - expected) / torch.linalg.norm(expected)).item()


def _statistics(conv: nn.Conv2d, kind: str, inputs: torch.Tensor):
    model = nn.Sequential(conv)
    stats = collect_statistics(model, {"0": [kind]}, lambda: inputs.split(16))
    return stats["0"]


@pytest.mark.parametrize("method_name", sorted(REDUCED_RANK))
@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_whitened_init_beats_weight_only_on_correlated_inputs(method_name, stride, padding):
    if method_name not in METHODS:
        pytest.skip(f"{method_name} is not registered")
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=stride, padding=padding, bias=True).eval()
    inputs = correlated_inputs()
    method = METHODS[method_name]
    stats = _statistics(conv, method.statistic, inputs)
    rank = REDUCED_RANK[method_name]
    with torch.no_grad():
        expected = conv(inputs)
        plain, _ = factorize(method, conv, rank, 1)
        whitened, _ = factorize(method, conv, rank, 1, stats.whitening(method.statistic))
        plain_error, whitened_error = _relative(plain(inputs), expected), _relative(whitened(inputs), expected)
    ratio = whitened_error / plain_error
    assert ratio < 0.8, f"{method_name}: whitened {whitened_error:.4f} vs weight-only {plain_error:.4f} (ratio {ratio:.3f})"


@pytest.mark.parametrize("method_name", sorted(REDUCED_RANK))
def test_full_rank_stays_exact_with_whitening(method_name):
    if method_name not in METHODS:
        pytest.skip(f"{method_name} is not registered")
    torch.manual_seed(1)
    conv = nn.Conv2d(5, 6, 3, padding=1, bias=False).double().eval()
    inputs = correlated_inputs(channels=5).double()
    method = METHODS[method_name]
    stats = _statistics(conv, method.statistic, inputs)
    full = method.full_rank(conv, 1)
    stack, weight_error = factorize(method, conv, full, 1, stats.whitening(method.statistic))
    with torch.no_grad():
        error = _relative(stack(inputs), conv(inputs))
    assert error < 1e-6 and weight_error < 1e-6, f"{method_name} at full rank {full}: output {error:.2e}, weight {weight_error:.2e}"


def test_statistics_match_a_direct_im2col():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    inputs = torch.randn(6, 3, 9, 10)
    stats = collect_statistics(nn.Sequential(conv), {"0": ["channel_patches", "column_patches", "channels"]}, lambda: inputs.split(4))["0"]
    patches = F.unfold(inputs.double(), (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1))  # (N, C*6, L)
    per_channel = patches.reshape(6, 3, 6, -1).permute(1, 2, 0, 3).reshape(3, 6, -1)
    expected = per_channel @ per_channel.transpose(1, 2) / per_channel.shape[-1]
    got = stats.covariance("channel_patches")
    assert torch.allclose(got, expected, atol=1e-10), f"max diff {(got - expected).abs().max():.2e}"
    columns = F.unfold(inputs.double(), (3, 1), padding=(1, 0), stride=(2, 1)).transpose(0, 1).reshape(9, -1)
    expected_columns = columns @ columns.T / columns.shape[1]
    got_columns = stats.covariance("column_patches")
    assert torch.allclose(got_columns, expected_columns, atol=1e-10), f"max diff {(got_columns - expected_columns).abs().max():.2e}"
    flat = inputs.double().transpose(0, 1).reshape(3, -1)
    assert torch.allclose(stats.covariance("channels"), flat @ flat.T / flat.shape[1], atol=1e-10)


@pytest.mark.parametrize(
    "covariance",
    [
        torch.zeros(4, 4),
        torch.diag(torch.tensor([1.0, 0.0, 0.0, 2.0])),
        torch.ones(4, 4),  # rank one: every direction but one is dead
        torch.full((4, 4), float("nan")),
    ],
    ids=["all-zero", "dead-channels", "rank-one", "nan"],
)
def test_whitening_of_singular_statistics_stays_finite(covariance):
    transform = whitening(covariance)
    product = transform.root @ transform.inverse
    assert torch.isfinite(transform.root).all() and torch.isfinite(transform.inverse).all(), transform
    assert torch.allclose(product, torch.eye(4, dtype=torch.float64), atol=1e-6), f"root @ inverse:\n{product}"


def test_dead_channels_keep_decompositions_finite():
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 8, 3, padding=1).eval()
    inputs = correlated_inputs(channels=6)
    inputs[:, 2:4] = 0  # dead ReLU channels
    for name, method in METHODS.items():
        stats = _statistics(conv, method.statistic, inputs)
        rank = method.rank_step(1) * 2
        stack, error = factorize(method, conv, rank, 1, stats.whitening(method.statistic))
        assert all(torch.isfinite(p).all() for p in stack.parameters()), f"{name}: non-finite factor"
        assert error == error and error < 10, f"{name}: weight error {error}"


class _Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(8, 10, 3, padding=1)
        self.b = nn.Conv2d(10, 12, 3, padding=1, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("method_name", sorted(REDUCED_RANK))
def test_refit_never_increases_calibration_error(method_name):
    if method_name not in METHODS:
        pytest.skip(f"{method_name} is not registered")
    torch.manual_seed(4)
    original = _Chain().eval()
    working = copy.deepcopy(original)
    inputs = correlated_inputs()
    batches = lambda: inputs.split(16)  # noqa: E731
    method = METHODS[method_name]
    rank = REDUCED_RANK[method_name]
    upstream, _ = factorize(METHODS["spatial_separable"], original.a, 4, 1)
    swap_(working, {"a": upstream})  # the refit of b must absorb a's error too
    stack, _ = factorize(method, original.b, rank, 1)
    refit = refit_last_factor_(original, working, "b", stack, 1, batches)
    with torch.no_grad():
        measured = _relative(stack(working.a(inputs).relu()), original(inputs))
    assert refit.error_after <= refit.error_before + 1e-12, f"{method_name}: {refit}"
    assert refit.error_after < 0.9 * refit.error_before, f"{method_name}: refit barely helped: {refit}"
    assert abs(measured - refit.error_after) < 1e-4, f"{method_name}: reported {refit.error_after:.6f}, measured {measured:.6f}"


def test_refit_keeps_the_old_weights_when_they_are_already_optimal():
    torch.manual_seed(5)
    original = _Chain().eval()
    inputs = correlated_inputs()
    method = METHODS["spatial_separable"]
    stack, _ = factorize(method, original.b, method.full_rank(original.b, 1), 1)
    before = stack[-1].weight.detach().clone()
    refit = refit_last_factor_(original, copy.deepcopy(original), "b", stack, 1, lambda: inputs.split(16))
    assert refit.error_before < 1e-5 and refit.error_after <= refit.error_before, refit
    assert torch.allclose(stack[-1].weight, before, atol=1e-4), "an exact stack must stay (nearly) unchanged"


def test_patch_extractor_reproduces_unfold_with_same_padding():
    conv = nn.Conv2d(3, 4, (3, 5), padding="same", dilation=(2, 1))
    extractor = layers.build_patch_extractor(conv, conv.kernel_size, padding="same", dilation=conv.dilation)
    x = torch.randn(2, 3, 7, 8)
    weight_matrix = conv.weight.detach().reshape(4, -1)
    with torch.no_grad():
        via_patches = torch.einsum("ok,nkhw->nohw", weight_matrix, extractor(x)) + conv.bias[None, :, None, None]
        error = _relative(via_patches, conv(x))
    assert error < 1e-6, f"patch extractor disagrees with the conv: {error:.2e}"


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 0, 1), (1, "same", 2)])
def test_joint_spatial_refit_beats_the_last_factor_refit(bias, stride, padding, dilation):
    from compressor.joint_refit import collect_patch_statistics, spatial_als_

    torch.manual_seed(6)
    original = _Chain().eval()
    original.b = nn.Conv2d(10, 12, 3, stride=stride, padding=padding, dilation=dilation, bias=bias).eval()
    working = copy.deepcopy(original)
    inputs = correlated_inputs()
    batches = lambda: inputs.split(16)  # noqa: E731
    upstream, _ = factorize(METHODS["spatial_separable"], original.a, 4, 1)
    swap_(working, {"a": upstream})
    method = METHODS["spatial_separable"]
    last_only, _ = factorize(method, original.b, 5, 1)
    joint = copy.deepcopy(last_only)
    last_refit = refit_last_factor_(original, working, "b", last_only, 1, batches)
    stats = collect_patch_statistics(original, working, "b", original.b, 1, batches)
    joint_refit = spatial_als_(joint, original.b, stats)
    with torch.no_grad():
        measured = _relative(joint(working.a(inputs).relu()), original(inputs))
    assert joint_refit.error_before == pytest.approx(last_refit.error_before, rel=1e-6), (joint_refit, last_refit)
    assert joint_refit.error_after <= last_refit.error_after + 1e-9, f"joint {joint_refit} vs last factor {last_refit}"
    assert joint_refit.error_after < 0.95 * last_refit.error_after, f"joint {joint_refit} vs last factor {last_refit}"
    assert abs(measured - joint_refit.error_after) < 1e-4, f"reported {joint_refit.error_after:.6f}, measured {measured:.6f}"


def test_joint_spatial_refit_keeps_an_exact_stack():
    from compressor.joint_refit import collect_patch_statistics, spatial_als_

    torch.manual_seed(7)
    original = _Chain().eval()
    inputs = correlated_inputs()
    method = METHODS["spatial_separable"]
    stack, _ = factorize(method, original.b, method.full_rank(original.b, 1), 1)
    stats = collect_patch_statistics(original, copy.deepcopy(original), "b", original.b, 1, lambda: inputs.split(16))
    refit = spatial_als_(stack, original.b, stats)
    assert refit.error_before < 1e-5 and refit.error_after <= refit.error_before, refit
