"""Depthwise-separable factorization of a dense conv kernel.

Guo, Li, Zhang, Wang, Tian, Bai. "Network Decoupling: From Regular to Depthwise Separable
Convolutions", BMVC 2018. For each input channel ``i`` the slice ``W[:, i]`` is an
``out x (kh*kw)`` matrix; its rank-``M`` SVD ``U S V^T`` gives ``M`` depthwise filters (rows of
``sqrt(S) V^T``) and the matching pointwise columns (``U sqrt(S)``). The sum over input channels is
exactly what a pointwise conv computes, so the factorization is exact at ``M = min(out, kh*kw)``.

With calibration data, each slice is whitened by its input channel's ``(kh*kw)`` patch covariance
before the SVD (see :mod:`compressor.decompose.whiten`): the truncation then minimizes that
channel's contribution to the output error instead of the weight error.
"""

from __future__ import annotations

import torch

from compressor.decompose._checks import check_kernel, check_rank
from compressor.decompose.whiten import Whitening


def depthwise_separable_full_rank(out_channels: int, kh: int, kw: int) -> int:
    return min(out_channels, kh * kw)


def _check_whitening(whitening: Whitening | None, in_channels: int, patch: int) -> None:
    if whitening is not None and tuple(whitening.root.shape) != (in_channels, patch, patch):
        raise ValueError(
            f"Expected a per-channel whitening of shape {(in_channels, patch, patch)}, got {tuple(whitening.root.shape)}"
        )


def _per_input_slices(weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    out_channels, in_channels, kh, kw = weight.shape
    _check_whitening(whitening, in_channels, kh * kw)
    slices = weight.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(in_channels, out_channels, kh * kw)
    return slices if whitening is None else slices @ whitening.root.to(slices.device)


def depthwise_separable_spectrum(weight: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Singular values (in, min(out, kh*kw)) of each (whitened) input-channel slice, float64.

    Keeping ``M`` of them per channel leaves a squared (whitened) error of the sum of the rest.
    """
    check_kernel(weight)
    return torch.linalg.svdvals(_per_input_slices(weight, whitening))


def depthwise_separable(
    weight: torch.Tensor, multiplier: int, *, whitening: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight`` (out, in, kh, kw) into depthwise and pointwise kernels.

    Returns ``(depthwise, pointwise)`` with shapes ``(in*M, 1, kh, kw)`` (a conv with
    ``groups=in``: output channel ``i*M + m`` reads input channel ``i``) and ``(out, in*M, 1, 1)``.
    The singular values are split evenly (``sqrt(S)`` on each side) so both factors have the same
    scale, which keeps later fine-tuning well conditioned. ``whitening`` (batched ``(in, kh*kw,
    kh*kw)``) makes the truncation minimize the output error on the data it was measured on.
    """
    check_kernel(weight)
    out_channels, in_channels, kh, kw = weight.shape
    check_rank(multiplier, depthwise_separable_full_rank(out_channels, kh, kw), "depth multiplier")
    per_input = _per_input_slices(weight, whitening)
    u, s, vh = torch.linalg.svd(per_input, full_matrices=False)
    root = s[:, :multiplier].sqrt()
    filters = root.unsqueeze(-1) * vh[:, :multiplier, :]
    if whitening is not None:
        filters = filters @ whitening.inverse.to(filters.device)
    depthwise = filters.reshape(in_channels * multiplier, 1, kh, kw)
    pointwise = (u[:, :, :multiplier] * root.unsqueeze(1)).permute(1, 0, 2)
    pointwise = pointwise.reshape(out_channels, in_channels * multiplier, 1, 1)
    return depthwise.to(weight.dtype), pointwise.to(weight.dtype)


def depthwise_separable_reconstruct(
    depthwise: torch.Tensor, pointwise: torch.Tensor, in_channels: int
) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel that the two factors compute together."""
    total, _, kh, kw = depthwise.shape
    if total % in_channels:
        raise ValueError(f"Expected depthwise channels divisible by in_channels={in_channels}, got {total}")
    multiplier = total // in_channels
    out_channels = pointwise.shape[0]
    filters = depthwise.to(torch.float64).reshape(in_channels, multiplier, kh * kw)
    mixing = pointwise.to(torch.float64).reshape(out_channels, in_channels, multiplier)
    dense = torch.einsum("oim,imk->oik", mixing, filters)
    return dense.reshape(out_channels, in_channels, kh, kw).to(depthwise.dtype)
