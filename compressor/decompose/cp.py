"""CP (canonical polyadic) factorization of a conv kernel into four one-mode factors.

Lebedev, Ganin, Rakhuba, Oseledets, Lempitsky. "Speeding-up Convolutional Neural Networks Using
Fine-tuned CP-Decomposition", ICLR 2015: a rank-``R`` CP of the (out, in, kh, kw) kernel,
``W[o,c,i,j] ~= sum_r last[o,r] first[r,c] vertical[r,i] horizontal[r,j]``, is a 1x1 conv
(in -> R), a (kh x 1) depthwise conv, a (1 x kw) depthwise conv and a 1x1 conv (R -> out).

Algorithm: tensorly's ``parafac`` (ALS, Kolda & Bader 2009) from its SVD initialization, with a fixed
seed (the SVD initialization pads modes shorter than ``R`` with seeded random columns) and a bounded
number of sweeps, run with tensorly's PyTorch backend in float64 on the CPU. The scale of every
rank-one term is then split evenly across its four factor columns (each gets the fourth root of the
term's norm), so no factor is huge while another is tiny.

Full rank (:func:`cp_full_rank`) is constructive, not ALS: fix one channel mode and one spatial
mode, e.g. input channel ``c`` and row ``i``; the remaining slice ``W[:, c, i, :]`` is an
``out x kw`` matrix of rank ``<= min(out, kw)``, and its SVD writes it as that many rank-one terms
``u v^T``, each a CP term ``u (x) e_c (x) e_i (x) v``. Over all ``(c, i)`` that is an exact CP with
``in*kh*min(out, kw)`` terms. The four such choices (input or output channel, row or column) give
:func:`cp_full_rank` as the smallest of the four counts; the two other pairings (both channels, or
both spatial modes) never need fewer terms. These terms are mutually orthogonal, so the
construction is also perfectly conditioned (degeneracy ratio 1, see below).

Degeneracy: Phan, Sobolev, Sozykin, Ermilov, Gusak, Tichavsky, Glukhov, Oseledets, Cichocki,
"Stable Low-rank Tensor Decomposition for Compression of Convolutional Neural Network", ECCV 2020,
show that CP fits of conv kernels often diverge into huge rank-one terms that cancel each other,
which breaks fine-tuning and float32 inference. :func:`check_degeneracy` raises
:class:`CPDegenerateError` after an ALS fit when

- a factor is not finite (NaN or inf); or
- the degeneracy ratio ``sum_r ||t_r||^2 / ||sum_r t_r||^2`` (:func:`degeneracy_ratio`: energy of
  the rank-one terms over the energy of their sum) exceeds :data:`DEGENERACY_RATIO` ``= 1e3``. It is
  1 for orthogonal terms, a few to a few tens for ALS fits of random kernels at useful ranks, and
  grows into the thousands only where ALS fits with cancelling terms (e.g. a random 12x10x3x3
  kernel at rank 89, one below full: ratio ~5.6e3). Above 1e3 the sum is over 30x smaller in norm
  than the terms it adds up: float32 rounding in the ``R`` intermediate channels is amplified over
  30x, and fine-tuning steps act on the huge terms; or
- the relative error is worse than that of the best rank-``R`` truncation of the four exact
  constructions above (:func:`truncated_construction_error`): such a truncation is itself a
  rank-``R`` CP with orthogonal terms, so a fit that loses to it is a broken fit.

The message states the measured numbers; callers catch the error and fall back to another method.

With an input :class:`~compressor.decompose.whiten.Whitening` of the covariance ``S`` of the input
channels, the output error of a weight error ``dW`` is ``||dW S^(1/2)||`` over the input mode (taking
the ``kh*kw`` taps of a patch as uncorrelated), so the CP is fitted to ``W L`` (``S = L L^T``, any root
gives the same error) and its input factor is mapped back with ``L^(-1)``: ``first = first_whitened @ L^(-1)``.
"""

from __future__ import annotations

import math
import warnings

import tensorly as tl
import torch
from tensorly.decomposition import parafac

from compressor import threads
from compressor.decompose._checks import check_kernel, check_rank
from compressor.decompose.whiten import Whitening, whiten_input_mode

DEGENERACY_RATIO = 1e3
"""Largest allowed ``sum_r ||t_r||^2 / ||sum_r t_r||^2`` (see the module docstring)."""

N_ITER_MAX = 100
"""ALS sweeps at most; a 64x64x3x3 kernel at rank 32 takes a few tenths of a second."""

TOL = 1e-7
"""ALS stops when the relative error changes by less than this between sweeps."""

SEED = 0

Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class CPDegenerateError(ValueError):
    """The CP fit diverged into cancelling terms or broke down; use another method for this layer."""


def cp_full_rank(out_channels: int, in_channels: int, kh: int, kw: int) -> int:
    """Number of terms of the constructive exact CP (see the module docstring)."""
    return min(
        in_channels * kh * min(out_channels, kw),
        in_channels * kw * min(out_channels, kh),
        out_channels * kh * min(in_channels, kw),
        out_channels * kw * min(in_channels, kh),
    )


