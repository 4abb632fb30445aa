"""Accuracy at a measured speed, on images the model never saw: the issue-15 plans, one run each.

Each plan is one ``compressor.compress`` + ``Result.save`` of a shared pretrained CIFAR-10 ResNet (see
../shared/data/README.md), as the CLI would run it:

* ``--data``: ``cifar10-train-jpeg-20000.npz`` (training images): calibration draws
  ``calibration.samples`` of it at random (the file is sorted by class); a fine-tuning plan holds out ``finetune.holdout`` of it to pick weights on
  and trains on the rest;
* held-out accuracy: ``cifar10-test-jpeg-9154.npz`` (test images no model here trained on, never used
  for a choice), original and compressed on the same images; the drop is paired (per image, compressed
  correct minus original correct) and given with its standard error;
* speed: ONNX Runtime at 1 thread, original vs compressed alternating, medians (the report's ``latency``).

Writes the ``accuracy`` section of BENCHMARKS.md (``--out``) and prints one JSON line per plan::

    .venv/bin/python scripts/benchmark_accuracy.py --model resnet32 --plans macs-0.5 macs-0.33-ft latency-0.5-ft
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compressor import compress, zoo  # noqa: E402
from compressor.data import load_data  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
import peers  # noqa: E402
from benchmarks_md import replace_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
BLOCKS = {"resnet20": (3, 3, 3), "resnet32": (5, 5, 5)}
#: Every method that rewrites a 3x3 conv of these models, plus keep; the stem (3 input channels) and
#: the classifier stay.
ALL_METHODS = ["spatial_separable", "depthwise_separable", "grouped", "low_rank", "keep"]


def plan_recipe(plan: str, args, seed: int = 0) -> dict:
    """``macs-F``, ``latency-F`` (target fraction F), ``mobile`` (recipes/mobile.yaml as shipped), with
    ``-ft`` for the fine-tune, ``-plain`` for the unweighted sum of errors (no sensitivity) and ``-rec``
    for block reconstruction (``reconstruct.steps``, on ``--reconstruct-calibration`` images)."""
    parts = plan.split("-")
    finetune = "ft" in parts
    plain = "plain" in parts
    rebuilt = "rec" in parts
    if parts[0] == "mobile":
        from compressor.recipe import load_recipe

        recipe = load_recipe(ROOT / "recipes" / "mobile.yaml").model_dump(mode="json", exclude_none=True)
        recipe.pop("finetune", None)
        finetune = True
    else:
        metric, fraction = parts[0], float(parts[1])
        recipe = {
            "name": plan,
            "rules": [{"match": "layer*", "method": ALL_METHODS, "min_in_channels": 8}],
            "target": {metric: 1 / 3 if abs(fraction - 0.33) < 1e-9 else fraction},
        }
    recipe["input_shape"] = [1, 3, 32, 32]
    recipe["calibration"] = {"samples": args.calibration, "batch_size": 128, "seed": seed}
    if plain:
        recipe["calibration"]["sensitivity_samples"] = 0
    if rebuilt:
        recipe["calibration"]["samples"] = args.reconstruct_calibration
        recipe["reconstruct"] = {"steps": args.reconstruct_steps}
    recipe["export"] = {"opset": 17, "tolerance": 1e-3}
    recipe["bench"] = {"threads": [1], "runs": args.runs}
    if finetune:
        recipe["finetune"] = {"max_minutes": args.finetune_minutes}
    return recipe


def _model(name: str) -> torch.nn.Module:
    model = zoo.CifarResNet(BLOCKS[name])
    model.load_state_dict(torch.load(DATA / f"{name}-cifar10.pth", weights_only=True))
    return model.eval()


def paired_drop(original: torch.nn.Module, compressed: torch.nn.Module, test) -> dict:
    """Accuracies of both models on every test image, and the paired drop with its standard error."""
    correct = {"original": [], "compressed": []}
    with torch.no_grad():
        for inputs, labels in test.batches(500):
            for name, model in (("original", original), ("compressed", compressed)):
                correct[name].append((model(inputs).argmax(1) == labels).double())
    before, after = torch.cat(correct["original"]), torch.cat(correct["compressed"])
    difference = after - before
    count = difference.numel()
    return {
        "samples": count,
        "accuracy_original": float(before.mean()),
        "accuracy_compressed": float(after.mean()),
        "drop_pt": 100 * float(difference.mean()),
        "drop_se_pt": 100 * float(difference.std(unbiased=True)) / math.sqrt(count),
    }


def run_plan(plan: str, args, seed: int = 0) -> dict:
    model = _model(args.model)
    train = load_data(DATA / "cifar10-train-jpeg-20000.npz", input_shape=[1, 3, 32, 32])
    test = load_data(DATA / "cifar10-test-jpeg-9154.npz", input_shape=[1, 3, 32, 32])
    load = os.getloadavg()
    started = time.perf_counter()
    result = compress(model, plan_recipe(plan, args, seed), torch.zeros(1, 3, 32, 32), data=train, progress=False)
    with tempfile.TemporaryDirectory() as out:
        result.save(out)
    wall = time.perf_counter() - started
    report = result.report
    latency = report["latency"][0]
    tuned = report.get("finetune") or {}
    row = {
        "model": args.model,
        "plan": plan,
        "calibration_seed": seed,
        "calibration_samples": report["calibration_samples"],
        "macs_ratio": report["totals"]["macs_ratio"],
        "speedup_1_thread": latency["speedup"],
        "original_ms": latency["original_ms"],
        "compressed_ms": latency["compressed_ms"],
        **paired_drop(result.original, result.model, test),
        "finetune_seconds": tuned.get("seconds"),
        "finetune_budget_seconds": None if not tuned.get("budget") else tuned["budget"]["max_minutes"] * 60,
        "finetune_steps": tuned.get("steps"),
        "finetune_epochs": tuned.get("epochs"),
        "methods": sorted({layer["method"] for layer in report["layers"] if layer["method"] != "keep"}),
        "weighted_by": (report.get("target") or {}).get("weighted_by"),
        "wall_s": wall,
        "seconds": report["seconds"],
        "load_before": [round(v, 2) for v in load],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(row), flush=True)
    return row


def run_draws(plan: str, args) -> dict:
    """``plan`` calibrated on ``args.draws`` different draws of training images (``calibration.seed``
    0, 1, ...): the seed-0 row, with every draw's drop and their mean. Which images calibrate moves a
    plan without a fine-tune by more than the test-image standard error, which does not see it."""
    runs = [run_plan(plan, args, seed) for seed in range(args.draws)]
    row = dict(runs[0])
    row["draws"] = [{key: run[key] for key in ("calibration_seed", "accuracy_compressed", "drop_pt", "drop_se_pt")} for run in runs]
    row["drop_mean_pt"] = sum(run["drop_pt"] for run in runs) / len(runs)
    row["wall_s"] = sum(run["wall_s"] for run in runs)
    return row


PEERS = {
    # name: (our method whose weights-only `rank: {macs: f}` plan gives the layers' ranks, peer builder)
    "aimet": ("spatial_separable", lambda conv, rank: peers.aimet_spatial_svd(conv, rank)),
    "tltorch_tucker": ("grouped", lambda conv, rank: peers.tltorch_factorized(conv, "tucker", rank)),
    "tltorch_cp": ("cp", lambda conv, rank: peers.tltorch_factorized(conv, "cp", rank)),
}


def run_peer(plan: str, args) -> dict:
    """``aimet-F``, ``tltorch_tucker-F``, ``tltorch_cp-F``: the peer on every body conv at the ranks our
    weights-only plan gives for ``rank: {macs: F}`` (peers have no calibration data and no fine-tune)."""
    from compressor import plan as dry_run
    from compressor.bench import time_models
    from compressor.export import export_onnx

    name, fraction = plan.rsplit("-", 1)
    method, build = PEERS[name]
    model = _model(args.model)
    recipe = {"rules": [{"match": "layer*", "method": method, "rank": {"macs": float(fraction)}, "min_in_channels": 8}],
              "input_shape": [1, 3, 32, 32]}
    ranks = {layer.name: layer.rank for layer in dry_run(model, recipe, torch.zeros(1, 3, 32, 32)).layers if layer.rank}
    load = os.getloadavg()
    started = time.perf_counter()
    compressed = peers.replace_convs(model, ranks, build)
    test = load_data(DATA / "cifar10-test-jpeg-9154.npz", input_shape=[1, 3, 32, 32])
    with tempfile.TemporaryDirectory() as out:
        paths = {key: export_onnx(m, torch.zeros(1, 3, 32, 32), Path(out) / f"{key}.onnx", 17)
                 for key, m in (("original", model), ("compressed", compressed))}
        timed = time_models(paths, (1, 3, 32, 32), threads=1, runs=args.runs, warmup=5)
    macs = {key: peers.macs_and_params(m, (1, 3, 32, 32))[0] for key, m in (("original", model), ("compressed", compressed))}
    row = {
        "model": args.model,
        "plan": plan,
        "macs_ratio": macs["compressed"] / macs["original"],
        "speedup_1_thread": timed["original"]["median_ms"] / timed["compressed"]["median_ms"],
        "original_ms": timed["original"]["median_ms"],
        "compressed_ms": timed["compressed"]["median_ms"],
        **paired_drop(model, compressed, test),
        "finetune_seconds": None,
        "finetune_budget_seconds": None,
        "methods": [name],
        "weighted_by": None,
        "wall_s": time.perf_counter() - started,
        "load_before": [round(v, 2) for v in load],
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    print(json.dumps(row), flush=True)
    return row


def plot(rows: list[dict], path: Path) -> None:
    """Accuracy drop against measured 1-thread speedup, ours and the peers'."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for row in rows:
        peer = row["plan"].split("-")[0] in PEERS
        axes.errorbar(row["speedup_1_thread"], row["drop_pt"], yerr=row["drop_se_pt"], fmt="s" if peer else "o",
                      color="tab:gray" if peer else "tab:blue", capsize=3)
        axes.annotate(row["plan"], (row["speedup_1_thread"], row["drop_pt"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.axhline(0, color="black", linewidth=0.5)
    axes.axvline(1, color="black", linewidth=0.5)
    axes.set_xlabel("ONNX Runtime speedup at 1 thread (original / compressed)")
    axes.set_ylabel("held-out accuracy drop (pt)")
    axes.set_title("Ours (blue) vs peers (gray), CIFAR-10 test images")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def _draws_cell(row: dict) -> str:
    draws = row.get("draws")
    if not draws:
        return "-"
    each = ", ".join(f"{draw['drop_pt']:+.2f}" for draw in draws)
    return f"{row['drop_mean_pt']:+.2f} ({each})"


def render(rows: list[dict], args) -> list[str]:
    lines = [
        "## Accuracy at measured speed, on held-out test images",
        "",
        f"Produced by `python scripts/benchmark_accuracy.py --model {args.model} --plans {' '.join(args.plans)}"
        f" --finetune-minutes {args.finetune_minutes:g}{f' --draws {args.draws}' if args.draws > 1 else ''}` ({sum(r['wall_s'] for r in rows) / 60:.1f} minutes of runs) on {os.cpu_count()} CPU cores "
        f"({platform.machine()}), {time.strftime('%Y-%m-%d')}; torch {torch.__version__}, {torch.get_num_threads()} torch threads.",
        "",
        f"Shared pretrained CIFAR-10 {args.model}. Calibration and fine-tuning on training images "
        f"(`cifar10-train-jpeg-20000.npz`, {args.calibration} calibration images; the fine-tune picks its weights "
        "on a held-out tenth of them); accuracy on the 9154 held-out test images (`cifar10-test-jpeg-9154.npz`), "
        "original and compressed on the same images: the drop is paired, ± its standard error. Speedup: ONNX "
        "Runtime at 1 thread, original vs compressed alternating, medians. Plans: `macs-F` / `latency-F` solve "
        "a whole-model target with every method (spatial, depthwise, grouped, low_rank, keep) per layer, "
        "data-aware, errors weighted by end-to-end sensitivity; `-plain` sums unweighted errors instead; "
        "`-ft` adds the fine-tune; `-rec` adds block reconstruction (recipe `reconstruct: {steps: "
        f"{args.reconstruct_steps}}}`, on {args.reconstruct_calibration} calibration images; no labels); `mobile` is recipes/mobile.yaml as shipped. Peers, on the same body convs at the "
        "ranks of `rank: {macs: F}`, weights only (they have no data-aware init and no fine-tune): `aimet-F` AIMET's "
        "Spatial SVD (re-implemented, scripts/peers.py), `tltorch_tucker-F` / `tltorch_cp-F` TensorLy-Torch "
        "`FactorizedConv.from_conv`. MACs counted by torch's flop counter for peers, by our profile for ours. "
        "Load: the 1-minute load average before the row (the benchmark keeps 2 threads busy itself, so about 2 "
        "is an otherwise idle 2-core machine).",
        "",
        "Plans without a fine-tune ran on several calibration draws where `draws` says so: the row's other "
        "columns are the first draw's (seed 0); which images calibrate moves the drop by more than its ± "
        "(which is over the test images only). The fine-tuned plans ran on one draw.",
        "",
        "| plan | MACs kept | speedup (1 thr) | acc. original | acc. compressed | drop (pt) | draws: mean drop (each) | fine-tune s (budget) | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tuned = "-" if r["finetune_seconds"] is None else f"{r['finetune_seconds']:.0f} ({r['finetune_budget_seconds']:.0f})"
        lines.append(
            f"| {r['plan']} | {r['macs_ratio']:.3f} | {r['speedup_1_thread']:.2f}x | {100 * r['accuracy_original']:.2f} | "
            f"{100 * r['accuracy_compressed']:.2f} | {r['drop_pt']:+.2f} ± {r['drop_se_pt']:.2f} | {_draws_cell(r)} | {tuned} | "
            f"{r['load_before'][0]:.2f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32", choices=sorted(BLOCKS))
    parser.add_argument("--plans", nargs="+", default=["macs-0.5", "macs-0.33-ft", "latency-0.5-ft"])
    parser.add_argument("--finetune-minutes", type=float, default=10.0)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--reconstruct-steps", type=int, default=100, help="reconstruct.steps of the -rec plans")
    parser.add_argument("--reconstruct-calibration", type=int, default=1024, help="calibration.samples of the -rec plans")
    parser.add_argument("--draws", type=int, default=1, help="calibration draws (calibration.seed 0..N-1) for each plan without a fine-tune")
    parser.add_argument("--runs", type=int, default=100, help="ONNX Runtime timing rounds per model")
    parser.add_argument("--out", type=Path, help="write the accuracy section of this markdown file (BENCHMARKS.md)")
    parser.add_argument("--json", type=Path, help="append the rows here")
    parser.add_argument("--plot", type=Path, help="accuracy-vs-speedup PNG, linked from the --out section")
    parser.add_argument("--render-only", action="store_true", help="write --out/--plot from the rows in --json, run nothing")
    args = parser.parse_args()
    if not (DATA / "cifar10-test-jpeg-9154.npz").is_file():
        print(f"no shared data at {DATA}: this benchmark needs ../shared/data (see its README.md)", file=sys.stderr)
        return 2
    rows, failed = [], []
    if args.render_only:  # the rows of an earlier (e.g. interrupted) run, from --json
        rows = [json.loads(line) for line in args.json.read_text().splitlines() if line.strip()]
        args.plans = [row["plan"] for row in rows]
    for plan in [] if args.render_only else args.plans:
        try:
            if plan.split("-")[0] in PEERS:
                rows.append(run_peer(plan, args))
            elif args.draws > 1 and "finetune" not in plan_recipe(plan, args):
                rows.append(run_draws(plan, args))
            else:
                rows.append(run_plan(plan, args))
        except CompressorError as err:  # e.g. a latency target this machine cannot reach: say so, run the rest
            print(json.dumps({"plan": plan, "error": str(err)}), flush=True)
            failed.append((plan, str(err)))
            continue
        if args.json:
            with args.json.open("a") as handle:
                handle.write(json.dumps(rows[-1]) + "\n")
    if args.out:
        lines = render(rows, args)
        lines += [f"| {plan} | failed: {error} ||||||||" for plan, error in failed]
        if args.plot:
            plot(rows, args.plot)
            lines += ["", f"![accuracy drop against measured speedup]({os.path.relpath(args.plot, args.out.parent)})"]
        replace_section(args.out, "accuracy", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
