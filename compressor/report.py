"""report.json content and its terminal rendering."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from compressor.passes.match import LayerPlan

LAYER_KEYS = (
    "name",
    "method",
    "rank",
    "kernel",
    "in_channels",
    "out_channels",
    "macs_before",
    "macs_after",
    "params_before",
    "params_after",
    "weight_rel_error",
    "output_rel_error",
    "predicted_error",
    "init",
    "skipped_reason",
    "note",
)
"""The stable per-layer keys of report.json; extra keys (groups, rule, calls, choices, sensitivity) follow them.

``output_rel_error`` is measured on the calibration data (``None`` without it);
``predicted_error`` is the relative error the rank was chosen by (whitened with data);
``sensitivity`` is what the budget solver weighed its square by (compressor/sensitivity.py).
"""


def layer_record(plan: LayerPlan) -> dict:
    record = {key: getattr(plan, key) for key in LAYER_KEYS}
    record["kernel"] = list(plan.kernel) if plan.kernel else None
    record.update(groups=plan.groups, rule=plan.rule, calls=plan.calls, choices=list(plan.choices), sensitivity=plan.sensitivity)
    return record


def totals_record(before: dict[str, int], after: dict[str, int]) -> dict[str, float | int]:
    return {
        "macs_before": before["macs"],
        "macs_after": after["macs"],
        "params_before": before["params"],
        "params_after": after["params"],
        "macs_ratio": after["macs"] / max(before["macs"], 1),
        "params_ratio": after["params"] / max(before["params"], 1),
    }


def planned_totals(before: dict[str, int], layers: Sequence) -> dict[str, float | int]:
    """:func:`totals_record` of a plan: ``before`` (every Conv2d and Linear, as profiled) changed by each
    planned layer's cost, so a dry run counts MACs as the finished run does."""
    after = {
        key: before[key] + sum((getattr(l, f"{key}_after") or 0) - (getattr(l, f"{key}_before") or 0) for l in layers)
        for key in ("macs", "params")
    }
    return totals_record(before, after)


def format_count(value: int | None) -> str:
    """``1.23M``-style counts for tables (``-`` for unknown)."""
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


#: The terminal table's columns; report.md has these and more (see report_md._layer_table).
COLUMNS = ("layer", "method", "rank", "kernel", "MACs", "params", "weight err", "output err", "note")
#: Left out in this order while the table is wider than the terminal, so that names and numbers
#: never wrap; report.md keeps every column.
OPTIONAL_COLUMNS = ("params", "kernel", "output err", "weight err")


def _cells(layer: dict) -> dict[str, str]:
    rank = "-" if layer["rank"] is None else str(layer["rank"]) + (f"/g{layer['groups']}" if layer["groups"] > 1 else "")
    error, output_error = layer["weight_rel_error"], layer.get("output_rel_error")
    return {
        "layer": layer["name"],
        "method": layer["method"],
        "rank": rank,
        "kernel": "x".join(map(str, layer["kernel"])) if layer["kernel"] else "-",
        "MACs": f"{format_count(layer['macs_before'])} -> {format_count(layer['macs_after'])}",
        "params": f"{format_count(layer['params_before'])} -> {format_count(layer['params_after'])}",
        "weight err": "-" if error is None else f"{error:.2e}",
        "output err": "-" if output_error is None else f"{output_error:.2e}",
        "note": "; ".join(text for text in (layer["skipped_reason"], layer.get("note")) if text),
    }


#: The note column folds, down to this width; every other column keeps its cells on one line.
NOTE_WIDTH = 16


def _table(title: str, columns: Sequence[str], rows: Sequence[dict[str, str]], *, folded_notes: bool = False) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for column in columns:
        if column == "note":
            table.add_column(column, overflow="fold", min_width=min(NOTE_WIDTH, max((len(r["note"]) for r in rows), default=0)))
        else:
            table.add_column(column, no_wrap=True)
    for row in rows:
        # folded_notes: the narrowest the note column can get, for measuring
        table.add_row(*(row[column][:NOTE_WIDTH] if folded_notes and column == "note" else row[column] for column in columns))
    return table


def layer_table(layers: Sequence[dict], title: str, console: Console) -> tuple[Table, list[str]]:
    """The per-layer table at the console's width, and the columns left out to fit it."""
    rows = [_cells(layer) for layer in layers]
    dropped: list[str] = []
    for drop in (None, *OPTIONAL_COLUMNS):
        if drop is not None:
            dropped.append(drop)
        columns = [c for c in COLUMNS if c not in dropped]
        narrowest = _table(title, columns, rows, folded_notes=True)
        if Measurement.get(console, console.options.update(max_width=10**6), narrowest).maximum <= console.width:
            break
    return _table(title, columns, rows), dropped


def _print_layers(report: dict, title: str, console: Console, where: str) -> None:
    table, dropped = layer_table(report["layers"], title, console)
    console.print(table)
    if dropped:
        console.print(f"({', '.join(dropped)} left out to fit {console.width} columns; {where})")


def render_plan(report: dict, console: Console) -> None:
    _print_layers(report, f"Plan ({report['graph']} graph)", console, "a wider terminal shows them")
    _render_totals(report["totals"], console)
    _render_init_and_target(report, console)


def _render_totals(totals: dict, console: Console) -> None:
    console.print(
        f"Totals (Conv2d + Linear, per sample): MACs {format_count(totals['macs_before'])} -> {format_count(totals['macs_after'])} "
        f"(x{totals['macs_ratio']:.3f}), params {format_count(totals['params_before'])} -> {format_count(totals['params_after'])} "
        f"(x{totals['params_ratio']:.3f})"
    )


