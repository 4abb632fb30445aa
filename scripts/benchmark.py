"""Benchmarks against peers, reproducible from one command: writes BENCHMARKS.md (and a JSON of every row).

    .venv/bin/python scripts/benchmark.py                  # the full run (an hour on 2 cores)
    .venv/bin/python scripts/benchmark.py --quick          # smoke run: seconds, tiny subset (CI runs it)

Model and data: the pretrained CIFAR-10 ResNet-20 and images from ../shared/data (``--data-dir``).
Accuracy is measured on the first ``--holdout`` of the 9154 held-out CIFAR-10 *test* images
(``cifar10-test-jpeg-9154.npz``, which no model here trained on), original and compressed on the same
images; calibration and fine-tuning take ``--calibration`` of the 20000 training images
(``cifar10-train-jpeg-20000.npz``, a seeded shuffle), and fine-tuning selects its best weights on its
own 10% of those, never on the test images.
Plus a ResNet-50-style model at 224x224 with random weights, for latency and tool run time only.

Each row runs in a fresh process (peak memory is that process's maximum resident set). Peers run on
the same layers at the ranks our weight-only row chose (see scripts/peers.py for what they are).
MACs and params are counted by ``torch.utils.flop_counter`` on every model alike (so also for
tltorch's modules, which are not ``nn.Conv2d``). Latency: ONNX Runtime CPU, batch 1, median of
alternating runs, original and compressed timed in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data"
METHODS = ("spatial_separable", "depthwise_separable", "grouped", "cp")
PEERS = {"spatial_separable": ["aimet"], "grouped": ["tltorch_tucker"], "cp": ["tltorch_cp"]}
#: Peers left out of the ResNet-50 section, and why (printed in BENCHMARKS.md).
R50_SKIPPED = {
    "tltorch_cp": "its CP-ALS (tensorly `parafac`) did not finish one 512x512x3x3 kernel at R=763 in 300 s here "
    "(2026-12-06; our ALS takes about 20 s on it)"
}
#: The 3x3 body convs: the stem conv and the 1x1 shortcuts stay, for every tool alike.
BODY = {"resnet20": "layer*.conv*", "resnet50": "layer*.conv2"}


# ------------------------------------------------------------------------------------------------ one row (child)


def _model(name: str, data_dir: Path, quick: bool = False):
    import torch

    from compressor import zoo

    if quick:  # the smoke run checks that every step still works, on a model small enough for seconds
        return zoo.randomize_batchnorm(zoo.resnet20_cifar(width=4)).eval(), (1, 3, 32, 32), False
    if name == "resnet20":
        model = zoo.resnet20_cifar()
        weights = data_dir / "resnet20-cifar10.pth"
        pretrained = weights.exists()
        if pretrained:
            model.load_state_dict(torch.load(weights, weights_only=True))
        return model.eval(), (1, 3, 32, 32), pretrained
    model = zoo.randomize_batchnorm(zoo.resnet50())
    return model.eval(), (1, 3, 224, 224), False


def _splits(spec: dict, data_dir: Path):
    """(calibration batches, held-out batches) as normalized float tensors; synthetic when the data is absent."""
    import numpy as np
    import torch

    from compressor import zoo

    train_path, test_path = data_dir / "cifar10-train-jpeg-20000.npz", data_dir / "cifar10-test-jpeg-9154.npz"
    if train_path.exists() and test_path.exists() and not spec.get("quick"):
        train, test = np.load(train_path, allow_pickle=False), np.load(test_path, allow_pickle=False)
        x = np.concatenate([train["x"], test["x"]])
        y = np.concatenate([train["y"], test["y"]]).astype(np.int64)
        rest = np.random.default_rng(0).permutation(len(train["x"]))[: spec["calibration"]]
        held = len(train["x"]) + np.arange(min(spec["holdout"], len(test["x"])))
    else:  # the quick mode's stand-in: the pipeline runs, the numbers mean nothing
        generator = np.random.default_rng(0)
        x = generator.integers(0, 256, (spec["images"], 3, 32, 32), dtype=np.uint8)
        y = generator.integers(0, 10, spec["images"])
        order = generator.permutation(len(x))
        held, rest = order[: spec["holdout"]], order[spec["holdout"] :][: spec["calibration"]]
    mean = torch.tensor(zoo.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zoo.CIFAR10_STD).view(1, 3, 1, 1)

    def batches(indices, size=64):
        out = []
        for start in range(0, len(indices), size):
            part = indices[start : start + size]
            images = (torch.from_numpy(x[part]).float() / 255 - mean) / std
            out.append((images, torch.from_numpy(y[part])))
        return out

    return batches(rest), batches(held)


def _recipe(spec: dict, body: str) -> dict:
    if spec["budget"]:
        rules = [{"match": body, "method": [*spec["budget_methods"], "keep"]}]
    else:
        rules = [{"match": body, "method": spec["method"], "rank": {"macs": spec["fraction"]}}]
    recipe = {
        "name": spec["id"],
        "rules": rules,
        "calibration": {"samples": spec["calibration"], "batch_size": 64},
        "export": {"opset": 17, "tolerance": 1e-3, "quantize": spec["quantize"], "int8_tolerance": 1.0},
        "bench": {"threads": [1, 0], "runs": spec["runs"], "warmup": 3},
    }
    if spec["budget"]:
        recipe["target"] = {spec.get("target_metric", "macs"): spec["fraction"]}
    if spec["finetune"]:
        recipe["finetune"] = {**spec["finetune"], "holdout": 0.1}
    return recipe


def _import_peers():
    """scripts/peers.py, imported when a row runs (it imports torch; the parent process never needs it)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import peers

    return peers