# (p, q, f1, f2) as mode indices of (out, in, kh, kw): fixed channel mode, fixed spatial mode, free
# channel mode, free spatial mode; in the order of cp_full_rank's terms.
_CONSTRUCTIONS = ((1, 2, 0, 3), (1, 3, 0, 2), (0, 2, 1, 3), (0, 3, 1, 2))


def _construction_size(shape: torch.Size, construction: tuple[int, int, int, int]) -> int:
    p, q, f1, f2 = construction
    return shape[p] * shape[q] * min(shape[f1], shape[f2])


def _exact(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Constructive exact CP of a float64 (out, in, kh, kw) tensor; mode factors (n_mode, R).

    Fixed modes ``p`` (a channel mode) and ``q`` (a spatial mode); the free modes ``f1`` (the other
    channel mode) and ``f2`` (the other spatial mode) carry the SVD of each ``F1 x F2`` slice.
    """
    sizes = tensor.shape
    # The first of the smallest, as cp_full_rank counts.
    p, q, f1, f2 = min(_CONSTRUCTIONS, key=lambda construction: _construction_size(sizes, construction))
    u, s, vh = torch.linalg.svd(tensor.permute(p, q, f1, f2), full_matrices=False)  # (P,Q,F1,k), (P,Q,k), (P,Q,k,F2)
    size_p, size_q, k = sizes[p], sizes[q], s.shape[-1]
    rank = size_p * size_q * k
    eye_p = torch.eye(size_p, dtype=tensor.dtype, device=tensor.device)
    eye_q = torch.eye(size_q, dtype=tensor.dtype, device=tensor.device)
    factors: list[torch.Tensor] = [torch.empty(0)] * 4
    # Term index r = (p_index * Q + q_index) * k + s_index.
    factors[p] = eye_p[:, :, None, None].expand(size_p, size_p, size_q, k).reshape(size_p, rank)
    factors[q] = eye_q[:, None, :, None].expand(size_q, size_p, size_q, k).reshape(size_q, rank)
    factors[f1] = (u * s[:, :, None, :]).permute(2, 0, 1, 3).reshape(sizes[f1], rank)
    factors[f2] = vh.permute(3, 0, 1, 2).reshape(sizes[f2], rank)
    return factors


def truncated_construction_error(tensor: torch.Tensor, rank: int) -> float:
    """Relative error of the best rank-``rank`` truncation of the four exact constructions.

    Each construction's terms are mutually orthogonal with norms the slices' singular values, so
    keeping the ``rank`` largest leaves the root of the sum of the other squared singular values. It
    is a well-conditioned rank-``rank`` CP (degeneracy ratio 1), hence a floor that a fit must beat.
    """
    return truncated_construction_errors(tensor, [rank])[0]


def truncated_construction_errors(tensor: torch.Tensor, ranks: list[int]) -> list[float]:
    """:func:`truncated_construction_error` at each of ``ranks``, from one set of slice SVDs."""
    tensor = tensor.detach().to(torch.float64)
    norm = tensor.norm().item()
    if norm == 0:
        return [0.0 for _ in ranks]
    best = [math.inf for _ in ranks]
    for p, q, f1, f2 in _CONSTRUCTIONS:
        energy = torch.linalg.svdvals(tensor.permute(p, q, f1, f2)).flatten().pow(2).sort(descending=True).values
        # tails[k] = sum of energy[k:], so the error at rank k reads off one reversed cumulative sum.
        tails = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
        for index, rank in enumerate(ranks):
            tail = tails[min(rank, energy.numel())].clamp_min(0).sqrt().item() / norm
            best[index] = min(best[index], tail)
    return best


def _als(tensor: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """tensorly ALS from the SVD initialization; mode factors (n_mode, R), float64 on the CPU."""
    with (
        threads.small_work(tensor.numel() * rank),
        warnings.catch_warnings(),
        tl.backend_context("pytorch", local_threadsafe=True),
    ):
        # Modes shorter than R (kh, kw) get seeded random columns; tensorly says so on every call.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        weights, factors = parafac(
            tensor, rank, n_iter_max=N_ITER_MAX, init="svd", tol=TOL, random_state=SEED, normalize_factors=False
        )
    factors = [f.clone() for f in factors]
    factors[0] = factors[0] * weights.reshape(1, -1)
    return factors


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give every column of every factor the fourth root of its term's norm (signs kept)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
    term = norms.prod(0)
    share = term.pow(1.0 / len(factors))
    alive = term > 0
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return [torch.where(alive, f / safe[m] * share, torch.zeros_like(f)) for m, f in enumerate(factors)]


def _reconstruct_modes(factors: list[torch.Tensor]) -> torch.Tensor:
    return torch.einsum("or,cr,ir,jr->ocij", *factors)


def degeneracy_ratio(
    first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor, last: torch.Tensor
) -> float:
    """``sum_r ||t_r||^2 / ||sum_r t_r||^2`` for the CP terms ``t_r`` (inf if the sum is zero)."""
    modes = [last.to(torch.float64)] + [f.to(torch.float64).T for f in (first, vertical, horizontal)]
    term_energy = torch.stack([f.norm(dim=0) for f in modes]).prod(0).pow(2).sum().item()
    total = _reconstruct_modes(modes).norm().item() ** 2
    if term_energy == 0:
        return 1.0
    return math.inf if total == 0 else term_energy / total


def check_degeneracy(
    target: torch.Tensor,
    first: torch.Tensor,
    vertical: torch.Tensor,
    horizontal: torch.Tensor,
    last: torch.Tensor,
    *,
    max_ratio: float = DEGENERACY_RATIO,
) -> tuple[float, float]:
    """Raise :class:`CPDegenerateError` if the CP of ``target`` is degenerate; else ``(ratio, error)``.

    Degenerate: a non-finite factor; a degeneracy ratio (:func:`degeneracy_ratio`) above
    ``max_ratio``; or a relative error ``||target - approx|| / ||target||`` above that of the
    rank-``R`` truncated construction (:func:`truncated_construction_error`, plus a 1e-9 slack).
    """
    factors = (first, vertical, horizontal, last)
    rank = first.shape[0]
    if not all(torch.isfinite(f).all() for f in factors):
        raise CPDegenerateError(f"CP factors at rank {rank} are not finite (NaN or inf): the ALS fit broke down")
    reference = target.detach().to(torch.float64)
    approx = cp_reconstruct(*(f.to(torch.float64) for f in factors))
    norm = reference.norm().item()
    error = (approx - reference).norm().item() / norm if norm > 0 else (0.0 if approx.norm() == 0 else math.inf)
    ratio = degeneracy_ratio(*factors)
    if ratio > max_ratio:
        raise CPDegenerateError(
            f"degenerate CP at rank {rank}: its rank-one terms cancel, the sum of their squared norms is "
            f"{ratio:.3g}x the squared norm of their sum (limit {max_ratio:.3g}); relative fit error {error:.4g}"
        )
    floor = truncated_construction_error(reference, rank)
    if error > floor + 1e-9:
        raise CPDegenerateError(
            f"CP fit at rank {rank} failed: relative error {error:.4g} is worse than {floor:.4g}, the error of "
            f"the rank-{rank} truncated exact construction (term energy ratio {ratio:.3g})"
        )
    return ratio, error


def cp(weight: torch.Tensor, rank: int, *, input_whitening: Whitening | None = None) -> Factors:
    """Return ``(first, vertical, horizontal, last)``: shapes (R, in), (R, kh), (R, kw), (out, R).

    ``W[o,c,i,j] ~= sum_r last[o,r] first[r,c] vertical[r,i] horizontal[r,j]``; exact at
    ``rank == cp_full_rank(...)`` (constructive, no ALS). ``input_whitening`` (size ``in``) makes the
    fit minimize the output error on its data instead of the weight error. Deterministic. Raises
    :class:`CPDegenerateError` if the ALS fit is degenerate (see :func:`check_degeneracy`).
    """
    check_kernel(weight)
    out_channels, in_channels, kh, kw = weight.shape
    full = cp_full_rank(out_channels, in_channels, kh, kw)
    check_rank(rank, full, "rank")
    if input_whitening is not None and input_whitening.size != in_channels:
        raise ValueError(f"Expected an input whitening of size in={in_channels}, got {input_whitening.size}")
    target = weight.detach().to(device="cpu", dtype=torch.float64)
    if input_whitening is not None:
        target = whiten_input_mode(target, input_whitening.root.to("cpu"))
    if target.norm() == 0:
        factors = [torch.zeros(n, rank, dtype=torch.float64) for n in target.shape]
    elif rank == full:
        factors = _balance(_exact(target))
    else:
        factors = _balance(_als(target, rank))
        check_degeneracy(target, factors[1].T, factors[2].T, factors[3].T, factors[0])
    if input_whitening is not None:
        factors[1] = (factors[1].T @ input_whitening.inverse.to("cpu")).T  # first = first_whitened @ inverse
        factors = _balance(factors)
    last, first_t, vertical_t, horizontal_t = factors
    return tuple(
        part.contiguous().to(dtype=weight.dtype, device=weight.device)
        for part in (first_t.T, vertical_t.T, horizontal_t.T, last)
    )


def cp_reconstruct(
    first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor, last: torch.Tensor
) -> torch.Tensor:
    """The dense (out, in, kh, kw) kernel of the four-factor chain, in the factors' dtype."""
    dense = torch.einsum(
        "or,rc,ri,rj->ocij",
        last.to(torch.float64),
        first.to(torch.float64),
        vertical.to(torch.float64),
        horizontal.to(torch.float64),
    )
    return dense.to(first.dtype)