def _render_init_and_target(report: dict, console: Console) -> None:
    if report.get("init") == "data":
        console.print(f"init: data-aware (whitened decompositions, least-squares refits) on {report['calibration_samples']} calibration samples")
    else:
        console.print("init: weights only (no --data given: decompositions minimize the weight error, not the output error)")
    target = report.get("target")
    if target:
        achieved = target.get("achieved", target["planned_ratio"])
        console.print(
            f"target {target['metric']} <= {target['fraction']:.3f} of the original: achieved {achieved:.4f} "
            f"({target['solved_layers']} layers chosen by the budget solver, errors from {target['error_source']})"
        )


def render_summary(report: dict, console: Console) -> None:
    _print_layers(report, f"Layers ({report['graph']} graph)", console, "report.md has every column")
    _render_totals(report["totals"], console)
    console.print(f"PyTorch output, compressed vs original: relative error {report['output_rel_error']:.3e}")
    task = report.get("task")
    if task:
        console.print(f"Task: {task['kind']} ({task['source']}), {len(task['outputs'])} output(s)")
    onnx = report.get("onnx")
    if onnx:
        verdict = "PASS" if onnx["passed"] else "FAIL"
        console.print(
            f"ONNX Runtime parity {verdict}: compressed max|diff| {onnx['parity_max_abs']:.3e}, "
            f"rel {onnx['parity_rel']:.3e} (tolerance {onnx['tolerance']:.1e}); original rel "
            f"{onnx.get('original_parity_rel', float('nan')):.3e}"
        )
    _render_init_and_target(report, console)
    metrics = report.get("metrics")
    if metrics:
        for label, values in (("PyTorch", metrics), ("ONNX Runtime", metrics.get("onnx"))):
            if not values:
                continue
            accuracy = ""
            if values["accuracy_original"] is not None:
                accuracy = f", accuracy {values['accuracy_original']:.4f} -> {values['accuracy_compressed']:.4f}"
            console.print(f"Eval ({label}) on {values['samples']} samples: top-1 agreement {_fraction(values['agreement'])}{accuracy}")
    int8 = report.get("int8")
    if int8:
        console.print(
            f"INT8 ({int8['mode']}) {'PASS' if int8['passed'] else 'FAIL'}: top-1 agreement with the float compressed model "
            f"{int8['agreement_with_float']:.4f} on {int8['samples']} samples ({int8['checked_on']})"
        )
    for record in report.get("latency") or ():
        threads = "all threads" if record["threads"] == 0 else f"{record['threads']} thread{'s' if record['threads'] > 1 else ''}"
        int8_text = f", INT8 {record['int8_ms']:.2f} ms (x{record['int8_speedup']:.2f})" if "int8_ms" in record else ""
        console.print(
            f"Latency (ONNX Runtime, {threads}, batch {record['batch']}, median): {record['original_ms']:.2f} ms -> "
            f"{record['compressed_ms']:.2f} ms (x{record['speedup']:.2f}){int8_text}"
        )
    _render_latency_target(report.get("target"), console)
    _render_advice(report.get("advice"), console)
    _render_finetune(report.get("finetune"), console)


def _render_latency_target(target: dict | None, console: Console) -> None:
    if not target or target.get("metric") != "latency" or "measured_ratio" not in target:
        return
    steps = ", ".join(f"{a['ratio']:.3f}" for a in target["corrections"] if "ratio" in a)
    verdict = "held" if target["held"] else "NOT held"
    console.print(
        f"Latency target {target['fraction']} ({target['measured_threads']} thread(s)): {verdict}, whole model measured "
        f"at {target['measured_ratio']:.3f} of the original (each plan: {steps})"
    )


def _render_advice(advice: dict | None, console: Console) -> None:
    if not advice:
        return
    where = "all threads" if advice["threads"] == 0 else f"{advice['threads']} thread(s)"
    console.print(f"Fastest here: {where}" + (f", {advice['format']}" if "format" in advice else ""))
    if advice["slower_than_original"]:
        settings = ", ".join("all" if t == 0 else str(t) for t in advice["slower_than_original"])
        console.print(f"[bold]Warning: the compressed model is slower than the original at {settings} thread(s).[/bold]")


def _fraction(value: float | None) -> str:
    """An agreement; ``None`` for outputs without classes (task other)."""
    return "n/a (no classes)" if value is None else f"{value:.4f}"


def _render_finetune(tuned: dict | None, console: Console) -> None:
    if not tuned:
        return
    if "skipped" in tuned:
        console.print(f"fine-tune skipped: {tuned['skipped']}")
        return
    before, after = tuned["before"], tuned["after"]
    accuracy = ""
    if after["accuracy_compressed"] is not None:
        accuracy = f", accuracy {before['accuracy_compressed']:.4f} -> {after['accuracy_compressed']:.4f} (original {after['accuracy_original']:.4f})"
    console.print(
        f"fine-tune: {tuned['steps']} steps ({tuned['epochs']:.1f} epochs) in {tuned['seconds']:.1f}s on {tuned['device']}"
        f"{' x' + str(tuned['world_size']) if tuned['world_size'] > 1 else ''}, stopped by {tuned['stopped_by']}, "
        f"{tuned['images_per_second']:.0f} img/s; held-out ({after['samples']}) agreement {_fraction(before['agreement'])} -> "
        f"{_fraction(after['agreement'])}{accuracy}; best weights from step {tuned['best_step']}"
    )
