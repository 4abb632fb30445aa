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


def macs_figure(layers: Sequence[dict]):
    """Per-layer MACs before and after, as grouped horizontal bars on a linear axis from zero: bar
    lengths compare (a log axis made a 4x cut look like a quarter), the legend sits above the bars."""
    import numpy as np

    rows = [layer for layer in layers if layer.get("macs_before")]
    figure = _figure(8, max(2.5, 0.22 * len(rows) + 1.4))
    axes = figure.add_subplot()
    y = np.arange(len(rows))
    axes.barh(y - 0.2, [l["macs_before"] for l in rows], height=0.4, label="before")
    axes.barh(y + 0.2, [l["macs_after"] or 0 for l in rows], height=0.4, label="after")
    axes.set_yticks(y, [l["name"] for l in rows], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(left=0)
    axes.set_xlabel("MACs per sample")
    axes.set_title("Per-layer MACs", pad=22)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, frameon=False, fontsize=8)
    figure.tight_layout()
    return figure


def plot_macs(layers: Sequence[dict], path: Path) -> Path:
    macs_figure(layers).savefig(path)
    return path


def _threads_text(count: int) -> str:
    return threads_label(count) if count == 0 else f"{count} thread{'s' if count > 1 else ''}"


def latency_figure(latency: Sequence[dict]):
    """Median latency of each model per thread setting, each bar labelled with its value. No p90
    whiskers: one slow outlier stretched the axis until the bars compared were slivers; the p90s
    are in report.md's table."""
    import numpy as np

    models = [m for m in ("original", "compressed", "int8") if f"{m}_ms" in latency[0]]
    figure = _figure(6, 3.2)
    axes = figure.add_subplot()
    x = np.arange(len(latency))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        medians = [r[f"{model}_ms"] for r in latency]
        bars = axes.bar(x + (i - (len(models) - 1) / 2) * width, medians, width, label=model)
        axes.bar_label(bars, fmt="%.3g", fontsize=7)
    axes.set_xticks(x, [f"{_threads_text(r['threads'])}, batch {r['batch']}" for r in latency], fontsize=8)
    axes.set_ylabel("ms (median)")
    axes.set_ylim(0, 1.15 * max(r[f"{m}_ms"] for r in latency for m in models))
    axes.set_title(f"ONNX Runtime latency ({latency[0]['provider']})", pad=22)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=len(models), frameon=False, fontsize=8)
    figure.tight_layout()
    return figure


def plot_latency(latency: Sequence[dict], path: Path) -> Path:
    latency_figure(latency).savefig(path)
    return path


#: The x axis of budget.png per target metric: what a candidate costs.
COST_LABELS = {"macs": "MACs per sample", "params": "parameters", "latency": "ms (single-layer timing)"}


def budget_figure(curves: Sequence[dict], metric: str):
    """Predicted relative error against cost for the largest solved layers, the chosen point marked.
    Cost, not rank: a rank counts different things per method (depth multiplier, channels), so
    curves over rank could not be compared."""
    columns = min(3, len(curves))
    rows = (len(curves) + columns - 1) // columns
    figure = _figure(4 * columns, 3 * rows)
    for index, curve in enumerate(curves):
        axes = figure.add_subplot(rows, columns, index + 1)
        for method, points in curve["methods"].items():  # points: [rank, predicted error, cost]
            axes.plot([p[2] for p in points], [p[1] for p in points], marker=".", label=method)
        method, rank = curve["chosen"]
        if rank is not None and method in curve["methods"]:
            chosen = [p for p in curve["methods"][method] if p[0] == rank]
            if chosen:
                axes.plot([chosen[0][2]], [chosen[0][1]], "k*", markersize=10, label="chosen")
        axes.set_title(f"{curve['name']} ({method}{'' if rank is None else f' r={rank}'})", fontsize=8)
        axes.set_xlabel(COST_LABELS.get(metric, metric), fontsize=8)
        axes.set_xlim(left=0)
        axes.set_ylabel("predicted rel. error", fontsize=8)
        axes.tick_params(labelsize=7)
        axes.legend(fontsize=6)
    figure.tight_layout()
    return figure


def plot_budget(curves: Sequence[dict], path: Path, metric: str = "macs") -> Path:
    budget_figure(curves, metric).savefig(path)
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
                f"| {label} | {values['samples']} | {_num(values.get('agreement'), '.4f')} | {_num(values.get('accuracy_original'), '.4f')} | "
                f"{_num(values.get('accuracy_compressed'), '.4f')} | {_num(values.get('output_rel_error'), '.3e')} |"
            )
        # Segmentation: agreement and accuracy above count pixels; mean IoU says how the classes fare.
        for label, values in rows:
            if values.get("miou_vs_original") is not None:
                lines.append(
                    f"\n{label}: mIoU vs the original's prediction {values['miou_vs_original']:.4f}; vs labels "
                    f"{_num(values.get('miou_original'), '.4f')} (original) -> {_num(values.get('miou_compressed'), '.4f')} (compressed)."
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
    return lines + _advice_lines(report.get("advice"))


def _advice_lines(advice: dict | None) -> list[str]:
    if not advice:
        return []
    lines = ["", f"**Recommended:** {threads_label(advice['threads'])} intra-op thread(s)"
             + (f", {advice['format']}" if "format" in advice else "") + f" ({advice['compressed_ms']:.3f} ms compressed)."]
    if advice.get("format") == "float":
        lines.append(f"INT8 is slower than float here ({advice['int8_vs_float']:.2f}x of the float compressed speed): ship the float model.")
    if advice["slower_than_original"]:
        settings = ", ".join(threads_label(t) for t in advice["slower_than_original"])
        lines.append(f"**The compressed model is slower than the original at {settings} thread(s).**")
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


def _reconstruct_line(report: dict) -> list[str]:
    record = report.get("reconstruct")
    if not record:
        return []
    if "skipped" in record:
        return [f"Block reconstruction skipped: {_escape(record['skipped'])}."]
    pieces = record["pieces"]
    before = sum(p["error_before"] for p in pieces) / max(len(pieces), 1)
    after = sum(p["error_after"] for p in pieces) / max(len(pieces), 1)
    seconds = sum(p["seconds"] for p in pieces)
    return [
        f"Block reconstruction ({record['steps']} steps, train {record['train']}): {len(pieces)} pieces, mean relative "
        f"output error on the calibration data {before:.3e} -> {after:.3e}, {seconds:.1f} s."
    ]


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
        lines += ["", f"PyTorch output, compressed vs original, on a random batch: relative error {report['output_rel_error']:.3e} (the worst output)."]
    task = report.get("task")
    if task:
        lines.append(f"Outputs: {len(task['outputs'])}, task {task['kind']} ({task['source']}; see `task:` in the recipe).")
    lines += _reconstruct_line(report)
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
        lines += [f"![Predicted error vs cost, largest layers]({images[BUDGET_PLOT]})", ""]
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
    target = report.get("target") or {}
    if target.get("curves"):
        images[BUDGET_PLOT] = plot_budget(target["curves"], out / BUDGET_PLOT, target.get("metric", "macs")).name
    (out / REPORT_MD).write_text(render_markdown(report, images))
    return [REPORT_MD, *images]
