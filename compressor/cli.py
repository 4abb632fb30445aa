"""``compress --recipe RECIPE [options] MODEL``: a thin layer over :mod:`compressor.pipeline`.

Every ``CompressorError`` becomes one line on stderr and its exit code (2; 1 when ONNX Runtime
parity fails); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import sys
import time
import traceback
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from compressor.bench import DEFAULT_PROVIDERS, benchmark, model_input_shape, threads_label
from compressor.data import load_data
from compressor.errors import CompressorError, ParityError, describe_error
from compressor.exported import is_exported_program
from compressor.load import load_model
from compressor.pipeline import EXPORTED_PROGRAM_FILE, OUTPUT_FILES, compress, example_input_for, plan
from compressor.recipe import load_recipe
from compressor.report import render_plan, render_summary

PROG = "compress"
#: The recipes that ship with the tool; ``--recipe NAME`` finds ``NAME.yaml`` here.
SHIPPED_RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected N,C,H,W (four positive integers), got {text!r}")
    return shape


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=PROG,
        description="Factorize the convolutions of a trained PyTorch model, export it to ONNX and verify it.",
        # The subcommand is dispatched before parsing (main), so argparse would never list it.
        epilog=f"other command: {PROG} bench MODEL.onnx [--vs OTHER.onnx] times ONNX models in ONNX Runtime "
        f"(see {PROG} bench --help). Exit codes: 0 ok, 2 error (one line on stderr), 1 ONNX Runtime parity failure.",
    )
    parser.add_argument("model", metavar="MODEL", help="a state_dict file (with --arch) or a pickled nn.Module (with --trust-model)")
    parser.add_argument("--recipe", required=True, metavar="RECIPE", help="YAML recipe file, or the name of a shipped one (e.g. mobile for recipes/mobile.yaml)")
    parser.add_argument("--out", metavar="DIR", help="output folder (default: MODEL with the suffix .compressed)")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty output folder")
    parser.add_argument("--input-shape", type=_input_shape, metavar="N,C,H,W", help="example input shape (overrides the recipe)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help="override a recipe value by dotted path, e.g. rules.0.rank=8 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="load, trace and match, print the plan, write nothing")
    parser.add_argument("--trust-model", action="store_true", help="allow loading a pickled nn.Module (runs code from the file)")
    parser.add_argument("--arch", metavar="MODULE:CALLABLE", help="architecture factory for a state_dict MODEL")
    parser.add_argument("--data", metavar="PATH", help="calibration data for data-aware initialization: .npz (x, optional y), an image folder, or pkg.module:function")
    parser.add_argument("--eval-data", metavar="PATH", help="held-out data (same formats) for accuracy/agreement in PyTorch and ONNX Runtime")
    parser.add_argument("--providers", type=_providers, metavar="P1,P2", help="ONNX Runtime execution providers for the latency benchmark (default: CPUExecutionProvider; sets bench.providers)")
    parser.add_argument("--device", metavar="DEVICE", help="fine-tuning device: cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def _requested_out(args: argparse.Namespace) -> Path:
    return Path(args.out) if args.out else Path(args.model).with_suffix(".compressed")


def _output_dir(args: argparse.Namespace) -> Path:
    out = _requested_out(args)
    if out.exists() and not out.is_dir():
        raise CompressorError(f"output path {out} exists and is not a folder")
    model_path = Path(args.model).resolve()
    if any((out / name).resolve() == model_path for name in (*OUTPUT_FILES, EXPORTED_PROGRAM_FILE)):
        raise CompressorError(f"--out {out} would overwrite the input model {args.model}; choose another folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise CompressorError(f"output folder {out} is not empty; pass --force to write into it, or choose --out")
    _check_writable(out)
    return out


def _check_writable(out: Path) -> None:
    """Fail before any long work if the output cannot be written: probe the nearest existing
    ancestor with a folder made and removed at once (permission bits alone do not tell, e.g. for
    root or a read-only mount)."""
    existing = out.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CompressorError(f"cannot write the output folder {out}: {existing} is not a folder")
    try:
        Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".probe", dir=existing)).rmdir()
    except OSError as err:
        raise CompressorError(f"cannot write the output folder {out}: {err.strerror or err} in {existing}") from err


def _staging_dir(out: Path) -> Path:
    """An empty folder beside ``out`` (same file system, so publishing is a rename)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as err:
        raise CompressorError(f"cannot write beside the output folder {out}: {err.strerror or err}") from err


