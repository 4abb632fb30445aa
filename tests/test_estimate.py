"""Cheap budget errors (compressor.estimate) against the decompositions they stand in for."""

from __future__ import annotations

import pytest
import torch

from compressor import estimate
from compressor.decompose import block_term, block_term_reconstruct, cp, cp_reconstruct
from compressor.decompose.cp import truncated_construction_error


def _kernel(out_channels=24, in_channels=16, seed=0) -> torch.Tensor:
    """A kernel with a decaying channel spectrum, as trained convs have."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_channels, in_channels, 3, 3, generator=generator, dtype=torch.float64)
    decay = torch.logspace(0, -1.5, in_channels, dtype=torch.float64)
    return weight * decay[None, :, None, None]


def _relative(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx.to(torch.float64) - weight).norm() / weight.norm())


@pytest.mark.parametrize("groups", [1, 2])
def test_block_term_estimate_tracks_the_decomposition(groups):
    weight = _kernel()
    ranks = [2 * groups, 4 * groups, 8]
    estimates = estimate.block_term_errors(weight, ranks, groups)
    for rank, predicted in zip(ranks, estimates):
        real = _relative(block_term_reconstruct(*block_term(weight, rank, groups), groups), weight)
        # HOSVD terms without HOOI or sweeps: never better than the decomposition, and close to it.
        assert real - 1e-9 <= predicted <= 1.15 * real + 1e-9, f"g{groups} rank {rank}: estimate {predicted:.4f}, real {real:.4f}"
    assert estimates == sorted(estimates, reverse=True), f"estimates must fall with the rank: {estimates}"


def test_tucker2_estimate_is_exact_at_full_rank():
    weight = _kernel()
    assert estimate.tucker2_errors(weight, [24])[0] < 1e-7


def test_cp_bound_holds_for_an_accepted_fit_and_reads_all_ranks_at_once():
    weight = _kernel(8, 6)
    ranks = [3, 6, 12]
    bounds = estimate.cp_errors(weight, ranks)
    assert bounds == pytest.approx([truncated_construction_error(weight, r) for r in ranks], rel=1e-12, abs=1e-15)
    fitted = _relative(cp_reconstruct(*cp(weight, 6)), weight)
    assert fitted <= bounds[1] + 1e-9, f"rank-6 CP fit {fitted:.4f} above its bound {bounds[1]:.4f}"
