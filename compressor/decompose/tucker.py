"""Tucker-2 factorization of a conv kernel on its two channel modes.

Kim, Park, Yoo, Choi, Yang, Shin. "Compression of Deep Convolutional Neural Networks for Fast and
Low Power Mobile Applications", ICLR 2016: a (out, in, kh, kw) kernel becomes a 1x1 conv
(in -> r_in), a kxk core conv (r_in -> r_out) and a 1x1 conv (r_out -> out). Computed with
tensorly's ``partial_tucker`` (HOSVD initialization on modes 0 and 1, deterministic), refined by
HOOI sweeps (:func:`_hooi`); exact when the ranks reach the ranks of the mode unfoldings. The SVDs go through the eigendecomposition of the
smaller Gram matrix (:func:`_gram_svd`): a conv kernel's unfoldings are wide (channels x
channels*k*k), so this costs a (channels x channels) eigenproblem instead of a full SVD, and the
basis stays orthonormal, so full rank stays exact. (tensorly's own ``symeig_svd`` eigendecomposes
the *larger* Gram matrix of a wide matrix: 4608 x 4608 for a 512-channel 3x3 conv, ~40 s.)
"""

from __future__ import annotations

import numpy as np
import tensorly.backend
import torch
from tensorly.base import unfold
from tensorly.decomposition import partial_tucker
from tensorly.tenalg import mode_dot, multi_mode_dot

from compressor.decompose._checks import check_kernel, check_positive_int


def _gram_svd(matrix: np.ndarray, n_eigenvecs: int | None = None, **_: object):
    """Truncated SVD through the eigendecomposition of the smaller of ``M M^T`` and ``M^T M``."""
    rows, cols = matrix.shape
    keep = min(rows, cols) if n_eigenvecs is None else min(n_eigenvecs, rows, cols)
    wide = rows <= cols
    gram = matrix @ matrix.T if wide else matrix.T @ matrix
    eigenvalues, eigenvectors = np.linalg.eigh(gram)
    order = np.argsort(eigenvalues)[::-1][:keep]
    singular = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    basis = eigenvectors[:, order]
    safe = np.where(singular > singular.max(initial=0.0) * 1e-12, singular, np.inf)
    if wide:
        return basis, singular, (matrix.T @ basis / safe).T
    return matrix @ basis / safe, singular, basis.T


def _hooi(
    tensor: np.ndarray, core: np.ndarray, last: np.ndarray, first_t: np.ndarray, n_iter_max: int, tol: float = 1e-5
):
    """Higher-order orthogonal iteration on modes 0 and 1, from the HOSVD factors.

    tensorly's ``partial_tucker`` runs its iterations with a full SVD whatever ``svd`` it is given;
    this loop uses :func:`_gram_svd`, which is what makes wide layers affordable.
    """
    norm = np.linalg.norm(tensor)
    previous = np.inf
    for _ in range(n_iter_max):
        last = _gram_svd(unfold(mode_dot(tensor, first_t.T, 1), 0), last.shape[1])[0]
        first_t = _gram_svd(unfold(mode_dot(tensor, last.T, 0), 1), first_t.shape[1])[0]
        core = multi_mode_dot(tensor, [last, first_t], modes=[0, 1], transpose=True)
        error = np.sqrt(abs(norm**2 - np.linalg.norm(core) ** 2)) / max(norm, 1e-300)
        if previous - error < tol:
            break
        previous = error
    return core, last, first_t


def tucker2(
    weight: torch.Tensor, out_rank: int, in_rank: int, *, n_iter_max: int = 5
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(first, core, last)``: shapes (in_rank, in), (out_rank, in_rank, kh, kw), (out, out_rank).

    A rank larger than its mode's dimension is allowed: the extra factor columns are zero, which
    keeps the layer shape the caller asked for (grouped convs need equal widths) and stays exact.
    """
    check_kernel(weight)
    out_channels, in_channels, kh, kw = weight.shape
    check_positive_int(out_rank, "out_rank")
    check_positive_int(in_rank, "in_rank")
    kept_out, kept_in = min(out_rank, out_channels), min(in_rank, in_channels)
    tensor = weight.detach().to(torch.float64).cpu().numpy()
    with tensorly.backend.BackendManager.backend_context("numpy"):
        (core, (last, first_t)), _ = partial_tucker(
            tensor, rank=[kept_out, kept_in], modes=[0, 1], n_iter_max=0, init="svd", svd=_gram_svd
        )
        if (kept_out, kept_in) != (out_channels, in_channels):
            core, last, first_t = _hooi(tensor, core, last, first_t, n_iter_max)
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
