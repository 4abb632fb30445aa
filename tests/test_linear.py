"""nn.Linear layers: low_rank as two Linears (opt-in per rule), exact at full rank, whitened by
their input statistics and refitted like convs; the shipped recipes never select a classifier."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

import compressor
from compressor import layers, zoo
from compressor.errors import RecipeError
from compressor.decompose.whiten import whitening
from compressor.linear import linear_statistics
from compressor.methods import METHODS, factorize
from compressor.passes import plan_layers, trace
from compressor.profile import profile_model, totals
from compressor.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").glob("*.yaml"))
EXACT = 1e-5
LOW_RANK = METHODS["low_rank"]


def _linear_low_rank(linear: nn.Linear, rank: int, white=None) -> tuple[nn.Sequential, float]:
    stack, error = factorize(LOW_RANK, layers.conv_view(linear), rank, 1, white)
    return layers.as_linear_stack(linear, stack), error


def _rel(stack: nn.Module, linear: nn.Linear, x: torch.Tensor) -> float:
    with torch.no_grad():
        return ((stack(x) - linear(x)).norm() / linear(x).norm()).item()


@pytest.mark.parametrize("shape", [(4, 24), (2, 5, 24)], ids=["N-in", "N-T-in"])
@pytest.mark.parametrize("out_features", [10, 40])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_full_rank_linear_stack_is_exact_and_keeps_bias_last(shape, out_features, bias):
    torch.manual_seed(0)
    linear = nn.Linear(24, out_features, bias=bias)
    full = LOW_RANK.full_rank(layers.conv_view(linear), 1)
    stack, weight_error = _linear_low_rank(linear, full)
    assert [type(m) for m in stack] == [nn.Linear, nn.Linear], stack
    assert stack[0].bias is None and (stack[1].bias is None) == (not bias), stack
    error = _rel(stack, linear, torch.randn(*shape))
    assert full == min(24, out_features) and error < EXACT and weight_error < 1e-6, (
        f"full rank {full}: output error {error:.3e}, weight error {weight_error:.3e}"
    )


def test_linear_error_falls_with_rank_and_whitening_targets_the_data():
    torch.manual_seed(1)
    linear = nn.Linear(32, 24)
    # Inputs living mostly in 6 directions: whitened truncation should spend its rank there.
    basis = torch.randn(6, 32)
    x = torch.randn(512, 6) @ basis + 0.01 * torch.randn(512, 32)
    white = whitening(x.double().T @ x.double() / len(x))
    plain = [_rel(_linear_low_rank(linear, r)[0], linear, x) for r in range(1, 25)]
    aware = [_rel(_linear_low_rank(linear, r, white)[0], linear, x) for r in range(1, 25)]
    rounded = [round(e, 4) for e in plain]
    assert all(b <= a + 1e-6 for a, b in zip(plain, plain[1:])) and plain[0] > 0.1 and plain[-1] < EXACT, rounded
    assert aware[5] < 0.01 < plain[5], f"rank 6 output error: whitened {aware[5]:.4f}, weights only {plain[5]:.4f}"


def test_linear_statistics_are_the_second_moment_of_input_vectors():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))
    x = torch.randn(3, 7, 8)
    with linear_statistics(model, {"2": ["patches"]}) as stats:
        with torch.no_grad():
            model(x)
    hidden = torch.relu(model[0](x)).reshape(-1, 6).double()
    got = stats["2"].covariance("patches")
    assert stats["2"].counts["patches"] == 21 and torch.allclose(got, hidden.T @ hidden / 21), got
    assert not model[2]._forward_pre_hooks, "the hook outlived the context"


def test_profile_counts_a_linear_as_its_conv_view():
    linear = nn.Linear(16, 12)
    profile = profile_model(nn.Sequential(linear), torch.randn(2, 5, 16))["0"]
    cost = LOW_RANK.macs(layers.conv_view(linear), profile.calls, 4, 1)
    stack, _ = _linear_low_rank(linear, 4)
    measured = totals(profile_model(stack, torch.randn(2, 5, 16)))["macs"]
    assert profile.macs == 5 * 16 * 12 and cost == measured == 5 * 4 * (16 + 12), (profile.macs, cost, measured)


@pytest.mark.parametrize(
    "rule, message",
    [
        ({"method": "depthwise_separable"}, "layer_type linear takes method low_rank or keep"),
        ({"method": ["low_rank", "grouped"]}, "got grouped"),
        ({"method": "low_rank", "kernel_size": 1}, "kernel_size filter conv kernels"),
        ({"method": "low_rank", "layer_type": "dense"}, "layer_type"),
    ],
)
def test_linear_rules_refuse_conv_only_settings(rule, message):
    with pytest.raises(RecipeError) as info:
        load_recipe({"rules": [{"match": "fc", "layer_type": "linear", **rule}]})
    assert message in str(info.value), str(info.value)


def test_conv_rules_never_select_a_linear_and_linear_rules_never_a_conv():
    recipe = load_recipe({"rules": [{"match": "*", "method": "low_rank"}, {"match": "*", "layer_type": "linear", "method": "low_rank"}]})
    assert recipe.rule_for("fc", 1, 64, 10, linear=True).index == 1
    assert recipe.rule_for("conv", 1, 64, 10).index == 0


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_recipes_keep_the_classifier(path):
    model = zoo.resnet20_cifar().eval()
    x = torch.randn(1, 3, 32, 32)
    traced = trace(model)
    recipe = load_recipe(path)
    planned = {plan.name for plan in plan_layers(traced.module, recipe, profile_model(traced.module, x))}
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears and not planned & set(linears), f"{path.name} plans Linear layers {sorted(planned & set(linears))}"
    assert not any(rule.layer_type == "linear" for rule in recipe.rules), path.name


class _Head(nn.Module):
    """Convs, then a two-layer MLP head on pooled features and a per-position Linear on tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.bn = nn.BatchNorm2d(32)
        self.fc1 = nn.Linear(32, 48)
        self.fc2 = nn.Linear(48, 10)
        self.tokens = nn.Linear(32, 32)

    def forward(self, x):
        features = torch.relu(self.bn(self.conv(x)))
        pooled = self.fc2(torch.relu(self.fc1(features.mean((2, 3)))))
        tokens = self.tokens(features.flatten(2).transpose(1, 2))  # (N, H*W, C)
        return pooled, tokens.mean(1)


