"""Give a model that came in as an ``nn.Sequential`` back as one.

``torch.fx`` returns a ``GraphModule`` that prints as ``Sequential`` but cannot be indexed or
sliced, which breaks code that did ``model[0]`` or ``model[:-1]`` on the caller's model.
"""

from __future__ import annotations

import copy

from torch import nn

from compressor.passes.rewrite import swap_


def as_sequential(original: nn.Module, rewritten: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``original`` with ``replacements`` swapped in by name when ``original`` is exactly an
    ``nn.Sequential`` whose modules include every replaced conv; else ``rewritten`` unchanged.

    Exact: a conv rewrite is local (one module in, one out), so swapping the same stacks by name
    computes what the rewritten graph computes. Convs lifted from functional calls exist only in the
    graph, so a model with any keeps the graph.
    """
    if type(original) is not nn.Sequential:
        return rewritten
    names = {name for name, _ in original.named_modules()}
    if not set(replacements) <= names:
        return rewritten
    sequential = copy.deepcopy(original)
    swap_(sequential, dict(replacements))
    return sequential.train(rewritten.training)
