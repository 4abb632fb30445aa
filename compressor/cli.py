"""``compress --recipe RECIPE [options] MODEL``: a thin layer over :mod:`compressor.pipeline`.

Every ``CompressorError`` becomes one line on stderr and its exit code (2; 1 when ONNX Runtime
parity fails); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import sys
import time
import traceback
import warnings
from pathlib import Path

from rich.console import Console

from compressor.data import load_data
from compressor.errors import CompressorError, ParityError
from compressor.load import load_model
from compressor.pipeline import OUTPUT_FILES, compress, example_input_for, plan
from compressor.recipe import load_recipe
from compressor.report import render_plan, render_summary

PROG = "compress"


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (four positive integers), got {text!r}")
    return shape


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Factorize the convolutions of a trained PyTorch model, export it to ONNX and verify it.",
    )
    parser.add_argument("model", metavar="MODEL", help="a state_dict file (with --arch) or a pickled nn.Module (with --trust-model)")
    parser.add_argument("--recipe", required=True, metavar="RECIPE", help="YAML recipe, e.g. recipes/mobile.yaml")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: MODEL with the suffix .compressed)")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty output folder")
    parser.add_argument("--input-shape", type=_input_shape, metavar="N,C,H,W", help="example input shape (overrides the recipe)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="override a recipe value by dotted path, e.g. rules.0.rank=8 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="load, trace and match, print the plan, write nothing")
    parser.add_argument("--trust-model", action="store_true", help="allow loading a pickled nn.Module (runs code from the file)")
    parser.add_argument("--arch", metavar="MODULE:CALLABLE", help="architecture factory for a state_dict MODEL")
    parser.add_argument("--data", metavar="PATH", help="calibration data for data-aware initialization: .npz (x, optional y), an image folder, or pkg.module:function")
    parser.add_argument("--eval-data", metavar="PATH", help="held-out data (same formats) for accuracy/agreement in PyTorch and ONNX Runtime")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _output_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out) if args.out else Path(args.model).with_suffix(".compressed")
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output path {out} exists and is not a folder")
    model_path = Path(args.model).resolve()
    if any((out / name).resolve() == model_path for name in OUTPUT_FILES):
        raise CompressorError(f"--out {out} would overwrite the input model {args.model}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CompressorError(f"output folder {out} is not empty; pass --force to write into it, or choose --out")
    return out


def _staging_dir(out: Path) -> Path:
    """An empty folder beside ``out`` (same file system, so publishing is a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise CompressorError(f"cannot write beside the output folder {out}: {err.strerror or err}") from err


def _publish(staging: Path, out: Path) -> None:
    """Move finished outputs into ``out``: one rename for a new folder, one replace per file into an
    existing one (--force). An interrupted or failed run therefore never leaves a partial ``out``."""
    if not out.exists():
        staging.rename(out)
        return
    for produced in sorted(staging.iterdir()):
        os.replace(produced, out / produced.name)
    staging.rmdir()


def _dataset(path: str | None, shape: tuple[int, ...], recipe):
    if path is None:
        return None
    return load_data(path, input_shape=tuple(shape), mean=recipe.data.mean, std=recipe.data.std)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


def run(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    recipe = load_recipe(args.recipe, args.overrides)
    shape = args.input_shape or recipe.input_shape
    if shape is None:
        raise CompressorError("no input shape: set input_shape in the recipe or pass --input-shape N,C,H,W")
    out = None if args.dry_run else _output_dir(args)
    model = load_model(args.model, arch=args.arch, trust_model=args.trust_model)
    example_input = example_input_for(model, shape)
    data = _dataset(args.data, shape, recipe)
    if data is not None:  # image folders are sorted by class: a prefix of them would miss classes
        data = data.shuffled()
    eval_data = _dataset(args.eval_data, shape, recipe)
    if data is None:
        console.print("no --data: initialization is weights-only (pass calibration data for data-aware init)")
    if args.dry_run:
        render_plan(plan(model, recipe, example_input, data=data).report(), console)
        console.print("dry run: nothing written")
        return 0
    result = compress(model, recipe, example_input, data=data, eval_data=eval_data)
    staging = _staging_dir(out)
    try:
        result.save(staging, final_dir=out)
    except ParityError:
        _publish(staging, out)  # the outputs are complete; report.json says why they failed
        render_summary(result.report, console)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, out)
    render_summary(result.report, console)
    console.print(f"wrote {', '.join(OUTPUT_FILES)} to {out}/ in {time.perf_counter() - started:.1f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    warnings.showwarning = _one_line_warnings
    try:
        return run(args, console)
    except CompressorError as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
