"""Data-aware initialization: streaming statistics, whitened decompositions, least-squares refits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compressor import calibrate, layers
from compressor.calibrate import collect_statistics, refit_last_factor_
from compressor.decompose.spatial import whitened_unfolding
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


# (kernel, stride, padding, dilation): strided, asymmetric 'same' (odd total), 'valid', 1x1
GEOMETRIES = [
    ((3, 2), (2, 1), (1, 0), (1, 2)),
    ((3, 4), (1, 1), "same", (2, 1)),
    ((3, 3), (1, 1), 1, 1),
    ((5, 5), (1, 1), "valid", 1),
    ((1, 1), (1, 1), 0, 1),
]


def _unfold_reference(inputs: torch.Tensor, conv: nn.Conv2d, kernel, stride, padding, dilation) -> torch.Tensor:
    """im2col columns (C*kh*kw, N*L) in float64, through F.unfold on the input padded as the conv pads."""
    x = inputs.double()
    if padding == "same":  # nn.Conv2d: the odd pixel of an odd total goes last
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        x = F.pad(x, (totals[1] // 2, totals[1] - totals[1] // 2, totals[0] // 2, totals[0] - totals[0] // 2))
        padding = 0
    elif padding == "valid":
        padding = 0
    patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return patches.transpose(0, 1).reshape(patches.shape[1], -1)


@pytest.mark.parametrize("kernel, stride, padding, dilation", GEOMETRIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_statistics_match_a_direct_im2col(kernel, stride, padding, dilation, dtype):
    """Every statistic kind against float64 F.unfold: float32 activations multiply in float32 per
    chunk (relative error about 1e-7 measured; asserted below 1e-5), float64 ones stay exact."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, kernel, stride=stride, padding=padding, dilation=dilation).to(dtype)
    inputs = torch.randn(6, 3, 9, 10, dtype=dtype) + 0.5  # an offset: second moments, not centred
    kinds = ["channel_patches", "column_patches", "patches", "channels"]
    stats = collect_statistics(nn.Sequential(conv), {"0": kinds}, lambda: inputs.split(4))["0"]
    taps = kernel[0] * kernel[1]
    patches = _unfold_reference(inputs, conv, kernel, stride, conv.padding, conv.dilation)
    per_channel = patches.reshape(3, taps, -1)
    column_padding = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], 0)
    columns = _unfold_reference(inputs, conv, (kernel[0], 1), (stride[0], 1), column_padding, (conv.dilation[0], 1))
    if column_padding == "same":
        columns = _same_columns(inputs, conv)
    flat = inputs.double().transpose(0, 1).reshape(3, -1)
    expected = {
        "channel_patches": per_channel @ per_channel.transpose(1, 2) / per_channel.shape[-1],
        "column_patches": columns @ columns.T / columns.shape[1],
        "patches": patches @ patches.T / patches.shape[1],
        "channels": flat @ flat.T / flat.shape[1],
    }
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for kind, want in expected.items():
        got = stats.covariance(kind)
        error = _relative(got, want)
        assert got.dtype == torch.float64 and error < tolerance, f"{kind} ({dtype}): relative error {error:.2e}"


