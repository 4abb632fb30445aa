"""Refit every factor stack against the original network, layer after layer in execution order.

Each stack is refitted so that, fed by the network compressed so far, it reproduces the original
layer's output on the original network (the asymmetric objective of Zhang et al., TPAMI 2016, see
:mod:`compressor.calibrate`): spatially separable stacks by ALS on both factors
(:mod:`compressor.joint_refit`), every other stack by least squares on its last factor.

The activations come from :func:`compressor.walk.walk_`, one pass over the calibration batches.
With ``block_targets`` (the recipe's ``calibration.block_targets``, on by default), a stack that feeds
a residual sum through its BatchNorm is fitted to what makes the *sum* match the original's instead
(see :func:`compressor.walk.walk_`). Where the walk cannot serve the model
(:func:`compressor.walk.supports`: no FX graph, a conv called more than once), each layer re-runs both
networks from the input instead, at quadratic cost; that path fits every stack to its own layer's
original output (no block targets), which is what the walk computes with ``block_targets`` off.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from torch import nn

from compressor import layers, threads, tree, walk
from compressor.calibrate import Pairs, Refit, fit_last_factor_, paired_calls
from compressor.joint_refit import patch_statistics, spatial_als_
from compressor.passes import swap_

#: The method whose stacks get the two-factor ALS refit; every other stack refits its last factor.
JOINT_METHOD = "spatial_separable"


def refit_stack_(method: str, conv: nn.Conv2d, stack: nn.Sequential, pairs: Callable[[], Pairs]) -> Refit:
    """Refit ``stack`` (the factorization of ``conv`` by ``method``) in place on ``pairs()``."""
    if isinstance(stack[-1], nn.Linear):
        # low_rank of an nn.Linear: the same least squares on its 1x1 conv views, which write into the Linears.
        views = nn.Sequential(*(layers.conv_view(linear) for linear in stack))
        return fit_last_factor_(views, ((layers.as_conv_input(t), layers.as_conv_input(h), n) for t, h, n in pairs()))
    if method == JOINT_METHOD:
        statistics = patch_statistics(conv, pairs())
        size = statistics.gram.shape[0]
        with threads.small_work(conv.out_channels * size * size):  # the ALS is many small solves
            return spatial_als_(stack, conv, statistics)
    return fit_last_factor_(stack, pairs())


def refit_all_(
    module: nn.Module,
    stacks: dict[str, tuple[str, nn.Sequential]],
    calibration: Sequence[torch.Tensor],
    calls: dict[str, int],
    started: Callable[[str], None] = lambda name: None,
    max_bytes: int | None = None,
    spilled: Callable[[str, int], None] = lambda node, held: None,
    block_targets: bool = False,
) -> dict[str, Refit]:
    """Refit every ``stacks[name] = (method, stack)`` in place, in the dict's order (execution order).

    ``module`` holds the original convs under the names of ``stacks`` and is not changed;
    ``calls[name]`` is how often the model calls that conv (the re-run fallback needs it);
    ``started(name)`` is told as each layer's refit begins (a progress bar); ``max_bytes`` and
    ``spilled`` bound the one-pass walk's held activations; ``block_targets`` fits convs that feed a
    residual sum to the original sum (both: see :func:`compressor.walk.walk_`; the re-run path fits
    every conv to its own original output).
    """
    refits: dict[str, Refit] = {}
    if walk.supports(module, list(stacks)) is None:

        def visit(name: str, targets: Sequence[torch.Tensor], hidden: Sequence[torch.Tensor]) -> nn.Module:
            started(name)
            method, stack = stacks[name]
            pairs = lambda: zip(targets, hidden, sizes)  # noqa: E731
            refits[name] = refit_stack_(method, module.get_submodule(name), stack, pairs)
            return stack

        parameter = tree.first_parameter(module)
        if parameter is not None:  # as the re-run path does: batches in the model's dtype and device
            calibration = [batch.to(device=parameter.device, dtype=parameter.dtype) for batch in calibration]
        sizes = [batch.shape[0] for batch in calibration]
        walk.walk_(module, calibration, {name: visit for name in stacks}, max_bytes, spilled, block_targets)
        return refits
    working = copy.deepcopy(module)
    for name, (method, stack) in stacks.items():
        started(name)
        pairs = lambda: paired_calls(module, working, name, calls[name], lambda: iter(calibration))  # noqa: E731
        refits[name] = refit_stack_(method, module.get_submodule(name), stack, pairs)
        swap_(working, {name: stack})
    return refits
