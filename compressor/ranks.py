"""Turn a rule's rank (int, full, {macs}, {params}, {energy}, vbmf; round_to) into one validated rank.

Cost forms pick the largest allowed rank under the layer's budget; spectral forms read the
(whitened, when calibration statistics exist) singular values, so with data they measure what the
layer's *outputs* keep rather than what its weights keep.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from compressor.decompose.low_rank import whitened_groups
from compressor.decompose.rank import energy_rank, evbmf_rank, guarded_rank, round_rank
from compressor.decompose.spatial import whitened_unfolding
from compressor.decompose.whiten import Whitening
from compressor.errors import RankError
from compressor.methods import Method, conv_macs, conv_params
from compressor.profile import CallShape


def rank_multiple(method: Method, conv: nn.Conv2d, groups: int, round_to: int | None) -> int:
    """Every rank the rule may produce is a multiple of this: of the method's step, and such that the
    intermediate channel count (rank x :meth:`~compressor.methods.Method.channels_per_rank`) is a
    multiple of ``round_to``. A depthwise-separable layer with 16 input channels and ``round_to: 8``
    may use any depth multiplier; with 3 input channels, multipliers of 8."""
    step = method.rank_step(groups)
    if round_to is None:
        return step
    return math.lcm(step, round_to // math.gcd(round_to, method.channels_per_rank(conv)))


def allowed_ranks(
    method: Method, conv: nn.Conv2d, groups: int, round_to: int | None, round_small: bool = False
) -> list[int]:
    """Ascending ranks that are multiples of :func:`rank_multiple`, plus full rank if it is not one.

    ``round_small`` (``round_to: auto``) also allows every rank below the first multiple: a layer too
    small, or a budget too tight, for one whole block still gets a rank.
    """
    full = method.full_rank(conv, groups)
    multiple = rank_multiple(method, conv, groups, round_to)
    step = method.rank_step(groups)
    below = list(range(step, min(multiple, full + 1), step)) if round_small else []
    ranks = below + list(range(multiple, full + 1, multiple))
    if not ranks or ranks[-1] != full:
        ranks.append(full)
    return ranks


def describe_layer(method: Method, conv: nn.Conv2d, name: str) -> str:
    kh, kw = conv.kernel_size
    return f"layer {name} ({method.name}, kernel {kh}x{kw}, {conv.in_channels}->{conv.out_channels})"


def _cost(metric: str, method: Method, conv: nn.Conv2d, calls: Sequence[CallShape], rank: int, groups: int) -> int:
    return method.macs(conv, calls, rank, groups) if metric == "macs" else method.params(conv, rank, groups)


def _largest_under_budget(
    method: Method, conv: nn.Conv2d, calls: Sequence[CallShape], metric: str, fraction: float, groups: int,
    round_to: int | None, name: str, round_small: bool = False,
) -> int:
    original = conv_macs(conv, calls) if metric == "macs" else conv_params(conv)
    budget = fraction * original
    ranks = allowed_ranks(method, conv, groups, round_to, round_small)
    fitting = [rank for rank in ranks if _cost(metric, method, conv, calls, rank, groups) <= budget]
    if fitting:
        return fitting[-1]
    smallest = _cost(metric, method, conv, calls, ranks[0], groups)
    raise RankError(
        f"{describe_layer(method, conv, name)}: {{{metric}: {fraction}}} allows {int(budget)} {metric.upper() if metric == 'macs' else metric} "
        f"but the smallest rank ({ranks[0]}) costs {smallest}; raise the budget or add an earlier rule that keeps this layer"
    )


def _mode_matrices(method: Method, conv: nn.Conv2d, whitening: Whitening | None) -> list[torch.Tensor]:
    """Unfoldings whose ranks bound the method's rank: the channel modes of the (whitened) kernel,
    of each group's kernel for a grouped conv (whose rank counts per group, see :func:`_per_group`)."""
    weight = method.whitened_weight(conv.weight, whitening if method.statistic == "channels" else None)
    rows = weight.shape[0] // conv.groups
    matrices = []
    for block in weight.split(rows):
        out_channels, in_channels = block.shape[:2]
        matrices += [block.reshape(out_channels, -1), block.transpose(0, 1).reshape(in_channels, -1)]
    return matrices


