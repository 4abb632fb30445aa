"""Accuracy without fine-tuning: weight-only vs data-aware initialization, per method, under a MACs target.

On the pretrained CIFAR-10 ResNet-20 from ../shared/data (see its README). The 4660 images are
split once, deterministically (seed 0): ``--calibration`` images feed ``--data`` (statistics and
refits), a disjoint ``--holdout`` set measures accuracy and top-1 agreement with the original.
The model has seen all of these images in training, so "accuracy" is accuracy on seen images;
agreement with the original is the cleaner figure. Writes a markdown table to stdout (and --out).

    .venv/bin/python scripts/benchmark_init.py [--targets 0.5 0.35] [--methods spatial_separable ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import compressor
from compressor import zoo

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ["spatial_separable", "depthwise_separable", "grouped", "cp", "mixed"]
MIXED = ["spatial_separable", "depthwise_separable", "grouped", "keep"]


def _normalized(images: np.ndarray) -> torch.Tensor:
    from compressor import zoo
    from compressor.data import scale_uint8

    return scale_uint8(images, np.array(zoo.CIFAR10_MEAN, np.float32), np.array(zoo.CIFAR10_STD, np.float32))


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int = 250) -> list:
    return [(x[i : i + size], None if y is None else y[i : i + size]) for i in range(0, len(x), size)]


def recipe_for(method: str, target: float, samples: int) -> dict:
    return {
        "input_shape": [1, 3, 32, 32],
        # The stem (3 input channels) stays: it is 1% of the MACs and every later layer depends on it.
        "rules": [
            {"match": "conv1", "method": "keep"},
            {"match": "layer*", "method": MIXED if method == "mixed" else method},
        ],
        "target": {"macs": target},
        "calibration": {"samples": samples, "batch_size": 128},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--holdout", type=int, default=1000)
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    weights, data = args.data_dir / "resnet20-cifar10.pth", args.data_dir / "cifar10-train-4660.npz"
    if not weights.exists() or not data.exists():
        print(f"benchmark material not found in {args.data_dir}; see ../shared/data/README.md", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    model = zoo.resnet20_cifar()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    arrays = np.load(data)
    order = np.random.default_rng(0).permutation(len(arrays["y"]))
    holdout, calibration = order[: args.holdout], order[args.holdout : args.holdout + args.calibration]
    x, y = _normalized(arrays["x"]), torch.from_numpy(arrays["y"])
    eval_batches = _batches(x[holdout], y[holdout])
    calibration_batches = _batches(x[calibration], None)
    example = torch.zeros(1, 3, 32, 32)
    lines = [
        f"ResNet-20 (CIFAR-10, pretrained), no fine-tuning; {len(holdout)} held-out images, "
        f"{len(calibration)} calibration images (disjoint); torch {torch.__version__}, {torch.get_num_threads()} threads",
        "",
        "| method | target MACs | init | MACs ratio | params ratio | held-out accuracy (orig -> comp) | agreement | output rel. error | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for target in args.targets:
        for method in args.methods:
            for init in ("weights", "data"):
                started = time.perf_counter()
                result = compressor.compress(
                    model,
                    recipe_for(method, target, args.calibration),
                    example,
                    data=calibration_batches if init == "data" else None,
                    eval_data=eval_batches,
                )
                seconds = time.perf_counter() - started
                totals, metrics = result.report["totals"], result.report["metrics"]
                line = (
                    f"| {method} | {target:.2f} | {init} | {totals['macs_ratio']:.3f} | {totals['params_ratio']:.3f} | "
                    f"{metrics['accuracy_original']:.4f} -> {metrics['accuracy_compressed']:.4f} | "
                    f"{metrics['agreement']:.4f} | {metrics['output_rel_error']:.3f} | {seconds:.1f} |"
                )
                lines.append(line)
                print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
