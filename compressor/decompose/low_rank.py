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
are dense convs, the kind CPUs run at full speed, and it applies to 1x1 convs too. A grouped conv
is ``groups`` independent convs: each is factorized on its own and both factors keep the groups.
"""

from __future__ import annotations

import torch

from compressor.decompose._checks import check_kernel, check_rank
from compressor.decompose.whiten import Whitening


def low_rank_full_rank(out_channels: int, in_channels: int, kh: int, kw: int, groups: int = 1) -> int:
    """Per group: a grouped conv is ``groups`` independent convs, each factorized on its own."""
    return min(out_channels // groups, in_channels // groups * kh * kw)


def whitened_groups(weight: torch.Tensor, groups: int, whitening: Whitening | None) -> torch.Tensor:
    """(groups, out/groups, in/groups*kh*kw): each group's kernel as a matrix, whitened per group."""
    out_channels, in_per_group, kh, kw = weight.shape
    size = in_per_group * kh * kw
    if out_channels % groups:
        raise ValueError(f"Expected out_channels divisible by groups={groups}, got {out_channels}")
    if whitening is not None and (whitening.size != size or whitening.root.dim() - 2 != int(groups > 1)):
        raise ValueError(f"Expected a whitening of size in/groups*kh*kw={size}, one per group, got {tuple(whitening.root.shape)}")
    flat = weight.detach().to(torch.float64).reshape(groups, out_channels // groups, size)
    return flat if whitening is None else flat @ whitening.root.to(flat.device)


def low_rank_spectrum(weight: torch.Tensor, whitening: Whitening | None = None, groups: int = 1) -> torch.Tensor:
    """Singular values of the (whitened) ``out x (in*kh*kw)`` kernel, float64; ``(groups, k)`` for a
    grouped conv (keeping rank ``r`` keeps ``r`` of each group's)."""
    check_kernel(weight)
    values = torch.linalg.svdvals(whitened_groups(weight, groups, whitening))
    return values[0] if groups == 1 else values


def low_rank(
    weight: torch.Tensor, rank: int, *, groups: int = 1, whitening: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factor ``weight`` (out, in/groups, kh, kw) into ``(first, last)`` kernels.

    Shapes: ``first`` (groups*R, in/groups, kh, kw), ``last`` (out, R, 1, 1), both convs with
    ``groups`` groups: ``rank`` R counts per group. ``whitening`` (size ``in/groups*kh*kw``, index
    ``c*kh*kw + i*kw + j``, batched per group when grouped) makes the truncation minimize the
    output error on its data.
    """
    check_kernel(weight)
    out_channels, in_per_group, kh, kw = weight.shape
    check_rank(rank, low_rank_full_rank(out_channels, in_per_group * groups, kh, kw, groups), "rank")
    u, s, vh = torch.linalg.svd(whitened_groups(weight, groups, whitening), full_matrices=False)
    root = s[:, :rank].sqrt()
    rows = root.unsqueeze(-1) * vh[:, :rank]
    if whitening is not None:
        rows = rows @ whitening.inverse.to(rows.device)
    first = rows.reshape(groups * rank, in_per_group, kh, kw)
    last = (u[:, :, :rank] * root.unsqueeze(1)).reshape(out_channels, rank, 1, 1)
    return first.contiguous().to(weight.dtype), last.contiguous().to(weight.dtype)


def low_rank_reconstruct(first: torch.Tensor, last: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The (out, in/groups, kh, kw) kernel that the two factors compute together."""
    rank = last.shape[1]
    rows = first.to(torch.float64).reshape(groups, rank, -1)
    mixing = last.to(torch.float64).reshape(groups, -1, rank)
    dense = mixing @ rows
    return dense.reshape(last.shape[0], *first.shape[1:]).to(first.dtype)
