"""The rewrite methods: for each, its eligibility, full rank, cost model, factorization and layers.

A registry maps the recipe's method name to a :class:`Method`; the pass code never branches on
method names. Ranks are per method: the depth multiplier for ``depthwise_separable``, the number of
intermediate channels for ``spatial_separable``, ``low_rank`` and ``grouped`` (a multiple of ``groups``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from compressor import decompose, layers
from compressor.estimate import tucker2_errors
from compressor.decompose.block_term import block_term_full_rank
from compressor.decompose.cp import cp_full_rank
from compressor.decompose.depthwise import depthwise_separable_full_rank, depthwise_separable_spectrum
from compressor.decompose.grouped_tucker import grouped_tucker2_full_rank
from compressor.decompose.low_rank import low_rank_full_rank, low_rank_spectrum, whitened_groups
from compressor.decompose.spatial import spatial_separable_full_rank, spatial_separable_spectrum
from compressor.decompose.whiten import Whitening, whiten_input_mode
from compressor.profile import CallShape

Factors = tuple[torch.Tensor, ...]

#: The input statistics a method's data-aware initialization whitens with (see calibrate.py):
#: per-input-channel (kh*kw) patch covariances, the (in*kh) covariance of vertical patches, the
#: (in*kh*kw) covariance of whole patches, or the (in x in) covariance of input channels.
STATISTICS = ("channel_patches", "column_patches", "patches", "channels")


def _area(hw: tuple[int, int]) -> int:
    return hw[0] * hw[1]


def conv_macs(conv: nn.Conv2d, calls: Sequence[CallShape]) -> int:
    kh, kw = conv.kernel_size
    per_position = (conv.in_channels // conv.groups) * conv.out_channels * kh * kw
    return sum(per_position * _area(call.output_hw) for call in calls)


def conv_params(conv: nn.Conv2d) -> int:
    return sum(p.numel() for p in conv.parameters())


class Method(ABC):
    """One way of rewriting a dense conv; exact at :meth:`full_rank`."""

    name: str
    statistic: str = "channels"

    def skip_reason(self, conv: nn.Conv2d) -> str | None:
        return layers.unsupported_reason(conv)

    def rank_step(self, groups: int) -> int:
        """Ranks must be multiples of this."""
        return 1

    def channels_per_rank(self, conv: nn.Conv2d) -> int:
        """Intermediate channels per unit of rank: what ``round_to`` (channel counts that are multiples
        of 8 or 16, for ONNX Runtime's NCHWc kernels) must make a multiple."""
        return 1

    @abstractmethod
    def full_rank(self, conv: nn.Conv2d, groups: int) -> int: ...

    @abstractmethod
    def macs(self, conv: nn.Conv2d, calls: Sequence[CallShape], rank: int, groups: int) -> int: ...

    @abstractmethod
    def params(self, conv: nn.Conv2d, rank: int, groups: int) -> int: ...

    @abstractmethod
    def decompose(self, weight: torch.Tensor, rank: int, groups: int, whitening: Whitening | None = None) -> Factors:
        """Factors of ``weight``; with ``whitening`` (of kind :attr:`statistic`) they target the output error."""

    def factors(self, conv: nn.Conv2d, rank: int, groups: int, whitening: Whitening | None = None) -> Factors:
        """:meth:`decompose` of ``conv``'s weight; a method whose factors depend on the conv's own
        groups (not only on its weight's shape) overrides this."""
        return self.decompose(conv.weight.detach(), rank, groups, whitening)

    def whitened_weight(self, weight: torch.Tensor, whitening: Whitening | None) -> torch.Tensor:
        """``weight`` in float64 with this method's whitening applied, so that norms of differences
        are (approximately) output errors on the calibration data."""
        weight = weight.detach().to(torch.float64)
        if whitening is None:
            return weight
        return whiten_input_mode(weight, whitening.root)

    def spectrum(self, weight: torch.Tensor, groups: int, whitening: Whitening | None) -> torch.Tensor | None:
        """Singular values whose tail, squared, is the (whitened) error at each rank; ``None`` when
        the method has no closed form and errors must be measured by decomposing."""
        return None

    def predicted_errors(
        self, conv: nn.Conv2d, ranks: Sequence[int], groups: int, whitening: Whitening | None
    ) -> list[float]:
        """Relative (whitened) error ``||(W - W_r) S^(1/2)|| / ||W S^(1/2)||`` for each rank."""
        weight = conv.weight.detach()
        spectrum = self.spectrum(weight, groups, whitening)
        if spectrum is not None:
            energy = spectrum.to(torch.float64) ** 2
            total = float(energy.sum().clamp_min(1e-300))
            return [float(energy[..., rank:].sum()) ** 0.5 / total**0.5 for rank in ranks]
        reference = self.whitened_weight(weight, whitening)
        scale = float(torch.linalg.norm(reference).clamp_min(1e-300))
        errors = []
        for rank in ranks:
            approx = self.reconstruct(conv, self.factors(conv, rank, groups, whitening), groups)
            errors.append(float(torch.linalg.norm(self.whitened_weight(approx, whitening) - reference)) / scale)
        return errors

    @abstractmethod
    def reconstruct(self, conv: nn.Conv2d, factors: Factors, groups: int) -> torch.Tensor: ...

    @abstractmethod
    def build(self, conv: nn.Conv2d, factors: Factors, groups: int) -> nn.Sequential: ...

    def _bias_params(self, conv: nn.Conv2d) -> int:
        return 0 if conv.bias is None else conv.out_channels


class DepthwiseSeparable(Method):
    name = "depthwise_separable"
    statistic = "channel_patches"

    def full_rank(self, conv: nn.Conv2d, groups: int) -> int:
        return depthwise_separable_full_rank(conv.out_channels, *conv.kernel_size)

    def channels_per_rank(self, conv: nn.Conv2d) -> int:
        return conv.in_channels  # the depthwise conv has in_channels x depth multiplier outputs

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        per_position = conv.in_channels * rank * (kh * kw + conv.out_channels)
        return sum(per_position * _area(call.output_hw) for call in calls)

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        return conv.in_channels * rank * (kh * kw + conv.out_channels) + self._bias_params(conv)

    def decompose(self, weight, rank, groups, whitening=None):
        return decompose.depthwise_separable(weight, rank, whitening=whitening)

    def spectrum(self, weight, groups, whitening):
        return depthwise_separable_spectrum(weight, whitening)

    def reconstruct(self, conv, factors, groups):
        return decompose.depthwise_separable_reconstruct(*factors, conv.in_channels)

    def build(self, conv, factors, groups):
        return layers.build_depthwise_separable(conv, *factors)


class SpatialSeparable(Method):
    name = "spatial_separable"
    statistic = "column_patches"

    def skip_reason(self, conv):
        if conv.kernel_size == (1, 1):
            return "1x1 kernel; nothing to separate spatially"
        return super().skip_reason(conv)

    def full_rank(self, conv, groups):
        return spatial_separable_full_rank(conv.out_channels, conv.in_channels, *conv.kernel_size)

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        total = 0
        for call in calls:
            # The vertical factor keeps the input width: stride, padding, dilation along W are the second factor's.
            intermediate = call.output_hw[0] * call.input_hw[1]
            total += intermediate * rank * conv.in_channels * kh + _area(call.output_hw) * conv.out_channels * rank * kw
        return total

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        return rank * (conv.in_channels * kh + conv.out_channels * kw) + self._bias_params(conv)

    def decompose(self, weight, rank, groups, whitening=None):
        return decompose.spatial_separable(weight, rank, whitening=whitening)

    def spectrum(self, weight, groups, whitening):
        return spatial_separable_spectrum(weight, whitening)

    def reconstruct(self, conv, factors, groups):
        return decompose.spatial_separable_reconstruct(*factors)

    def build(self, conv, factors, groups):
        return layers.build_spatial_separable(conv, *factors)


class LowRank(Method):
    """Zhang et al. 2016 channel decomposition: kxk conv in -> R, then 1x1 R -> out (both dense).

    Grouped convs keep their groups in both factors; the rank counts per group (the intermediate
    width is ``groups x rank``). Depthwise convs (one input channel per group) are left alone.
    """

    name = "low_rank"
    statistic = "patches"

    def skip_reason(self, conv):
        return layers.unsupported_reason(conv, grouped=True)

    def channels_per_rank(self, conv):
        return conv.groups

    def full_rank(self, conv, groups):
        return low_rank_full_rank(conv.out_channels, conv.in_channels, *conv.kernel_size, conv.groups)

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        per_position = rank * (conv.in_channels * kh * kw + conv.out_channels)  # per group, summed over groups
        return sum(per_position * _area(call.output_hw) for call in calls)

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        return rank * (conv.in_channels * kh * kw + conv.out_channels) + self._bias_params(conv)

    def whitened_weight(self, weight, whitening):
        weight = weight.detach().to(torch.float64)
        if whitening is None:
            return weight
        groups = whitening.root.shape[0] if whitening.root.dim() == 3 else 1  # batched per group
        return whitened_groups(weight, groups, whitening).reshape(weight.shape)

    # ``groups`` is the conv's own: the match step sets a grouped conv's plan groups to its conv's.
    def decompose(self, weight, rank, groups, whitening=None):
        return decompose.low_rank(weight, rank, groups=groups, whitening=whitening)

    def spectrum(self, weight, groups, whitening):
        return low_rank_spectrum(weight, whitening, groups)

    def reconstruct(self, conv, factors, groups):
        return decompose.low_rank_reconstruct(*factors, conv.groups)

    def build(self, conv, factors, groups):
        return layers.build_low_rank(conv, *factors)


class Grouped(Method):
    """Block-term (Tucker-2 with ``groups: 1``) on a dense conv; on a grouped conv, one Tucker-2 per
    conv group (:mod:`compressor.decompose.grouped_tucker`), every factor keeping the conv's groups
    (the plan's ``groups`` is then the conv's). Depthwise convs are left alone."""

    name = "grouped"

    def skip_reason(self, conv):
        return layers.unsupported_reason(conv, grouped=True)

    def rank_step(self, groups):
        return groups

    def full_rank(self, conv, groups):
        if conv.groups > 1:
            return grouped_tucker2_full_rank(conv.out_channels, conv.in_channels, *conv.kernel_size, conv.groups)
        return block_term_full_rank(conv.out_channels, conv.in_channels, *conv.kernel_size, groups)

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        # A grouped conv's 1x1 factors are grouped too: each output channel reads 1/G of its inputs.
        reduce_in, expand_in = (conv.in_channels // conv.groups, rank // groups) if conv.groups > 1 else (conv.in_channels, rank)
        total = 0
        for call in calls:
            total += _area(call.input_hw) * reduce_in * rank
            total += _area(call.output_hw) * (rank * rank // groups * kh * kw + conv.out_channels * expand_in)
        return total

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        reduce_in, expand_in = (conv.in_channels // conv.groups, rank // groups) if conv.groups > 1 else (conv.in_channels, rank)
        return rank * reduce_in + rank * rank // groups * kh * kw + conv.out_channels * expand_in + self._bias_params(conv)

    def whitened_weight(self, weight, whitening):
        if whitening is None or whitening.root.dim() == 2:
            return super().whitened_weight(weight, whitening)
        weight = weight.detach().to(torch.float64)
        rows = weight.shape[0] // whitening.root.shape[0]  # batched per conv group
        return torch.cat([whiten_input_mode(weight[g * rows:(g + 1) * rows], root) for g, root in enumerate(whitening.root)])

    def predicted_errors(self, conv, ranks, groups, whitening):
        if conv.groups == 1:
            return super().predicted_errors(conv, ranks, groups, whitening)
        # Groups are independent: squared errors add, and each group's comes from its truncated HOSVD.
        weight = self.whitened_weight(conv.weight, whitening)
        rows = weight.shape[0] // conv.groups
        blocks = [weight[g * rows:(g + 1) * rows] for g in range(conv.groups)]
        energies = [float((block**2).sum()) for block in blocks]
        total = max(sum(energies), 1e-300)
        per_group = [tucker2_errors(block, [rank // conv.groups for rank in ranks]) for block in blocks]
        return [
            (sum(energy * errors[i] ** 2 for energy, errors in zip(energies, per_group)) / total) ** 0.5
            for i in range(len(ranks))
        ]

    def decompose(self, weight, rank, groups, whitening=None):
        return decompose.block_term(weight, rank, groups, input_whitening=whitening)

    def factors(self, conv, rank, groups, whitening=None):
        if conv.groups > 1:
            return decompose.grouped_tucker2(conv.weight.detach(), rank, conv.groups, whitening=whitening)
        return super().factors(conv, rank, groups, whitening)

    def reconstruct(self, conv, factors, groups):
        if conv.groups > 1:
            return decompose.grouped_tucker2_reconstruct(*factors, conv.groups)
        return decompose.block_term_reconstruct(*factors, groups)

    def build(self, conv, factors, groups):
        return layers.build_grouped(conv, *factors, groups)


class CP(Method):
    """Lebedev et al. 2015: 1x1 (in -> R), (kh x 1) and (1 x kw) depthwise, 1x1 (R -> out).

    ``decompose`` raises :class:`~compressor.decompose.cp.CPDegenerateError` (a ``ValueError``)
    when the fit is degenerate; the caller falls back to another method.
    """

    name = "cp"
    statistic = "channels"  # the (in x in) input-channel covariance whitens the first factor's mode

    def skip_reason(self, conv):
        if conv.kernel_size == (1, 1):
            return "1x1 kernel; CP would only split a 1x1 conv into two 1x1 convs"
        return super().skip_reason(conv)

    def full_rank(self, conv, groups):
        return cp_full_rank(conv.out_channels, conv.in_channels, *conv.kernel_size)

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        total = 0
        for call in calls:
            # The vertical depthwise keeps the input width: stride, padding, dilation along W are the horizontal one's.
            intermediate = call.output_hw[0] * call.input_hw[1]
            total += _area(call.input_hw) * conv.in_channels * rank
            total += intermediate * rank * kh
            total += _area(call.output_hw) * rank * (kw + conv.out_channels)
        return total

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        return rank * (conv.in_channels + kh + kw + conv.out_channels) + self._bias_params(conv)

    def decompose(self, weight, rank, groups, whitening=None, *, input_whitening=None):
        """``whitening`` (positional, as for the other methods) and ``input_whitening`` are the same thing."""
        if whitening is not None and input_whitening is not None:
            raise ValueError("Expected at most one of whitening and input_whitening")
        return decompose.cp(weight, rank, input_whitening=input_whitening if whitening is None else whitening)

    def reconstruct(self, conv, factors, groups):
        return decompose.cp_reconstruct(*factors)

    def build(self, conv, factors, groups):
        return layers.build_cp(conv, *factors)


METHODS: dict[str, Method] = {m.name: m for m in (DepthwiseSeparable(), SpatialSeparable(), LowRank(), Grouped(), CP())}
"""Every rewriting method by recipe name; ``keep`` is the absence of one."""


def factorize(
    method: Method, conv: nn.Conv2d, rank: int, groups: int, whitening: Whitening | None = None
) -> tuple[nn.Sequential, float]:
    """Decompose ``conv`` and build its stack; return it with the relative (unwhitened) weight error."""
    weight = conv.weight.detach()
    factors = method.factors(conv, rank, groups, whitening)
    approx = method.reconstruct(conv, factors, groups).to(torch.float64)
    reference = weight.to(torch.float64)
    error = (torch.linalg.norm(approx - reference) / torch.linalg.norm(reference).clamp_min(1e-30)).item()
    stack = method.build(conv, factors, groups)
    layers.check_stack(conv, stack)
    return stack, error
