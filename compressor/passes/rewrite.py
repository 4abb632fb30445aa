"""The only place that mutates a model: replace convs by their factor stacks."""

from __future__ import annotations

import torch.fx
from torch import nn

from compressor import tree
from compressor.passes.computed import ComputedConv
from compressor.passes.functional import FunctionalConv


def _parent_name(target: str) -> tuple[str, str]:
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, name = _parent_name(target)
    setattr(tree.get_submodule(root, parent), name, module)


def swap_(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Register each replacement under its conv's name and every alias of that conv, in place.

    The graph is not touched: a ``GraphModule``'s ``call_module`` nodes now call the replacement.
    That is enough to run the model (the calibration refits run on such a copy); :func:`rewrite_`
    also inlines the chains so that the graph shows the factors.
    """
    replaced = {id(tree.get_submodule(model, target)): target for target in replacements}
    aliases: dict[str, list[str]] = {target: [] for target in replacements}
    for name, module in tree.named_modules(model, remove_duplicate=False):
        if id(module) in replaced:
            aliases[replaced[id(module)]].append(name)
    for target in sorted(replacements):
        for name in aliases[target]:  # a module registered under several names is replaced under all of them
            _set_submodule(model, name, replacements[target])
    return model


def rewrite_(model: nn.Module, replacements: dict[str, nn.Sequential]) -> nn.Module:
    """Replace, in place, each named conv by its stack and return ``model``.

    The stack is registered under the conv's qualified name, so a module called from several places
    stays one shared module. On a ``GraphModule`` every call site is also inlined into a chain of
    ``call_module`` nodes (``name.0``, ``name.1``, ...), visited in graph order, and the graph is
    linted and recompiled; otherwise the swap alone is the rewrite (module-swap fallback).
    """
    swap_(model, replacements)
    if isinstance(model, torch.fx.GraphModule):
        graph = model.graph
        for node in list(graph.nodes):
            if node.op != "call_module" or node.target not in replacements:
                continue
            if type(replacements[node.target]) is not nn.Sequential:
                continue  # a stack with a forward of its own (layers.DecoupledSeparable) stays one call
            value = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_before(node):
                for index in range(len(replacements[node.target])):
                    value = graph.call_module(f"{node.target}.{index}", (value,))
            node.replace_all_uses_with(value)
            graph.erase_node(node)
        graph.lint()
        model.recompile()
    return model


def _conv_from_call(module: torch.fx.GraphModule, call: FunctionalConv) -> nn.Conv2d:
    weight = module.get_parameter(call.weight)
    bias = module.get_parameter(call.bias) if call.bias else None
    out_channels, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(
        in_per_group * call.groups, out_channels, (kh, kw), stride=call.stride, padding=call.padding,
        dilation=call.dilation, groups=call.groups, bias=bias is not None, device="meta",
    )
    conv.weight = weight  # the same Parameter objects: no copy, and their dtype and device are kept
    if bias is not None:
        conv.bias = bias
    return conv


def _drop_attribute(module: nn.Module, target: str) -> None:
    parent, name = _parent_name(target)
    delattr(module.get_submodule(parent) if parent else module, name)


def lift_functional_convs_(module: nn.Module, calls: list[FunctionalConv]) -> list[str]:
    """Turn each liftable functional conv call into an ``nn.Conv2d`` module call, in place.

    The module reuses the call's parameters. When their holder is a bare container (``torch.export``
    programs), the conv replaces it and keeps its name (``layer1.0.conv1``), so recipe patterns
    written for the eager model still match; otherwise it is registered under the call's node name.
    Returns the new module names in graph order.
    """
    liftable = [call for call in calls if call.liftable]
    if not liftable or not isinstance(module, torch.fx.GraphModule):
        return []
    graph = module.graph
    for call in liftable:
        _set_submodule(module, call.name, _conv_from_call(module, call))  # call_module nodes need it registered
        readers = [n for n in graph.nodes if n.op == "get_attr" and n.target in (call.weight, call.bias)]
        with graph.inserting_before(call.node):
            value = call.node.args[0] if call.node.args else call.node.kwargs["input"]
            lifted = graph.call_module(call.name, (value,))
        call.node.replace_all_uses_with(lifted)
        graph.erase_node(call.node)
        for reader in readers:
            graph.erase_node(reader)
        if not call.replaces_holder:
            for target in filter(None, (call.weight, call.bias)):
                _drop_attribute(module, target)
    graph.lint()
    module.recompile()
    return [call.name for call in liftable]


def fold_computed_convs_(model: nn.Module, found: list[ComputedConv]) -> dict[str, ComputedConv]:
    """Put each foldable computed-weight conv's plain ``nn.Conv2d`` in its place (under every alias),
    in place. Returns the folded ones by name."""
    folded = {item.name: item for item in found if item.conv is not None}
    swap_(model, {name: item.conv for name, item in folded.items()})
    return folded
