"""The terminal rendering of plans and reports: one MACs definition, a table that fits, a readable Plan."""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

import compressor
from compressor import zoo
from compressor.report import OPTIONAL_COLUMNS, render_plan, render_summary
from tests.models_for_cli import CONV_NAMES, INPUT_SHAPE, tiny_net

RECIPE = {"rules": [{"match": "*", "method": "spatial_separable", "rank": 2, "min_kernel_size": 3}], "bench": {"runs": 0}}


def _rendered(render, report: dict, width: int) -> str:
    console = Console(file=io.StringIO(), width=width, color_system=None)
    render(report, console)
    return console.file.getvalue()


@pytest.fixture(scope="module")
def resnet20_plan() -> dict:
    # A fixed-rank recipe: a shipped one may set a latency target, which times every layer first.
    body = {"rules": [{"match": "*", "method": "depthwise_separable", "min_in_channels": 8, "rank": {"macs": 0.35}}]}
    return compressor.plan(zoo.resnet20_cifar().eval(), body, torch.randn(1, 3, 32, 32)).report()


def test_dry_run_counts_macs_as_the_run_does():
    model, x = tiny_net(), torch.randn(INPUT_SHAPE)
    planned = compressor.plan(model, RECIPE, x).report()["totals"]
    measured = compressor.compress(model, RECIPE, x).report["totals"]
    assert planned == measured, f"plan {planned} != run {measured}"
    text = _rendered(render_plan, compressor.plan(model, RECIPE, x).report(), 200)
    assert "Totals (Conv2d + Linear, per sample)" in text and "conv MACs" not in text, text


@pytest.mark.parametrize("width", [80, 100, 120])
def test_layer_table_fits_the_terminal_without_breaking_names(resnet20_plan, width):
    text = _rendered(render_plan, resnet20_plan, width)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width, f"{max(map(len, lines))} columns at width {width}:\n{text}"
    for layer in resnet20_plan["layers"]:
        assert any(f" {layer['name']} " in line for line in lines), f"{layer['name']} broken at width {width}:\n{text}"
    assert "2.36M -> " in text, text  # MACs before -> after are never dropped


def test_a_wide_terminal_shows_every_column(resnet20_plan):
    text = _rendered(render_plan, resnet20_plan, 200)
    assert "left out" not in text, text
    header = next(line for line in text.splitlines() if " layer " in line)
    assert all(column in header for column in OPTIONAL_COLUMNS), header


def test_the_summary_says_report_md_has_the_columns_left_out(tmp_path):
    result = compressor.compress(tiny_net(), RECIPE, torch.randn(INPUT_SHAPE))
    text = _rendered(render_summary, result.report, 70)
    assert "left out to fit 70 columns; report.md has every column" in " ".join(text.split()), text


def test_a_plan_prints_as_the_dry_run_table():
    layer_plan = compressor.plan(tiny_net(), RECIPE, torch.randn(INPUT_SHAPE))
    text = str(layer_plan)
    assert text.startswith("Plan (fx graph)") and "Plan(traced=" not in text, text[:300]
    assert all(name in text for name in CONV_NAMES), text
    assert "Totals (Conv2d + Linear, per sample)" in text, text


def test_summary_says_whether_the_latency_target_held_and_where_the_model_is_slower():
    from compressor.report import _render_advice, _render_latency_target

    def rendered(target, advice):
        console = Console(file=io.StringIO(), width=200, color_system=None)
        _render_latency_target(target, console)
        _render_advice(advice, console)
        return console.file.getvalue()

    target = {"metric": "latency", "fraction": 0.5, "measured_threads": 1, "measured_ratio": 0.61, "held": False,
              "corrections": [{"ratio": 0.66}, {"ratio": 0.61}, {"unreachable": "..."}]}
    advice = {"threads": 1, "compressed_ms": 3.0, "slower_than_original": [0], "format": "float"}
    text = rendered(target, advice)
    assert "NOT held" in text and "0.610 of the original" in text and "0.660, 0.610" in text, text
    assert "slower than the original at all thread(s)" in text and "Fastest here: 1 thread(s), float" in text, text
    target.update(held=True, measured_ratio=0.51)
    advice["slower_than_original"] = []
    text = rendered(target, advice)
    assert "held" in text and "NOT held" not in text and "slower" not in text, text
