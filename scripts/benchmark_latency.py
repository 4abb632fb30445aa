"""Measured ONNX Runtime speedup against MACs reduction, per method, budget, thread count, float and INT8.

For each model (torchvision-layout ResNet-18 and ResNet-50 at 224x224 with random weights: latency
does not depend on the values; the CIFAR-10 ResNet-20 and ResNet-32 with the shared weights when
present) and each method, the budget solver compresses to each MACs fraction (``target: {macs: f}``,
the method or keep per layer, ranks rounded the tool's default way, ``round_to: auto``), and the
table gives the measured speedup (original median / compressed median, alternating runs), the MACs
reduction (original / compressed MACs) and their ratio. ``mixed`` lets the solver pick among
depthwise-separable, low-rank, spatial and keep. INT8 rows quantize both models statically (QDQ
U8S8, per channel), compare INT8 with INT8, and give the INT8 compressed model's speed against the
float compressed one in the same run. ``mobile`` rows run ``recipes/mobile.yaml`` (weights-only,
no fine-tune: latency does not depend on the values) and say whether its latency target held.
``--latency-targets`` adds runs of ``target: {latency: f}`` (mixed) with planned and measured
fractions. ``--thread-study`` times the originals at 1 and 2 threads with ORT's spinning on and off.

Run it alone: timings under load are noise (the header records the load average).
"""

from __future__ import annotations

import argparse
import json
import os
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
from compressor.bench import session, threads_label, time_models  # noqa: E402
from compressor.errors import CompressorError  # noqa: E402
from compressor.data import scale_uint8  # noqa: E402
from compressor.export import export_onnx  # noqa: E402
from compressor.quantize import quantize_onnx, verify_int8  # noqa: E402
from compressor.recipe import apply_overrides, load_recipe  # noqa: E402
from benchmarks_md import replace_section  # noqa: E402

DATA = ROOT.parent / "shared" / "data"


def cifar_images(path: Path, start: int, count: int) -> torch.Tensor:
    """Images ``start`` to ``start + count`` of a fixed shuffle of a shared CIFAR npz, normalized. The
    files are sorted by class, so a slice of them, or any prefix of a sorted subset, would be one or
    two classes: the shuffled order is kept."""
    mean, std = np.array(zoo.CIFAR10_MEAN, np.float32), np.array(zoo.CIFAR10_STD, np.float32)
    x = np.load(path)["x"]
    rows = np.random.default_rng(0).permutation(len(x))[start:start + count]
    return scale_uint8(x[rows], mean, std)


def _cifar_batches(count: int) -> list[torch.Tensor] | None:
    data = DATA / "cifar10-train-jpeg-20000.npz"
    if not data.is_file():
        return None
    return list(cifar_images(data, 0, count).split(64))


def load_model(name: str) -> tuple[torch.nn.Module, tuple[int, ...], str, list[torch.Tensor]]:
    """The model, its input shape, where its weights came from, and calibration batches for INT8."""
    torch.manual_seed(0)
    if name in ("resnet20", "resnet32"):
        model = getattr(zoo, f"{name}_cifar")().eval()
        weights = DATA / f"{name}-cifar10.pth"
        source = "random weights (shared .pth absent)"
        if weights.is_file():
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            source = f"pretrained ({weights.name})"
        batches = _cifar_batches(256) or list(torch.randn(256, 3, 32, 32).split(64))
        return model, (1, 3, 32, 32), source, batches
    if name in ("resnet18", "resnet50"):
        model = getattr(zoo, name)().eval()
        return model, (1, 3, 224, 224), "random weights (latency does not depend on them)", list(torch.randn(32, 3, 224, 224).split(8))
    raise SystemExit(f"unknown model {name!r}")


MIXED = ["depthwise_separable", "low_rank", "spatial_separable", "keep"]


def recipe_for(method: str, target: dict, round_to: int | None, threads: list[int], cache: str | None) -> dict:
    methods = MIXED if method == "mixed" else [method, "keep"]
    rule = {"match": "*", "method": methods, "min_in_channels": 8}
    if round_to:
        rule["round_to"] = round_to
    return {"rules": [rule], "target": target, "bench": {"threads": threads[:1], "runs": 0, "cache": cache}}


def mobile_recipe(shape, threads: list[int], cache: str | None) -> dict:
    raw = load_recipe(ROOT / "recipes" / "mobile.yaml").model_dump(mode="json", exclude_none=True)
    overrides = [f"input_shape={list(shape)}", f"bench.threads={threads[:1]}"] + ([f"bench.cache={cache}"] if cache else [])
    return apply_overrides(raw, overrides)