def _publish(staging: Path, out: Path) -> None:
    """Move finished outputs into ``out``: one rename for a new folder, one replace per file into an
    existing one (--force). An interrupted or failed run therefore never leaves a partial ``out``."""
    if not out.exists():
        staging.rename(out)
        return
    produced_names = {p.name for p in staging.iterdir()}
    for stale in (*OUTPUT_FILES, EXPORTED_PROGRAM_FILE):  # from an earlier run with other settings
        if stale not in produced_names and (out / stale).is_file():
            (out / stale).unlink()
    for produced in sorted(staging.iterdir()):
        os.replace(produced, out / produced.name)
    staging.rmdir()


def recipe_source(text: str) -> str:
    """``text`` itself when it names a file, else a shipped recipe of that name (``mobile`` ->
    recipes/mobile.yaml); a path that exists nowhere goes on to load_recipe, whose error names it."""
    if Path(text).exists() or Path(text).suffix or "/" in text:
        return text
    shipped = SHIPPED_RECIPES / f"{text}.yaml"
    if shipped.is_file():
        return str(shipped)
    names = sorted(p.stem for p in SHIPPED_RECIPES.glob("*.yaml"))
    raise CompressorError(f"recipe file not found: {text} (shipped recipes: {', '.join(names) or 'none installed'})")


def _dataset(path: str | None, shape: tuple[int, ...], recipe):
    if path is None:
        return None
    return load_data(path, input_shape=tuple(shape), mean=recipe.data.mean, std=recipe.data.std)


def _one_line_warnings(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr if file is None else file)


