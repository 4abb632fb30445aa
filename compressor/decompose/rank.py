"""Rank selection: how many components of a spectrum (or a matrix) to keep.

Four small pure functions, float64 throughout:

* :func:`energy_rank` keeps the leading singular values that hold a fraction of the energy
  (the squared Frobenius norm), the usual rule for SVD-type truncation.
* :func:`evbmf_rank` is the rank found by empirical variational Bayesian matrix factorization
  (EVBMF): Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed
  variational Bayesian matrix factorization", JMLR 14 (2013) 1-37, with the threshold of
  Nakajima, Sugiyama, Babacan, "Perfect dimensionality recovery by variational Bayesian PCA",
  NIPS 2012. Kim, Park, Yoo, Choi, Yang, Shin, "Compression of Deep Convolutional Neural Networks
  for Fast and Low Power Mobile Applications", ICLR 2016, pick their Tucker-2 ranks this way on the
  kernel's mode-0 and mode-1 unfoldings.
* :func:`guarded_rank` lifts a VBMF rank that collapsed (rank 0, or a handful of components out
  of hundreds: on trained weights the noise estimate can swallow most of the spectrum) to a floor,
  and says so.
* :func:`round_rank` aligns a rank to a hardware-friendly multiple.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch

# Relative slack on the energy target (of the total energy): cumulative sums carry rounding of a
# few ulps, and a fraction met exactly must not cost one more component.
ENERGY_RTOL = 1e-12

# guarded_rank's default floor: 1/8 of the full rank (at least 1).
DEFAULT_MINIMUM_FRACTION = 0.125

# EVBMF constant: tau-bar = 2.5129 sqrt(alpha) (Nakajima et al. 2012, eq. 14; the value the
# authors' MATLAB code and every port use).
_TAU_UBAR_COEFFICIENT = 2.5129


def energy_rank(singular_values: torch.Tensor, fraction: float) -> int:
    """Smallest ``r >= 1`` with ``sum(s[:r]**2) >= fraction * sum(s**2)``.

    ``singular_values`` is a 1-d tensor of non-negative values, sorted here (descending), so any
    order is accepted. ``fraction`` is in ``(0, 1]``. The comparison allows a relative slack of
    ``ENERGY_RTOL`` of the total energy, so a fraction reached exactly (up to rounding) does not
    take one component more.

    Special cases: all zeros returns 1 (a rank must be positive); with ``fraction == 1`` the answer
    is the number of nonzero singular values (trailing exact zeros carry no energy and are not
    kept), at least 1. The result never exceeds that count for any fraction.
    """
    if not isinstance(singular_values, torch.Tensor) or singular_values.dim() != 1 or singular_values.numel() == 0:
        shape = tuple(singular_values.shape) if isinstance(singular_values, torch.Tensor) else type(singular_values)
        raise ValueError(f"Expected a non-empty 1-d tensor of singular values, got {shape}")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"Expected an energy fraction in (0, 1], got {fraction!r}")
    s = singular_values.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        raise ValueError(f"Expected finite non-negative singular values, got min {s.min().item()!r}")
    s = torch.sort(s, descending=True).values
    nonzero = int((s > 0).sum())
    if nonzero == 0:
        return 1
    if fraction == 1.0:
        return nonzero
    energy = torch.cumsum(s * s, dim=0)
    total = energy[-1].item()
    target = fraction * total - ENERGY_RTOL * total
    rank = int(torch.searchsorted(energy, torch.tensor([target], dtype=torch.float64)).item()) + 1
    return max(1, min(rank, nonzero))


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    """Nakajima et al. 2012, eq. 15: the posterior SNR ``tau`` for a component of scaled energy ``x``."""
    return 0.5 * (x - (1.0 + alpha) + np.sqrt(np.maximum((x - (1.0 + alpha)) ** 2 - 4.0 * alpha, 0.0)))


def _evb_free_energy(
    log_sigma2: float, s: np.ndarray, rows: int, cols: int, residual: float, x_ubar: float
) -> float:
    """EVBMF free energy (up to constants) as a function of ``log(sigma2)``; JMLR 2013, eq. (38)-(39).

    Same terms as ``EVBsigma2`` in CasvandenBogaard/VBMF (see :func:`evbmf_rank`); components at or
    below ``x_ubar`` contribute ``x - log x``, those above it the EVB terms in ``tau``. ``x`` is
    floored at the smallest normal float so that exact zero singular values (a rank-deficient
    matrix) give a constant instead of ``+inf`` for every ``sigma2``.
    """
    sigma2 = math.exp(log_sigma2)
    count = s.shape[0]
    alpha = rows / cols
    x = s * s / (cols * sigma2)
    above = x[x > x_ubar]
    below = np.maximum(x[x <= x_ubar], np.finfo(np.float64).tiny)
    tau_above = _tau(above, alpha)
    value = (
        np.sum(below - np.log(below))
        + np.sum(above - tau_above)
        + np.sum(np.log((tau_above + 1.0) / above))
        + alpha * np.sum(np.log(tau_above / alpha + 1.0))
        + residual / (cols * sigma2)
        + (rows - count) * log_sigma2
    )
    return float(value)


def _estimate_sigma2(s: np.ndarray, rows: int, cols: int, x_ubar: float) -> float:
    """Noise variance minimizing the EVBMF free energy over the analytic interval (JMLR 2013, sec. 5)."""
    from scipy.optimize import minimize_scalar  # scipy ships with tensorly, a dependency

    count = s.shape[0]
    residual = 0.0  # all min(rows, cols) components are kept (H = L), as in the reference
    alpha = rows / cols
    e_h_ub = min(math.ceil(rows / (1.0 + alpha)) - 1, count) - 1
    energy = s * s
    upper = (float(np.sum(energy)) + residual) / (rows * cols)
    lower = max(energy[e_h_ub + 1] / (cols * x_ubar), float(np.mean(energy[e_h_ub + 1 :])) / cols)
    # Exact zeros in the tail would put the bound at 0 (log -inf); a floor far below any noise level.
    lower = max(lower, upper * np.finfo(np.float64).eps ** 2)
    if lower >= upper:
        return upper
    args = (s, rows, cols, residual, x_ubar)
    # The free energy is piecewise in sigma2 (components cross x_ubar) and not unimodal in general:
    # a coarse grid over log(sigma2) picks the basin, bounded Brent refines inside the best cell.
    grid = np.linspace(math.log(lower), math.log(upper), 65)
    values = [_evb_free_energy(g, *args) for g in grid]
    best = int(np.argmin(values))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    result = minimize_scalar(
        _evb_free_energy, args=args, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
    )
    log_sigma2 = float(result.x) if result.fun <= values[best] else float(grid[best])
    return math.exp(log_sigma2)


def evbmf_rank(matrix: torch.Tensor, sigma2: float | None = None) -> int:
    """Number of components that analytic EVBMF keeps for ``matrix`` (may be 0; see :func:`guarded_rank`).

    Ported from CasvandenBogaard/VBMF, ``VBMF.py::EVBMF`` (a Python port of Nakajima's MATLAB code;
    jacobgil/pytorch-tensor-decompositions vendors it, ``VBMF/VBMF.py``, to pick Kim et al.'s Tucker
    ranks), keeping only what
    decides the rank: the matrix is transposed so that ``L = rows <= M = cols`` (the reference
    requires that of its caller), ``H = L`` components, ``alpha = L/M``,
    ``tau_ubar = 2.5129 sqrt(alpha)``, and a component is kept when its singular value exceeds
    ``sqrt(M sigma2 (1 + tau_ubar)(1 + alpha/tau_ubar))`` (Nakajima et al. 2012, eq. 14).

    Without ``sigma2``, the noise variance minimizes the free energy on the reference's interval
    ``[max(s[k]^2/(M x_ubar), mean(s[k:]^2)/M), sum(s^2)/(LM)]``, ``k = ceil(L/(1+alpha)) - 1``.
    Two deliberate departures from the reference's ``minimize_scalar(..., method='Bounded')`` on
    ``sigma2`` itself: the search runs on ``log(sigma2)`` (the scipy default ``xatol=1e-5`` is
    absolute, wider than the whole interval for weights of size 1e-3, which made the reference's
    answer depend on the matrix's scale; EVBMF's rank is scale-invariant, this search is too), and a
    65-point grid chooses the basin before Brent refines it (the free energy is not unimodal, so a
    bracketing search alone can stop in a worse local minimum). Two guards the reference lacks:
    singular values below ``s_max * max(L, M) * eps`` (numpy's ``matrix_rank`` tolerance) count as
    exact zeros, so an exactly low-rank matrix gets its rank rather than a count of SVD round-off;
    and exact zeros are floored inside the free energy (where ``log 0`` made it ``+inf`` for every
    ``sigma2``). On the planted-rank tests both searches agree wherever the reference is reliable.

    ``sigma2`` (optional): the noise variance per entry, if known; skips the estimation.
    """
    if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2 or matrix.numel() == 0:
        shape = tuple(matrix.shape) if isinstance(matrix, torch.Tensor) else type(matrix)
        raise ValueError(f"Expected a non-empty 2-d matrix, got {shape}")
    if sigma2 is not None and (isinstance(sigma2, bool) or not math.isfinite(sigma2) or sigma2 <= 0):
        raise ValueError(f"Expected a positive finite noise variance sigma2 (or None), got {sigma2!r}")
    y = matrix.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(y).all()):
        raise ValueError("Expected a finite matrix, got NaN or inf entries")
    if y.shape[0] > y.shape[1]:
        y = y.T
    rows, cols = y.shape
    s = torch.linalg.svdvals(y).numpy()
    # Round-off level counts as exact zero (numpy.linalg.matrix_rank's tolerance).
    s = np.where(s > s[0] * max(rows, cols) * np.finfo(np.float64).eps, s, 0.0)
    if not np.any(s > 0):
        return 0
    alpha = rows / cols
    tau_ubar = _TAU_UBAR_COEFFICIENT * math.sqrt(alpha)
    x_ubar = (1.0 + tau_ubar) * (1.0 + alpha / tau_ubar)
    if sigma2 is None:
        sigma2 = _estimate_sigma2(s, rows, cols, x_ubar)
    threshold = math.sqrt(cols * sigma2 * x_ubar)
    return int(np.sum(s > threshold))


def _describe_fraction(value: float) -> str:
    approx = Fraction(value).limit_denominator(1000)
    return f"{approx.numerator}/{approx.denominator}" if approx.numerator == 1 else f"{value:g}"


def guarded_rank(
    raw: int, full: int, *, minimum_fraction: float = DEFAULT_MINIMUM_FRACTION
) -> tuple[int, str | None]:
    """Clamp an automatic (VBMF) rank into ``[floor, full]``; return ``(rank, note or None)``.

    The floor is ``max(1, ceil(minimum_fraction * full))`` (default 1/8 of the full rank): EVBMF on
    trained weights can call most of the spectrum noise and return 0 or 1, which would wreck the
    layer, and 1/8 is about the lowest rank the compression literature keeps on a conv. Any raw rank
    below the floor is lifted to it, one above ``full`` is lowered to ``full``; the note says which
    and why, e.g. ``"VBMF found rank 0 (noise dominates); using 1/8 of full rank 24 = 3"``.
    """
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"Expected a non-negative integer raw rank, got {raw!r}")
    if isinstance(full, bool) or not isinstance(full, int) or full < 1:
        raise ValueError(f"Expected a positive integer full rank, got {full!r}")
    if isinstance(minimum_fraction, bool) or not 0.0 < minimum_fraction <= 1.0:
        raise ValueError(f"Expected minimum_fraction in (0, 1], got {minimum_fraction!r}")
    floor = max(1, min(full, math.ceil(minimum_fraction * full - 1e-9)))
    if raw > full:
        return full, f"VBMF found rank {raw} above full rank {full}; using {full}"
    if raw >= floor:
        return raw, None
    why = "noise dominates" if raw == 0 else f"below the floor of {floor}"
    share = _describe_fraction(minimum_fraction)
    return floor, f"VBMF found rank {raw} ({why}); using {share} of full rank {full} = {floor}"


def round_rank(rank: int, multiple: int, full: int, step: int = 1) -> int:
    """Round ``rank`` to a multiple of both ``multiple`` and ``step`` (their lcm, ``unit``).

    Direction: to the nearest multiple of ``unit``, ties up; never below one ``unit`` (so never 0);
    then clamped to ``full`` rounded down to ``step`` (the full rank is always an acceptable
    rank, aligned or not, while a rank above it is not). When ``full < unit`` no aligned rank fits,
    and the answer is ``full`` rounded down to ``step``. ``step`` is a hard constraint (e.g. the
    number of groups of a block-term decomposition), ``multiple`` a preference: ``full < step`` is
    an error.
    """
    for value, what, least in ((rank, "rank", 0), (multiple, "multiple", 1), (full, "full rank", 1), (step, "step", 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            kind = "non-negative" if least == 0 else "positive"
            raise ValueError(f"Expected a {kind} integer {what}, got {value!r}")
    if full < step:
        raise ValueError(f"Expected full rank >= step {step}, got {full}")
    unit = math.lcm(multiple, step)
    ceiling = full // step * step
    if full < unit:
        return ceiling
    nearest = (2 * rank + unit) // (2 * unit) * unit  # floor(rank/unit + 1/2): nearest, ties up
    return min(max(nearest, unit), ceiling)
