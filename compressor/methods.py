"""The rewrite methods: for each, its eligibility, full rank, cost model, factorization and layers.

A registry maps the recipe's method name to a :class:`Method`; the pass code never branches on
method names. Ranks are per method: the depth multiplier for ``depthwise_separable``, the number of
intermediate channels for ``spatial_separable`` and ``grouped`` (a multiple of ``groups``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from compressor import decompose, layers
from compressor.decompose.block_term import block_term_full_rank
from compressor.decompose.depthwise import depthwise_separable_full_rank
from compressor.decompose.spatial import spatial_separable_full_rank
from compressor.profile import CallShape

Factors = tuple[torch.Tensor, ...]


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

    def skip_reason(self, conv: nn.Conv2d) -> str | None:
        return layers.unsupported_reason(conv)

    def rank_step(self, groups: int) -> int:
        """Ranks must be multiples of this."""
        return 1

    @abstractmethod
    def full_rank(self, conv: nn.Conv2d, groups: int) -> int: ...

    @abstractmethod
    def macs(self, conv: nn.Conv2d, calls: Sequence[CallShape], rank: int, groups: int) -> int: ...

    @abstractmethod
    def params(self, conv: nn.Conv2d, rank: int, groups: int) -> int: ...

    @abstractmethod
    def decompose(self, weight: torch.Tensor, rank: int, groups: int) -> Factors: ...

    @abstractmethod
    def reconstruct(self, conv: nn.Conv2d, factors: Factors, groups: int) -> torch.Tensor: ...

    @abstractmethod
    def build(self, conv: nn.Conv2d, factors: Factors, groups: int) -> nn.Sequential: ...

    def _bias_params(self, conv: nn.Conv2d) -> int:
        return 0 if conv.bias is None else conv.out_channels


class DepthwiseSeparable(Method):
    name = "depthwise_separable"

    def full_rank(self, conv: nn.Conv2d, groups: int) -> int:
        return depthwise_separable_full_rank(conv.out_channels, *conv.kernel_size)

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        per_position = conv.in_channels * rank * (kh * kw + conv.out_channels)
        return sum(per_position * _area(call.output_hw) for call in calls)

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        return conv.in_channels * rank * (kh * kw + conv.out_channels) + self._bias_params(conv)

    def decompose(self, weight, rank, groups):
        return decompose.depthwise_separable(weight, rank)

    def reconstruct(self, conv, factors, groups):
        return decompose.depthwise_separable_reconstruct(*factors, conv.in_channels)

    def build(self, conv, factors, groups):
        return layers.build_depthwise_separable(conv, *factors)


class SpatialSeparable(Method):
    name = "spatial_separable"

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

    def decompose(self, weight, rank, groups):
        return decompose.spatial_separable(weight, rank)

    def reconstruct(self, conv, factors, groups):
        return decompose.spatial_separable_reconstruct(*factors)

    def build(self, conv, factors, groups):
        return layers.build_spatial_separable(conv, *factors)


class Grouped(Method):
    name = "grouped"

    def rank_step(self, groups):
        return groups

    def full_rank(self, conv, groups):
        return block_term_full_rank(conv.out_channels, conv.in_channels, *conv.kernel_size, groups)

    def macs(self, conv, calls, rank, groups):
        kh, kw = conv.kernel_size
        total = 0
        for call in calls:
            total += _area(call.input_hw) * conv.in_channels * rank
            total += _area(call.output_hw) * rank * (rank // groups * kh * kw + conv.out_channels)
        return total

    def params(self, conv, rank, groups):
        kh, kw = conv.kernel_size
        return rank * (conv.in_channels + rank // groups * kh * kw + conv.out_channels) + self._bias_params(conv)

    def decompose(self, weight, rank, groups):
        return decompose.block_term(weight, rank, groups)

    def reconstruct(self, conv, factors, groups):
        return decompose.block_term_reconstruct(*factors, groups)

    def build(self, conv, factors, groups):
        return layers.build_grouped(conv, *factors, groups)


METHODS: dict[str, Method] = {m.name: m for m in (DepthwiseSeparable(), SpatialSeparable(), Grouped())}
"""Every rewriting method by recipe name; ``keep`` is the absence of one."""


def factorize(method: Method, conv: nn.Conv2d, rank: int, groups: int) -> tuple[nn.Sequential, float]:
    """Decompose ``conv`` and build its stack; return it with the relative weight error."""
    weight = conv.weight.detach()
    factors = method.decompose(weight, rank, groups)
    approx = method.reconstruct(conv, factors, groups).to(torch.float64)
    reference = weight.to(torch.float64)
    error = (torch.linalg.norm(approx - reference) / torch.linalg.norm(reference).clamp_min(1e-30)).item()
    stack = method.build(conv, factors, groups)
    layers.check_stack(conv, stack)
    return stack, error
