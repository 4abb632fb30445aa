"""End-to-end tests of the ``compress`` command, each run in a subprocess as a user would run it.

The model is ``tests.models_for_cli:tiny_net`` (four convs: 3x3 3->8 + BN, 3x3 8->16 stride 2, 3x3 16->16,
1x1 16->16) on a 1x3x32x32 input, so that one run takes a few seconds, most of them importing torch.
The module-scoped ``runs`` fixture starts every run at once (a few in parallel) and each test waits for the
one it checks; one successful lossless run (default output folder) is shared by several tests.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import Future, ThreadPoolExecutor
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import compressor
from compressor.load import load_model
from compressor.pipeline import OUTPUT_FILES, example_input_for
from tests.conftest import sha256
from tests.models_for_cli import CONV_NAMES, INPUT_SHAPE, tiny_net

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSSLESS = REPO_ROOT / "recipes" / "lossless.yaml"
ARCH = "tests.models_for_cli:tiny_net"
SHAPE = ",".join(map(str, INPUT_SHAPE))
LAYER_KEYS = (
    "name", "method", "rank", "kernel", "in_channels", "out_channels", "macs_before", "macs_after",
    "params_before", "params_after", "weight_rel_error", "skipped_reason",
)
TOTALS_KEYS = ("macs_before", "macs_after", "params_before", "params_after")
ONNX_KEYS = ("original", "compressed", "parity_max_abs", "parity_rel")
EXACT = 1e-5  # a full-rank rewrite is exact up to float32 round-off
PARITY = 1e-4  # the lossless recipe's export.tolerance
WARNING_PREFIX = "compress: warning:"
#: What a lossless run writes (no INT8, no budget plot); a subset of OUTPUT_FILES, listed in report.json.
LOSSLESS_FILES = ("compressed.pt", "original.onnx", "compressed.onnx", "report.json", "report.md", "macs.png", "latency.png")


# ------------------------------------------------------------------------------------------------ helpers


def run_cli(*args, cwd: Path = REPO_ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m compressor ARGS`` in ``cwd`` (the repository root, so that ``tests.`` is importable)."""
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # the runs go in parallel; the model is tiny
    return subprocess.run(
        [sys.executable, "-m", "compressor", *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
    )


def shown(proc: subprocess.CompletedProcess) -> str:
    """The exit code and the ends of both streams, for assertion messages."""
    return f"exit {proc.returncode}\n--- stdout (tail) ---\n{proc.stdout[-3000:]}\n--- stderr (tail) ---\n{proc.stderr[-3000:]}"


def error_lines(stderr: str) -> list[str]:
    """The non-empty stderr lines, one-line warnings left out."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(WARNING_PREFIX)]


def assert_one_line_error(proc: subprocess.CompletedProcess, exit_code: int, *needles: str) -> str:
    """Exit ``exit_code``, no traceback, exactly one non-warning stderr line containing every needle."""
    assert proc.returncode == exit_code, f"expected exit {exit_code}: {shown(proc)}"
    assert "Traceback" not in proc.stderr, f"traceback without --debug: {shown(proc)}"
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}: {lines!r}"
    line = lines[0]
    assert line.startswith("compress: error: "), f"unexpected error line: {line!r}"
    for needle in needles:
        assert needle in line, f"expected {needle!r} in the error line: {line!r}"
    return line


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime (to prove that nothing was written)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def reference_costs() -> tuple[dict[str, dict], int, int]:
    """Per-conv MACs/params of ``tiny_net`` on INPUT_SHAPE, measured with hooks, independent of the library,
    and the MACs/params of its Linear layers."""
    model = tiny_net()
    convs: dict[str, dict] = {}
    linear = {"macs": 0, "params": 0}

    def hook(name):
        def record(module, inputs, output):
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                per_position = module.in_channels // module.groups * module.out_channels * kh * kw
                convs[name] = {
                    "macs": per_position * output.shape[2] * output.shape[3],
                    "params": sum(p.numel() for p in module.parameters()),
                    "kernel": [kh, kw],
                    "in_channels": module.in_channels,
                    "out_channels": module.out_channels,
                }
            else:
                linear["macs"] += module.in_features * module.out_features
                linear["params"] += sum(p.numel() for p in module.parameters())
        return record

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(INPUT_SHAPE))
    for handle in handles:
        handle.remove()
    return convs, linear["macs"], linear["params"]


def onnx_conv_count(path: Path) -> int:
    return sum(node.op_type == "Conv" for node in onnx.load(str(path)).graph.node)


def check_successful_run(proc: subprocess.CompletedProcess, out: Path, method: str, groups: int = 1) -> dict:
    """Everything a successful lossless run must leave behind; returns report.json."""
    assert proc.returncode == 0, shown(proc)
    for name in LOSSLESS_FILES:
        assert (out / name).is_file(), f"{name} missing from {out}: {sorted(p.name for p in out.iterdir())}"
    report = json.loads((out / "report.json").read_text())
    assert report["files"] == sorted(LOSSLESS_FILES) and set(LOSSLESS_FILES) <= set(OUTPUT_FILES), report["files"]

    assert report["graph"] == "fx", f"graph {report['graph']!r}, trace_error {report.get('trace_error')!r}"
    assert report["output_rel_error"] < EXACT, f"output_rel_error {report['output_rel_error']:.3e} >= {EXACT}"

    convs, linear_macs, linear_params = reference_costs()
    layers = report["layers"]
    assert [layer["name"] for layer in layers] == list(CONV_NAMES), [layer["name"] for layer in layers]
    rewritten = 0
    for layer in layers:
        missing = [key for key in LAYER_KEYS if key not in layer]
        assert not missing, f"layer {layer.get('name')} lacks keys {missing}: {layer}"
        ref = convs[layer["name"]]
        for key in ("kernel", "in_channels", "out_channels"):
            assert layer[key] == ref[key], f"{layer['name']}: {key} {layer[key]} != {ref[key]}"
        assert layer["macs_before"] == ref["macs"], f"{layer['name']}: macs_before {layer['macs_before']} != {ref['macs']}"
        assert layer["params_before"] == ref["params"], f"{layer['name']}: params_before {layer['params_before']} != {ref['params']}"
        spatial_skip = method == "spatial_separable" and layer["kernel"] == [1, 1]
        if spatial_skip:
            assert layer["method"] == "keep", layer
            assert layer["skipped_reason"] and "1x1" in layer["skipped_reason"], f"skipped_reason {layer['skipped_reason']!r}"
            assert layer["rank"] is None and layer["weight_rel_error"] is None, layer
            assert (layer["macs_after"], layer["params_after"]) == (layer["macs_before"], layer["params_before"]), layer
            continue
        rewritten += 1
        assert layer["method"] == method, f"{layer['name']}: method {layer['method']!r} != {method!r}"
        assert layer["skipped_reason"] is None, f"{layer['name']}: skipped_reason {layer['skipped_reason']!r}"
        assert isinstance(layer["rank"], int) and layer["rank"] > 0, f"{layer['name']}: rank {layer['rank']!r}"
        assert layer["rank"] % groups == 0, f"{layer['name']}: rank {layer['rank']} not a multiple of groups {groups}"
        assert layer.get("groups", 1) == groups, f"{layer['name']}: groups {layer.get('groups')} != {groups}"
        error = layer["weight_rel_error"]
        assert error is not None and 0 <= error < EXACT, f"{layer['name']}: weight_rel_error {error!r} not < {EXACT}"
        assert layer["macs_after"] > 0 and layer["params_after"] > 0, layer

    totals = report["totals"]
    missing = [key for key in TOTALS_KEYS if key not in totals]
    assert not missing, f"totals lacks {missing}: {totals}"
    macs_before = sum(c["macs"] for c in convs.values()) + linear_macs
    params_before = sum(c["params"] for c in convs.values()) + linear_params
    assert totals["macs_before"] == macs_before, f"totals macs_before {totals['macs_before']} != measured {macs_before}"
    assert totals["params_before"] == params_before, f"totals params_before {totals['params_before']} != {params_before}"
    # The per-layer cost model must agree with the totals measured on the rewritten model.
    planned_macs = sum(layer["macs_after"] for layer in layers) + linear_macs
    planned_params = sum(layer["params_after"] for layer in layers) + linear_params
    assert totals["macs_after"] == planned_macs, f"totals macs_after {totals['macs_after']} != per-layer sum {planned_macs}"
    assert totals["params_after"] == planned_params, f"totals params_after {totals['params_after']} != per-layer sum {planned_params}"

    record = report["onnx"]
    missing = [key for key in ONNX_KEYS if key not in record]
    assert not missing, f"onnx lacks {missing}: {record}"
    assert Path(record["original"]).resolve() == (out / "original.onnx").resolve(), record["original"]
    assert Path(record["compressed"]).resolve() == (out / "compressed.onnx").resolve(), record["compressed"]
    assert record["parity_rel"] <= PARITY, f"parity_rel {record['parity_rel']:.3e} > {PARITY}"
    assert record["parity_max_abs"] < 1e-4, f"parity_max_abs {record['parity_max_abs']:.3e}"
    assert record.get("passed") is True, record

    # Independent check: ONNX Runtime on compressed.onnx, new batch size, against the original PyTorch model.
    generator = torch.Generator().manual_seed(123)
    batch = torch.randn((3, *INPUT_SHAPE[1:]), generator=generator)
    with torch.no_grad():
        expected = tiny_net()(batch).numpy().astype(np.float64)
    session = ort.InferenceSession(str(out / "compressed.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0].astype(np.float64)
    rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    assert got.shape == expected.shape and rel < EXACT, f"ORT compressed.onnx vs original torch: rel {rel:.3e} (shape {got.shape})"
    before, after = onnx_conv_count(out / "original.onnx"), onnx_conv_count(out / "compressed.onnx")
    assert after >= before + rewritten, f"Conv nodes: original.onnx {before}, compressed.onnx {after}, {rewritten} layers rewritten"
    return report


# ------------------------------------------------------------------------------------------------ the runs

MISSING = "does_not_exist"
LOSSLESS_ARGS = ["--recipe", LOSSLESS, "--arch", ARCH, "--input-shape", SHAPE]

# Error cases: id -> (model file key or MISSING, CLI args before --out and the model, needles in the one-line error).
# More loader errors (arch import failures, --arch with a pickled module, non-PyTorch files) are unit-tested in
# test_load.py, in-process: each CLI run here costs seconds of torch import.
ERRORS = {
    "state_dict_without_arch": ("state_dict", ["--recipe", LOSSLESS, "--input-shape", SHAPE], ["--arch", "state_dict"]),
    "wrong_arch": (
        "state_dict",
        ["--recipe", LOSSLESS, "--input-shape", SHAPE, "--arch", "tests.models_for_cli:other_net"],
        ["missing", "unexpected", "features.0.weight", "conv1.weight"],
    ),
    "bad_arch_format": (
        "state_dict",
        ["--recipe", LOSSLESS, "--input-shape", SHAPE, "--arch", "tests.models_for_cli"],
        ["tests.models_for_cli", "MODULE:CALLABLE"],
    ),
    "missing_model_file": (MISSING, LOSSLESS_ARGS, [MISSING, "not found"]),
    "missing_recipe_file": (
        "state_dict", ["--recipe", "recipes/no_such_recipe.yaml", "--input-shape", SHAPE, "--arch", ARCH],
        ["no_such_recipe.yaml", "not found"],
    ),
    "bad_recipe_key": ("state_dict", [*LOSSLESS_ARGS, "--set", "rules.0.rnk=1"], ["'rnk'", "rank"]),
    "rank_above_full": ("state_dict", [*LOSSLESS_ARGS, "--set", "rules.0.rank=1000"], ["conv1", "1000"]),
    "rule_matches_nothing": ("state_dict", [*LOSSLESS_ARGS, "--set", "rules.0.match=nothing*"], ["nothing*", *CONV_NAMES]),
    "no_input_shape": ("state_dict", ["--recipe", LOSSLESS, "--arch", ARCH], ["input shape", "--input-shape"]),
    "untrusted_pickle": ("module", ["--recipe", LOSSLESS, "--input-shape", SHAPE], ["--trust-model", "--arch"]),
    "torchscript": ("script", ["--recipe", LOSSLESS, "--input-shape", SHAPE, "--trust-model"], ["TorchScript", "cannot be rewritten"]),
}


class Runs:
    """CLI runs started together (a few at a time: each spends seconds importing torch) and awaited by the
    tests that check them. ``result(name)`` is ``(CompletedProcess, case folder)``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pool = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
        self.futures: dict[str, Future] = {}
        self.folders: dict[str, Path] = {}
        self.notes: dict[str, object] = {}

    def folder(self, name: str) -> Path:
        folder = self.folders[name] = self.root / name
        folder.mkdir()
        return folder

    def start(self, name: str, *args, cwd: Path = REPO_ROOT) -> None:
        self.futures[name] = self.pool.submit(run_cli, *args, cwd=cwd)

    def result(self, name: str) -> tuple[subprocess.CompletedProcess, Path]:
        return self.futures[name].result(), self.folders.get(name)

    def wait_all(self) -> None:
        for future in self.futures.values():
            future.result()


@pytest.fixture(scope="module")
def runs(model_files, tmp_path_factory):
    """Start every CLI run of this module at once; each test then waits for its own."""
    runs = Runs(tmp_path_factory.mktemp("cli_runs"))
    model = model_files["state_dict"]
    runs.notes["digest_before"] = {key: sha256(path) for key, path in model_files.items()}

    # The shared lossless run: default output folder x/model.compressed next to x/model.pt.
    runs.folders["lossless"] = model.parent / "model.compressed"
    runs.start("lossless", *LOSSLESS_ARGS, model)
    for name, overrides in METHOD_OVERRIDES.items():
        runs.start(name, *LOSSLESS_ARGS, "--out", runs.folder(name) / "out", *overrides, model)
    runs.start("trusted_pickle", "--recipe", LOSSLESS, "--input-shape", SHAPE, "--trust-model",
               "--out", runs.folder("trusted_pickle") / "out", model_files["module"])
    runs.start("string_annotations", "--recipe", LOSSLESS, "--arch", "tests.models_for_cli:string_annotated_net",
               "--input-shape", SHAPE, "--out", runs.folder("string_annotations") / "out", model)
    runs.start("parity_failure", *LOSSLESS_ARGS, "--set", "export.tolerance=1e-12",
               "--out", runs.folder("parity_failure") / "out", model)
    for name, force in (("force", ["--force"]), ("no_force", [])):
        out = runs.folder(name) / "out"
        out.mkdir()
        (out / "notes.txt").write_text("keep me\n")
        runs.start(name, *LOSSLESS_ARGS, "--out", out, *force, model)

    # Dry run on its own copy of the model, default output folder; the folder is snapshotted first.
    dry = runs.folder("dry_run")
    (dry / "x").mkdir()
    (dry / "x" / "model.pt").write_bytes(model.read_bytes())
    runs.notes["dry_run_before"] = tree(dry)
    runs.start("dry_run", *LOSSLESS_ARGS, "--dry-run", dry / "x" / "model.pt")

    for case, (key, args, _) in ERRORS.items():
        folder = runs.folder(case)
        path = folder / f"{MISSING}.pt" if key == MISSING else model_files[key]
        runs.start(case, *args, "--out", folder / "out", path)
    runs.start("debug", "--recipe", "recipes/no_such_recipe.yaml", "--arch", ARCH, "--input-shape", SHAPE,
               "--out", runs.folder("debug") / "out", "--debug", model)
    runs.start("help", "--help")
    yield runs
    runs.pool.shutdown(wait=True, cancel_futures=True)


METHOD_OVERRIDES = {
    "spatial_separable": ["--set", "rules.0.method=spatial_separable"],
    "grouped": ["--set", "rules.0.method=grouped", "--set", "rules.0.groups=2"],
}
METHOD_GROUPS = {"spatial_separable": 1, "grouped": 2}


# ------------------------------------------------------------------------------------------------ successful runs


def test_lossless_depthwise_end_to_end(runs):
    check_successful_run(*runs.result("lossless"), "depthwise_separable")


def test_default_output_folder_is_model_stem_dot_compressed(runs, model_files):
    proc, out = runs.result("lossless")
    assert proc.returncode == 0, shown(proc)
    model = model_files["state_dict"]
    siblings = sorted(p.name for p in model.parent.iterdir())
    assert siblings == ["model.compressed", "model.pt"], f"x/ holds {siblings}"
    assert out == model.parent / "model.compressed"
    assert sorted(p.name for p in out.iterdir()) == sorted(LOSSLESS_FILES), sorted(p.name for p in out.iterdir())


def test_stdout_has_summary_table(runs):
    proc, out = runs.result("lossless")
    assert proc.returncode == 0, shown(proc)
    for name in CONV_NAMES:
        assert re.search(rf"\b{name}\b", proc.stdout), f"layer {name} not in stdout:\n{proc.stdout}"
    assert "PASS" in proc.stdout and "FAIL" not in proc.stdout, proc.stdout
    assert "depthwise_separable" in proc.stdout, proc.stdout
    assert str(out) in proc.stdout, proc.stdout
    assert not error_lines(proc.stderr), f"a successful run wrote to stderr: {proc.stderr!r}"


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_lossless_other_methods(runs, method):
    proc, folder = runs.result(method)
    report = check_successful_run(proc, folder / "out", method, METHOD_GROUPS[method])
    skipped = [layer["name"] for layer in report["layers"] if layer["skipped_reason"]]
    assert skipped == (["head"] if method == "spatial_separable" else []), f"skipped layers: {skipped}"
    if method == "spatial_separable":
        assert "1x1" in proc.stdout, f"the skip reason is not in the table:\n{proc.stdout}"


def test_input_model_files_are_byte_identical(runs, model_files):
    runs.wait_all()  # every run, successful or not, has read its model file
    before = runs.notes["digest_before"]
    after = {key: sha256(path) for key, path in model_files.items()}
    changed = {key: (before[key], after[key]) for key in before if before[key] != after[key]}
    assert not changed, f"sha256 of input model files changed: {changed}"


def test_compressed_pt_loads_in_fresh_process(runs, model_files, tmp_path):
    """compressed.pt is a plain pickled module: a new interpreter, outside the repository and with only
    torch imported, loads it and reproduces the in-process compressed model."""
    proc, out = runs.result("lossless")
    assert proc.returncode == 0, shown(proc)
    model = load_model(model_files["state_dict"], arch=ARCH)
    result = compressor.compress(model, LOSSLESS, example_input_for(model, INPUT_SHAPE))
    x = torch.randn((4, *INPUT_SHAPE[1:]), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = result.model(x)
    torch.save(x, tmp_path / "input.pt")
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        model = torch.load({str(out / 'compressed.pt')!r}, weights_only=False)
        assert isinstance(model, torch.nn.Module), type(model)
        assert not model.training, "compressed.pt was saved in training mode"
        x = torch.load("input.pt")
        with torch.no_grad():
            y = model(x)
        torch.save(y, "got.pt")
        expected = torch.load("expected.pt")
        print("max_abs", (y - expected).abs().max().item())
        print("imported:", sorted(m for m in sys.modules if m.split(".")[0] in ("compressor", "tests")))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    fresh = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert fresh.returncode == 0, shown(fresh)
    assert "imported: []" in fresh.stdout, f"loading compressed.pt needed more than torch: {fresh.stdout}"
    got = torch.load(tmp_path / "got.pt")
    assert got.shape == expected.shape, f"{got.shape} != {expected.shape}"
    max_abs = (got - expected).abs().max().item()
    assert max_abs <= 1e-6, f"fresh-process compressed.pt vs in-process compressed model: max|diff| {max_abs:.3e}"


def test_pickled_module_with_trust(runs):
    proc, folder = runs.result("trusted_pickle")
    check_successful_run(proc, folder / "out", "depthwise_separable")


def test_string_annotated_forward(runs):
    """A model defined under ``from __future__ import annotations`` (its forward's annotations are strings,
    as in compressor.zoo) must compress and save like any other."""
    proc, folder = runs.result("string_annotations")
    check_successful_run(proc, folder / "out", "depthwise_separable")


# ------------------------------------------------------------------------------------------------ dry run, --force


def test_dry_run_prints_plan_and_writes_nothing(runs):
    proc, folder = runs.result("dry_run")
    assert proc.returncode == 0, shown(proc)
    before, after = runs.notes["dry_run_before"], tree(folder)
    assert after == before, f"--dry-run changed {folder}: {sorted(set(after) ^ set(before))}"
    assert not (folder / "x" / "model.compressed").exists()
    for name in CONV_NAMES:
        assert re.search(rf"\b{name}\b", proc.stdout), f"layer {name} not in the plan:\n{proc.stdout}"
    assert "Plan" in proc.stdout and "nothing written" in proc.stdout, proc.stdout
    assert not error_lines(proc.stderr), proc.stderr


def test_non_empty_out_without_force_is_refused(runs):
    proc, folder = runs.result("no_force")
    out = folder / "out"
    assert_one_line_error(proc, 2, "--force", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"], sorted(p.name for p in out.iterdir())
    assert (out / "notes.txt").read_text() == "keep me\n"


def test_force_writes_into_non_empty_out(runs):
    proc, folder = runs.result("force")
    out = folder / "out"
    assert proc.returncode == 0, shown(proc)
    assert (out / "notes.txt").read_text() == "keep me\n", "--force touched an unrelated file"
    assert sorted(p.name for p in out.iterdir()) == sorted([*LOSSLESS_FILES, "notes.txt"])
    check_successful_run(proc, out, "depthwise_separable")


# ------------------------------------------------------------------------------------------------ user errors


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors_exit_2_with_one_line(runs, case):
    proc, folder = runs.result(case)
    line = assert_one_line_error(proc, 2, *ERRORS[case][2])
    assert not (folder / "out").exists(), f"{case}: the failed run left an output folder"
    if case == "rank_above_full":
        # The maximum is the rank that "full" resolves to (from the shared lossless run).
        lossless, out = runs.result("lossless")
        assert lossless.returncode == 0, shown(lossless)
        report = json.loads((out / "report.json").read_text())
        full = next(layer["rank"] for layer in report["layers"] if layer["name"] == "conv1")
        assert re.search(rf"\b{full}\b", line), f"the maximum rank {full} of conv1 is not named: {line!r}"


def test_debug_shows_traceback(runs):
    proc, _ = runs.result("debug")
    assert proc.returncode != 0, shown(proc)
    assert "Traceback" in proc.stderr and "RecipeError" in proc.stderr, shown(proc)
    assert "no_such_recipe.yaml" in proc.stderr, shown(proc)


def test_parity_failure_exits_1_and_keeps_report(runs):
    proc, folder = runs.result("parity_failure")
    out = folder / "out"
    line = assert_one_line_error(proc, 1, "1.0e-12")
    assert (out / "report.json").is_file(), f"report.json missing after a parity failure: {shown(proc)}"
    record = json.loads((out / "report.json").read_text())["onnx"]
    assert record["passed"] is False, record
    assert record["tolerance"] == 1e-12, record
    assert record["parity_rel"] > 1e-12, record
    for number in (record["parity_rel"], record["parity_max_abs"]):
        assert f"{number:.3e}" in line, f"measured {number:.3e} not in the error line: {line!r}"
    assert "FAIL" in proc.stdout, f"the summary does not say FAIL:\n{proc.stdout}"


# ------------------------------------------------------------------------------------------------ packaging


def test_console_script_and_help(runs):
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts.get("compress") == "compressor.cli:main", scripts
    from compressor import cli

    assert callable(cli.main)
    proc, _ = runs.result("help")
    assert proc.returncode == 0, shown(proc)
    for option in ("--recipe", "--out", "--force", "--input-shape", "--set", "--dry-run", "--trust-model", "--arch", "--debug"):
        assert option in proc.stdout, f"{option} not in --help:\n{proc.stdout}"
    assert proc.stdout.startswith("usage: compress"), proc.stdout[:200]


def test_output_folder_that_would_overwrite_the_input_is_refused(tmp_path, tiny_state_dict):
    target = tmp_path / "compressed.pt"
    torch.save(tiny_state_dict, target)
    before = sha256(target)
    proc = run_cli("--recipe", LOSSLESS, "--arch", ARCH, "--input-shape", SHAPE, "--out", tmp_path, "--force", target)
    assert_one_line_error(proc, 2, "would overwrite the input model")
    assert sha256(target) == before, "the input model was modified"


def test_data_and_eval_data_make_init_data_aware_and_report_metrics(tmp_path, tiny_state_dict):
    model = tmp_path / "model.pt"
    torch.save(tiny_state_dict, model)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calibration.npz", x=rng.integers(0, 256, (24, 3, 32, 32), dtype=np.uint8))
    np.savez(
        tmp_path / "held_out.npz",
        x=rng.standard_normal((12, 3, 32, 32)).astype(np.float32),
        y=rng.integers(0, 16, 12),
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent("""\
        rules:
          - match: "*"
            method: [spatial_separable, depthwise_separable, keep]
        target: {macs: 0.6}
        calibration: {samples: 16, batch_size: 8}
    """))
    out = tmp_path / "out"
    proc = run_cli("--recipe", recipe, "--arch", ARCH, "--input-shape", SHAPE, "--data", tmp_path / "calibration.npz",
                   "--eval-data", tmp_path / "held_out.npz", "--out", out, model)
    assert proc.returncode == 0, shown(proc)
    report = json.loads((out / "report.json").read_text())
    assert report["init"] == "data" and report["calibration_samples"] == 16, shown(proc)
    # Four small convs give a coarse candidate grid: within 2% is checked on ResNet-20 in test_pipeline.
    assert 0.5 <= report["target"]["achieved"] <= 0.6, report["target"]
    metrics = report["metrics"]
    assert metrics["samples"] == 12 and 0 <= metrics["agreement"] <= 1, metrics
    assert metrics["onnx"]["samples"] == 12 and abs(metrics["onnx"]["agreement"] - metrics["agreement"]) <= 1 / 12, metrics
    assert "init: data-aware" in proc.stdout, shown(proc)


def test_without_data_the_terminal_says_weights_only(runs):
    proc, _ = runs.result("lossless")
    assert "initialization is weights-only" in proc.stdout, shown(proc)


@pytest.mark.parametrize(
    "make, needles",
    [
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((4, 5, 32, 32), np.float32)), ("bad.npz", "channel")),
        (lambda d: np.savez(d / "bad.npz", x=np.full((4, 3, 32, 32), np.nan, np.float32)), ("bad.npz", "NaN")),
    ],
    ids=["wrong-channels", "nan"],
)
def test_bad_calibration_data_is_a_one_line_error(tmp_path, tiny_state_dict, make, needles):
    model = tmp_path / "model.pt"
    torch.save(tiny_state_dict, model)
    make(tmp_path)
    proc = run_cli("--recipe", LOSSLESS, "--arch", ARCH, "--input-shape", SHAPE, "--data", tmp_path / "bad.npz",
                   "--out", tmp_path / "out", model)
    assert_one_line_error(proc, 2, *needles)
    assert not (tmp_path / "out").exists(), "a failed run left an output folder"


def test_a_failed_save_leaves_no_output_and_no_staging_folder(tmp_path, tiny_state_dict, monkeypatch, capsys):
    from compressor import cli
    from compressor.errors import ExportError
    from compressor.pipeline import Result

    model = tmp_path / "model.pt"
    torch.save(tiny_state_dict, model)

    def failing_export(self, path, *, original_path=None):
        Path(path).write_bytes(b"half an onnx file")
        raise ExportError("simulated exporter crash")

    monkeypatch.setattr(Result, "export_onnx", failing_export)
    code = cli.main(["--recipe", str(LOSSLESS), "--arch", ARCH, "--input-shape", SHAPE, "--out", str(tmp_path / "out"), str(model)])
    assert code == 2, capsys.readouterr()
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["model.pt"], f"a failed run left {leftovers}"
    assert "simulated exporter crash" in capsys.readouterr().err


def test_help_names_the_bench_subcommand(runs):
    proc, _ = runs.result("help")
    assert proc.returncode == 0, shown(proc)
    assert "compress bench MODEL.onnx" in " ".join(proc.stdout.split()), proc.stdout


def _dry_run(tmp_path, tiny_state_dict, capsys, *args):
    model = tmp_path / "model.pt"
    torch.save(tiny_state_dict, model)
    from compressor import cli

    code = cli.main(["--arch", ARCH, "--dry-run", *map(str, args), str(model)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_shipped_recipe_is_found_by_name(tmp_path, tiny_state_dict, capsys):
    code, out, err = _dry_run(tmp_path, tiny_state_dict, capsys, "--recipe", "lossless", "--input-shape", SHAPE)
    assert code == 0, err
    assert "Plan (fx graph)" in out and "depthwise_separable" in out, out


def test_an_unknown_recipe_name_lists_the_shipped_ones(tmp_path, tiny_state_dict, capsys):
    code, _, err = _dry_run(tmp_path, tiny_state_dict, capsys, "--recipe", "mobil", "--input-shape", SHAPE)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "recipe file not found: mobil" in lines[0] and "mobile" in lines[0] and "lossless" in lines[0], lines


#: A fixed-rank recipe at the shipped recipes' 224x224, written per test so that changes to the shipped
#: ones (mobile.yaml is tuned over time) cannot change what these tests check.
BODY_RECIPE = """\
input_shape: [1, 3, 224, 224]
rules:
  - match: "*"
    method: depthwise_separable
    min_kernel_size: 3
    min_in_channels: 8
    rank: {macs: 0.35}
"""


@pytest.mark.parametrize("args, source", [(("--input-shape", SHAPE), "from --input-shape"), ((), "from the recipe ")])
def test_the_terminal_says_where_the_input_shape_came_from(tmp_path, tiny_state_dict, capsys, args, source):
    recipe = tmp_path / "body.yaml"
    recipe.write_text(BODY_RECIPE)
    code, out, err = _dry_run(tmp_path, tiny_state_dict, capsys, "--recipe", recipe, *args)
    assert code == 0, err
    shape = SHAPE if args else "1,3,224,224"
    assert f"input shape {shape} {source}" in " ".join(out.split()), out


def test_surprising_plans_are_one_line_warnings(tmp_path, tiny_state_dict, capsys):
    recipe = tmp_path / "body.yaml"
    recipe.write_text(BODY_RECIPE)
    code, _, err = _dry_run(tmp_path, tiny_state_dict, capsys, "--recipe", recipe, "--input-shape", SHAPE,
                            "--set", "rules.0.rank=null")
    warned = [line for line in err.splitlines() if line.startswith(WARNING_PREFIX)]
    assert code == 0 and len(warned) == 1 and "grows MACs" in warned[0], err
    code, _, err = _dry_run(tmp_path, tiny_state_dict, capsys, "--recipe", recipe, "--input-shape", SHAPE,
                            "--set", "target={macs: 0.8}")
    warned = [line for line in err.splitlines() if line.startswith(WARNING_PREFIX)]
    assert code == 0 and len(warned) == 1 and "changes nothing" in warned[0] and "rules.0.rank=null" in warned[0], err


def test_the_cli_leaves_the_library_logs_reaching_the_root_logger(tmp_path, caplog, capsys):
    from compressor import cli

    assert cli.main(["bench", str(tmp_path / "missing.onnx")]) == 2
    caplog.set_level(logging.WARNING, logger="compressor")
    logging.getLogger("compressor.pipeline").warning("reaches the root")
    assert [r.getMessage() for r in caplog.records] == ["reaches the root"], "later callers in the process lose the logs"
    assert capsys.readouterr().err.count("reaches the root") == 1, "printed twice"
