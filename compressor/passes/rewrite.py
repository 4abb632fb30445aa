"""The only place that mutates a model: replace convs by their factor stacks."""

from __future__ import annotations

import torch.fx
from torch import nn


def _parent_name(target: str) -> tuple[str, str]:
    *parent, name = target.rsplit(".", 1)
    return (parent[0] if parent else ""), name


def _set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, name = _parent_name(target)
    setattr(root.get_submodule(parent) if parent else root, name, module)


def swap_(model: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """Register each replacement under its conv's name and every alias of that conv, in place.

    The graph is not touched: a ``GraphModule``'s ``call_module`` nodes now call the replacement.
    That is enough to run the model (the calibration refits run on such a copy); :func:`rewrite_`
    also inlines the chains so that the graph shows the factors.
    """
    replaced = {id(model.get_submodule(target)): target for target in replacements}
    aliases: dict[str, list[str]] = {target: [] for target in replacements}
    for name, module in model.named_modules(remove_duplicate=False):
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
            value = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_before(node):
                for index in range(len(replacements[node.target])):
                    value = graph.call_module(f"{node.target}.{index}", (value,))
            node.replace_all_uses_with(value)
            graph.erase_node(node)
        graph.lint()
        model.recompile()
    return model
