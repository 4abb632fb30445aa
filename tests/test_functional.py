"""Functional convolutions (F.conv2d, aten.conv2d) become nn.Conv2d layers when they are layers in all but name."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from compressor.passes import lift_functional_convs_, match_functional_convs
from compressor.passes.functional import SIGNATURES
from tests.models_for_cli import INPUT_SHAPE, tiny_net


class OwnParameters(nn.Module):
    """A conv written with F.conv2d on the module's own parameters, with the given call options."""

    def __init__(self, options: dict, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.weight = nn.Parameter(torch.randn(6, 4, 3, 2))
        self.bias = nn.Parameter(torch.randn(6)) if bias else None
        self.options = options

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, **self.options).relu()


CALL_OPTIONS = {
    "defaults": {},
    "stride2": {"stride": 2},
    "stride_tuple_padding_tuple": {"stride": (2, 1), "padding": (1, 2)},
    "same": {"padding": "same"},
    "dilated": {"padding": 2, "dilation": (2, 1)},
}


def _functional_nodes(module: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [node for node in module.graph.nodes if node.op == "call_function" and node.target in SIGNATURES]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("options", list(CALL_OPTIONS))
def test_lifted_conv_keeps_every_hyperparameter(options, bias):
    model = OwnParameters(CALL_OPTIONS[options], bias).eval()
    traced = torch.fx.symbolic_trace(model)
    calls = match_functional_convs(traced)
    assert [call.reason for call in calls] == [None], [call.reason for call in calls]
    names = lift_functional_convs_(traced, calls)
    traced.graph.lint()
    assert not _functional_nodes(traced), traced.code
    conv = traced.get_submodule(names[0])
    assert type(conv) is nn.Conv2d and (conv.bias is not None) == bias, conv
    x = torch.randn(2, 4, 11, 9)
    with torch.no_grad():
        error = ((traced(x) - model(x)).norm() / model(x).norm()).item()
    assert error < 1e-6, f"{options}: lifted conv {conv} differs by {error:.3e}"


class NotLayers(nn.Module):
    """Functional convs that must stay functional: a computed weight, and a weight read by two calls."""

    def __init__(self) -> None:
        super().__init__()
        self.scaled = nn.Parameter(torch.randn(4, 4, 3, 3))
        self.shared = nn.Parameter(torch.randn(4, 4, 3, 3))

    def forward(self, x):
        x = F.conv2d(x, self.scaled * 2, padding=1)
        return F.conv2d(x, self.shared, padding=1) + F.conv2d(x, self.shared, padding=1)


def test_convs_that_are_not_layers_stay_functional_with_a_reason():
    traced = torch.fx.symbolic_trace(NotLayers())
    reasons = [call.reason for call in match_functional_convs(traced)]
    assert len(reasons) == 3 and "computed in the graph" in reasons[0], reasons
    assert all("also read by" in reason for reason in reasons[1:]), reasons
    assert lift_functional_convs_(traced, match_functional_convs(traced)) == []
    assert len(_functional_nodes(traced)) == 3


def test_exported_program_convs_take_the_eager_names():
    model = tiny_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.randn(INPUT_SHAPE),))
    unlifted = program.module(check_guards=False)
    module = torch.fx.GraphModule(unlifted, unlifted.graph)
    names = lift_functional_convs_(module, match_functional_convs(module))
    assert names == ["conv1", "conv2", "conv3", "head"], names
    eager = {name: m for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name in names:
        lifted, original = module.get_submodule(name), eager[name]
        same = [(a, getattr(lifted, a), getattr(original, a)) for a in ("stride", "padding", "dilation", "groups", "kernel_size")]
        assert all(x == y for _, x, y in same) and (lifted.bias is None) == (original.bias is None), f"{name}: {same}"
    x = torch.randn(3, *INPUT_SHAPE[1:])
    with torch.no_grad():
        error = ((module(x) - model(x)).norm() / model(x).norm()).item()
    assert error < 1e-6, f"lifted exported program differs from the eager model by {error:.3e}"