def _same_columns(inputs: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """(kh x 1) columns of a 'same' conv: padded along H only, by nn.Conv2d's split of the total."""
    total = conv.dilation[0] * (conv.kernel_size[0] - 1)
    x = F.pad(inputs.double(), (0, 0, total // 2, total - total // 2))
    patches = F.unfold(x, (conv.kernel_size[0], 1), dilation=(conv.dilation[0], 1))
    return patches.transpose(0, 1).reshape(patches.shape[1], -1)


def test_shared_gram_gives_the_same_statistics_as_each_kind_alone():
    """patches and channel_patches (one Gram, its block diagonal) and channels: the same sums
    whether requested together or one by one."""
    torch.manual_seed(3)
    conv = nn.Conv2d(5, 4, 3, padding=1).double()
    inputs = torch.randn(7, 5, 8, 8, dtype=torch.float64)
    kinds = ["channel_patches", "patches", "channels", "column_patches"]
    together = collect_statistics(nn.Sequential(conv), {"0": kinds}, lambda: inputs.split(3))["0"]
    for kind in kinds:
        alone = collect_statistics(nn.Sequential(conv), {"0": [kind]}, lambda: inputs.split(3))["0"]
        assert together.counts[kind] == alone.counts[kind], kind
        error = _relative(together.sums[kind], alone.sums[kind])
        assert error < 1e-13, f"{kind}: {error:.2e}"


def test_wide_gram_mirrors_its_upper_block():
    """Grams of 256+ rows compute 3/4 of the products and mirror the rest: same as the full product."""
    from compressor.calibrate import _gram

    columns = torch.randn(300, 2000, dtype=torch.float64)
    got = _gram(columns)
    assert torch.equal(got[150:, :150], got[:150, 150:].T)
    assert _relative(got, columns @ columns.T) < 1e-13


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


def test_whitening_root_factors_the_regularized_covariance_and_whitens_like_the_symmetric_root():
    """``root @ root.mT`` is the covariance plus the ridge, and the whitened spectra (what truncation and
    the budget read) equal those of the symmetric root ``S^(1/2)`` from an eigendecomposition."""
    torch.manual_seed(8)
    mixing = torch.randn(12, 12, dtype=torch.float64)
    covariance = mixing @ torch.diag(torch.logspace(0, -6, 12, dtype=torch.float64)) @ mixing.T
    transform = whitening(covariance, ridge=1e-4)
    regularized = covariance + 1e-4 * covariance.diagonal().mean() * torch.eye(12, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(regularized)
    symmetric = vectors @ torch.diag(values.sqrt()) @ vectors.T
    weight = torch.randn(7, 12, dtype=torch.float64)
    kernel = torch.randn(5, 4, 3, 3, dtype=torch.float64)  # spatial: 4 channels x 3 rows = 12, whitened on the column side
    unfolded = kernel.permute(1, 2, 0, 3).reshape(12, 15)
    errors = {
        "root @ root.mT": _relative(transform.root @ transform.root.mT, regularized),
        "root @ inverse": float((transform.root @ transform.inverse - torch.eye(12, dtype=torch.float64)).abs().max()),
        "row spectrum": _relative(torch.linalg.svdvals(weight @ transform.root), torch.linalg.svdvals(weight @ symmetric)),
        "column spectrum": _relative(
            torch.linalg.svdvals(whitened_unfolding(kernel, transform)), torch.linalg.svdvals(symmetric @ unfolded)
        ),
    }
    assert max(errors.values()) < 1e-10, errors


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


@pytest.mark.parametrize("kernel, stride, padding, dilation", GEOMETRIES[:3])
def test_refit_sums_match_a_direct_im2col(kernel, stride, padding, dilation):
    """The joint refit's sums (patches with a constant 1 row, cross terms, energies) and the last-factor
    refit's solution, against float64 F.unfold and a direct ridge solve, from float32 activations.
    The products are float32 per chunk: 1e-7 relative; the residual about the original conv is read
    to the same relative precision, which is what keeps small errors readable."""
    from compressor.calibrate import fit_last_factor_
    from compressor.joint_refit import patch_statistics

    torch.manual_seed(4)
    conv = nn.Conv2d(3, 5, kernel, stride=stride, padding=padding, dilation=dilation)
    hidden = torch.randn(6, 3, 9, 10) + 0.5
    with torch.no_grad():
        target = conv(hidden) + 0.1 * torch.randn(conv(hidden).shape)
    pairs = [(target[:4], hidden[:4], 4), (target[4:], hidden[4:], 2)]
    stats = patch_statistics(conv, pairs)
    patches = _unfold_reference(hidden, conv, kernel, stride, conv.padding, conv.dilation)
    patches = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=torch.float64)])
    wanted = target.double().transpose(0, 1).reshape(5, -1)
    reference = torch.cat([conv.weight.detach().double().reshape(5, -1), conv.bias.detach().double()[:, None]], 1)
    residual = wanted - reference @ patches
    errors = {
        "gram": _relative(stats.gram, patches @ patches.T),
        "cross": _relative(stats.cross, patches @ wanted.T),
        "residual cross": _relative(stats.products.cross, residual @ patches.T),
        "energy": abs(stats.energy / float((wanted**2).sum()) - 1),
        "residual energy": abs(stats.products.residual_energy / float((residual**2).sum()) - 1),
    }
    assert max(errors.values()) < 1e-6 and stats.samples == 6, errors

    stack = nn.Sequential(nn.Identity(), copy.deepcopy(conv))
    refit = fit_last_factor_(stack, pairs, ridge=0.0)
    solved = torch.linalg.lstsq(patches.T, wanted.T).solution.T
    got = torch.cat([stack[-1].weight.detach().double().reshape(5, -1), stack[-1].bias.detach().double()[:, None]], 1)
    assert _relative(got, solved) < 1e-5, f"weights differ from lstsq by {_relative(got, solved):.2e}"
    residual = float((wanted - solved @ patches).norm() / wanted.norm())
    assert refit.error_after == pytest.approx(residual, rel=1e-6), (refit, residual)


def test_whitening_is_kept_until_more_vectors_arrive():
    """The budget and the decomposition ask for the same whitening several times: one factorization per kind."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    inputs = torch.randn(4, 3, 6, 6)
    stats = collect_statistics(nn.Sequential(conv), {"0": ["channels"]}, lambda: inputs.split(2))["0"]
    first = stats.whitening("channels")
    assert stats.whitening("channels") is first
    stats.sums["channels"] = stats.sums["channels"] * 2
    stats.counts["channels"] *= 2
    again = stats.whitening("channels")
    assert again is not first and torch.allclose(again.root, first.root)


def test_product_chunks_are_bounded_by_the_widest_patch_not_the_stack_input(monkeypatch):
    """A head that widens its input (2 -> 64 channels, as CP's first factor does at R > in) must not
    let a chunk's patch columns pass the bound; the chunked products equal the unchunked ones."""
    generator = torch.Generator().manual_seed(0)
    head = nn.Conv2d(2, 64, 1, bias=False)
    hidden = torch.randn(8, 2, 4, 4, generator=generator)
    target = torch.randn(8, 4, 4, 4, generator=generator)
    reference = torch.randn(4, 65, generator=generator, dtype=torch.float64)  # 64 patch rows and the constant
    whole = calibrate.collect_products(reference, [(target, hidden, 8)], calibrate.CHANNELS, True, head)
    limit = 65 * 16 * 2  # two samples of the head's patches (and their constant row)
    monkeypatch.setattr(calibrate, "_CHUNK_ELEMENTS", limit)
    sizes = []
    add = calibrate.Products.add_

    def counted_add(self, columns, *rest):
        sizes.append(columns.numel())
        return add(self, columns, *rest)

    monkeypatch.setattr(calibrate.Products, "add_", counted_add)
    chunked = calibrate.collect_products(reference, [(target, hidden, 8)], calibrate.CHANNELS, True, head)
    assert max(sizes) <= limit and len(sizes) == 4, f"patch elements per chunk {sizes}, limit {limit}"
    off = float((chunked.gram - whole.gram).abs().max() / whole.gram.abs().max())
    assert off < 1e-6, f"chunked Gram off the whole one by {off:.2e}"
