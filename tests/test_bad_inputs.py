"""Every bad input gets one line on stderr and exit code 2, writes nothing and leaves the inputs untouched.

One row per case. Each row builds its files in a fresh folder and runs the CLI in-process (a subprocess
per row would spend seconds importing torch; tests/test_cli.py checks a few of them as real processes).
"""

from __future__ import annotations

import json
import os
import sys
import types
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from compressor.cli import main
from tests.conftest import sha256
from tests.models_for_cli import INPUT_SHAPE, TinyNet, tiny_net

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSSLESS = str(REPO_ROOT / "recipes" / "lossless.yaml")
ARCH = "tests.models_for_cli:tiny_net"
SHAPE = ",".join(map(str, INPUT_SHAPE))
WARNING_PREFIX = "compress: warning:"


@dataclass
class Case:
    """``build(folder)`` writes the inputs and returns the CLI arguments (before ``--out``)."""

    build: Callable[[Path], list[str]]
    needles: tuple[str, ...]
    #: Appended after the arguments; ``None`` lets the CLI choose (default output folder).
    out: str | None = "out"
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ builders


def _state_dict(folder: Path, name: str = "model.pt", model: torch.nn.Module | None = None) -> Path:
    path = folder / name
    torch.save((model or tiny_net()).state_dict(), path)
    return path


def _recipe(folder: Path, text: str) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(text)
    return path


def _args(model: Path, *, recipe: str | Path = LOSSLESS, arch: str | None = ARCH, shape: str | None = SHAPE, more=()) -> list[str]:
    args = ["--recipe", str(recipe)]
    if arch:
        args += ["--arch", arch]
    if shape:
        args += ["--input-shape", shape]
    return [*args, *more, str(model)]


def _npz(folder: Path, x: np.ndarray) -> Path:
    path = folder / "data.npz"
    np.savez(path, x=x)
    return path


def _with_data(folder: Path, data: Path) -> list[str]:
    return _args(_state_dict(folder), more=["--data", str(data)])


def _pickled_module(folder: Path) -> Path:
    path = folder / "module.pt"
    torch.save(tiny_net(), path)
    return path


def _vanished_class(folder: Path) -> Path:
    """A pickled module whose class lived in a module that no longer exists."""
    module = types.ModuleType("vanished_models")
    exec("import torch\nclass Gone(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n        self.conv = torch.nn.Conv2d(3, 4, 3)\n", module.__dict__)
    sys.modules["vanished_models"] = module
    try:
        path = folder / "gone.pt"
        torch.save(module.Gone(), path)
    finally:
        del sys.modules["vanished_models"]
    return path


def _torchscript(folder: Path) -> Path:
    path = folder / "scripted.pt"
    torch.jit.script(tiny_net()).save(str(path))
    return path


def _truncated(folder: Path) -> Path:
    path = _state_dict(folder)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _nan_weights(folder: Path) -> Path:
    model = tiny_net()
    with torch.no_grad():
        model.conv2.weight[0, 0, 0, 0] = float("nan")
    return _state_dict(folder, model=model)


def _hostile_pt2(folder: Path) -> Path:
    import warnings

    plain = folder / "plain.pt2"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(tiny_net(), (torch.randn(INPUT_SHAPE),))
        torch.export.save(program, str(plain))
    hostile = folder / "hostile.pt2"
    with zipfile.ZipFile(plain) as source, zipfile.ZipFile(hostile, "w") as copy:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    plain.unlink()
    return hostile


def _image_folder(folder: Path, *, broken: bool) -> Path:
    root = folder / "images" / "cat"
    root.mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(root / "ok.png")
    if broken:
        (root / "broken.png").write_bytes(b"not a png at all")
    return folder / "images"


def _budget_recipe(folder: Path) -> Path:
    return _recipe(folder, "name: b\ntarget: {macs: 0.01}\nrules:\n  - match: '*'\n    method: [spatial_separable, keep]\n")


def _existing_out(folder: Path) -> list[str]:
    (folder / "out").mkdir()
    (folder / "out" / "keep.txt").write_text("mine\n")
    return _args(_state_dict(folder))


def _file_as_parent(folder: Path) -> list[str]:
    (folder / "a_file").write_text("x\n")
    return _args(_state_dict(folder))


# ------------------------------------------------------------------------------------------------ the table

