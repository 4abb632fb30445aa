"""Cheap error estimates over a rank grid for the methods without a closed-form spectrum.

The budget solver needs, per layer, the (whitened) relative error of every candidate rank. For the
spectral methods one SVD gives them all; grouped (block-term / Tucker-2) and CP were measured by
running the full iterative decomposition once per candidate, which made choosing ranks take
minutes. Here each comes from one or two eigendecompositions per layer:

* ``grouped`` with one group (Tucker-2): the truncated HOSVD. With ``U``, ``V`` the eigenbases of
  the output- and input-mode Gram matrices of the (whitened) kernel, the core ``U^T W V`` holds
  all of ``W``'s energy, and keeping ranks ``(r, r)`` keeps the energy of its leading ``r x r``
  block, so one cumulative sum gives every rank. The decomposition itself starts from this HOSVD
  and runs HOOI, which never lowers the kept energy: the estimate is an upper bound.
* ``grouped`` with ``G`` groups: the same greedy construction as
  :func:`compressor.decompose.block_term` (one Tucker-2 term per group, each on what the previous
  left), with HOSVD terms instead of HOOI ones and without the ALS sweeps that follow: an estimate
  from above in practice (the sweeps only keep improvements), not a proven bound.
* ``cp``: the error of the best rank-``R`` truncation of the exact orthogonal constructions
  (:func:`compressor.decompose.cp.truncated_construction_errors`). A CP fit worse than that is
  refused as degenerate, so every accepted fit is at least this good: an upper bound, often loose
  (ALS usually does better), which makes the solver conservative about CP.

The recorded ``predicted_error`` of a layer is the estimate; after the decomposition the report
has the real weight error and, with data, the refit's output error.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from compressor.decompose.cp import truncated_construction_errors


def _leading_basis(unfolding: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of ``unfolding @ unfolding.T``, largest eigenvalue first (columns)."""
    _, vectors = torch.linalg.eigh(unfolding @ unfolding.T)
    return vectors.flip(1)


def _tucker2_bases(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out_channels, in_channels = weight.shape[:2]
    left = _leading_basis(weight.reshape(out_channels, -1))
    right = _leading_basis(weight.transpose(0, 1).reshape(in_channels, -1))
    return left, right


def _tucker2_term(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-(r, r) truncated HOSVD of ``weight`` on its two channel modes."""
    left, right = _tucker2_bases(weight)
    left, right = left[:, :rank], right[:, :rank]
    core = torch.einsum("oq,oihw,ip->qphw", left, weight, right)
    return torch.einsum("oq,qphw,ip->oihw", left, core, right)


def tucker2_errors(weight: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """Relative error of the truncated HOSVD at ranks ``(r, r)`` for each ``r`` (float64 ``weight``)."""
    total = float((weight**2).sum())
    if total == 0:
        return [0.0 for _ in ranks]
    left, right = _tucker2_bases(weight)
    core = torch.einsum("oq,oihw,ip->qphw", left, weight, right)
    kept = (core**2).sum(dim=(2, 3)).cumsum(0).cumsum(1)  # kept[a, b]: energy of the leading (a+1, b+1) block
    out_channels, in_channels = weight.shape[:2]
    errors = []
    for rank in ranks:
        retained = float(kept[min(rank, out_channels) - 1, min(rank, in_channels) - 1])
        errors.append(max(total - retained, 0.0) ** 0.5 / total**0.5)
    return errors


def block_term_errors(weight: torch.Tensor, ranks: Sequence[int], groups: int) -> list[float]:
    """Relative error of the greedy block-term construction with HOSVD terms, per total rank."""
    if groups == 1:
        return tucker2_errors(weight, ranks)
    norm = float(weight.norm())
    if norm == 0:
        return [0.0 for _ in ranks]
    errors = []
    for rank in ranks:
        residual = weight.clone()
        for _ in range(groups):
            residual = residual - _tucker2_term(residual, rank // groups)
        errors.append(float(residual.norm()) / norm)
    return errors


def cp_errors(weight: torch.Tensor, ranks: Sequence[int]) -> list[float]:
    """Upper bounds on the relative error of an accepted rank-``R`` CP fit, per rank."""
    return truncated_construction_errors(weight, list(ranks))
