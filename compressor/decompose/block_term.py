"""Block-term decomposition of a conv kernel into ``G`` Tucker-2 terms, i.e. a grouped conv.

De Lathauwer, "Decompositions of a Higher-Order Tensor in Block Terms — Part II", SIAM J. Matrix
Anal. Appl. 2008; applied to convolutions by Wang, Cheng, "Accelerating Convolutional Neural
Networks with Dominant Convolutional Kernel and Knowledge Pre-regression" / Yunpeng Chen et al.,
"Sharing Residual Units Through Collective Tensor Factorization" (IJCAI 2018), where the ``G`` terms
become one 1x1 conv (in -> R), a grouped kxk conv (R -> R, ``groups=G``) and a 1x1 conv (R -> out).

Algorithm: greedy Tucker-2 (tensorly HOOI) on the residual, one term at a time, then a few block
coordinate (ALS) sweeps that refit each term to what the others leave; the best sweep is kept. With
one group this is plain Tucker-2. Exact at :func:`block_term_full_rank`: with per-group rank
``r >= rank(W_(1))`` each greedy term captures the whole input mode and removes ``r`` more output
directions, so ``G*r >= rank(W_(0))`` terms reach zero residual (and symmetrically).
"""

from __future__ import annotations

import math

import torch

from compressor.decompose._checks import check_kernel, check_positive_int
from compressor.decompose.tucker import tucker2, tucker2_reconstruct
from compressor.decompose.whiten import Whitening, whiten_input_mode


def block_term_full_rank(out_channels: int, in_channels: int, kh: int, kw: int, groups: int) -> int:
    """Smallest total rank (a multiple of ``groups``) at which the greedy construction is exact."""
    in_mode = min(in_channels, out_channels * kh * kw)
    out_mode = min(out_channels, in_channels * kh * kw)
    per_group = min(max(in_mode, math.ceil(out_mode / groups)), max(out_mode, math.ceil(in_mode / groups)))
    return groups * per_group


def block_term(
    weight: torch.Tensor, rank: int, groups: int, *, sweeps: int = 2, input_whitening: Whitening | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(first, core, last)``: shapes (R, in), (R, R/G, kh, kw), (out, R).

    ``core`` is the weight of a conv with ``groups=G``: output channels ``g*R/G .. (g+1)*R/G - 1``
    read the input channels of the same block, as PyTorch lays grouped weights out.
    ``input_whitening`` (in x in, from the input channels' covariance ``S = L L^T``) decomposes ``W L``
    on the input-channel mode and maps the first factor back with ``L^(-1)``.
    """
    if input_whitening is not None:
        check_kernel(weight)
        if input_whitening.size != weight.shape[1]:
            raise ValueError(f"Expected a whitening of size in={weight.shape[1]}, got {input_whitening.size}")
        whitened = whiten_input_mode(weight.detach(), input_whitening.root)
        first, core, last = block_term(whitened, rank, groups, sweeps=sweeps)
        first = first @ input_whitening.inverse.to(first.device)
        return first.to(weight.dtype), core.to(weight.dtype), last.to(weight.dtype)
    check_kernel(weight)
    check_positive_int(groups, "groups")
    check_positive_int(rank, "rank")
    if rank % groups:
        raise ValueError(f"Expected rank divisible by groups={groups}, got {rank}")
    per_group = rank // groups
    target = weight.detach().to(torch.float64)
    terms = []
    residual = target.clone()
    for _ in range(groups):
        term = tucker2(residual, per_group, per_group)
        residual = residual - tucker2_reconstruct(*term)
        terms.append(term)
    if groups > 1:
        best_error, best_terms = torch.linalg.norm(residual).item(), list(terms)
        for _ in range(sweeps):
            for index in range(groups):
                left_for_term = residual + tucker2_reconstruct(*terms[index])
                terms[index] = tucker2(left_for_term, per_group, per_group)
                residual = left_for_term - tucker2_reconstruct(*terms[index])
            error = torch.linalg.norm(residual).item()
            if error >= best_error * (1 - 1e-6):
                break
            best_error, best_terms = error, list(terms)
        terms = best_terms
    first = torch.cat([term[0] for term in terms], dim=0)
    core = torch.cat([term[1] for term in terms], dim=0)
    last = torch.cat([term[2] for term in terms], dim=1)
    return first.to(weight.dtype), core.to(weight.dtype), last.to(weight.dtype)


def block_term_reconstruct(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor, groups: int) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel of the 1x1 -> grouped kxk -> 1x1 chain."""
    per_group = core.shape[0] // groups
    blocks = (slice(g * per_group, (g + 1) * per_group) for g in range(groups))
    dense = sum(tucker2_reconstruct(first[b], core[b], last[:, b]).to(torch.float64) for b in blocks)
    return dense.to(core.dtype)
