"""Spatially separable factorization: a (kh x 1) conv to ``R`` channels, then a (1 x kw) conv.

Jaderberg, Vedaldi, Zisserman. "Speeding up Convolutional Neural Networks with Low Rank
Expansions", BMVC 2014 (scheme 2); Tai, Xiao, Zhang, Wang, E. "Convolutional neural networks with
low-rank regularization", ICLR 2016, which gives the closed form used here: the kernel unfolded to
``(in*kh) x (out*kw)`` has an SVD ``U S V^T``; rank ``R`` keeps the ``R`` leading triplets, the
vertical filters are ``U sqrt(S)`` and the horizontal ones ``V sqrt(S)``. Truncated SVD is the
optimal rank-``R`` approximation of that unfolding, and exact at ``R = min(in*kh, out*kw)``.

With calibration data the rows are whitened by the ``(in*kh)`` covariance of the vertical factor's
input columns (see :mod:`compressor.decompose.whiten`), which treats the ``kw`` horizontal taps as
uncorrelated: the truncation then targets the output error, and the refit that follows in the
pipeline corrects what that approximation misses.
"""

from __future__ import annotations

import torch

from compressor.decompose._checks import check_kernel, check_rank
from compressor.decompose.whiten import Whitening


def spatial_separable_full_rank(out_channels: int, in_channels: int, kh: int, kw: int) -> int:
    return min(in_channels * kh, out_channels * kw)


def whitened_unfolding(weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    """The ``(in*kh) x (out*kw)`` unfolding whose truncated SVD is the spatially separable factorization,
    whitened on its rows (``root.mT @``: the rows are the input-side vectors)."""
    out_channels, in_channels, kh, kw = weight.shape
    if whitening is not None and whitening.size != in_channels * kh:
        raise ValueError(f"Expected a whitening of size in*kh={in_channels * kh}, got {whitening.size}")
    unfolded = weight.detach().to(torch.float64).permute(1, 2, 0, 3).reshape(in_channels * kh, out_channels * kw)
    return unfolded if whitening is None else whitening.root.mT.to(unfolded.device) @ unfolded


def spatial_separable_spectrum(weight: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Singular values of the (whitened) ``(in*kh) x (out*kw)`` unfolding, float64."""
    check_kernel(weight)
    return torch.linalg.svdvals(whitened_unfolding(weight, whitening))


def spatial_separable(
    weight: torch.Tensor, rank: int, *, whitening: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight`` (out, in, kh, kw) into ``(vertical, horizontal)`` kernels.

    Shapes: ``vertical`` (R, in, kh, 1), ``horizontal`` (out, R, 1, kw). ``whitening`` (size
    ``in*kh``, index ``c*kh + i``) makes the truncation minimize the output error on its data.
    """
    check_kernel(weight)
    out_channels, in_channels, kh, kw = weight.shape
    check_rank(rank, spatial_separable_full_rank(out_channels, in_channels, kh, kw), "rank")
    u, s, vh = torch.linalg.svd(whitened_unfolding(weight, whitening), full_matrices=False)
    root = s[:rank].sqrt()
    columns = u[:, :rank] * root
    if whitening is not None:
        columns = whitening.inverse.mT.to(columns.device) @ columns
    vertical = columns.reshape(in_channels, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = (vh[:rank].T * root).reshape(out_channels, kw, rank).permute(0, 2, 1).unsqueeze(2)
    return vertical.contiguous().to(weight.dtype), horizontal.contiguous().to(weight.dtype)


def spatial_separable_reconstruct(vertical: torch.Tensor, horizontal: torch.Tensor) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel that the two factors compute together."""
    dense = torch.einsum("rih,orw->oihw", vertical[..., 0].to(torch.float64), horizontal[:, :, 0, :].to(torch.float64))
    return dense.to(vertical.dtype)
