"""Tucker-2 of a grouped conv, one per group: the group structure stays in every factor.

A conv with ``G`` groups is ``G`` independent convs, group ``g`` mapping input channels
``g*in/G .. (g+1)*in/G - 1`` to output channels ``g*out/G .. (g+1)*out/G - 1``. Each of those
kernels gets its own Tucker-2 (Kim, Park, Yoo, Choi, Yang, Shin, "Compression of Deep
Convolutional Neural Networks for Fast and Low Power Mobile Applications", ICLR 2016), and the
``G`` results are laid side by side as three grouped convs: a 1x1 conv (``in -> R``, ``G``
groups), a kxk core (``R -> R``, ``G`` groups) and a 1x1 conv (``R -> out``, ``G`` groups), with
``R = G*r``. Factorizing the dense equivalent instead (a block-diagonal kernel) would mix the
groups and cost the dense layer's MACs; ResNeXt and RegNet keep their groups for that reason.

Exact when each group's ``r`` reaches the larger of its two channel-mode ranks (see
:func:`~compressor.decompose.tucker.tucker2`, which pads a rank above a mode's dimension with
zeros). With an input whitening (a ``(G, in/G, in/G)`` batch of roots of each group's input
channel covariance) each group decomposes ``W_g S_g^(1/2)`` and maps its first factor back with
``S_g^(-1/2)``: the truncation then targets that group's output error on the data.
"""

from __future__ import annotations

import torch

from compressor.decompose._checks import check_kernel, check_positive_int
from compressor.decompose.tucker import tucker2, tucker2_reconstruct
from compressor.decompose.whiten import Whitening, whiten_input_mode


def grouped_tucker2_full_rank(out_channels: int, in_channels: int, kh: int, kw: int, groups: int) -> int:
    """Total rank ``G*r`` with ``r`` the larger channel-mode rank bound of one group's kernel."""
    out_per_group, in_per_group = out_channels // groups, in_channels // groups
    in_mode = min(in_per_group, out_per_group * kh * kw)
    out_mode = min(out_per_group, in_per_group * kh * kw)
    return groups * max(in_mode, out_mode)


def _check(weight: torch.Tensor, rank: int, groups: int) -> None:
    check_kernel(weight)
    check_positive_int(groups, "groups")
    check_positive_int(rank, "rank")
    if weight.shape[0] % groups:
        raise ValueError(f"Expected out_channels divisible by groups={groups}, got {weight.shape[0]}")
    if rank % groups:
        raise ValueError(f"Expected rank divisible by groups={groups}, got {rank}")


def grouped_tucker2(
    weight: torch.Tensor, rank: int, groups: int, *, whitening: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Factor a grouped conv's ``weight`` (out, in/G, kh, kw) into ``(first, core, last)``.

    Shapes: ``first`` (R, in/G), ``core`` (R, R/G, kh, kw), ``last`` (out, R/G): the weights of
    three convs with ``groups=G`` each, laid out as PyTorch lays out grouped weights (rows
    ``g*R/G .. (g+1)*R/G - 1`` belong to group ``g``). ``rank`` R is the total, a multiple of G.
    """
    _check(weight, rank, groups)
    out_channels, in_per_group = weight.shape[:2]
    if whitening is not None and tuple(whitening.root.shape) != (groups, in_per_group, in_per_group):
        raise ValueError(
            f"Expected one whitening of size in/groups={in_per_group} per group ({groups}), got {tuple(whitening.root.shape)}"
        )
    per_group, rows = rank // groups, out_channels // groups
    target = weight.detach().to(torch.float64)
    firsts, cores, lasts = [], [], []
    for g in range(groups):
        block = target[g * rows:(g + 1) * rows]
        if whitening is not None:
            block = whiten_input_mode(block, whitening.root[g].to(block.device))
        first, core, last = tucker2(block, per_group, per_group)
        if whitening is not None:
            first = first @ whitening.inverse[g].to(first.device)
        firsts.append(first)
        cores.append(core)
        lasts.append(last)
    first, core, last = torch.cat(firsts), torch.cat(cores), torch.cat(lasts)
    return first.to(weight.dtype), core.to(weight.dtype), last.to(weight.dtype)


def grouped_tucker2_reconstruct(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor, groups: int) -> torch.Tensor:
    """The (out, in/G, kh, kw) grouped kernel that the three grouped factors compute together."""
    per_group, rows = core.shape[0] // groups, last.shape[0] // groups
    blocks = [
        tucker2_reconstruct(
            first[g * per_group:(g + 1) * per_group],
            core[g * per_group:(g + 1) * per_group],
            last[g * rows:(g + 1) * rows],
        ).to(torch.float64)
        for g in range(groups)
    ]
    return torch.cat(blocks).to(core.dtype)
