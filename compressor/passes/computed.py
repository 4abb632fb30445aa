"""Read-only: find convs whose effective weight is computed in ``forward`` from parameters alone.

Weight standardization (timm's ``ScaledStdConv2d`` and ``StdConv2d``, NF-Nets), weight norm
(``torch.nn.utils.parametrizations.weight_norm`` and the older hook-based ``weight_norm``) and any
``torch.nn.utils.parametrize`` parametrization compute the weight that reaches ``F.conv2d`` on every
call. FX traces through such a module (or sees a weight it cannot read), so it would never be planned
as a conv. In eval mode that weight is a constant: :func:`match_computed_convs` captures it from one
call and builds a plain ``nn.Conv2d`` holding it; :func:`compressor.passes.rewrite.fold_computed_convs_`
puts that conv in the module's place, and the pipeline rewrites it like any other conv.

A module is folded only when the capture proves it is exactly one conv with a parameter-only weight:
one ``conv2d`` call per forward, the same weight from two different inputs, and the plain conv
reproducing the module's output on a probe (relative error below :data:`EXACT`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode

from compressor import tree
from compressor.errors import describe_error

#: Relative output error below which the plain conv counts as the same layer (float32 round-off).
EXACT = 1e-5


@dataclass
class ComputedConv:
    """One conv with a computed weight. ``conv``: its plain replacement, or ``None`` with ``reason``."""

    name: str
    kind: str
    conv: nn.Conv2d | None
    reason: str | None = None
    rel_error: float | None = None


def _computes_weight(module: nn.Module) -> bool:
    if not isinstance(module, nn.Conv2d):
        return False
    return type(module) is not nn.Conv2d or parametrize.is_parametrized(module) or bool(module._forward_pre_hooks)


class _ConvCalls(TorchFunctionMode):
    """Records the (weight, bias) of every conv2d call made while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d or func is F.conv2d:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.calls.append((weight.detach().clone(), None if bias is None else bias.detach().clone()))
        return func(*args, **kwargs)


def _probe(conv: nn.Conv2d, seed: int) -> torch.Tensor:
    kh, kw = conv.kernel_size
    side = max(8, (max(kh, kw) - 1) * max(conv.dilation) + 2 * max(conv.stride) + 1)
    parameter = tree.first_parameter(conv)
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(2, conv.in_channels, side, side, generator=generator)
    return probe.to(dtype=parameter.dtype, device=parameter.device) if parameter is not None else probe


def _describe(module: nn.Module) -> str:
    if parametrize.is_parametrized(module):
        kinds = sorted({type(p).__name__ for plist in module.parametrizations.values() for p in plist})
        return f"parametrized ({', '.join(kinds)})"
    if type(module) is nn.Conv2d or module._forward_pre_hooks:
        return "weight computed by a forward pre-hook (e.g. torch.nn.utils.weight_norm)"
    if type(module).forward is nn.Conv2d.forward:
        # FX would trace into a subclass of its own; as a plain conv it keeps its name for recipe patterns.
        return f"an nn.Conv2d subclass ({type(module).__name__})"
    return f"weight computed in {type(module).__name__}.forward"


def _plain(module: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    conv = nn.Conv2d(
        module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
        dilation=module.dilation, groups=module.groups, bias=bias is not None, padding_mode=module.padding_mode,
        device=weight.device, dtype=weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _fold_one(name: str, module: nn.Conv2d) -> ComputedConv:
    kind = _describe(module)
    was_training = module.training
    tree.set_training_(module, False)
    try:
        captured = []
        outputs = []
        with torch.no_grad():
            for seed in (0, 1):
                probe = _probe(module, seed)
                with _ConvCalls() as recorder:
                    outputs.append((probe, module(probe)))
                captured.append(recorder.calls)
    except Exception as err:  # a user forward may fail on the probe in any way
        return ComputedConv(name, kind, None, f"its forward failed on a probe input: {describe_error(err)}")
    finally:
        tree.set_training_(module, was_training)
    if any(len(calls) != 1 for calls in captured):
        return ComputedConv(name, kind, None, f"its forward makes {len(captured[0])} conv2d calls, not one")
    (weight, bias), (weight_again, _) = captured[0][0], captured[1][0]
    if weight.shape != module.weight.shape or not torch.equal(weight, weight_again):
        return ComputedConv(name, kind, None, "its weight depends on the input, not on parameters alone")
    conv = _plain(module, weight, bias)
    with torch.no_grad():
        worst = 0.0
        for probe, expected in outputs:
            if not isinstance(expected, torch.Tensor) or expected.shape != conv(probe).shape:
                return ComputedConv(name, kind, None, "its forward does more than the conv (output shape differs)")
            diff = (conv(probe) - expected).to(torch.float64).norm() / expected.to(torch.float64).norm().clamp_min(1e-30)
            worst = max(worst, float(diff))
    if worst > EXACT:
        return ComputedConv(name, kind, None, f"a plain conv with its weight is off by {worst:.1e} (its forward does more than the conv)", worst)
    return ComputedConv(name, kind, conv, rel_error=worst)


def match_computed_convs(model: nn.Module) -> list[ComputedConv]:
    """Every conv module of ``model`` whose weight is computed, in ``named_modules`` order, each with
    its plain replacement (eval-mode weight) or the reason it cannot have one. Runs each such module
    twice on small probe inputs; changes nothing."""
    found = []
    for name, module in tree.named_modules(model):
        if name and _computes_weight(module):
            found.append(_fold_one(name, module))
    return found