def _ours(spec: dict, data_dir: Path) -> dict:
    import compressor
    from compressor.evaluate import evaluate
    from compressor.pipeline import example_input_for

    peers = _import_peers()
    model, shape, pretrained = _model(spec["model"], data_dir, spec.get("quick", False))
    example = example_input_for(model, shape)
    calibration, held = _splits(spec, data_dir) if spec["model"] == "resnet20" else (None, None)
    result = compressor.compress(
        model, _recipe(spec, BODY[spec["model"]]), example, data=calibration if spec["init"] == "data" else None, progress=False
    )
    if held is not None:  # measured here, not in compress(): fine-tuning must not select on these images
        result.eval_batches = held
        result.report["metrics"] = evaluate(result.original, result.model, held)
    with tempfile.TemporaryDirectory() as out:
        result.save(out)
    report = result.report
    macs, params = peers.macs_and_params(result.model, shape)
    macs0, params0 = peers.macs_and_params(model, shape)
    row = {
        "pretrained": pretrained,
        "macs_ratio": macs / macs0,
        "params_ratio": params / params0,
        "ranks": {layer["name"]: layer["rank"] for layer in report["layers"] if layer["rank"]},
        "methods_chosen": sorted({layer["method"] for layer in report["layers"] if layer["rank"]}),
        "metrics": report.get("metrics"),
        "onnx_metrics": (report.get("metrics") or {}).get("onnx"),
        "int8": report.get("int8"),
        "latency": report.get("latency"),
        "finetune_result": {k: report["finetune"].get(k) for k in ("steps", "train_seconds", "before", "after", "stopped_by")}
        if isinstance(report.get("finetune"), dict) and "steps" in report["finetune"]
        else None,
        "seconds": report.get("seconds"),
        "output_rel_error": report.get("output_rel_error"),
        "target": {k: report["target"].get(k) for k in ("metric", "fraction", "planned_ratio", "achieved")} if report.get("target") else None,
        "layer_methods": {layer["name"]: layer["method"] for layer in report["layers"]},
        "parity_rel": report["onnx"]["parity_rel"],
    }
    return row


