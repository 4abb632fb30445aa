"""Convs whose weight is computed in forward are folded into plain nn.Conv2d layers and rewritten."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import compressor
from compressor.passes import match_computed_convs

EXACT = 1e-4


class ScaledStdConv2d(nn.Conv2d):
    """Written like timm's: weight standardization by F.batch_norm over each filter, times gain x scale."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, bias=True, gamma=1.0, eps=1e-6, gain_init=1.0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=bias)
        self.gain = nn.Parameter(torch.full((self.out_channels, 1, 1, 1), gain_init))
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps

    def forward(self, x):
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdConv2dManual(nn.Conv2d):
    """Weight standardization computed by hand (timm's StdConv2d without batch_norm)."""

    def forward(self, x):
        mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
        var = self.weight.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (self.weight - mean) / torch.sqrt(var + 1e-5), self.bias)


class Conv2dSame(nn.Conv2d):
    """TF 'SAME' padding computed from the input size: more than a conv, so it must not be folded."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (0, 1, 0, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Doubled(nn.Module):
    def forward(self, weight):
        return 2.0 * weight


class NFNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = ScaledStdConv2d(3, 16, 3, stride=2)
        self.body = ScaledStdConv2d(16, 24, 3, gain_init=0.7)
        self.std = StdConv2dManual(24, 24, 3, padding=1, bias=False)
        self.normed = parametrizations.weight_norm(nn.Conv2d(24, 24, 3, padding=1))
        self.doubled = nn.Conv2d(24, 24, 3, padding=1)
        parametrize.register_parametrization(self.doubled, "weight", Doubled())
        self.same = Conv2dSame(24, 16, 2)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        for conv in (self.stem, self.body, self.std, self.normed, self.doubled, self.same):
            x = F.silu(conv(x))
        return self.head(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    return NFNetLike().eval(), torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_computed_weights_are_captured_exactly_and_refused_when_more_than_a_conv():
    model, _ = _model()
    found = {item.name: item for item in match_computed_convs(model)}
    assert sorted(found) == ["body", "doubled", "normed", "same", "std", "stem"], sorted(found)
    for name in ("stem", "body", "std", "normed", "doubled"):
        assert found[name].conv is not None and type(found[name].conv) is nn.Conv2d, (name, found[name].reason)
        assert found[name].rel_error < 1e-5, (name, found[name].rel_error)
    assert "parametrized (Doubled)" in found["doubled"].kind, found["doubled"].kind
    assert "ScaledStdConv2d.forward" in found["stem"].kind, found["stem"].kind
    assert found["same"].conv is None and "does more than the conv" in found["same"].reason, found["same"]


# low_rank and spatial: exact at full rank and quick (the depthwise branches are slow on CPU in PyTorch).
@pytest.mark.parametrize("method", ["low_rank", "spatial_separable"])
def test_folded_convs_are_rewritten_with_the_same_outputs_at_full_rank(method, tmp_path):
    model, x = _model()
    result = compressor.compress(model, {"rules": [{"match": "*", "method": method, "rank": "full"}]}, x)
    layers = {layer["name"]: layer for layer in result.report["layers"]}
    for name in ("stem", "body", "std", "normed", "doubled"):
        layer = layers[name]
        assert layer["method"] == method and "folded into a plain nn.Conv2d" in (layer["note"] or ""), layer
    with torch.no_grad():
        expected, got = model(x), result.model(x)
    error = float((got - expected).norm() / expected.norm())
    assert error < EXACT, f"{method}: relative output error {error:.3e}"
    result.export_onnx(tmp_path / "c.onnx", original_path=tmp_path / "o.onnx")
    assert result.report["onnx"]["passed"], result.report["onnx"]


class PlainSubclass(nn.Conv2d):
    """A Conv2d subclass that computes nothing: FX traces into it, folding keeps its name."""


def test_hook_based_weight_norm_and_plain_subclasses_fold_too():
    torch.manual_seed(0)
    with pytest.warns(FutureWarning):
        normed = torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3))
    found = {item.name: item for item in match_computed_convs(nn.Sequential(PlainSubclass(3, 4, 3), normed))}
    assert found["0"].kind == "an nn.Conv2d subclass (PlainSubclass)" and found["0"].rel_error == 0.0, found["0"]
    assert "forward pre-hook" in found["1"].kind and found["1"].rel_error < 1e-5, found["1"]