def _per_group(method: Method, conv: nn.Conv2d, rank: int) -> int:
    """A Tucker-2 rank read from one group's unfoldings, as the total over a grouped conv's groups."""
    return rank * conv.groups


def _energy(method: Method, conv: nn.Conv2d, fraction: float, groups: int, whitening: Whitening | None) -> int:
    spectrum = method.spectrum(conv.weight.detach(), groups, whitening)
    if spectrum is not None:
        if spectrum.dim() == 2:
            # One depth multiplier for all channels: rank m keeps the m-th singular value of each.
            spectrum = (spectrum.to(torch.float64) ** 2).sum(0).sqrt()
        return energy_rank(spectrum, fraction)
    return _per_group(method, conv, max(energy_rank(torch.linalg.svdvals(matrix), fraction) for matrix in _mode_matrices(method, conv, whitening)))


def _vbmf(method: Method, conv: nn.Conv2d, groups: int, whitening: Whitening | None) -> int:
    if method.statistic == "patches":
        # low_rank: its rank is exactly that of each group's (whitened) out x (in*kh*kw) kernel matrix.
        return max(evbmf_rank(matrix) for matrix in whitened_groups(conv.weight, groups, whitening))
    if method.statistic == "channel_patches":
        # Depthwise: the slices of all channels stacked share one (kh*kw)-dimensional filter space.
        # (A grouped low_rank spectrum is 2-d too, but its groups have filter spaces of their own.)
        weight = conv.weight.detach().to(torch.float64)
        out_channels, in_channels, kh, kw = weight.shape
        slices = weight.permute(1, 0, 2, 3).reshape(in_channels, out_channels, kh * kw)
        if whitening is not None:
            slices = slices @ whitening.root
        return evbmf_rank(slices.reshape(in_channels * out_channels, kh * kw))
    if method.statistic == "column_patches":
        return evbmf_rank(whitened_unfolding(conv.weight, whitening))
    # Tucker-style ranks from both channel-mode unfoldings (Kim et al. 2016).
    return _per_group(method, conv, max(evbmf_rank(matrix) for matrix in _mode_matrices(method, conv, whitening)))


def resolve_rank(
    method: Method,
    conv: nn.Conv2d,
    calls: Sequence[CallShape],
    spec,
    groups: int,
    name: str,
    *,
    round_to: int | None = None,
    round_small: bool = False,
    whitening: Whitening | None = None,
) -> tuple[int, str | None]:
    """The rank for ``spec`` and a note when it was adjusted (VBMF collapse); raises ``RankError``."""
    full = method.full_rank(conv, groups)
    step = method.rank_step(groups)
    what = describe_layer(method, conv, name)
    if spec is None or spec == "full":
        return full, None
    if isinstance(spec, int):
        if spec > full:
            raise RankError(f"{what}: rank {spec} is above its full rank {full} (the maximum for this layer)")
        if spec % step:
            raise RankError(f"{what}: rank {spec} is not divisible by groups={groups}")
        return spec, None
    if hasattr(spec, "macs") or hasattr(spec, "params"):
        metric = "macs" if hasattr(spec, "macs") else "params"
        fraction = getattr(spec, metric)
        return _largest_under_budget(method, conv, calls, metric, fraction, groups, round_to, name, round_small), None
    note = None
    if hasattr(spec, "energy"):
        raw = _energy(method, conv, spec.energy, groups, whitening)
    elif spec == "vbmf":
        raw, note = guarded_rank(_vbmf(method, conv, groups, whitening), full)
    else:  # the recipe schema makes this unreachable
        raise RankError(f"{what}: unsupported rank {spec!r}")
    multiple = rank_multiple(method, conv, groups, round_to)
    if round_small and raw < multiple:
        multiple = 1  # below one block, the rank the spectrum asked for
    return round_rank(max(raw, 1), multiple, full, step), note
