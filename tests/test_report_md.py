"""report.md renders from a report dict, with every image it links written beside it."""

from __future__ import annotations

import re

from compressor.report_md import BUDGET_PLOT, LATENCY_PLOT, MACS_PLOT, budget_figure, latency_figure, macs_figure, write_report_md

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layer(name, before, after, method="spatial_separable", rank=8):
    return {
        "name": name, "method": method, "rank": rank, "groups": 1, "kernel": [3, 3], "macs_before": before,
        "macs_after": after, "params_before": 100, "params_after": 50, "weight_rel_error": 0.1,
        "output_rel_error": None, "predicted_error": 0.05, "skipped_reason": None, "note": "a | pipe",
    }


def _report(**extra) -> dict:
    latency = {
        "threads": 1, "batch": 1, "runs": 5, "provider": "CPUExecutionProvider", "original_ms": 2.0,
        "original_p90_ms": 2.5, "compressed_ms": 1.0, "compressed_p90_ms": 1.2, "speedup": 2.0,
        "int8_ms": 0.8, "int8_p90_ms": 0.9, "int8_speedup": 2.5,
    }
    report = {
        "model": "net.pt", "recipe": {"name": "fast", "description": "test"}, "input_shape": [1, 3, 32, 32],
        "graph": "fx", "init": "weights",
        "layers": [_layer("conv1", 1000, 400), _layer("conv2", 2000, 900)],
        "totals": {"macs_before": 3000, "macs_after": 1300, "params_before": 200, "params_after": 100,
                   "macs_ratio": 1300 / 3000, "params_ratio": 0.5},
        "output_rel_error": 0.01,
        "onnx": {"passed": True, "parity_rel": 1e-7, "tolerance": 1e-4},
        "latency": [latency, {**latency, "threads": 0}],
        "int8": {"mode": "static", "format": "QDQ", "agreement_with_float": 0.99, "samples": 100,
                 "checked_on": "eval-data", "tolerance": 0.05, "passed": True},
    }
    report.update(extra)
    return report


