"""Fine-tuning under a wall-clock budget: held-out accuracy before and after, throughput, wall time.

On the pretrained CIFAR-10 ResNet-20 from ../shared/data (see its README). The 4660 images are split
once, deterministically (seed 0): ``--holdout`` images are held out (``--eval-data``), the rest feed
calibration and fine-tuning. The model has seen all of them in training, so "accuracy" is accuracy on
seen images; agreement with the original is the cleaner figure. Each run is ``compressor.compress``
with the recipe's ``finetune: {max_minutes: B}``; "wall" is the fine-tune step alone, which the
budget covers. Writes a markdown table to stdout (and --out; --json for the raw records).

    flock /tmp/cpu.lock .venv/bin/python scripts/benchmark_finetune.py --budgets 5 10 \\
        --recipes mobile spatial grouped --out finetune.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import compressor
from compressor import zoo

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data"
# CP is left out: its fits take minutes on this model, time a budgeted benchmark would rather train.
MIXED = ["spatial_separable", "depthwise_separable", "grouped", "keep"]


def recipe_for(name: str, target: float, calibration: int) -> dict:
    """``mobile``: recipes/mobile.yaml as shipped; the others solve a whole-model MACs target."""
    if name == "mobile":
        recipe = compressor.load_recipe(ROOT / "recipes" / "mobile.yaml").model_dump(mode="json", exclude_none=True)
    else:
        method = {"spatial": "spatial_separable", "grouped": "grouped", "mixed": MIXED}[name]
        # The stem (3 input channels) stays: it is 1% of the MACs and every later layer depends on it.
        recipe = {
            "rules": [{"match": "conv1", "method": "keep"}, {"match": "layer*", "method": method}],
            "target": {"macs": target},
        }
    recipe["input_shape"] = [1, 3, 32, 32]
    recipe["calibration"] = {"samples": calibration, "batch_size": 128}
    return recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--holdout", type=int, default=600)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--target", type=float, default=1 / 3, help="MACs fraction for spatial, grouped, mixed")
    parser.add_argument("--budgets", type=float, nargs="+", default=[5, 10], help="minutes")
    parser.add_argument("--recipes", nargs="+", default=["mobile", "spatial", "grouped"], choices=["mobile", "spatial", "grouped", "mixed"])
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="finetune overrides, e.g. finetune.batchnorm=train (repeatable)")
    parser.add_argument("--out", type=Path, help="markdown table")
    parser.add_argument("--json", type=Path, help="raw finetune records")
    args = parser.parse_args()
    weights, data = args.data_dir / "resnet20-cifar10.pth", args.data_dir / "cifar10-train-4660.npz"
    if not weights.exists() or not data.exists():
        print(f"benchmark material not found in {args.data_dir}; see ../shared/data/README.md", file=sys.stderr)
        return 2
    model = zoo.resnet20_cifar()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    dataset = compressor.load_data(data, input_shape=(1, 3, 32, 32), mean=zoo.CIFAR10_MEAN, std=zoo.CIFAR10_STD)
    train, holdout = dataset.split(args.holdout, seed=0)
    example = torch.zeros(1, 3, 32, 32)
    lines = [
        f"ResNet-20 (CIFAR-10, pretrained); {holdout.count()} held-out images, {train.count()} for calibration "
        f"({args.calibration}) and fine-tuning; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"overrides: {' '.join(args.overrides) or 'none'}",
        "",
        "| recipe | MACs ratio | budget (min) | steps | epochs | held-out accuracy before -> after (original) "
        "| agreement before -> after | images/s | fine-tune wall (s) | budget used | stopped by |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    records = []
    for budget in args.budgets:
        for name in args.recipes:
            recipe = compressor.load_recipe(
                recipe_for(name, args.target, args.calibration), [f"finetune.max_minutes={budget}", *args.overrides]
            )
            started = time.perf_counter()
            result = compressor.compress(model, recipe, example, data=train, eval_data=holdout, progress=False)
            total = time.perf_counter() - started
            tuned, ratio = result.report["finetune"], result.report["totals"]["macs_ratio"]
            before, after = tuned["before"], tuned["after"]
            line = (
                f"| {name} | {ratio:.3f} | {budget:g} | {tuned['steps']} | {tuned['epochs']:.1f} | "
                f"{before['accuracy_compressed']:.4f} -> {after['accuracy_compressed']:.4f} ({after['accuracy_original']:.4f}) | "
                f"{before['agreement']:.4f} -> {after['agreement']:.4f} | {tuned['images_per_second']:.0f} | "
                f"{tuned['seconds']:.1f} | {tuned['seconds'] / (budget * 60):.3f} | {tuned['stopped_by']} |"
            )
            lines.append(line)
            print(line, flush=True)
            records.append({"recipe": name, "budget_minutes": budget, "macs_ratio": ratio, "compress_seconds": total,
                            "finetune": {k: v for k, v in tuned.items() if k != "evaluations"},
                            "evaluations": tuned["evaluations"]})
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
