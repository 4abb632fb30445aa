"""A model given as an ``nn.Sequential`` comes back as one: indexable, and computing what the graph does."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

import compressor

RECIPE = {"rules": [{"match": "*", "method": "spatial_separable", "rank": 4, "min_kernel_size": 3}], "bench": {"runs": 0}}


class _Wrapper(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x)


def _sequential() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()


def test_a_sequential_model_comes_back_indexable_and_exact():
    model, x = _sequential(), torch.randn(2, 3, 16, 16)
    result = compressor.compress(model, RECIPE, x[:1])
    assert type(result.model) is nn.Sequential, type(result.model)
    assert isinstance(result.model[3], nn.Sequential) and isinstance(result.model[-1], nn.Linear), result.model
    features = result.model[:-1]
    assert features(x).shape == (2, 16), features(x).shape
    graph = compressor.compress(_Wrapper(model), RECIPE, x[:1]).model  # not a Sequential: the graph is kept
    assert isinstance(graph, torch.fx.GraphModule), type(graph)
    with torch.no_grad():
        difference = (result.model(x) - graph(x)).abs().max().item()
    assert difference < 1e-6, f"the Sequential and the graph differ by {difference:.3e}"
    assert type(model[3]) is nn.Conv2d, "the caller's model was modified"


def test_the_sequential_result_exports_and_verifies(tmp_path):
    result = compressor.compress(_sequential(), RECIPE, torch.randn(1, 3, 16, 16))
    parity = result.export_onnx(tmp_path / "c.onnx")
    assert parity.rel < 1e-4, parity
