"""Segmentation and detection heads at half the MACs: weights-only vs data-aware vs a short fine-tune.

The zoo U-Net (dense logits: segmentation) and YOLO-style detector (three output maps) are
compressed with ``target: {macs: 0.5}`` (the solver picks depthwise-separable, low-rank, spatial or
keep per layer; layers with fewer than 8 input channels kept), three ways: from the weights alone,
data-aware (whitened decompositions and refits on calibration images), and data-aware plus a
distillation fine-tune of ``--finetune-minutes``. The images are the shared CIFAR-10 ones,
upsampled bilinearly: training images for calibration and fine-tuning, held-out test images for
evaluation. Agreement with the original needs no labels: pixel agreement and mIoU of the
compressed model's argmax against the original's (U-Net), relative error of all outputs (both).
Speedup: ONNX Runtime, one intra-op thread, original median / compressed median over alternating runs.

The zoo models have random weights. Their BatchNorm statistics are first re-estimated on training
images (a random net with unit running variances would pass activations of arbitrary scale), so
the layers see image-like inputs; but what a trained detector or segmenter loses may differ.

Run it alone: timings under load are noise (the section records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from compressor import compress, tree, zoo_unet, zoo_yolo  # noqa: E402
from compressor.export import export_onnx  # noqa: E402
from benchmark_latency import cifar_images, ort_version, time_pair  # noqa: E402
from benchmarks_md import replace_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
#: Training images from here on re-estimate the random models' BatchNorm statistics (20000 in the file).
BATCHNORM_FIRST = 20000 - 256
SECTION = "heads"
METHODS = ["depthwise_separable", "low_rank", "spatial_separable", "keep"]
MODELS = {
    "unet": (lambda: zoo_unet.unet(), 64),  # (builder, input side: CIFAR's 32 upsampled)
    "yolo": (lambda: zoo_yolo.yolo_style(), 128),
}


def images(path: Path, start: int, count: int, side: int, batch: int) -> list[torch.Tensor]:
    """:func:`benchmark_latency.cifar_images` upsampled to ``side``, in batches."""
    x = cifar_images(path, start, count)
    return [F.interpolate(b, size=(side, side), mode="bilinear", align_corners=False) for b in x.split(batch)]


def settle_batchnorm_(model: torch.nn.Module, batches: list[torch.Tensor]) -> torch.nn.Module:
    """Running statistics of every BatchNorm = the plain average over ``batches`` (momentum None)."""
    norms = [m for m in tree.modules(model) if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    tree.set_training_(model, True)
    with torch.no_grad():
        for batch in batches:
            model(batch)
    return tree.set_training_(model, False)


def recipe(minutes: float | None, samples: int) -> dict:
    raw = {
        "rules": [{"match": "*", "method": METHODS, "min_in_channels": 8}],
        "target": {"macs": 0.5},
        "calibration": {"samples": samples, "batch_size": 32},
        "bench": {"threads": [1], "runs": 0},
    }
    if minutes is not None:
        raw["finetune"] = {"max_minutes": minutes, "batch_size": 32}
    return raw


def run_model(name: str, args, work: Path) -> list[dict]:
    build, side = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    train = DATA / "cifar10-train-jpeg-20000.npz"
    test = DATA / "cifar10-test-jpeg-9154.npz"
    # The last 256 shuffled training images, never among the --train-images (capped below) that calibrate and fine-tune.
    settle_batchnorm_(model, images(train, BATCHNORM_FIRST, 256, side, 32))
    data = images(train, 0, args.train_images, side, 32)
    held_out = images(test, 0, args.eval_images, side, 32)
    x = data[0][:1]
    original = export_onnx(model, x, work / f"{name}.original.onnx")
    rows = []
    for variant, minutes, given in (
        ("weights-only", None, None),
        ("data-aware", None, data),
        (f"data-aware + {args.finetune_minutes:g} min fine-tune", args.finetune_minutes, data),
    ):
        started = time.perf_counter()
        result = compress(model, recipe(minutes, args.samples), x, data=given, eval_data=held_out)
        seconds = time.perf_counter() - started
        compressed = export_onnx(result.model, x, work / f"{name}.{len(rows)}.onnx")
        timed = time_pair({"original": original, "compressed": compressed}, tuple(x.shape), 1, args.runs)
        metrics, report = result.report["metrics"], result.report
        tuned = report.get("finetune") or {}
        row = {
            "model": name, "input": side, "variant": variant, "task": report["task"]["kind"],
            "macs_ratio": report["totals"]["macs_ratio"], "agreement": metrics.get("agreement"),
            "miou_vs_original": metrics.get("miou_vs_original"), "output_rel_error": metrics["output_rel_error"],
            "output_rel_errors": metrics.get("output_rel_errors"), "original_ms": timed["original"]["median_ms"],
            "compressed_ms": timed["compressed"]["median_ms"],
            "speedup": timed["original"]["median_ms"] / timed["compressed"]["median_ms"],
            "finetune_steps": tuned.get("steps"), "compress_s": seconds,
            "methods": sorted({layer["method"] for layer in report["layers"]}), "phases_s": report.get("seconds"),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _fmt(value, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def render(rows: list[dict], header: str) -> list[str]:
    lines = [
        "## Segmentation and detection heads (scripts/benchmark_heads.py)",
        "",
        header,
        "",
        "| model | task | init | MACs ratio | pixel agreement | mIoU vs original | output rel. error | "
        "ORT ms original -> compressed (1 thread) | speedup | compress s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_output = r["output_rel_errors"]
        error = _fmt(r["output_rel_error"], ".3f")
        if per_output and len(per_output) > 1:
            error += " (" + ", ".join(format(e, ".3f") for e in per_output) + ")"
        lines.append(
            f"| {r['model']} {r['input']}x{r['input']} | {r['task']} | {r['variant']} | {r['macs_ratio']:.3f} | "
            f"{_fmt(r['agreement'], '.3f')} | {_fmt(r['miou_vs_original'], '.3f')} | {error} | "
            f"{r['original_ms']:.2f} -> {r['compressed_ms']:.2f} | {r['speedup']:.2f}x | {r['compress_s']:.0f} |"
        )
    lines += [
        "",
        "Random-weight zoo models (BatchNorm statistics re-estimated on 256 training images); inputs: shared CIFAR-10 "
        "images upsampled bilinearly. Calibration and fine-tuning on training images, evaluation on held-out test "
        "images; agreement and mIoU compare the compressed model's argmax with the original's (no labels). "
        "Output rel. error: ||compressed - original|| / ||original|| over all outputs (per output in brackets). "
        "MACs ratio: whole model, compressed / original. A trained model's losses may differ from these.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="unet,yolo")
    parser.add_argument("--train-images", type=int, default=1024, help="training images passed as --data (fine-tune)")
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (of those)")
    parser.add_argument("--eval-images", type=int, default=256)
    parser.add_argument("--finetune-minutes", type=float, default=2.0)
    parser.add_argument("--runs", type=int, default=30, help="timed ORT runs per model, alternating")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.train_images > BATCHNORM_FIRST:
        parser.error(f"--train-images at most {BATCHNORM_FIRST}: the last 256 training images set BatchNorm statistics")
    for path in ("cifar10-train-jpeg-20000.npz", "cifar10-test-jpeg-9154.npz"):
        if not (DATA / path).is_file():
            raise SystemExit(f"needs {DATA / path} (see ../shared/data/README.md)")
    torch.set_num_threads(1)
    load, started = os.getloadavg(), time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += run_model(name, args, Path(tmp))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    command = "python scripts/benchmark_heads.py " + " ".join(sys.argv[1:])
    header = (
        f"Command: `{command.strip()}`; {time.perf_counter() - started:.0f} s; load average at start "
        f"{load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} CPUs (this process allowed "
        f"{len(os.sched_getaffinity(0))} of them; torch and ORT at 1 thread); onnxruntime {ort_version()}, torch {torch.__version__}; `target: {{macs: 0.5}}`, "
        f"methods {', '.join(METHODS)} (min_in_channels 8); {args.samples} calibration images of {args.train_images} "
        f"training images, {args.eval_images} evaluation images, {args.runs} timed runs."
    )
    replace_section(args.out, SECTION, render(rows, header))


if __name__ == "__main__":
    main()
