"""What each Conv2d and Linear sees in one forward pass: spatial sizes per call, MACs, parameters.

Forward hooks rather than FX shape propagation, so that the same numbers come out of a traced
GraphModule and of a model FX cannot trace. A module called twice contributes twice to MACs and once
to parameters, as it does at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compressor import tree
from compressor.layers import DecoupledSeparable


@dataclass
class CallShape:
    """Spatial sizes (per sample) of one call of a conv: input (H, W) and output (H, W); for a
    Linear, ``(positions, 1)`` both, as for the 1x1 conv it equals (``layers.conv_view``)."""

    input_hw: tuple[int, int]
    output_hw: tuple[int, int]


@dataclass
class LayerProfile:
    module: nn.Module
    calls: list[CallShape] = field(default_factory=list)
    macs: int = 0
    #: Position of the module's first call in the forward pass (``None`` if never called).
    first_call: int | None = None


def _conv_macs(conv: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = conv.kernel_size
    per_output = (conv.in_channels // conv.groups) * kh * kw
    return per_output * output[0].numel()


def _linear_macs(linear: nn.Linear, output: torch.Tensor) -> int:
    return linear.in_features * output[0].numel()


def profile_model(model: nn.Module, example_input: torch.Tensor) -> dict[str, LayerProfile]:
    """Run ``model`` once on ``example_input`` and return a profile per Conv2d/Linear qualified name.

    MACs are per sample (the batch dimension is divided out), so totals do not depend on the
    example batch size. Modules that never run keep an empty ``calls`` list.
    """
    profiles: dict[str, LayerProfile] = {}
    handles = []

    def seen(name: str) -> LayerProfile:
        """The profile of ``name``, its position in the forward fixed at its first call."""
        profile = profiles[name]
        if profile.first_call is None:
            profile.first_call = sum(p.first_call is not None for p in profiles.values())
        return profile

    def record(name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            profile = seen(name)
            if isinstance(module, nn.Conv2d):
                profile.calls.append(
                    CallShape(tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:]))  # type: ignore[arg-type]
                )
                profile.macs += _conv_macs(module, output)
            else:
                # A Linear is a 1x1 conv over the positions of its input's leading dims (one for (N, in)).
                positions = output[0].numel() // module.out_features
                profile.calls.append(CallShape((positions, 1), (positions, 1)))
                profile.macs += _linear_macs(module, output)

        return hook

    def record_branched(name: str):
        # layers.DecoupledSeparable runs its convs' weights through F.conv2d (as M branches), so their
        # own hooks never fire: record them as the chain they are equivalent to, MACs included.
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            depthwise, pointwise = module[0], module[1]
            input_hw, output_hw = tuple(inputs[0].shape[-2:]), tuple(output.shape[-2:])
            area = output_hw[0] * output_hw[1]
            kh, kw = depthwise.kernel_size
            prefix = f"{name}." if name else ""
            for child, call, macs in (
                (f"{prefix}0", CallShape(input_hw, output_hw), kh * kw * depthwise.out_channels * area),
                (f"{prefix}1", CallShape(output_hw, output_hw), pointwise.in_channels * pointwise.out_channels * area),
            ):
                profile = seen(child)
                profile.calls.append(call)
                profile.macs += macs

        return hook

    for name, module in tree.named_modules(model):
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            profiles[name] = LayerProfile(module)
            handles.append(module.register_forward_hook(record(name)))
        elif isinstance(module, DecoupledSeparable):
            handles.append(module.register_forward_hook(record_branched(name)))
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    return profiles


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in tree.parameters(module))


def totals(profiles: dict[str, LayerProfile]) -> dict[str, int]:
    """MACs per sample and parameters over every profiled Conv2d and Linear."""
    return {
        "macs": sum(p.macs for p in profiles.values()),
        "params": sum(count_parameters(p.module) for p in profiles.values()),
    }