def time_pair(paths: dict, shape, threads: int, runs: int) -> dict:
    return time_models(paths, shape, threads=threads, runs=runs, warmup=max(2, runs // 10))


def thread_study(paths: dict, shape, runs: int) -> list[dict]:
    """Each original at 1 and 2 intra-op threads, ORT's spin-waiting on and off, alternating."""
    rows = []
    for name, path in paths.items():
        sessions = {(threads, spin): session(path, threads=threads, spinning=spin) for threads, spin in ((1, True), (2, True), (2, False))}
        feed = {"input": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
        times = {key: [] for key in sessions}
        for sess in sessions.values():
            for _ in range(3):
                sess.run(None, feed)
        for _ in range(runs):
            for key, sess in sessions.items():
                begun = time.perf_counter()
                sess.run(None, feed)
                times[key].append((time.perf_counter() - begun) * 1e3)
        base = float(np.median(times[(1, True)]))
        for (threads, spin), values in times.items():
            rows.append({"model": name, "threads": threads, "spinning": spin, "ms": float(np.median(values)),
                         "vs_1_thread": base / float(np.median(values))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_rows(model_name, method, fraction, result, x, shape, work, original, original_int8, calibration, threads, runs, started):
    compressed = export_onnx(result.model, x, work / f"{model_name}.{method}.{fraction}.onnx")
    macs_reduction = 1 / result.report["totals"]["macs_ratio"]
    variants = [("float", original, compressed, None, None)]
    if original_int8 is not None:
        compressed_int8 = quantize_onnx(compressed, compressed.with_suffix(".int8.onnx"), "static", calibration)
        agreement = verify_int8(compressed, compressed_int8, [(b, None) for b in calibration], 1.0)["agreement_with_float"]
        variants.append(("int8", original_int8, compressed_int8, agreement, compressed))
    rows = []
    for precision, before, after, agreement, float_after in variants:
        for count in threads:
            paths = {"original": before, "compressed": after}
            if float_after is not None:
                paths["float_compressed"] = float_after
            timed = time_pair(paths, shape, count, runs)
            speedup = timed["original"]["median_ms"] / timed["compressed"]["median_ms"]
            row = {
                "model": model_name, "method": method, "fraction": fraction, "precision": precision,
                "threads": count, "original_ms": timed["original"]["median_ms"],
                "compressed_ms": timed["compressed"]["median_ms"], "speedup": speedup,
                "macs_reduction": macs_reduction, "ratio": speedup / macs_reduction,
                "int8_agreement": agreement, "compress_s": time.perf_counter() - started,
                "vs_float_compressed": (timed["float_compressed"]["median_ms"] / timed["compressed"]["median_ms"])
                if float_after is not None else None,
            }
            target = result.report.get("target") or {}
            if target.get("metric") == "latency":
                row.update(latency_target=target["fraction"], held=target.get("held"), measured_in_plan=target.get("measured_ratio"))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet50,resnet20,resnet32")
    parser.add_argument("--methods", default="depthwise_separable,low_rank,spatial_separable,grouped,cp,mixed,mobile")
    parser.add_argument("--skip", default="resnet50:cp,resnet50:grouped,resnet18:cp",
                        help="model:method pairs left out (CP and grouped decompositions of the 224 models take minutes per row)")
    parser.add_argument("--fractions", default="0.5,0.3333")
    parser.add_argument("--threads", default="1,0")
    parser.add_argument("--round-to", type=int, default=None, help="default: the recipe default, round_to: auto")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and setting (224 models: a third)")
    parser.add_argument("--no-int8", action="store_true")
    parser.add_argument("--latency-targets", default="", help="e.g. 0.5: also run target {latency: f} (mixed methods)")
    parser.add_argument("--thread-study", action="store_true")
    parser.add_argument("--cache", default=None, help="latency cache folder (default: the tool's)")
    parser.add_argument("--out", type=Path, help="write the markdown here too")
    parser.add_argument("--no-benchmarks-md", action="store_true", help="leave BENCHMARKS.md's latency section as it is")
    parser.add_argument("--json", type=Path, help="write all records here")
    args = parser.parse_args()
    begun = time.perf_counter()
    threads = [int(t) for t in args.threads.split(",")]
    skipped = {tuple(pair.split(":")) for pair in args.skip.split(",") if pair}
    rows, latency_rows, study, notes = [], [], [], []
    load = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="benchmark-latency-"))
    originals = {}
    for model_name in args.models.split(","):
        model, shape, source, calibration = load_model(model_name)
        notes.append(f"{model_name}: {source}, input {list(shape)}")
        x = torch.randn(shape)
        runs = args.runs if shape[-1] <= 64 else max(5, args.runs // 3)
        original = export_onnx(model, x, work / f"{model_name}.onnx")
        originals[model_name] = (original, shape)
        original_int8 = None if args.no_int8 else quantize_onnx(original, work / f"{model_name}.int8.onnx", "static", calibration)
        for method in args.methods.split(","):
            if (model_name, method) in skipped:
                continue
            fractions = [None] if method == "mobile" else [float(f) for f in args.fractions.split(",")]
            for fraction in fractions:
                started = time.perf_counter()
                try:
                    recipe = (mobile_recipe(shape, threads, args.cache) if method == "mobile"
                              else recipe_for(method, {"macs": fraction}, args.round_to, threads, args.cache))
                    result = compress(model, recipe, x)
                except CompressorError as err:
                    rows.append({"model": model_name, "method": method, "fraction": fraction, "error": str(err)})
                    print(f"{model_name} {method} {fraction}: {err}", flush=True)
                    continue
                rows += measure_rows(model_name, method, fraction, result, x, shape, work, original, original_int8,
                                     calibration, threads, runs, started)
        for fraction in [float(f) for f in args.latency_targets.split(",") if f]:
            try:
                result = compress(model, recipe_for("mixed", {"latency": fraction}, args.round_to, threads, args.cache), x)
            except CompressorError as err:  # e.g. below the smallest reachable latency: a finding, not a crash
                latency_rows.append({"model": model_name, "target": fraction, "threads": threads[0], "error": str(err)})
                print(f"{model_name} latency {fraction}: {err}", flush=True)
                continue
            compressed = export_onnx(result.model, x, work / f"{model_name}.latency.{fraction}.onnx")
            timed = time_pair({"original": original, "compressed": compressed}, shape, threads[0], runs)
            target = result.report["target"]
            measured = timed["compressed"]["median_ms"] / timed["original"]["median_ms"]
            latency_rows.append({
                "model": model_name, "target": fraction, "threads": threads[0], "planned": target["planned_ratio"],
                "measured_in_plan": target["measured_ratio"], "corrections": len(target["corrections"]) - 1,
                "measured": measured, "off_by": measured / fraction - 1, "timed_layers": target["measured"],
                "cache_hits": target["cache_hits"], "macs_ratio": result.report["totals"]["macs_ratio"],
            })
            print(json.dumps(latency_rows[-1]), flush=True)
    if args.thread_study:
        for name, (path, shape) in originals.items():
            study += thread_study({name: path}, shape, args.runs)
    header = [
        f"Command: `python scripts/benchmark_latency.py {' '.join(sys.argv[1:])}`; {time.perf_counter() - begun:.0f} s; "
        f"load average at start {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} CPUs; "
        f"onnxruntime {ort_version()}, torch {torch.__version__}.",
        "",
    ]
    lines = header + render(rows, latency_rows, study, notes, args)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    if not args.no_benchmarks_md:
        replace_section(ROOT / "BENCHMARKS.md", "latency", ["## Measured speed (scripts/benchmark_latency.py)", "", *lines])
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "latency_targets": latency_rows, "thread_study": study}, indent=2))


def ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def render(rows, latency_rows, study, notes, args) -> list[str]:
    lines = [
        "| model | method | MACs target | precision | threads | original ms | compressed ms | speedup | MACs reduction "
        "| speedup / MACs reduction | INT8 vs float compressed | INT8 agreement | latency target held |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fraction = "-" if r["fraction"] is None else f"{r['fraction']:.3g}"
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {fraction} | - | - | - | - | - | - | unreachable: {r['error'][:90]} | - | - | - |")
            continue
        agreement = "-" if r["int8_agreement"] is None else f"{r['int8_agreement']:.3f}"
        versus = "-" if r["vs_float_compressed"] is None else f"{r['vs_float_compressed']:.2f}x"
        held = "-" if "held" not in r else f"{'yes' if r['held'] else 'no'} ({r['measured_in_plan']:.3f} of {r['latency_target']})"
        lines.append(
            f"| {r['model']} | {r['method']} | {fraction} | {r['precision']} | {threads_label(r['threads'])} | "
            f"{r['original_ms']:.2f} | {r['compressed_ms']:.2f} | {r['speedup']:.2f}x | {r['macs_reduction']:.2f}x | "
            f"**{r['ratio']:.2f}** | {versus} | {agreement} | {held} |"
        )
    if latency_rows:
        lines += ["", "| model | target latency | threads | planned (per-layer sum) | measured in the plan | corrections "
                  "| measured after | measured/target - 1 | MACs ratio | layers timed | cache hits |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in latency_rows:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['target']:.3g} | {threads_label(r['threads'])} | unreachable: {r['error'][:120]} |")
                continue
            lines.append(
                f"| {r['model']} | {r['target']:.3g} | {threads_label(r['threads'])} | {r['planned']:.3f} | "
                f"{r['measured_in_plan']:.3f} | {r['corrections']} | {r['measured']:.3f} | "
                f"{r['off_by']:+.1%} | {r['macs_ratio']:.3f} | {r['timed_layers']} | {r['cache_hits']} |"
            )
    if study:
        lines += ["", "| model | intra-op threads | spin-waiting | median ms | speed vs 1 thread |", "|---|---|---|---|---|"]
        for r in study:
            lines.append(f"| {r['model']} | {r['threads']} | {'on' if r['spinning'] else 'off'} | {r['ms']:.2f} | {r['vs_1_thread']:.2f}x |")
    rounding = f"multiples of {args.round_to}" if args.round_to else "round_to: auto (this CPU's NCHWc block)"
    lines += ["", "Models: " + "; ".join(notes) + f". Ranks: {rounding}; weights-only init; "
              "INT8 = static QDQ U8S8 per-channel, calibrated on the model's calibration batches, INT8 original vs INT8 "
              "compressed; 'INT8 vs float compressed' = float compressed ms / INT8 compressed ms in the same run; "
              "agreement = top-1 INT8 vs float compressed on those batches."]
    return lines


if __name__ == "__main__":
    main()
