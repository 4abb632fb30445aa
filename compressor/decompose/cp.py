"""CP (canonical polyadic) factorization of a conv kernel into four one-mode factors.

Lebedev, Ganin, Rakhuba, Oseledets, Lempitsky. "Speeding-up Convolutional Neural Networks Using
Fine-tuned CP-Decomposition", ICLR 2015: a rank-``R`` CP of the (out, in, kh, kw) kernel,
``W[o,c,i,j] ~= sum_r last[o,r] first[r,c] vertical[r,i] horizontal[r,j]``, is a 1x1 conv
(in -> R), a (kh x 1) depthwise conv, a (1 x kw) depthwise conv and a 1x1 conv (R -> out).

Algorithm: alternating least squares (ALS, Kolda & Bader, "Tensor Decompositions and
Applications", SIAM Review 2009, section 3.4) in float64 from the SVD start (each mode's leading
left singular vectors, seeded random columns where a mode is shorter than ``R``). A sweep never
forms a Khatri-Rao product: its cost is two matmuls with the kernel, ``2 * numel * R``
multiply-adds, so ResNet-50's 512x512x3x3 kernels at R=763 take about 0.15 s a sweep on two cores
(tensorly's generic ``parafac``, used before, formed a (512*512*3) x 763 Khatri-Rao product per
mode and ran over 12 minutes on one such model). The scale of every rank-one term is split evenly
across its four factor columns after each sweep (each gets the fourth root of the term's norm), so
no factor is huge while another is tiny.

Where the fit from the SVD start fails the checks below, ALS runs again from the best rank-``R``
truncation of the exact constructions (a warm start at the error floor, from which each sweep can
only go down; a random 8x6x3x3 kernel at rank 53 of 54: cancelling terms from the SVD start, an
exact fit with degeneracy ratio 1.01 from the construction). It is not the first choice because,
measured on the shared ResNet-32 with every body conv CP at 1/3 of its MACs and whitened by
calibration data, it ends worse: mean refitted output error 0.481 against 0.476 after 200 sweeps
(held-out accuracy -6.70 against -6.52 pt), and 0.485 against 0.468 after 1000.

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
  grows into the thousands only where ALS fits with cancelling terms (tensorly's ALS from its SVD
  start on a random 12x10x3x3 kernel at rank 89, one below full: ratio ~5.6e3). Above 1e3 the sum
  is over 30x smaller in norm than the terms it adds up: float32 rounding in the ``R``
  intermediate channels is amplified over 30x, and fine-tuning steps act on the huge terms; or
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

import torch

from compressor import threads
from compressor.decompose._checks import check_kernel, check_rank
from compressor.decompose.whiten import Whitening, whiten_input_mode

SEED = 0
"""Seeds the SVD start's random columns (modes shorter than ``R``), so a fit is deterministic."""

DEGENERACY_RATIO = 1e3
"""Largest allowed ``sum_r ||t_r||^2 / ||sum_r t_r||^2`` (see the module docstring)."""

N_ITER_MAX = 200
"""ALS sweeps at most. Measured on ResNet-32's trained 3x3 kernels at 1/3- and 1/2-MACs ranks from
the SVD start, the error after 100 / 200 sweeps is a median 4.3% / 2.2% above that after 400 (worst
10% / 5%): ALS on trained kernels keeps creeping down. A sweep of a 512x512x3x3 kernel at R=763
takes ~0.15 s, so 200 sweeps of ResNet-50's three such kernels cost about 90 s."""

TOL = 1e-4
"""ALS stops when a sweep lowers the relative error by less than this fraction. Measured with a
400-sweep cap: trained kernels seldom stop early (median stop at sweep 254, 0.7% above the 400-sweep
error), so they mostly run to :data:`N_ITER_MAX`; a random 512x512x3x3 kernel at R=763 (SVD start)
stops after 105 sweeps (16 s) at 0.6587, 0.6% above the 0.6550 a 10x smaller tolerance reaches at
the 200-sweep cap (30 s)."""

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


