"""Tucker-2 factorization of a conv kernel on its two channel modes.

Kim, Park, Yoo, Choi, Yang, Shin. "Compression of Deep Convolutional Neural Networks for Fast and
Low Power Mobile Applications", ICLR 2016: a (out, in, kh, kw) kernel becomes a 1x1 conv
(in -> r_in), a kxk core conv (r_in -> r_out) and a 1x1 conv (r_out -> out). Computed with
tensorly's ``partial_tucker`` (HOOI, SVD init, so deterministic) on modes 0 and 1; exact when the
ranks reach the ranks of the mode unfoldings. The SVDs go through the eigendecomposition of the
small (channels x channels) Gram matrices (``symeig_svd``): a conv kernel's unfoldings are wide,
and this is several times faster than a full SVD, while the basis stays orthonormal, so full rank
stays exact.
"""

from __future__ import annotations

import numpy as np
import tensorly.backend
import torch
from tensorly.decomposition import partial_tucker

from compressor.decompose._checks import check_kernel


def tucker2(
    weight: torch.Tensor, out_rank: int, in_rank: int, *, n_iter_max: int = 10
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(first, core, last)``: shapes (in_rank, in), (out_rank, in_rank, kh, kw), (out, out_rank).

    A rank larger than its mode's dimension is allowed: the extra factor columns are zero, which
    keeps the layer shape the caller asked for (grouped convs need equal widths) and stays exact.
    """
    check_kernel(weight)
    out_channels, in_channels, kh, kw = weight.shape
    for name, value in (("out_rank", out_rank), ("in_rank", in_rank)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"Expected a positive integer {name}, got {value!r}")
    kept_out, kept_in = min(out_rank, out_channels), min(in_rank, in_channels)
    tensor = weight.detach().to(torch.float64).cpu().numpy()
    if (kept_out, kept_in) == (out_channels, in_channels):
        n_iter_max = 0  # both modes kept whole: the SVD initialization is already exact
    with tensorly.backend.BackendManager.backend_context("numpy"):
        (core, (last, first_t)), _ = partial_tucker(
            tensor, rank=[kept_out, kept_in], modes=[0, 1], n_iter_max=n_iter_max, init="svd", tol=1e-8,
            svd="symeig_svd",
        )
    padded_core = np.zeros((out_rank, in_rank, kh, kw))
    padded_core[:kept_out, :kept_in] = core
    padded_last = np.zeros((out_channels, out_rank))
    padded_last[:, :kept_out] = last
    padded_first = np.zeros((in_rank, in_channels))
    padded_first[:kept_in] = first_t.T
    return tuple(
        torch.from_numpy(np.ascontiguousarray(part)).to(dtype=weight.dtype, device=weight.device)
        for part in (padded_first, padded_core, padded_last)
    )


def tucker2_reconstruct(first: torch.Tensor, core: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel of the 1x1 -> kxk -> 1x1 chain."""
    dense = torch.einsum(
        "oq,qrhw,ri->oihw", last.to(torch.float64), core.to(torch.float64), first.to(torch.float64)
    )
    return dense.to(core.dtype)
