"""End-to-end check on pickled full-size architectures: lossless for every method, then mobile.

For each model of compressor.zoo (random weights, random BatchNorm statistics) this pickles the
whole module, runs the ``compress`` CLI in a fresh process, and collects from report.json the
PyTorch output error (compressed vs original), the ONNX Runtime parity of both exports, the MACs
ratio, and the wall time of the run. Prints a Markdown table; exits 1 if any lossless run is not
exact or any run fails.

    .venv/bin/python scripts/check_architectures.py [--models resnet18 vgg11_bn] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from compressor import zoo

REPO = Path(__file__).resolve().parents[1]
MODELS = ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "inception_style", "deeplab_style"]
RUNS = [
    ("lossless/depthwise_separable", "recipes/lossless.yaml", []),
    ("lossless/spatial_separable", "recipes/lossless.yaml", ["rules.0.method=spatial_separable"]),
    ("lossless/grouped g=1", "recipes/lossless.yaml", ["rules.0.method=grouped"]),
    ("lossless/grouped g=2", "recipes/lossless.yaml", ["rules.0.method=grouped", "rules.0.groups=2"]),
    ("mobile", "recipes/mobile.yaml", []),
]
EXACT = 1e-4


def _pickle(name: str, folder: Path) -> Path:
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.ZOO[name]()).eval()
    path = folder / f"{name}.pt"
    torch.save(model, path)
    return path


def _run(model_path: Path, recipe: str, overrides: list[str], shape, out: Path) -> tuple[int, float, dict | None, str]:
    command = [sys.executable, "-m", "compressor", "--recipe", recipe, "--trust-model", "--force", "--out", str(out)]
    command += ["--input-shape", ",".join(map(str, shape)), str(model_path)]
    for item in overrides:
        command += ["--set", item]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return completed.returncode, seconds, report, completed.stderr.strip().splitlines()[-1:] and completed.stderr.strip().splitlines()[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--out", type=Path, help="keep the outputs here (default: a temporary folder)")
    args = parser.parse_args()
    failures = 0
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        print("| model | run | exit | output rel err vs original | ORT parity rel (compressed) | ORT parity rel (original) | max abs (compressed) | MACs ratio | wall s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name in args.models:
            model_path = _pickle(name, root)
            shape = zoo.default_input_shape(name)
            for label, recipe, overrides in RUNS:
                out = root / f"{name}-{label.replace('/', '-').replace(' ', '').replace('=', '')}"
                code, seconds, report, last_error = _run(model_path, recipe, overrides, shape, out)
                if report is None or "onnx" not in report:
                    failures += 1
                    print(f"| {name} | {label} | {code} | - | - | - | - | - | {seconds:.1f} |  <!-- {last_error} -->")
                    continue
                onnx = report["onnx"]
                lossless_broken = label.startswith("lossless") and report["output_rel_error"] > EXACT
                failures += int(code != 0 or lossless_broken)
                print(
                    f"| {name} | {label} | {code} | {report['output_rel_error']:.2e} | {onnx['parity_rel']:.2e} | "
                    f"{onnx['original_parity_rel']:.2e} | {onnx['parity_max_abs']:.2e} | "
                    f"{report['totals']['macs_ratio']:.3f} | {seconds:.1f} |",
                    flush=True,
                )
    print(f"\n{failures} failing run(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
