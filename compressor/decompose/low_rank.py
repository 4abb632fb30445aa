"""Channel (low-rank) decomposition: a kxk conv to ``R`` channels, then a 1x1 conv to ``out``.

Zhang, Zou, He, Sun, "Accelerating Very Deep Convolutional Networks for Classification and
Detection", TPAMI 2016 (the channel decomposition; AIMET calls it "weight SVD"). The kernel
flattened to ``out x (in*kh*kw)`` has an SVD ``U S V^T``; rank ``R`` keeps the ``R`` leading
triplets: the first factor's filters are the rows of ``sqrt(S) V^T`` (each an ``in x kh x kw``
kernel with the original stride, padding and dilation), the 1x1 factor's columns ``U sqrt(S)``.
Truncated SVD is the optimal rank-``R`` approximation, exact at ``R = min(out, in*kh*kw)``.

With calibration data the columns are whitened by the ``(in*kh*kw)`` covariance of the input
patches (see :mod:`compressor.decompose.whiten`): the truncation is then the closed-form optimum of
the layer's output error on that data (Zhang et al. 2016; BALF, arXiv 2509.25136). Both factors
are dense convs, the kind CPUs run at full speed, and it applies to 1x1 convs too.
"""

from __future__ import annotations

import torch

from compressor.decompose._checks import check_kernel, check_rank
from compressor.decompose.whiten import Whitening


def low_rank_full_rank(out_channels: int, in_channels: int, kh: int, kw: int) -> int:
    return min(out_channels, in_channels * kh * kw)


def _flattened(weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
    out_channels, in_channels, kh, kw = weight.shape
    size = in_channels * kh * kw
    if whitening is not None and whitening.size != size:
        raise ValueError(f"Expected a whitening of size in*kh*kw={size}, got {whitening.size}")
    flat = weight.detach().to(torch.float64).reshape(out_channels, size)
    return flat if whitening is None else flat @ whitening.root.to(flat.device)


def low_rank_spectrum(weight: torch.Tensor, whitening: Whitening | None = None) -> torch.Tensor:
    """Singular values of the (whitened) ``out x (in*kh*kw)`` kernel, float64."""
    check_kernel(weight)
    return torch.linalg.svdvals(_flattened(weight, whitening))


def low_rank(weight: torch.Tensor, rank: int, *, whitening: Whitening | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight`` (out, in, kh, kw) into ``(first, last)`` kernels.

    Shapes: ``first`` (R, in, kh, kw), ``last`` (out, R, 1, 1). ``whitening`` (size ``in*kh*kw``,
    index ``c*kh*kw + i*kw + j``) makes the truncation minimize the output error on its data.
    """
    check_kernel(weight)
    out_channels, in_channels, kh, kw = weight.shape
    check_rank(rank, low_rank_full_rank(out_channels, in_channels, kh, kw), "rank")
    u, s, vh = torch.linalg.svd(_flattened(weight, whitening), full_matrices=False)
    root = s[:rank].sqrt()
    rows = root[:, None] * vh[:rank]
    if whitening is not None:
        rows = rows @ whitening.inverse.to(rows.device)
    first = rows.reshape(rank, in_channels, kh, kw)
    last = (u[:, :rank] * root).reshape(out_channels, rank, 1, 1)
    return first.contiguous().to(weight.dtype), last.contiguous().to(weight.dtype)


def low_rank_reconstruct(first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel that the two factors compute together."""
    rank = first.shape[0]
    dense = last.to(torch.float64).reshape(-1, rank) @ first.to(torch.float64).reshape(rank, -1)
    return dense.reshape(last.shape[0], *first.shape[1:]).to(first.dtype)
