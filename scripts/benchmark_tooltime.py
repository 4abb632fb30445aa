"""The tool's own time: wall seconds per phase and peak memory of one ``compress`` + ``save`` run.

Not a test: a measurement to compare commits. It uses only the public API (``compress``,
``Result.save``), so the same script measures an older checkout too::

    git worktree add /tmp/before <commit>
    PYTHONPATH=/tmp/before .venv/bin/python scripts/benchmark_tooltime.py --model resnet32

The run is what ``compress --data`` does with the latency benchmark off: calibrate on ``--images``
training images, choose ranks, factorize and refit, export and verify ONNX. Held-out accuracy
(``cifar10-test-jpeg-9154.npz``, never used for calibration) is measured afterwards, outside the
timed region and after peak memory is read. Prints one JSON line; the load average is in it,
because the machine is shared and timings are noisy.

To compare checkouts on a busy machine, ``--compare A B --repeats 3`` runs the same measurement
in a fresh process per run, alternating A, B, A, B, ... (each with ``PYTHONPATH`` set to its
checkout), and prints every row, then per checkout the median of each phase's seconds, of the
wall and CPU seconds and of peak memory, and the ratio of B's medians to A's::

    git worktree add /tmp/before <commit>; git worktree add /tmp/after <commit>
    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/benchmark_tooltime.py --threads 1 \
        --compare /tmp/before /tmp/after --repeats 3
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BLOCKS = {"resnet20": (3, 3, 3), "resnet32": (5, 5, 5), "resnet56": (9, 9, 9)}


def _cifar_model(name: str, data_dir: Path):
    from compressor import zoo

    model = zoo.CifarResNet(BLOCKS[name])
    model.load_state_dict(torch.load(data_dir / f"{name}-cifar10.pth", weights_only=True))
    return model.eval(), (1, 3, 32, 32)


def _model(name: str, data_dir: Path):
    if name in BLOCKS:
        return _cifar_model(name, data_dir)
    from compressor import zoo

    return zoo.randomize_batchnorm(zoo.resnet50()).eval(), (1, 3, 224, 224)


def _normalized(x: np.ndarray) -> torch.Tensor:
    from compressor import zoo
    from compressor.data import scale_uint8

    return scale_uint8(x, np.array(zoo.CIFAR10_MEAN, np.float32), np.array(zoo.CIFAR10_STD, np.float32))


def _batches(x: torch.Tensor, y: torch.Tensor | None, size: int = 64) -> list:
    return [(x[i : i + size], None if y is None else y[i : i + size]) for i in range(0, len(x), size)]


def _data(args, shape) -> tuple[list, list | None]:
    """(calibration batches, held-out batches); random images for models without shared data."""
    if shape[-1] != 32:
        generator = torch.Generator().manual_seed(0)
        return _batches(torch.randn(args.images, *shape[1:], generator=generator), None), None
    train = np.load(args.data_dir / "cifar10-train-jpeg-20000.npz")
    picked = np.random.default_rng(0).permutation(len(train["x"]))[: args.images]
    calibration = _batches(_normalized(train["x"][picked]), torch.from_numpy(train["y"][picked]))
    test = np.load(args.data_dir / "cifar10-test-jpeg-9154.npz")
    held = _batches(_normalized(test["x"][: args.holdout]), torch.from_numpy(test["y"][: args.holdout]), 256)
    return calibration, held


def _count_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process per phase (all threads), filled as the run goes.

    Wraps the ``timed`` the pipeline imported, so it works on older checkouts too. On a shared
    machine a phase's wall time mostly measures the neighbours; its CPU time does not.
    """
    import contextlib

    from compressor import phases, pipeline

    cpu: dict[str, float] = {}
    original = phases.timed

    @contextlib.contextmanager
    def timed(seconds, phase):
        started = time.process_time()
        try:
            with original(seconds, phase):
                yield
        finally:
            cpu[phase] = cpu.get(phase, 0.0) + time.process_time() - started

    pipeline.timed = timed
    return cpu


