"""torch.fx tracing with a fallback for models FX cannot trace."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch.fx
from torch import nn

from compressor.errors import describe_error


class TraceFallbackWarning(UserWarning):
    """FX tracing failed; the rewrite swaps modules by qualified name instead."""


@dataclass
class Traced:
    """The module to rewrite and how: ``graph`` is ``"fx"`` or ``"module-swap"``."""

    module: nn.Module
    graph: str
    trace_error: str | None = None


def trace(model: nn.Module) -> Traced:
    """``symbolic_trace`` the model; on failure return it as is for module swapping, with a warning.

    A conv rewrite is local (one module in, one module out, same signature), so swapping modules
    by name is exact even without a graph; what is lost is the detection of functional convs.
    """
    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as err:  # FX raises many types (TraceError, TypeError, RuntimeError, ...)
        message = describe_error(err)
        warnings.warn(
            f"torch.fx could not trace {type(model).__name__} ({message}); swapping modules by name instead",
            TraceFallbackWarning,
            stacklevel=2,
        )
        return Traced(model, "module-swap", message)
    _drop_string_annotations(traced)
    return Traced(traced, "fx")


def _drop_string_annotations(module: torch.fx.GraphModule) -> None:
    """Forget node type annotations that are strings.

    Under ``from __future__ import annotations`` a forward's ``x: torch.Tensor`` reaches FX as the
    string ``"torch.Tensor"``, which FX puts in the generated code's globals, and pickling the
    GraphModule (``torch.save``) then fails. The annotations are documentation only.
    """
    changed = False
    for node in module.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
            changed = True
    if changed:
        module.recompile()