def test_linear_rule_compresses_end_to_end_with_refit_and_onnx_parity(tmp_path):
    model = zoo.randomize_batchnorm(_Head()).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    rules = [{"match": "*", "method": "keep"}, {"match": ["fc1", "tokens"], "layer_type": "linear", "method": "low_rank"}]
    full = compressor.compress(model, {"rules": rules}, x)
    assert full.report["output_rel_error"] < 1e-4, full.report["output_rel_error"]
    by_name = {layer["name"]: layer for layer in full.report["layers"]}
    assert set(by_name) == {"conv", "fc1", "tokens"}, sorted(by_name)  # fc2: no linear rule names it
    assert "nn.Linear" in by_name["fc1"]["note"] and by_name["tokens"]["macs_before"] == 144 * 32 * 32, by_name
    assert [type(m) for m in full.model.get_submodule("tokens")] == [nn.Linear, nn.Linear]

    rules[1]["rank"] = 6
    data = [torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    held_out = [torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(9))]
    plain = compressor.compress(model, {"rules": rules}, x, eval_data=held_out)
    aware = compressor.compress(model, {"rules": rules, "calibration": {"samples": 32}}, x, data=data, eval_data=held_out)
    refits = {layer["name"]: layer["output_rel_error"] for layer in aware.report["layers"] if layer["method"] == "low_rank"}
    assert set(refits) == {"fc1", "tokens"} and all(e is not None for e in refits.values()), refits
    got, before = aware.report["metrics"]["output_rel_error"], plain.report["metrics"]["output_rel_error"]
    assert got < before, f"Linear low_rank held-out output error: data-aware {got:.4f}, weights-only {before:.4f}"
    parity = aware.export_onnx(tmp_path / "c.onnx", original_path=tmp_path / "o.onnx")
    assert aware.report["onnx"]["passed"] and parity.rel < 1e-5, aware.report["onnx"]


@pytest.mark.parametrize("aware", [False, True], ids=["weights", "data"])
def test_budget_counts_linear_macs_and_may_keep_them(aware):
    model = zoo.randomize_batchnorm(_Head()).eval()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    recipe = {
        "rules": [
            {"match": "*", "method": ["low_rank", "keep"]},
            {"match": "tokens", "layer_type": "linear", "method": ["low_rank", "keep"]},
        ],
        "target": {"macs": 0.6},
        "calibration": {"samples": 32},
    }
    data = [torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)] if aware else None
    result = compressor.compress(model, recipe, x, data=data)
    layers_ = {layer["name"]: layer for layer in result.report["layers"]}
    planned = sum(layer["macs_after"] for layer in layers_.values())
    assert result.report["totals"]["macs_ratio"] <= 0.6 + 1e-9, result.report["totals"]
    assert result.report["totals"]["macs_after"] == planned + 48 * 32 + 10 * 48, (result.report["totals"], planned)



def _subclassed(kind: str) -> nn.Linear:
    """Subclasses that tracing keeps as leaves (torch.nn's own): attention's out_proj class, and
    what a parametrization (weight norm) makes of a Linear."""
    if kind == "out_proj":
        return NonDynamicallyQuantizableLinear(16, 12)
    return nn.utils.parametrizations.weight_norm(nn.Linear(16, 12))


@pytest.mark.parametrize("kind", ["out_proj", "weight_norm"])
@pytest.mark.parametrize("selected", [True, False], ids=["selected", "filtered"])
def test_a_linear_subclass_a_linear_rule_names_is_kept_with_the_reason(kind, selected):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.fc = _subclassed(kind)
            self.plain = nn.Linear(12, 24)

        def forward(self, x):
            return self.plain(self.fc(self.conv(x).mean((2, 3))))

    model = Model().eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # "filtered": the rule names fc but min_out_channels leaves it out (the unselected-reason path).
    rule = {"match": ["fc", "plain"], "layer_type": "linear", "method": "low_rank", "rank": 4}
    if not selected:
        rule["min_out_channels"] = 20
    result = compressor.compress(model, {"rules": [{"match": "*", "method": "keep"}, rule]}, x)
    by_name = {layer["name"]: layer for layer in result.report["layers"]}
    fc, expected = by_name["fc"], "subclasses nn.Linear" if selected else "min_out_channels 20"
    assert fc["method"] == "keep" and expected in (fc["skipped_reason"] or "") and fc["macs_before"] == 16 * 12, fc
    assert by_name["plain"]["method"] == "low_rank", by_name["plain"]
    assert isinstance(result.model.get_submodule("fc"), type(model.fc)), type(result.model.get_submodule("fc"))