def _construction(
    tensor: torch.Tensor, construction: tuple[int, int, int, int]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """One constructive exact CP of a float64 (out, in, kh, kw) tensor: mode factors (n_mode, K), term norms (K,).

    Fixed modes ``p`` (a channel mode) and ``q`` (a spatial mode); the free modes ``f1`` (the other
    channel mode) and ``f2`` (the other spatial mode) carry the SVD of each ``F1 x F2`` slice. Only
    the ``f1`` factor carries scale, so the term norms are the slices' singular values.
    """
    sizes = tensor.shape
    p, q, f1, f2 = construction
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
    return factors, s.reshape(rank)


def _exact(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The smallest constructive exact CP (the first of the smallest, as cp_full_rank counts)."""
    construction = min(_CONSTRUCTIONS, key=lambda choice: _construction_size(tensor.shape, choice))
    return _construction(tensor, construction)[0]


def _tails(tensor: torch.Tensor, construction: tuple[int, int, int, int]) -> torch.Tensor:
    """``tails[k]``: the squared error of keeping the ``k`` largest terms of one construction (K+1,)."""
    p, q, f1, f2 = construction
    energy = torch.linalg.svdvals(tensor.permute(p, q, f1, f2)).flatten().pow(2).sort(descending=True).values
    # The error at every k reads off one reversed cumulative sum.
    return torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)]).clamp_min(0)


def _truncated_construction(tensor: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """The best rank-``rank`` truncation of the four exact constructions (orthogonal terms)."""
    construction = min(_CONSTRUCTIONS, key=lambda choice: _tails(tensor, choice)[rank].item())
    factors, norms = _construction(tensor, construction)
    kept = norms.argsort(descending=True)[:rank]
    return [f[:, kept] for f in factors]


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
    for construction in _CONSTRUCTIONS:
        tails = _tails(tensor, construction)
        for index, rank in enumerate(ranks):
            tail = tails[min(rank, tails.numel() - 1)].sqrt().item() / norm
            best[index] = min(best[index], tail)
    return best


def _svd_start(tensor: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """Each mode's leading left singular vectors of its unfolding; seeded random columns past them."""
    generator = torch.Generator().manual_seed(SEED)
    factors = []
    for mode, size in enumerate(tensor.shape):
        vectors = torch.linalg.svd(tensor.movedim(mode, 0).reshape(size, -1), full_matrices=False)[0][:, :rank]
        missing = rank - vectors.shape[1]
        if missing > 0:
            vectors = torch.cat([vectors, torch.randn(size, missing, generator=generator, dtype=tensor.dtype)], 1)
        factors.append(vectors)
    return factors


def _solve_normal(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``rhs @ gram^-1`` for a symmetric PSD ``gram``; least squares where it is singular."""
    root, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0:
        return torch.cholesky_solve(rhs.T, root).T
    return torch.linalg.lstsq(gram, rhs.T).solution.T


def _als(tensor: torch.Tensor, rank: int, start: list[torch.Tensor]) -> list[torch.Tensor]:
    """ALS from the mode factors ``start``; mode factors (n_mode, R), float64 on the CPU.

    Each sweep solves the four modes' least-squares problems in turn (out, in, kh, kw). The two
    products with the whole kernel (``numel * R`` multiply-adds each) are plain matmuls, and the
    Khatri-Rao products are never formed: the channel modes share the contraction of the spatial
    modes, the spatial modes the contraction of both channel modes. The fit error is read from the
    Gram matrices, so a sweep costs no reconstruction.
    """
    out_channels, in_channels, kh, kw = tensor.shape
    taps = kh * kw
    last, first, vertical, horizontal = start
    by_tap = tensor.reshape(out_channels, in_channels, taps).transpose(1, 2).contiguous()  # (out, taps, in)
    flat = tensor.reshape(out_channels, in_channels * taps)
    energy = tensor.pow(2).sum().item()
    previous = math.inf
    with threads.small_work(tensor.numel() * rank):
        for _ in range(N_ITER_MAX):
            spatial = (vertical[:, None, :] * horizontal[None, :, :]).reshape(taps, rank)
            gram_vertical, gram_horizontal = vertical.T @ vertical, horizontal.T @ horizontal
            gram_first = first.T @ first
            last = _solve_normal(gram_first * gram_vertical * gram_horizontal, ((by_tap @ first) * spatial).sum(1))
            gram_last = last.T @ last
            projected = (last.T @ flat).reshape(rank, in_channels, taps)  # the out mode contracted with last
            first_rhs = torch.einsum("rcs,sr->cr", projected, spatial)
            first = _solve_normal(gram_last * gram_vertical * gram_horizontal, first_rhs)
            gram_first = first.T @ first
            taps_rhs = torch.einsum("rcs,cr->rs", projected, first).reshape(rank, kh, kw)
            channels = gram_last * gram_first
            vertical = _solve_normal(channels * gram_horizontal, torch.einsum("rij,jr->ir", taps_rhs, horizontal))
            gram_vertical = vertical.T @ vertical
            horizontal_rhs = torch.einsum("rij,ir->jr", taps_rhs, vertical)
            horizontal = _solve_normal(channels * gram_vertical, horizontal_rhs)
            # ||T - approx||^2 = ||T||^2 - 2 <T, approx> + ||approx||^2, all from what the sweep has.
            inner = (horizontal_rhs * horizontal).sum().item()
            fit = (channels * gram_vertical * (horizontal.T @ horizontal)).sum().item()
            error = math.sqrt(max(energy - 2 * inner + fit, 0.0) / energy)
            last, first, vertical, horizontal = _balance([last, first, vertical, horizontal])
            if previous - error < TOL * previous:
                break
            previous = error
    return [last, first, vertical, horizontal]


def _balance(factors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give every column of every factor the fourth root of its term's norm (signs kept)."""
    norms = torch.stack([f.norm(dim=0) for f in factors])  # (4, R)
    term = norms.prod(0)
    share = term.pow(1.0 / len(factors))
    alive = term > 0
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    return [torch.where(alive, f / safe[m] * share, torch.zeros_like(f)) for m, f in enumerate(factors)]


def _modes(
    first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor, last: torch.Tensor
) -> list[torch.Tensor]:
    """The chain's factors as float64 mode factors (n_mode, R) in (out, in, kh, kw) order."""
    return [last.to(torch.float64)] + [f.to(torch.float64).T for f in (first, vertical, horizontal)]


def _reconstruct_modes(factors: list[torch.Tensor]) -> torch.Tensor:
    """The (out, in, kh, kw) sum of the terms of mode factors (n_mode, R), as one matmul.

    The rank-one terms of the three input-side modes are formed first ((in * kh * kw) x R): a
    four-operand einsum contracts pairwise and its first product, (out, in, R), took 6.5 GB on a
    512x512x3x3 kernel at R=752.
    """
    last, first, vertical, horizontal = factors
    rank = last.shape[1]
    terms = first[:, None, None, :] * vertical[None, :, None, :] * horizontal[None, None, :, :]
    return (last @ terms.reshape(-1, rank).T).reshape(last.shape[0], *terms.shape[:3])


def degeneracy_ratio(
    first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor, last: torch.Tensor
) -> float:
    """``sum_r ||t_r||^2 / ||sum_r t_r||^2`` for the CP terms ``t_r`` (inf if the sum is zero)."""
    modes = _modes(first, vertical, horizontal, last)
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


def _fit(target: torch.Tensor, rank: int) -> list[torch.Tensor]:
    """ALS from the SVD start, or from the truncated construction where that fit fails the checks."""

    def checked(start: list[torch.Tensor]) -> list[torch.Tensor]:
        factors = _balance(_als(target, rank, start))
        check_degeneracy(target, factors[1].T, factors[2].T, factors[3].T, factors[0])
        return factors

    try:
        return checked(_svd_start(target, rank))
    except CPDegenerateError:
        return checked(_truncated_construction(target, rank))


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
        factors = _fit(target, rank)
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
    return _reconstruct_modes(_modes(first, vertical, horizontal, last)).to(first.dtype)