class _PhasePeaks(logging.Handler):
    """Peak resident memory per phase: RSS sampled every 0.2 s, split at the "<phase> started" lines
    the pipeline logs. A phase's peak is the highest sample while it ran (ru_maxrss only has the run's)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.phase, self.peaks, self._stop = "start", {}, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.endswith(" started"):
            self.phase = message.split()[0]

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.wait(0.2):
            resident = int(Path("/proc/self/statm").read_text().split()[1]) * page / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident)

    def __enter__(self):
        logging.getLogger("compressor").addHandler(self)
        logging.getLogger("compressor").setLevel(logging.INFO)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        logging.getLogger("compressor").removeHandler(self)


def _recipe(args) -> dict:
    rule = {"match": args.match, "method": args.methods.split(",")}
    if args.rank is not None:
        rule["rank"] = {"macs": args.rank}
    recipe = {
        "name": "tooltime",
        "rules": [rule],
        "calibration": {"samples": args.images, "batch_size": 64},
        "export": {"opset": 17, "tolerance": 1e-3},
        "bench": {"runs": 0},
    }
    if args.target is not None:
        recipe["target"] = {"macs": args.target}
    return recipe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32", choices=[*BLOCKS, "resnet50"])
    parser.add_argument("--methods", default="spatial_separable,depthwise_separable,grouped,keep")
    parser.add_argument("--match", default="layer*.conv*", help="the rule's match pattern")
    parser.add_argument("--target", type=float, default=0.5, help="target: {macs: f}; give --rank instead for one method")
    parser.add_argument("--rank", type=float, default=None, help="rank: {macs: f} for a single-method rule (sets --target off)")
    parser.add_argument("--images", type=int, default=512, help="calibration images (--data)")
    parser.add_argument("--holdout", type=int, default=9154, help="held-out test images for accuracy")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-dir", type=Path, default=DATA)
    parser.add_argument("--label", default="")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="two checkouts to alternate")
    parser.add_argument("--repeats", type=int, default=3, help="runs per checkout with --compare")
    args = parser.parse_args()
    if args.compare:
        return _compare(args)
    if args.rank is not None:
        args.target = None
    if args.threads:
        torch.set_num_threads(args.threads)

    import compressor
    from compressor.evaluate import evaluate
    from compressor.pipeline import example_input_for

    model, shape = _model(args.model, args.data_dir)
    calibration, held = _data(args, shape)
    example = example_input_for(model, shape)
    cpu_by_phase = _count_cpu_seconds()
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    with _PhasePeaks() as phase_peaks:
        result = compressor.compress(model, _recipe(args), example, data=calibration, progress=False)
        with tempfile.TemporaryDirectory() as out:
            result.save(out)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of the run (all threads): on a shared, overloaded machine wall time mostly measures
    # the neighbours; with --threads 1 this is close to the wall time the run would take alone.
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load_after = os.getloadavg()
    row = {
        "label": args.label,
        "compressor": str(Path(compressor.__file__).parent),
        "model": args.model,
        "recipe": _recipe(args)["rules"][0] | {"target": args.target},
        "images": args.images,
        "threads": torch.get_num_threads(),
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_mib": round(peak_mib),
        "peak_rss_mib_by_phase": {phase: round(value) for phase, value in phase_peaks.peaks.items()},
        "seconds": {k: round(v, 2) for k, v in result.report["seconds"].items()},
        "cpu_seconds": {k: round(v, 2) for k, v in cpu_by_phase.items()},
        "planned_ratio": (result.report.get("target") or {}).get("planned_ratio"),
        "achieved": (result.report.get("target") or {}).get("achieved"),
        "methods": sorted({layer["method"] for layer in result.report["layers"] if layer.get("rank")}),
        # What the run decided, to compare checkouts: method, rank and refitted output error per layer.
        "plan": {
            layer["name"]: [layer["method"], layer.get("rank"), layer.get("output_rel_error") and round(layer["output_rel_error"], 6)]
            for layer in result.report["layers"]
            if layer.get("rank")
        },
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in load_after],
    }
    if held is not None:
        metrics = evaluate(result.original, result.model, held)
        row["heldout"] = {k: metrics[k] for k in ("samples", "accuracy_original", "accuracy_compressed", "agreement")}
    print(json.dumps(row))
    return 0


def _compare(args) -> int:
    """Alternate fresh processes over the two checkouts; medians per checkout and B/A ratios."""
    forwarded = [a for a in sys.argv[1:]]
    at = forwarded.index("--compare")
    del forwarded[at : at + 3]
    if "--repeats" in forwarded:
        at = forwarded.index("--repeats")
        del forwarded[at : at + 2]
    rows: dict[str, list[dict]] = {str(c): [] for c in args.compare}
    for repeat in range(args.repeats):
        for checkout in args.compare:
            env = os.environ | {"PYTHONPATH": str(checkout.resolve())}
            command = [sys.executable, __file__, *forwarded, "--data-dir", str(args.data_dir), "--label", f"{checkout.name}#{repeat}"]
            done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows[str(checkout)].append(row)
            print(json.dumps(row), flush=True)
    medians = {}
    for checkout, runs in rows.items():
        phases = {k for run in runs for k in run["seconds"]}
        medians[checkout] = {
            "wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
            "seconds": {k: round(statistics.median(r["seconds"].get(k, 0.0) for r in runs), 2) for k in sorted(phases)},
            "cpu_seconds": {k: round(statistics.median(r.get("cpu_seconds", {}).get(k, 0.0) for r in runs), 2) for k in sorted(phases) if k != "total"},
            "loadavg_1min": [r["loadavg_before"][0] for r in runs],
            "heldout": runs[-1].get("heldout"),
        }
    first, second = (medians[str(c)] for c in args.compare)
    ratios = {k: round(second[k] / first[k], 3) for k in ("wall_s", "cpu_s", "peak_rss_mib") if first[k]}
    for key in ("seconds", "cpu_seconds"):
        ratios[key] = {k: round(v / first[key][k], 3) for k, v in second[key].items() if first[key].get(k)}
    print(json.dumps({"medians": medians, "ratio_B_over_A": ratios}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