def test_report_md_links_every_plot_and_the_plots_are_pngs(tmp_path):
    target = {
        "metric": "latency", "fraction": 0.5, "planned_ratio": 0.49, "achieved": 0.52, "solved_layers": 2,
        "error_source": "weights", "original": 2.0, "planned": 0.98, "fixed_ms": 0.3, "measured_ms": 1.04,
        "threads": 1, "measured": 10, "cache_hits": 3, "cache": str(tmp_path / "cache"),
        "curves": [{"name": "conv2", "chosen": ["spatial_separable", 8],
                    "methods": {"spatial_separable": [[8, 0.3, 1.0], [16, 0.1, 2.0]], "grouped": [[8, 0.4, 1.0]]}}],
    }
    written = write_report_md(_report(target=target), tmp_path)
    assert sorted(written) == sorted(["report.md", MACS_PLOT, LATENCY_PLOT, BUDGET_PLOT]), written
    text = (tmp_path / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(linked) == sorted([MACS_PLOT, LATENCY_PLOT, BUDGET_PLOT]), linked
    for name in linked:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 2000, f"{name}: {len(data)} bytes"
    for needle in ("# Compression report: net.pt", "**fast**", "| conv2 | spatial_separable | 8 |", "2.00x",
                   "INT8 (static", "0.9900", "measured 1.040 ms", "a \\| pipe", "## Latency", "## Budget"):
        assert needle in text, f"{needle!r} not in report.md:\n{text}"


def test_without_latency_or_target_only_the_macs_plot_is_written(tmp_path):
    report = _report(latency=[], latency_skipped="bench.runs is 0 or bench.threads is empty")
    del report["int8"]
    written = write_report_md(report, tmp_path)
    assert sorted(written) == ["macs.png", "report.md"], written
    text = (tmp_path / "report.md").read_text()
    assert "Not measured (bench.runs is 0" in text and "latency.png" not in text, text


def _overlapping_bars(figure, axes) -> list[str]:
    figure.canvas.draw()
    legend = axes.get_legend().get_window_extent()
    return [str(bar) for bar in axes.patches if bar.get_width() > 0 and legend.overlaps(bar.get_window_extent())]


def test_macs_plot_is_linear_from_zero_and_its_legend_covers_no_bar():
    layers = [_layer(f"layer{i}.conv", 4000, 1000) for i in range(6)]
    figure = macs_figure(layers)
    (axes,) = figure.axes
    assert axes.get_xscale() == "linear" and axes.get_xlim()[0] == 0, (axes.get_xscale(), axes.get_xlim())
    widths = sorted({bar.get_width() for bar in axes.patches})
    assert widths == [1000, 4000], widths  # a 4x cut is drawn as a bar a quarter as long
    covered = _overlapping_bars(figure, axes)
    assert not covered, f"the legend covers {covered}"


def test_latency_plot_scales_to_the_medians_without_p90_whiskers():
    record = {"threads": 1, "batch": 1, "provider": "CPUExecutionProvider", "original_ms": 1.0, "original_p90_ms": 40.0,
              "compressed_ms": 0.5, "compressed_p90_ms": 0.6}
    figure = latency_figure([record])
    (axes,) = figure.axes
    top = axes.get_ylim()[1]
    assert top < 2.0, f"y axis to {top} ms for medians of 1.0 and 0.5 ms: a p90 outlier still sets the scale"
    assert not [line for line in axes.lines if len(line.get_xdata())], "error bars drawn"
    labels = sorted(text.get_text() for text in axes.texts)
    assert labels == ["0.5", "1"], labels


def test_budget_plot_puts_cost_on_the_x_axis():
    curves = [{"name": "conv2", "chosen": ["spatial_separable", 16],
               "methods": {"spatial_separable": [[8, 0.3, 100.0], [16, 0.1, 200.0]], "depthwise_separable": [[2, 0.2, 150.0]]}}]
    figure = budget_figure(curves, "macs")
    (axes,) = figure.axes
    assert axes.get_xlabel() == "MACs per sample", axes.get_xlabel()
    xs = {line.get_label(): list(line.get_xdata()) for line in axes.lines}
    assert xs == {"spatial_separable": [100.0, 200.0], "depthwise_separable": [150.0], "chosen": [200.0]}, xs


def test_latency_plot_legend_covers_no_bar():
    record = {"threads": 1, "batch": 1, "provider": "CPUExecutionProvider", "original_ms": 1.0, "original_p90_ms": 1.1,
              "compressed_ms": 0.9, "compressed_p90_ms": 1.0, "int8_ms": 0.95, "int8_p90_ms": 1.0}
    figure = latency_figure([record, {**record, "threads": 0}])
    covered = _overlapping_bars(figure, figure.axes[0])
    assert not covered, f"the legend covers {covered}"


def test_report_md_says_what_block_reconstruction_did(tmp_path):
    pieces = [{"end": "relu", "layers": ["a"], "error_before": 0.2, "error_after": 0.1, "seconds": 1.5},
              {"end": "add", "layers": ["b"], "error_before": 0.4, "error_after": 0.3, "seconds": 2.0}]
    write_report_md(_report(reconstruct={"steps": 100, "lr": 1e-3, "train": "all", "pieces": pieces}), tmp_path)
    text = (tmp_path / "report.md").read_text()
    line = "Block reconstruction (100 steps, train all): 2 pieces, mean relative output error on the calibration data 3.000e-01 -> 2.000e-01, 3.5 s."
    assert line in text, text
    write_report_md(_report(reconstruct={"skipped": "no --data: block reconstruction trains on calibration images"}), tmp_path)
    assert "Block reconstruction skipped: no --data" in (tmp_path / "report.md").read_text()
    write_report_md(_report(), tmp_path)
    assert "reconstruction" not in (tmp_path / "report.md").read_text()
