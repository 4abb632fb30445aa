"""report.md and its PNG plots, written beside report.json from the same dict.

Plots use matplotlib's object API (``Figure`` + the Agg canvas): no pyplot global state and no
display needed, so this works on headless machines and in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from compressor.bench import threads_label
from compressor.report import format_count

MACS_PLOT = "macs.png"
LATENCY_PLOT = "latency.png"
BUDGET_PLOT = "budget.png"
REPORT_MD = "report.md"
#: Every file this module may write (report.md and the plots).
FILES = (REPORT_MD, MACS_PLOT, LATENCY_PLOT, BUDGET_PLOT)


def _num(value, spec: str = ".3g") -> str:
    return "-" if value is None else format(value, spec)


def _escape(text) -> str:
    return "-" if text in (None, "") else str(text).replace("|", "\\|").replace("\n", " ")


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_macs(layers: Sequence[dict], path: Path) -> Path:
    """Per-layer MACs before and after, as grouped horizontal bars (log scale)."""
    import numpy as np

    rows = [layer for layer in layers if layer.get("macs_before")]
    figure = _figure(8, max(2.5, 0.22 * len(rows) + 1.2))
    axes = figure.add_subplot()
    y = np.arange(len(rows))
    axes.barh(y - 0.2, [l["macs_before"] for l in rows], height=0.4, label="before")
    axes.barh(y + 0.2, [l["macs_after"] or 0 for l in rows], height=0.4, label="after")
    axes.set_yticks(y, [l["name"] for l in rows], fontsize=7)
    axes.invert_yaxis()
    axes.set_xscale("log")
    axes.set_xlabel("MACs per sample")
    axes.set_title("Per-layer MACs")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_latency(latency: Sequence[dict], path: Path) -> Path:
    """Median latency of each model per thread setting, with p90 as the error bar's top."""
    import numpy as np

    models = [m for m in ("original", "compressed", "int8") if f"{m}_ms" in latency[0]]
    figure = _figure(6, 3.2)
    axes = figure.add_subplot()
    x = np.arange(len(latency))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        medians = [r[f"{model}_ms"] for r in latency]
        upper = [r[f"{model}_p90_ms"] - r[f"{model}_ms"] for r in latency]
        axes.bar(x + (i - (len(models) - 1) / 2) * width, medians, width, yerr=[[0] * len(upper), upper], label=model, capsize=3)
    axes.set_xticks(x, [f"{threads_label(r['threads'])} threads, batch {r['batch']}" for r in latency], fontsize=8)
    axes.set_ylabel("ms (median; bar to p90)")
    axes.set_title(f"ONNX Runtime latency ({latency[0]['provider']})")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_budget(curves: Sequence[dict], path: Path) -> Path:
    """Predicted relative error against rank for the largest solved layers, chosen rank marked."""
    columns = min(3, len(curves))
    rows = (len(curves) + columns - 1) // columns
    figure = _figure(4 * columns, 3 * rows)
    for index, curve in enumerate(curves):
        axes = figure.add_subplot(rows, columns, index + 1)
        for method, points in curve["methods"].items():
            ranks = [p[0] for p in points]
            errors = [p[1] for p in points]
            axes.plot(ranks, errors, marker=".", label=method)
        method, rank = curve["chosen"]
        if rank is not None and method in curve["methods"]:
            chosen = [p for p in curve["methods"][method] if p[0] == rank]
            if chosen:
                axes.plot([rank], [chosen[0][1]], "k*", markersize=10, label="chosen")
        axes.set_title(f"{curve['name']} ({method}{'' if rank is None else f' r={rank}'})", fontsize=8)
        axes.set_xlabel("rank", fontsize=8)
        axes.set_ylabel("predicted rel. error", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _layer_table(layers: Sequence[dict]) -> list[str]:
    lines = [
        "| layer | method | rank | kernel | MACs before | MACs after | params before | params after | weight err | output err | predicted err | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer in layers:
        rank = "-" if layer.get("rank") is None else str(layer["rank"]) + (f"/g{layer['groups']}" if layer.get("groups", 1) > 1 else "")
        kernel = "x".join(map(str, layer["kernel"])) if layer.get("kernel") else "-"
        note = "; ".join(t for t in (layer.get("skipped_reason"), layer.get("note")) if t)
        lines.append(
            f"| {_escape(layer['name'])} | {layer['method']} | {rank} | {kernel} | {format_count(layer.get('macs_before'))} | "
            f"{format_count(layer.get('macs_after'))} | {format_count(layer.get('params_before'))} | {format_count(layer.get('params_after'))} | "
            f"{_num(layer.get('weight_rel_error'), '.2e')} | {_num(layer.get('output_rel_error'), '.2e')} | "
            f"{_num(layer.get('predicted_error'), '.2e')} | {_escape(note)} |"
        )
    return lines


def _metrics_lines(report: dict) -> list[str]:
    lines = []
    metrics = report.get("metrics")
    rows = []
    if metrics:
        rows.append(("compressed vs original, PyTorch", metrics))
        if metrics.get("onnx"):
            rows.append(("compressed vs original, ONNX Runtime", metrics["onnx"]))
    int8 = report.get("int8")
    if int8 and int8.get("metrics"):
        rows.append(("INT8 vs original, ONNX Runtime", int8["metrics"]))
    if rows:
        lines += ["| comparison | samples | top-1 agreement | accuracy original | accuracy compressed | output rel. error |", "|---|---|---|---|---|---|"]
        for label, values in rows:
            lines.append(
                f"| {label} | {values['samples']} | {values['agreement']:.4f} | {_num(values.get('accuracy_original'), '.4f')} | "
                f"{_num(values.get('accuracy_compressed'), '.4f')} | {_num(values.get('output_rel_error'), '.3e')} |"
            )
    else:
        lines.append("No `--eval-data`: no accuracy or agreement figures.")
    if int8:
        verdict = "PASS" if int8["passed"] else "FAIL"
        lines += ["", f"INT8 ({int8['mode']}, {int8.get('format', '')}): top-1 agreement with the float compressed model "
                  f"**{int8['agreement_with_float']:.4f}** on {int8['samples']} samples of {int8['checked_on']} "
                  f"(tolerance: at most {int8['tolerance']:.2%} disagreement) — {verdict}."]
    return lines


def _latency_lines(report: dict) -> list[str]:
    latency = report.get("latency")
    if not latency:
        skipped = report.get("latency_skipped", "bench.runs is 0 or bench.threads is empty")
        return [f"Not measured ({skipped})."]
    has_int8 = "int8_ms" in latency[0]
    header = "| threads | batch | original ms (p90) | compressed ms (p90) | speedup |"
    rule = "|---|---|---|---|---|"
    if has_int8:
        header += " INT8 ms (p90) | INT8 speedup |"
        rule += "---|---|"
    lines = [header, rule]
    for r in latency:
        line = (
            f"| {threads_label(r['threads'])} | {r['batch']} | {r['original_ms']:.3f} ({r['original_p90_ms']:.3f}) | "
            f"{r['compressed_ms']:.3f} ({r['compressed_p90_ms']:.3f}) | {r['speedup']:.2f}x |"
        )
        if has_int8:
            line += f" {r['int8_ms']:.3f} ({r['int8_p90_ms']:.3f}) | {r['int8_speedup']:.2f}x |"
        lines.append(line)
    macs_ratio = report.get("totals", {}).get("macs_ratio")
    if macs_ratio:
        lines += ["", f"MACs reduction {1 / macs_ratio:.2f}x; measured speedup / MACs reduction: "
                  + ", ".join(f"{r['speedup'] * macs_ratio:.2f} ({threads_label(r['threads'])} threads)" for r in latency) + "."]
    lines += ["", f"{latency[0]['provider']}, graph optimizations ALL, {latency[0]['runs']} alternating runs per model "
              "after warm-up; medians, p90 in parentheses."]
    return lines


def _target_lines(report: dict) -> list[str]:
    target = report.get("target")
    if not target:
        return []
    lines = ["## Budget", ""]
    achieved = target.get("achieved")
    lines.append(
        f"Target: {target['metric']} <= {target['fraction']:.3f} of the original; planned {target['planned_ratio']:.4f}"
        + (f", achieved {achieved:.4f}" if achieved is not None else "")
        + f". {target['solved_layers']} layers chosen by the budget solver (errors from {target['error_source']})."
    )
    if target["metric"] == "latency":
        lines += [
            "",
            f"Latency model: original end to end {target['original']:.3f} ms (measured); predicted compressed "
            f"{target['planned']:.3f} ms = fixed {target['fixed_ms']:.3f} ms (everything outside the timed layers) + "
            "the chosen layers' single-layer times"
            + (f"; measured {target['measured_ms']:.3f} ms" if target.get("measured_ms") is not None else "")
            + f". Single-layer timings at {threads_label(target['threads'])} threads: {target['measured']} measured, "
            f"{target['cache_hits']} from the cache ({target['cache']}).",
        ]
    return lines + [""]


def render_markdown(report: dict, images: dict[str, str]) -> str:
    recipe = report.get("recipe", {})
    totals = report.get("totals", {})
    lines = [f"# Compression report: {_escape(report.get('model', 'model'))}", ""]
    lines.append(
        f"Recipe: **{_escape(recipe.get('name') or report.get('recipe_path') or 'unnamed')}**"
        + (f" — {_escape(recipe.get('description'))}" if recipe.get("description") else "")
        + f". Input shape {report.get('input_shape')}, {report.get('graph')} graph, init: {report.get('init')}."
    )
    lines += ["", "## Totals", ""]
    if totals:
        lines += [
            "| | before | after | ratio |", "|---|---|---|---|",
            f"| MACs (Conv2d + Linear, per sample) | {format_count(totals['macs_before'])} | {format_count(totals['macs_after'])} | {totals['macs_ratio']:.3f} |",
            f"| parameters | {format_count(totals['params_before'])} | {format_count(totals['params_after'])} | {totals['params_ratio']:.3f} |",
        ]
    if "output_rel_error" in report:
        lines += ["", f"PyTorch output, compressed vs original, on a random batch: relative error {report['output_rel_error']:.3e}."]
    onnx = report.get("onnx")
    if onnx:
        lines.append(
            f"ONNX Runtime parity {'PASS' if onnx['passed'] else 'FAIL'}: relative error {onnx['parity_rel']:.3e} "
            f"(tolerance {onnx['tolerance']:.1e})."
        )
    if MACS_PLOT in images:
        lines += ["", f"![Per-layer MACs before and after]({images[MACS_PLOT]})"]
    lines += ["", "## Accuracy and agreement", "", *_metrics_lines(report), "", "## Latency", "", *_latency_lines(report)]
    if LATENCY_PLOT in images:
        lines += ["", f"![Latency before and after]({images[LATENCY_PLOT]})"]
    lines += ["", *_target_lines(report)]
    if BUDGET_PLOT in images:
        lines += [f"![Predicted error vs rank, largest layers]({images[BUDGET_PLOT]})", ""]
    lines += ["## Layers", "", *_layer_table(report.get("layers", [])), ""]
    return "\n".join(lines)


def write_report_md(report: dict, out: str | Path) -> list[str]:
    """Write report.md and its plots into ``out``; return the names of the files written."""
    out = Path(out)
    images: dict[str, str] = {}
    if any(layer.get("macs_before") for layer in report.get("layers", [])):
        images[MACS_PLOT] = plot_macs(report["layers"], out / MACS_PLOT).name
    if report.get("latency"):
        images[LATENCY_PLOT] = plot_latency(report["latency"], out / LATENCY_PLOT).name
    curves = (report.get("target") or {}).get("curves")
    if curves:
        images[BUDGET_PLOT] = plot_budget(curves, out / BUDGET_PLOT).name
    (out / REPORT_MD).write_text(render_markdown(report, images))
    return [REPORT_MD, *images]