def _peer(spec: dict, data_dir: Path) -> dict:
    from compressor import export as onnx_export
    from compressor.bench import benchmark
    from compressor.evaluate import evaluate
    from compressor.phases import timed
    from compressor.pipeline import example_input_for

    peers = _import_peers()
    model, shape, pretrained = _model(spec["model"], data_dir, spec.get("quick", False))
    example = example_input_for(model, shape)
    build = {
        "aimet": peers.aimet_spatial_svd,
        "tltorch_cp": lambda conv, rank: peers.tltorch_factorized(conv, "cp", rank),
        "tltorch_tucker": lambda conv, rank: peers.tltorch_factorized(conv, "tucker", rank),
    }[spec["tool"]]
    seconds: dict[str, float] = {}
    with timed(seconds, "decompose"):
        compressed = peers.replace_convs(model, spec["ranks"], build)
    macs, params = peers.macs_and_params(compressed, shape)
    macs0, params0 = peers.macs_and_params(model, shape)
    row: dict = {"pretrained": pretrained, "macs_ratio": macs / macs0, "params_ratio": params / params0}
    if spec["model"] == "resnet20":
        _, held = _splits(spec, data_dir)
        row["metrics"] = evaluate(model, compressed, held)
    batch = onnx_export.parity_batch(example)
    row["output_rel_error"] = onnx_export.torch_relative_error(model, compressed, batch)
    with tempfile.TemporaryDirectory() as out:
        try:
            with timed(seconds, "export"):
                onnx_export.export_onnx(model, example, Path(out) / "original.onnx", 17)
                onnx_export.export_onnx(compressed, example, Path(out) / "peer.onnx", 17)
            with timed(seconds, "verify"):
                row["parity_rel"] = onnx_export.parity(compressed, Path(out) / "peer.onnx", batch).rel
        except Exception as err:  # a peer that does not export is a finding, not a crash
            row["export_error"] = f"{type(err).__name__}: {err}"[:200]
        if "export_error" not in row:
            with timed(seconds, "latency"):
                row["latency"] = benchmark(Path(out) / "original.onnx", Path(out) / "peer.onnx", shape, threads=[1, 0], runs=spec["runs"], warmup=3)
    row["seconds"] = seconds
    return row


