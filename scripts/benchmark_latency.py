"""Measured ONNX Runtime speedup against MACs reduction, per method, budget, thread count, float and INT8.

For each model (ResNet-20 on CIFAR-10 with the shared weights when present; a ResNet-50-style model
at 224x224 with random weights: latency does not depend on the values) and each method, the budget
solver compresses to each MACs fraction (``target: {macs: f}``, the method or keep per layer, ranks
rounded to ``--round-to``), and the table gives the measured speedup (original median / compressed
median, alternating runs), the MACs reduction (original / compressed MACs) and their ratio. INT8 rows
quantize both models statically (QDQ, per channel) and compare INT8 with INT8.
``--latency-targets`` adds runs of ``target: {latency: f}`` with predicted and measured fractions.

Run it alone (``flock /tmp/cpu.lock python scripts/benchmark_latency.py``): timings under load are noise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compressor import compress, zoo  # noqa: E402
from compressor.bench import threads_label, time_models  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.export import export_onnx  # noqa: E402
from compressor.quantize import quantize_onnx, verify_int8  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def load_model(name: str) -> tuple[torch.nn.Module, tuple[int, ...], str, list[torch.Tensor]]:
    """The model, its input shape, where its weights came from, and calibration batches for INT8."""
    torch.manual_seed(0)
    if name == "resnet20":
        model = zoo.resnet20_cifar().eval()
        weights, data = DATA / "resnet20-cifar10.pth", DATA / "cifar10-train-4660.npz"
        source = "random weights (shared .pth absent)"
        if weights.is_file():
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            source = f"pretrained ({weights.name})"
        if data.is_file():
            x = torch.from_numpy(np.load(data)["x"][:256]).float() / 255
            x = (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
            return model, (1, 3, 32, 32), source, list(x.split(64))
        return model, (1, 3, 32, 32), source, list(torch.randn(256, 3, 32, 32).split(64))
    if name == "resnet50":
        model = zoo.resnet50().eval()
        return model, (1, 3, 224, 224), "random weights (latency does not depend on them)", list(torch.randn(32, 3, 224, 224).split(8))
    raise SystemExit(f"unknown model {name!r}")


def recipe_for(method: str, target: dict, round_to: int | None, threads: list[int], cache: str | None) -> dict:
    methods = ["spatial_separable", "grouped", "keep"] if method == "mixed" else [method, "keep"]
    rule = {"match": "*", "method": methods, "min_in_channels": 8}
    if round_to:
        rule["round_to"] = round_to
    return {"rules": [rule], "target": target, "bench": {"threads": threads[:1], "runs": 0, "cache": cache}}


def time_pair(paths: dict, shape, threads: int, runs: int) -> dict:
    return time_models(paths, shape, threads=threads, runs=runs, warmup=max(2, runs // 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet50")
    parser.add_argument("--methods", default="spatial_separable,depthwise_separable,grouped,cp,mixed")
    parser.add_argument("--fractions", default="0.5,0.3333")
    parser.add_argument("--threads", default="1,0")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and setting (ResNet-50: a third)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--latency-targets", default="", help="e.g. 0.5: also run target {latency: f} (mixed methods)")
    parser.add_argument("--cache", default=None, help="latency cache folder (default: the tool's)")
    parser.add_argument("--out", type=Path, help="write the markdown here too")
    parser.add_argument("--json", type=Path, help="write all records here")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    rows, latency_rows, notes = [], [], []
    work = Path(tempfile.mkdtemp(prefix="benchmark-latency-"))
    for model_name in args.models.split(","):
        model, shape, source, calibration = load_model(model_name)
        notes.append(f"{model_name}: {source}, input {list(shape)}")
        x = torch.randn(shape)
        runs = args.runs if model_name != "resnet50" else max(5, args.runs // 3)
        original = export_onnx(model, x, work / f"{model_name}.onnx")
        original_int8 = None if args.no_int8 else quantize_onnx(original, work / f"{model_name}.int8.onnx", "static", calibration)
        for method in args.methods.split(","):
            for fraction in [float(f) for f in args.fractions.split(",")]:
                started = time.perf_counter()
                try:
                    result = compress(model, recipe_for(method, {"macs": fraction}, args.round_to, threads, args.cache), x)
                except CompressorError as err:
                    rows.append({"model": model_name, "method": method, "fraction": fraction, "error": str(err)})
                    print(f"{model_name} {method} {fraction}: {err}", flush=True)
                    continue
                compressed = export_onnx(result.model, x, work / f"{model_name}.{method}.{fraction}.onnx")
                macs_reduction = 1 / result.report["totals"]["macs_ratio"]
                variants = [("float", original, compressed, None)]
                if original_int8 is not None:
                    compressed_int8 = quantize_onnx(compressed, compressed.with_suffix(".int8.onnx"), "static", calibration)
                    agreement = verify_int8(compressed, compressed_int8, [(b, None) for b in calibration], 1.0)["agreement_with_float"]
                    variants.append(("int8", original_int8, compressed_int8, agreement))
                for precision, before, after, agreement in variants:
                    for count in threads:
                        timed = time_pair({"original": before, "compressed": after}, shape, count, runs)
                        speedup = timed["original"]["median_ms"] / timed["compressed"]["median_ms"]
                        row = {
                            "model": model_name, "method": method, "fraction": fraction, "precision": precision,
                            "threads": count, "original_ms": timed["original"]["median_ms"],
                            "compressed_ms": timed["compressed"]["median_ms"], "speedup": speedup,
                            "macs_reduction": macs_reduction, "ratio": speedup / macs_reduction,
                            "int8_agreement": agreement, "compress_s": time.perf_counter() - started,
                        }
                        rows.append(row)
                        print(json.dumps(row), flush=True)
        for fraction in [float(f) for f in args.latency_targets.split(",") if f]:
            try:
                result = compress(model, recipe_for("mixed", {"latency": fraction}, args.round_to, threads, args.cache), x)
            except CompressorError as err:  # e.g. below the smallest reachable latency: a finding, not a crash
                latency_rows.append({"model": model_name, "target": fraction, "threads": threads[0], "error": str(err)})
                print(f"{model_name} latency {fraction}: {err}", flush=True)
                continue
            compressed = export_onnx(result.model, x, work / f"{model_name}.latency.{fraction}.onnx")
            timed = time_pair({"original": original, "compressed": compressed}, shape, threads[0], args.runs)
            target = result.report["target"]
            measured = timed["compressed"]["median_ms"] / timed["original"]["median_ms"]
            latency_rows.append({
                "model": model_name, "target": fraction, "threads": threads[0], "planned": target["planned_ratio"],
                "measured": measured, "off_by": measured / fraction - 1, "timed_layers": target["measured"],
                "cache_hits": target["cache_hits"], "macs_ratio": result.report["totals"]["macs_ratio"],
            })
            print(json.dumps(latency_rows[-1]), flush=True)
    lines = render(rows, latency_rows, notes, args)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "latency_targets": latency_rows}, indent=2))


def render(rows, latency_rows, notes, args) -> list[str]:
    lines = [
        "| model | method | MACs target | precision | threads | original ms | compressed ms | speedup | MACs reduction | speedup / MACs reduction | INT8 agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['fraction']:.3g} | - | - | - | - | - | - | unreachable: {r['error'][:90]} | - |")
            continue
        agreement = "-" if r["int8_agreement"] is None else f"{r['int8_agreement']:.3f}"
        lines.append(
            f"| {r['model']} | {r['method']} | {r['fraction']:.3g} | {r['precision']} | {threads_label(r['threads'])} | "
            f"{r['original_ms']:.2f} | {r['compressed_ms']:.2f} | {r['speedup']:.2f}x | {r['macs_reduction']:.2f}x | "
            f"**{r['ratio']:.2f}** | {agreement} |"
        )
    if latency_rows:
        lines += ["", "| model | target latency | threads | planned | measured | measured/target - 1 | MACs ratio | layers timed | cache hits |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in latency_rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['target']:.3g} | {threads_label(r['threads'])} | unreachable: {r['error'][:120]} |")
                continue
            lines.append(
                f"| {r['model']} | {r['target']:.3g} | {threads_label(r['threads'])} | {r['planned']:.3f} | {r['measured']:.3f} | "
                f"{r['off_by']:+.1%} | {r['macs_ratio']:.3f} | {r['timed_layers']} | {r['cache_hits']} |"
            )
    lines += ["", "Models: " + "; ".join(notes) + f". Ranks rounded to multiples of {args.round_to}; weights-only init; "
              "INT8 = static QDQ per-channel, calibrated on the model's calibration batches, INT8 original vs INT8 compressed; "
              "agreement = top-1 INT8 vs float compressed on those batches."]
    return lines


if __name__ == "__main__":
    main()