class _OneLineLogWarnings(logging.Handler):
    """The library's logged warnings (surprising plans, see compressor.caveats) as one stderr line
    each, like Python warnings; its INFO progress stays off, the terminal output already shows it.
    Writes to the current sys.stderr, which tests and callers may have replaced."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        print(f"{PROG}: warning: {record.getMessage()}", file=sys.stderr)


def _log_warnings_to_stderr() -> None:
    logger = logging.getLogger("compressor")
    if not any(isinstance(handler, _OneLineLogWarnings) for handler in logger.handlers):  # main() may run repeatedly
        logger.addHandler(_OneLineLogWarnings())


def _providers(text: str) -> list[str]:
    providers = [part.strip() for part in text.split(",") if part.strip()]
    if not providers:
        raise argparse.ArgumentTypeError(f"expected comma-separated provider names, got {text!r}")
    return providers


def run(args: argparse.Namespace, console: Console) -> int:
    started = time.perf_counter()
    if getattr(args, "providers", None):
        args.overrides = [*args.overrides, f"bench.providers={json.dumps(args.providers)}"]
    recipe = load_recipe(recipe_source(args.recipe), args.overrides)
    shape = args.input_shape or recipe.input_shape
    if shape is None:
        raise CompressorError("no input shape: set input_shape in the recipe or pass --input-shape N,C,H,W")
    # Shipped recipes say 224x224: a CIFAR-sized model planned at that size runs, with other MACs.
    source = "--input-shape" if args.input_shape else f"the recipe {args.recipe} (--input-shape N,C,H,W sets another)"
    console.print(f"input shape {','.join(map(str, shape))} from {source}")
    out = None if args.dry_run else _output_dir(args)
    model = load_model(args.model, arch=args.arch, trust_model=args.trust_model)
    exported_program = is_exported_program(Path(args.model))
    example_input = example_input_for(model, shape)
    data = _dataset(args.data, shape, recipe)  # calibration draws across its classes (calibration.seed)
    eval_data = _dataset(args.eval_data, shape, recipe)
    if data is None:
        console.print("no --data: initialization is weights-only (pass calibration data for data-aware init)")
        if recipe.finetune is not None and recipe.finetune.enabled and not args.dry_run:
            console.print("no --data: fine-tuning skipped (it trains on --data; report.json records the skip)")
    if args.dry_run:
        render_plan(plan(model, recipe, example_input, data=data).report(), console)
        console.print("dry run: nothing written")
        return 0
    result = compress(model, recipe, example_input, data=data, eval_data=eval_data, device=args.device)
    if _rank() != 0:  # under torchrun every rank computes, rank 0 alone writes
        return 0
    result.report.setdefault("model", str(args.model))
    staging = _staging_dir(out)
    try:
        result.save(staging, final_dir=out, exported_program=exported_program)
    except ParityError:
        _publish(staging, out)  # the outputs are complete; report.json says why they failed
        render_summary(result.report, console)
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _publish(staging, out)
    render_summary(result.report, console)
    written = result.report.get("files") or ((*OUTPUT_FILES, EXPORTED_PROGRAM_FILE) if exported_program else OUTPUT_FILES)
    console.print(f"wrote {', '.join(written)} to {out}/ in {time.perf_counter() - started:.1f}s; details: {out / 'report.md'}")
    return 0


# ------------------------------------------------------------------------------------------------ compress bench


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = [-1]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def build_bench_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog=f"{PROG} bench",
        description="ONNX Runtime latency of an ONNX model (and, with --vs, of another one, alternating runs).",
    )
    parser.add_argument("model", metavar="MODEL.onnx", help="the model to time (the baseline with --vs)")
    parser.add_argument("--vs", metavar="OTHER.onnx", help="a second model, timed in the same rounds; speedup = MODEL / OTHER")
    parser.add_argument("--threads", type=_int_list, default=[1, 0], metavar="T1,T2", help="intra-op thread counts (0 = all cores; default 1,0)")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per model and setting (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--providers", type=_providers, default=list(DEFAULT_PROVIDERS), metavar="P1,P2", help="execution providers (default CPUExecutionProvider)")
    parser.add_argument("--input-shape", type=_input_shape, metavar="N,C,H,W", help="input shape (default: from the file, batch 1)")
    parser.add_argument("--json", action="store_true", help="print the records as JSON instead of a table (model_ms, model_p90_ms; with --vs original_*, compressed_*, speedup)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    return parser


def run_bench(args: argparse.Namespace, console: Console) -> int:
    """``compress bench MODEL.onnx [--vs OTHER.onnx]``: median/p90 per thread setting."""
    for path in (args.model, args.vs):
        if path is not None and not Path(path).is_file():
            raise CompressorError(f"ONNX file not found: {path}")
    if args.runs < 1:
        raise CompressorError(f"--runs must be at least 1, got {args.runs}")
    shape = tuple(args.input_shape) if args.input_shape else model_input_shape(args.model)
    records = benchmark(
        args.model, args.vs, shape, threads=args.threads or [1], runs=args.runs, warmup=args.warmup, providers=args.providers
    )
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    table = Table(title=f"ONNX Runtime latency, input {list(shape)}, {records[0]['provider']}", title_justify="left")
    for column in ("threads", "MODEL ms (p90)", *(("OTHER ms (p90)", "speedup") if args.vs else ())):
        table.add_column(column)
    for r in records:
        first = "original" if args.vs else "model"
        row = [threads_label(r["threads"]), f"{r[f'{first}_ms']:.3f} ({r[f'{first}_p90_ms']:.3f})"]
        if args.vs:
            row += [f"{r['compressed_ms']:.3f} ({r['compressed_p90_ms']:.3f})", f"{r['speedup']:.2f}x"]
        table.add_row(*row)
    console.print(table)
    console.print(f"{args.runs} runs per model after {args.warmup} warm-up, alternating; MODEL = {args.model}"
                  + (f", OTHER = {args.vs}" if args.vs else ""))
    return 0


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _init_distributed(device: str | None) -> bool:
    """Join the process group when started by torchrun (WORLD_SIZE > 1): nccl on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    import torch
    import torch.distributed as dist

    on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group("nccl" if on_gpu else "gloo")
    return True


def _write_crash_log(text: str) -> Path:
    handle, name = tempfile.mkstemp(prefix=f"{PROG}-crash-", suffix=".log")
    with os.fdopen(handle, "w") as log:
        log.write(text)
    return Path(name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # a subcommand beside the positional MODEL: dispatch before parsing
        args, command, distributed = build_bench_parser().parse_args(argv[1:]), run_bench, False
        args.dry_run = True  # nothing is written: an interrupt has no output folder to mention
    else:
        args, command = build_parser().parse_args(argv), run
        distributed = _init_distributed(args.device)
    console = Console(width=None if sys.stdout.isatty() else 200, quiet=_rank() != 0)
    warnings.showwarning = _one_line_warnings
    _log_warnings_to_stderr()
    try:
        return command(args, console)
    except CompressorError as err:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"{PROG}: error: {err}", file=sys.stderr)
        return err.exit_code
    except Exception as err:  # a bug, not a user error: keep the traceback, say where it is
        if args.debug:
            raise
        log = _write_crash_log(traceback.format_exc())
        print(f"{PROG}: internal error: {describe_error(err)}; nothing was written; traceback in {log}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        out = None if args.dry_run else _requested_out(args)
        where = f"; nothing was written to {out}" if out is not None else ""
        print(f"{PROG}: interrupted{where}", file=sys.stderr)
        return 130
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