def run_row(spec: dict, data_dir: Path) -> dict:
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    row = _ours(spec, data_dir) if spec["tool"] == "ours" else _peer(spec, data_dir)
    row["wall_seconds"] = time.perf_counter() - started
    row["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {**spec, **row}


# ------------------------------------------------------------------------------------------------ the plan (parent)


def _specs(args) -> list[dict]:
    common = {"quick": args.quick, "images": args.images, "holdout": args.holdout, "calibration": args.calibration, "runs": args.runs, "budget": False, "finetune": None, "quantize": "none"}
    finetune = {"steps": 2} if args.quick else {"max_minutes": args.finetune_minutes}
    specs = []
    for fraction in args.fractions:
        for method in args.methods:
            base = {**common, "model": "resnet20", "tool": "ours", "method": method, "fraction": fraction}
            tag = f"r20-{method}-{fraction:.2f}"
            specs.append({**base, "id": f"{tag}-weights", "init": "weights"})
            if not args.quick:
                specs.append({**base, "id": f"{tag}-data", "init": "data"})
            specs.append({**base, "id": f"{tag}-data-ft", "init": "data", "finetune": finetune, "quantize": "static"})
            for tool in PEERS.get(method, []):
                specs.append({**base, "id": f"{tag}-{tool}", "tool": tool, "init": "weights", "ranks_from": f"{tag}-weights"})
        budget = {**common, "model": "resnet20", "tool": "ours", "method": "budget", "fraction": fraction, "budget": True, "budget_methods": args.methods}
        if not args.quick:
            specs.append({**budget, "id": f"r20-budget-{fraction:.2f}-data", "init": "data"})
        specs.append({**budget, "id": f"r20-budget-{fraction:.2f}-data-ft", "init": "data", "finetune": finetune, "quantize": "static"})
    for fraction in args.latency_targets:  # what MACs budgets do not promise: measured ORT time (1 thread)
        latency = {**common, "model": "resnet20", "tool": "ours", "method": "latency budget", "fraction": fraction, "budget": True, "budget_methods": args.methods, "target_metric": "latency"}
        specs.append({**latency, "id": f"r20-latency-{fraction:.2f}-data", "init": "data"})
    if not args.quick:
        for method in args.methods:
            base = {**common, "model": "resnet50", "tool": "ours", "method": method, "fraction": 1 / 3, "init": "weights"}
            tag = f"r50-{method}-0.33"
            specs.append({**base, "id": f"{tag}-weights"})
            for tool in [tool for tool in PEERS.get(method, []) if tool not in R50_SKIPPED]:
                specs.append({**base, "id": f"{tag}-{tool}", "tool": tool, "ranks_from": f"{tag}-weights"})
    return specs


def _run_child(spec: dict, data_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        result_path = Path(folder) / "row.json"
        command = [sys.executable, __file__, "--row", json.dumps(spec), "--data-dir", str(data_dir), "--row-out", str(result_path)]
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
        if proc.returncode != 0 or not result_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            return {**spec, "error": " | ".join(tail)[:400]}
        return json.loads(result_path.read_text())


def _earlier_run(path: Path) -> tuple[dict[str, dict], float]:
    """The successful rows of an earlier run's JSON by id, and the seconds that run spent (none, 0 without one)."""
    if not path.exists():
        return {}, 0.0
    saved = json.loads(path.read_text())
    rows = {row["id"]: {**row, "resumed": True} for row in saved["rows"] if "error" not in row}
    return rows, float(saved["seconds"])


def _save_rows(path: Path, rows: list[dict], seconds: float) -> None:
    path.write_text(json.dumps({"command": _command(), "seconds": seconds, "rows": rows}, indent=1, default=str) + "\n")


def _command() -> str:
    shown = [arg for arg in sys.argv[1:] if arg != "--resume"]  # a resumed run finishes the same command
    return " ".join(["python scripts/benchmark.py", *shown])


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    for package in ("compressor", "torch", "tensorly", "onnxruntime", "onnx", "tensorly-torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed"
    return found


# ------------------------------------------------------------------------------------------------ markdown


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _speedups(row: dict, key: str = "speedup") -> tuple[str, str]:
    latency = row.get("latency") or []
    by_threads = {record["threads"]: record.get(key) for record in latency}
    return _ratio(by_threads.get(1)), _ratio(by_threads.get(0))


def _tool_label(row: dict) -> str:
    if row["tool"] == "ours":
        init = "data-aware" if row["init"] == "data" else "weights-only"
        tuned = " + fine-tune" if row.get("finetune") else ""
        return f"ours, {init}{tuned}"
    return {"aimet": "AIMET spatial SVD (re-impl.)", "tltorch_cp": "TensorLy-Torch CP", "tltorch_tucker": "TensorLy-Torch Tucker"}[row["tool"]]


def _phases(row: dict) -> str:
    from compressor.phases import PHASES

    seconds = row.get("seconds") or {}
    return ", ".join(f"{phase} {seconds[phase]:.1f}" for phase in PHASES if isinstance(seconds.get(phase), (int, float)))


def _table_head(*columns: str) -> list[str]:
    """A markdown table's header and separator lines."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _rows_markdown(rows: list[dict], accuracy: bool) -> list[str]:
    measured = ("acc. orig", "acc.", "agree", "ORT x (1 thr)", "ORT x (all)", "INT8 acc", "INT8 agree", "INT8 x (1 thr)", "INT8 x (all)")
    if not accuracy:
        measured = ("output rel err", "ORT x (1 thr)", "ORT x (all)")
    lines = _table_head("row", "tool", "MACs", "params", *measured, "wall s", "phases (s)", "peak MiB")
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['id']} | {_tool_label(row)} | failed: {row['error']} |")
            continue
        if "unreachable" in row:
            lines.append(f"| {row['id']} | {_tool_label(row)} | unreachable: {row['unreachable']} |")
            continue
        one, every = _speedups(row)
        common = f"| {row['id']} | {_tool_label(row)} | {_ratio(row['macs_ratio'])} | {_ratio(row['params_ratio'])} |"
        tail = f" {row['wall_seconds']:.0f} | {_phases(row)} | {row['peak_rss_mib']:.0f} |"
        if not accuracy:
            lines.append(f"{common} {row['output_rel_error']:.3g} | {one} | {every} |{tail}")
            continue
        metrics = row.get("metrics") or {}
        int8 = row.get("int8") or {}
        int8_metrics = int8.get("metrics") or {}
        int8_one, int8_all = _speedups(row, "int8_speedup")
        export_note = f" (no ONNX: {row['export_error']})" if row.get("export_error") else ""
        lines.append(
            f"{common} {_pct(metrics.get('accuracy_original'))} | {_pct(metrics.get('accuracy_compressed'))} | "
            f"{_pct(metrics.get('agreement'))} | {one}{export_note} | {every} | {_pct(int8_metrics.get('accuracy_compressed'))} | "
            f"{_pct(int8_metrics.get('agreement'))} | {int8_one} | {int8_all} |{tail}"
        )
    return lines


def _budget_lines(rows: list[dict]) -> list[str]:
    budgets = [row for row in rows if row.get("target")]
    if not budgets:
        return []
    lines = [
        "",
        "Global budgets (one rule over every body conv, methods " + ", ".join(METHODS) + " or keep; the solver picks per layer).",
        "MACs: planned and achieved are counted; latency: planned is the per-layer timing model's prediction,",
        "achieved is the measured 1-thread ORT time, both as fractions of the original's:",
        "",
        *_table_head("row", "target", "planned", "achieved", "convs per method (all convs; the stem, outside the rule, is keep)"),
    ]
    for row in budgets:
        target = row["target"]
        chosen = Counter((row.get("layer_methods") or {}).values())
        lines.append(
            f"| {row['id']} | {target['metric']} <= {target['fraction']:.2f} | {_ratio(target.get('planned_ratio'))} | "
            f"{_ratio(target.get('achieved'))} | {', '.join(f'{m} {n}' for m, n in sorted(chosen.items()))} |"
        )
    return lines


def _finetune_lines(rows: list[dict]) -> list[str]:
    tuned = [row for row in rows if row.get("finetune_result")]
    if not tuned:
        return []
    lines = [
        "",
        "Fine-tuning (on its own 10% split of the calibration images; before/after are agreement on that split;",
        "it keeps the best weights it saw there, the initial ones included, so equal numbers mean it kept them):",
        "",
        *_table_head("row", "steps", "train s", "stopped by", "agree before", "agree after"),
    ]
    for row in tuned:
        ft = row["finetune_result"]
        lines.append(
            f"| {row['id']} | {ft['steps']} | {ft['train_seconds']:.0f} | {ft['stopped_by']} | "
            f"{_pct((ft.get('before') or {}).get('agreement'))} | {_pct((ft.get('after') or {}).get('agreement'))} |"
        )
    return lines


def write_markdown(rows: list[dict], args, seconds: float, path: Path) -> None:
    r20 = [row for row in rows if row["model"] == "resnet20"]
    r50 = [row for row in rows if row["model"] == "resnet50"]
    pretrained = any(row.get("pretrained") for row in r20)
    versions = _versions()
    lines = [
        "# Benchmarks",
        "",
        f"Produced by `{_command()}` in {seconds / 60:.1f} minutes on {os.cpu_count()} CPU cores "
        f"({platform.processor() or platform.machine()}, {platform.system()}), {time.strftime('%Y-%m-%d')}.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".",
        *(
            [f"{resumed} rows were measured by an earlier run of this command and kept with `--resume`; the time adds up both runs."]
            if (resumed := sum(1 for row in rows if row.get("resumed")))
            else []
        ),
        "",
        "How to read it: MACs and params are ratios to the original model (whole model, counted by",
        "`torch.utils.flop_counter`); accuracy and agreement (top-1 equal to the original's) are in percent",
        f"on the first {args.holdout} held-out CIFAR-10 test images (never used for calibration or fine-tuning; standard "
        f"error of an accuracy near 80% on them: {100 * (0.8 * 0.2 / max(args.holdout, 1)) ** 0.5:.1f} pt); `ORT x` is the measured",
        "ONNX Runtime CPU speedup at batch 1 (median of alternating runs; `all` = all cores); INT8 is static",
        "QDQ quantization of the fine-tuned model, calibrated on the calibration images. Phases are the tool's",
        "own timings (report.json `seconds`); wall s is the whole row after imports (the phases plus loading",
        "and the held-out evaluation). INT8 speedups are against the float original.",
        "Row names carry the MACs fraction asked of the rewritten layers, the 3x3 body convs (ResNet-20:",
        "all but the stem; ResNet-50: each bottleneck's conv2). Their ranks are rounded down to whole vector",
        "blocks of this CPU (`round_to: auto`, the default), which lowers the MACs; the stem, 1x1 shortcuts and",
        "ResNet-50's 1x1 convs stay for every tool alike, which raises them: whole-model MACs land on either side.",
        "",
        "Peers: AIMET's Spatial SVD is re-implemented from its source (aimet-torch needs torchvision, which has",
        "no CPU build here; see scripts/peers.py) and is, by definition, our weights-only `spatial_separable`.",
        "TensorLy-Torch `FactorizedConv.from_conv` runs as installed, at the ranks our weights-only row chose",
        "for the same layers (Tucker-2 `[R, R, kh, kw]` for our `grouped`, CP rank R for our `cp`).",
        "",
        f"## CIFAR-10 ResNet-20 ({'pretrained, ../shared/data' if pretrained else 'smoke run: a RANDOM width-4 ResNet-20 on synthetic images; the numbers mean nothing'})",
        "",
        f"{args.calibration} calibration images; fine-tune budget {'2 steps' if args.quick else f'{args.finetune_minutes} min'} per row.",
        "",
        *_rows_markdown(r20, accuracy=True),
        *_budget_lines(r20),
        *_finetune_lines(r20),
    ]
    if r50:
        lines += [
            "",
            "## ResNet-50-style at 224x224 (random weights: latency, size and tool time only)",
            "",
            *_rows_markdown(r50, accuracy=False),
            *[f"\nNot run here: `{tool}`, because {why}." for tool, why in R50_SKIPPED.items()
              if any(tool in PEERS.get(method, []) for method in args.methods)],
        ]
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from benchmarks_md import kept_sections

    kept = kept_sections(path)  # tables other scripts own (benchmark_latency.py); they regenerate them
    path.write_text("\n".join(lines + ([""] + kept if kept else [])) + "\n")


# ------------------------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "BENCHMARKS.md")
    parser.add_argument("--quick", action="store_true", help="smoke run: one method, one fraction, tiny data, no ResNet-50")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--fractions", nargs="+", type=float, default=[1 / 2, 1 / 3])
    parser.add_argument("--images", type=int, default=4660, help="synthetic images of the --quick stand-in")
    parser.add_argument("--holdout", type=int, default=9154, help="held-out test images (of 9154)")
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--latency-targets", nargs="+", type=float, default=[0.7], help="target: {latency: f} rows (fraction of the original's 1-thread ORT time)")
    parser.add_argument("--finetune-minutes", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=30, help="timed ORT runs per model and thread setting")
    parser.add_argument("--resume", action="store_true", help="keep the finished rows of an interrupted run (read from the --out JSON) and run the rest")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main() -> int:
    args = _parser().parse_args()
    if args.row:
        row = run_row(json.loads(args.row), args.data_dir)
        args.row_out.write_text(json.dumps(row, default=str))
        return 0
    if args.quick:
        args.methods, args.fractions = ["spatial_separable"], [0.5]
        args.images, args.holdout, args.calibration, args.runs = 48, 16, 32, 3
    started = time.perf_counter()
    rows_path = args.out.with_suffix(".json")
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    finished, earlier_seconds = _earlier_run(rows_path) if args.resume else ({}, 0.0)
    rows: dict[str, dict] = {}
    for spec in _specs(args):
        if spec.get("ranks_from"):
            source = rows.get(spec["ranks_from"], {})
            if "ranks" not in source:
                rows[spec["id"]] = {**spec, "error": f"no ranks: {spec['ranks_from']} failed"}
                continue
            spec["ranks"] = source["ranks"]
        previous = finished.get(spec["id"])
        if previous is not None and {k: previous.get(k) for k in spec} == spec:
            rows[spec["id"]] = previous
            continue
        print(f"[{time.perf_counter() - started:6.0f}s] {spec['id']}", flush=True)
        rows[spec["id"]] = _run_child(spec, args.data_dir)
        if "smallest reachable" in rows[spec["id"]].get("error", ""):
            # A budget below what the rules can reach is a finding about the model, not a failed row.
            rows[spec["id"]]["unreachable"] = rows[spec["id"]].pop("error").split("RankError: ")[-1]
            print(f"    unreachable: {rows[spec['id']]['unreachable']}", flush=True)
        if "error" in rows[spec["id"]]:
            print(f"    failed: {rows[spec['id']]['error']}", flush=True)
        # saved after every row: an hour-long run that dies late keeps what it measured (see --resume)
        _save_rows(rows_path, list(rows.values()), earlier_seconds + time.perf_counter() - started)
    seconds = earlier_seconds + time.perf_counter() - started
    ordered = list(rows.values())
    _save_rows(rows_path, ordered, seconds)
    write_markdown(ordered, args, seconds, args.out)
    failed = [row["id"] for row in ordered if "error" in row]
    print(f"wrote {args.out} ({len(ordered)} rows, {len(failed)} failed) in {seconds / 60:.1f} min")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
