"""Read-only: find functional 2-D convolutions in a graph and decide which can become ``nn.Conv2d``.

``torch.export`` programs (``.pt2``) contain only functional convolutions (``aten.conv2d`` with the
weight as a graph input), and hand-written models sometimes call ``F.conv2d`` on their own
parameters. A call whose weight (and bias) are parameters read by this call alone is a conv layer
in all but name; :func:`compressor.passes.rewrite.lift_functional_convs_` turns it into one so the
rest of the pipeline treats it like any other ``nn.Conv2d``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

_CONV2D = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "transposed": False, "output_padding": 0}

#: Functional conv targets and their positional argument names.
SIGNATURES = {
    F.conv2d: _CONV2D,
    torch.conv2d: _CONV2D,
    torch.ops.aten.conv2d.default: _CONV2D,
    torch.ops.aten.conv2d.padding: _CONV2D,
    torch.ops.aten.convolution.default: _CONVOLUTION,
}


@dataclass(frozen=True)
class FunctionalConv:
    """One functional conv call. ``name`` is the module name it would get; ``reason`` why it cannot be lifted."""

    node: torch.fx.Node
    name: str
    weight: str | None
    bias: str | None
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    #: The holder module to replace by the conv (it holds nothing but this call's parameters).
    replaces_holder: bool = False
    reason: str | None = None

    @property
    def liftable(self) -> bool:
        return self.reason is None


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    values = tuple(int(v) for v in value)
    return values * 2 if len(values) == 1 else values


def bind_arguments(node: torch.fx.Node) -> dict:
    """The call's arguments by name, defaults filled in."""
    names = SIGNATURES[node.target]
    bound = dict(_DEFAULTS)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _parameter_target(module: torch.fx.GraphModule, value) -> tuple[str | None, str | None]:
    """``(target, None)`` if ``value`` reads a parameter, else ``(None, why not)``."""
    if not isinstance(value, torch.fx.Node) or value.op != "get_attr":
        return None, "it is computed in the graph, not read from a parameter"
    try:
        module.get_parameter(value.target)
    except AttributeError:
        return None, f"{value.target} is a buffer or constant, not a parameter"
    return value.target, None


def _readers(module: torch.fx.GraphModule, target: str) -> set[torch.fx.Node]:
    return {user for node in module.graph.nodes if node.op == "get_attr" and node.target == target for user in node.users}


def _holder(target: str) -> tuple[str, str]:
    holder, _, attribute = target.rpartition(".")
    return holder, attribute


def _replaces_holder(module: torch.fx.GraphModule, weight: str, bias: str | None) -> bool:
    """Whether the weight's owner is a bare container of exactly ``weight`` (and ``bias``), as in an
    unlifted ``torch.export`` module, so that the conv can take the owner's name."""
    holder, attribute = _holder(weight)
    if not holder or attribute != "weight" or (bias is not None and bias != f"{holder}.bias"):
        return False
    owner = module.get_submodule(holder)
    if type(owner) is not nn.Module or list(owner.children()) or list(owner.buffers(recurse=False)):
        return False
    expected = {"weight"} | ({"bias"} if bias is not None else set())
    return {name for name, _ in owner.named_parameters(recurse=False)} == expected


def match_functional_convs(module: nn.Module) -> list[FunctionalConv]:
    """Every functional 2-D conv call of a ``GraphModule``, in graph order, with whether it can be lifted."""
    if not isinstance(module, torch.fx.GraphModule):
        return []
    found, taken = [], {name for name, _ in module.named_modules()}
    for node in module.graph.nodes:
        if node.op != "call_function" or node.target not in SIGNATURES:
            continue
        bound = bind_arguments(node)
        weight, reason = _parameter_target(module, bound["weight"])
        bias = None
        if reason is None and bound["bias"] is not None:
            bias, bias_reason = _parameter_target(module, bound["bias"])
            reason = bias_reason and f"its bias: {bias_reason}"
        elif reason is not None:
            reason = f"its weight: {reason}"
        if reason is None and bound.get("transposed"):
            reason = "a transposed convolution"
        if reason is None and module.get_parameter(weight).dim() != 4:
            reason = f"a {module.get_parameter(weight).dim() - 2}-D convolution"
        if reason is None:
            others = (_readers(module, weight) | (_readers(module, bias) if bias else set())) - {node}
            if others:
                reason = f"its parameters are also read by {', '.join(sorted(n.name for n in others))}"
        padding = bound["padding"]
        holder = reason is None and _replaces_holder(module, weight, bias)
        name = _holder(weight)[0] if holder else node.name
        if not holder and name in taken:
            name = f"{node.name}_conv"
        taken.add(name)
        found.append(
            FunctionalConv(
                node=node,
                name=name,
                weight=weight,
                bias=bias,
                stride=_pair(bound["stride"]),
                padding=padding if isinstance(padding, str) else _pair(padding),
                dilation=_pair(bound["dilation"]),
                groups=int(bound["groups"]),
                replaces_holder=bool(holder),
                reason=reason,
            )
        )
    return found