CASES: dict[str, Case] = {
    # model files
    "missing_model_file": Case(lambda f: _args(f / "nope.pt"), ("nope.pt", "not found")),
    "model_path_is_a_folder": Case(lambda f: _args(f), ("directory",)),
    "empty_model_file": Case(lambda f: _args(_touch(f / "empty.pt")), ("empty.pt", "empty")),
    "truncated_model_file": Case(lambda f: _args(_truncated(f)), ("model.pt", "truncated")),
    "text_file_named_pt": Case(lambda f: _args(_text(f / "notes.pt")), ("notes.pt", "text file", "these are my notes")),
    "state_dict_without_arch": Case(lambda f: _args(_state_dict(f), arch=None), ("state_dict", "--arch")),
    "arch_missing_module": Case(lambda f: _args(_state_dict(f), arch="no_such_package.models:net"), ("no_such_package",)),
    "arch_missing_attribute": Case(lambda f: _args(_state_dict(f), arch="tests.models_for_cli:no_such_factory"), ("no_such_factory",)),
    "arch_not_callable": Case(lambda f: _args(_state_dict(f), arch="tests.models_for_cli:NOT_CALLABLE"), ("NOT_CALLABLE",)),
    "arch_bad_format": Case(lambda f: _args(_state_dict(f), arch="tests.models_for_cli"), ("MODULE:CALLABLE",)),
    "arch_returns_no_module": Case(lambda f: _args(_state_dict(f), arch="tests.models_for_cli:not_a_module"), ("dict", "nn.Module")),
    "arch_does_not_fit_state_dict": Case(
        lambda f: _args(_state_dict(f), arch="tests.models_for_cli:other_net"), ("missing", "unexpected", "conv1.weight", "features.0.weight")
    ),
    "pickled_module_without_trust": Case(lambda f: _args(_pickled_module(f), arch=None), ("--trust-model", "TinyNet")),
    "pickled_class_not_importable": Case(
        lambda f: _args(_vanished_class(f), arch=None, more=["--trust-model"]), ("gone.pt", "vanished_models")
    ),
    "torchscript_archive": Case(lambda f: _args(_torchscript(f), arch=None, more=["--trust-model"]), ("TorchScript",)),
    "pt2_with_pickled_members": Case(lambda f: _args(_hostile_pt2(f), arch=None), ("pickled", "--trust-model")),
    "model_without_conv": Case(
        lambda f: _args(_state_dict(f, model=_linear()), arch="tests.models_for_cli:linear_only"), ("no nn.Conv2d",)
    ),
    "weights_with_nan": Case(lambda f: _args(_nan_weights(f)), ("NaN", "conv2.weight")),
    "forward_fails_on_input_shape": Case(lambda f: _args(_state_dict(f), shape="1,4,32,32"), ("(1, 4, 32, 32)", "conv1")),
    "input_shape_malformed": Case(lambda f: _args(_state_dict(f), shape="1,3,32"), ("--input-shape", "N,C,H,W")),
    "input_shape_zero": Case(lambda f: _args(_state_dict(f), shape="0,3,32,32"), ("--input-shape",)),
    "no_input_shape": Case(lambda f: _args(_state_dict(f), shape=None), ("input shape", "--input-shape")),
    # recipes
    "recipe_missing": Case(lambda f: _args(_state_dict(f), recipe=f / "nope.yaml"), ("nope.yaml", "not found")),
    "recipe_invalid_yaml": Case(lambda f: _args(_state_dict(f), recipe=_recipe(f, "name: x\nrules: [\n  - {match: '*'\n")), ("line", "column")),
    "recipe_unknown_key": Case(
        lambda f: _args(_state_dict(f), recipe=_recipe(f, "name: x\nrulez: []\n")), ("rulez", "rules")
    ),
    "recipe_unknown_method": Case(
        lambda f: _args(_state_dict(f), more=["--set", "rules.0.method=tensor_train"]), ("tensor_train", "depthwise_separable")
    ),
    "rank_negative": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.0.rank=-3"]), ("rank", "-3")),
    "rank_zero": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.0.rank=0"]), ("rank", "0")),
    "rank_too_large": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.0.rank=1000"]), ("conv1", "1000", "full rank 8")),
    "groups_do_not_divide_rank": Case(
        lambda f: _args(_state_dict(f), more=["--set", "rules.0.method=grouped", "--set", "rules.0.groups=4", "--set", "rules.0.rank=6"]),
        ("groups", "6", "4"),
    ),
    "rule_matches_nothing": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.0.match=decoder.*"]), ("decoder.*", "conv1")),
    "regex_does_not_compile": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.0.match=re:conv(["]), ("conv([", "regex")),
    "impossible_budget": Case(lambda f: _args(_state_dict(f), recipe=_budget_recipe(f)), ("0.01", "smallest reachable", "0.127")),
    "set_bad_path": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.7.rank=3"]), ("rules.7",)),
    "set_without_equals": Case(lambda f: _args(_state_dict(f), more=["--set", "rules.0.rank"]), ("KEY=VALUE",)),
    # data
    "data_missing": Case(lambda f: _with_data(f, f / "nope.npz"), ("nope.npz",)),
    "data_wrong_shape": Case(lambda f: _with_data(f, _npz(f, np.zeros((4, 3, 32), np.float32))), ("data.npz", "shape")),
    "data_wrong_channels": Case(lambda f: _with_data(f, _npz(f, np.zeros((4, 1, 32, 32), np.float32))), ("channel",)),
    "data_with_nan": Case(lambda f: _with_data(f, _npz(f, np.full((4, 3, 32, 32), np.nan, np.float32))), ("NaN",)),
    "data_empty_folder": Case(lambda f: _with_data(f, _mkdir(f / "images")), ("images", "no image")),
    "data_unreadable_image": Case(lambda f: _with_data(f, _image_folder(f, broken=True)), ("broken.png",)),
    # outputs
    "output_exists_without_force": Case(_existing_out, ("not empty", "--force")),
    "output_parent_is_a_file": Case(_file_as_parent, ("a_file", "not a folder"), out="a_file/out"),
    "output_not_writable": Case(lambda f: _args(_state_dict(f)), ("cannot write",), out="/proc/compress_out"),
    "output_would_overwrite_model": Case(lambda f: _args(_state_dict(f, name="compressed.pt")), ("overwrite",), out="."),
}


def _touch(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _text(path: Path) -> Path:
    path.write_text("these are my notes, not a model\n")
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _linear() -> torch.nn.Module:
    from tests.models_for_cli import linear_only

    return linear_only()


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``folder`` with its checksum and mtime."""
    return {str(p.relative_to(folder)): (sha256(p), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    spec = CASES[case]
    monkeypatch.chdir(REPO_ROOT)  # --arch tests.models_for_cli:... imports from the repository root
    args = spec.build(tmp_path)
    if spec.out is not None:
        out = spec.out if os.path.isabs(spec.out) else str(tmp_path / spec.out)
        args = [*args[:-1], "--out", out, args[-1]]
    before = _snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip() and not line.startswith(WARNING_PREFIX)]
    shown = f"{case}: exit {code}\n--- stderr ---\n{captured.err[-3000:]}\n--- stdout ---\n{captured.out[-1500:]}"
    assert code == 2, shown
    assert len(lines) == 1 and "Traceback" not in captured.err, shown
    missing = [needle for needle in spec.needles if needle not in lines[0]]
    assert not missing, f"{case}: {missing} not in the error line {lines[0]!r}"
    after = _snapshot(tmp_path)
    assert after == before, f"{case}: files changed or appeared: {sorted(set(after.items()) ^ set(before.items()))}"
    leftovers = [p.name for p in tmp_path.rglob("*") if p.name.endswith((".partial", ".probe"))]
    assert not leftovers, f"{case}: staging folders left behind: {leftovers}"
    assert not Path("/proc/compress_out").exists()


def test_the_table_covers_at_least_thirty_cases():
    assert len(CASES) >= 30, len(CASES)


@pytest.mark.parametrize(
    "raised, code, needles",
    [
        (RuntimeError("a bug deep inside"), 1, ("internal error", "RuntimeError: a bug deep inside", "traceback in")),
        (KeyboardInterrupt(), 130, ("interrupted", "nothing was written")),
    ],
    ids=["crash", "ctrl_c"],
)
def test_a_crash_or_ctrl_c_mid_run_writes_nothing_and_says_so(raised, code, needles, tmp_path, capsys, monkeypatch):
    import compressor.cli

    def explode(*args, **kwargs):
        raise raised

    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(compressor.cli, "compress", explode)
    model = _state_dict(tmp_path)
    before = _snapshot(tmp_path)
    got = main(["--recipe", LOSSLESS, "--arch", ARCH, "--input-shape", SHAPE, "--out", str(tmp_path / "out"), str(model)])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(WARNING_PREFIX)]
    assert got == code and len(lines) == 1, f"exit {got}: {err}"
    assert all(needle in lines[0] for needle in needles), lines[0]
    assert _snapshot(tmp_path) == before, "files appeared or changed"
    if code == 1:
        log = Path(lines[0].rsplit("traceback in ", 1)[1])
        assert "Traceback" in log.read_text() and "a bug deep inside" in log.read_text(), log.read_text()[-500:]
        log.unlink()
