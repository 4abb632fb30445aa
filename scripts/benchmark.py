"""Accuracy kept vs MACs and ONNX Runtime latency, on the pretrained CIFAR-10 ResNet-20.

Needs ../shared/data/resnet20-cifar10.pth and cifar10-train-4660.npz (see that folder's README);
pass --data-dir to point elsewhere. The images are from CIFAR-10's training split, which the model
has seen, so the numbers are agreement with the original model (top-1) and accuracy on those
images, not test accuracy. All figures come from one run: compressed vs original, latency as the
median of repeats with one ORT thread.

    .venv/bin/python scripts/benchmark.py [--images 2000] [--repeats 100]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import compressor
from compressor import zoo
from compressor.bench import onnx_latency_ms

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CONFIGS = [
    ("depthwise_separable", 1, 0.35),
    ("depthwise_separable", 1, 0.6),
    ("spatial_separable", 1, 0.35),
    ("spatial_separable", 1, 0.6),
    ("grouped", 1, 0.35),
    ("grouped", 4, 0.6),
]


def _batches(images: np.ndarray, labels: np.ndarray, size: int = 250):
    mean = torch.tensor(zoo.CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(zoo.CIFAR10_STD).view(1, 3, 1, 1)
    for start in range(0, len(images), size):
        x = torch.from_numpy(images[start : start + size]).float() / 255
        yield (x - mean) / std, torch.from_numpy(labels[start : start + size])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    weights, data = args.data_dir / "resnet20-cifar10.pth", args.data_dir / "cifar10-train-4660.npz"
    if not weights.exists() or not data.exists():
        print(f"benchmark material not found in {args.data_dir}; see ../shared/data/README.md", file=sys.stderr)
        return 2
    model = zoo.resnet20_cifar()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    arrays = np.load(data)
    images, labels = arrays["x"][: args.images], arrays["y"][: args.images]
    example = torch.zeros(1, 3, 32, 32)
    print(f"ResNet-20 (CIFAR-10), {len(images)} images, ORT latency median of {args.repeats}, batch 1, 1 thread")
    print("| method | groups | MACs budget | MACs ratio | params ratio | top-1 agreement | accuracy (orig -> comp) | latency ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        baseline_path = Path(scratch) / "original.onnx"
        for method, groups, budget in CONFIGS:
            recipe = {
                "rules": [
                    {"match": "conv1", "method": "keep"},
                    {"match": "layer*", "method": method, "groups": groups, "rank": {"macs": budget}},
                ]
            }
            result = compressor.compress(model, recipe, example, eval_data=list(_batches(images, labels)))
            compressed_path = Path(scratch) / "compressed.onnx"
            result.export_onnx(compressed_path, original_path=None if baseline_path.exists() else baseline_path)
            original_ms = onnx_latency_ms(baseline_path, (1, 3, 32, 32), repeats=args.repeats)
            compressed_ms = onnx_latency_ms(compressed_path, (1, 3, 32, 32), repeats=args.repeats)
            totals, evaluation = result.report["totals"], result.report["metrics"]
            print(
                f"| {method} | {groups} | {budget:.2f} | {totals['macs_ratio']:.3f} | {totals['params_ratio']:.3f} | "
                f"{evaluation['agreement']:.4f} | {evaluation['accuracy_original']:.4f} -> "
                f"{evaluation['accuracy_compressed']:.4f} | {compressed_ms / original_ms:.3f} "
                f"({compressed_ms:.3f} / {original_ms:.3f} ms) |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
