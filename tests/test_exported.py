"""torch.export archives (.pt2): loaded without running code, rewritten, and written back as compressed.pt2."""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from compressor.cli import main
from compressor.errors import ModelLoadError
from compressor.load import load_model
from tests.conftest import sha256
from tests.models_for_cli import CONV_NAMES, INPUT_SHAPE, tiny_net

REPO_ROOT = Path(__file__).resolve().parents[1]
LOSSLESS = str(REPO_ROOT / "recipes" / "lossless.yaml")
SHAPE = ",".join(map(str, INPUT_SHAPE))
EXACT = 1e-5


def _save_program(model: nn.Module, path: Path, *, dynamic: bool = True) -> Path:
    batch = 2 if dynamic else 1
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (torch.randn(batch, *INPUT_SHAPE[1:]),), dynamic_shapes=shapes)
        torch.export.save(program, str(path))
    return path


@pytest.fixture(scope="module")
def program_file(tmp_path_factory) -> Path:
    return _save_program(tiny_net(), tmp_path_factory.mktemp("pt2") / "tiny.pt2")


def _relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("dynamic", [True, False], ids=["dynamic_batch", "static_batch"])
def test_loaded_program_runs_at_any_batch_size_like_the_eager_model(tmp_path, dynamic):
    path = _save_program(tiny_net(), tmp_path / "m.pt2", dynamic=dynamic)
    module = load_model(path)
    x = torch.randn(5, *INPUT_SHAPE[1:])
    with torch.no_grad():
        error = _relative(module(x), tiny_net()(x))
    assert error < 1e-6, f"loaded .pt2 vs eager model at batch 5: {error:.3e}"


def test_cli_rewrites_a_program_and_writes_compressed_pt2(program_file, tmp_path, capsys):
    digest, mtime = sha256(program_file), program_file.stat().st_mtime_ns
    out = tmp_path / "out"
    code = main(["--recipe", LOSSLESS, "--input-shape", SHAPE, "--out", str(out), str(program_file)])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert (sha256(program_file), program_file.stat().st_mtime_ns) == (digest, mtime), "the input .pt2 changed"
    report = json.loads((out / "report.json").read_text())
    rewritten = [layer["name"] for layer in report["layers"] if layer["method"] == "depthwise_separable"]
    assert rewritten == list(CONV_NAMES), f"rewritten layers {rewritten}"
    assert report["pt2"]["parity_rel"] < EXACT and report["onnx"]["passed"], (report["pt2"], report["onnx"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = torch.export.load(str(out / "compressed.pt2")).module()
    x = torch.randn(3, *INPUT_SHAPE[1:])
    with torch.no_grad():
        error = _relative(reloaded(x), tiny_net()(x))
    assert error < EXACT, f"compressed.pt2 at full rank vs the original eager model: {error:.3e}"
    convs = [name for name, m in reloaded.named_modules() if isinstance(m, nn.Conv2d)]
    assert not convs, f"an exported program holds no conv modules, yet found {convs}"


def _with_pickled_weight(source: Path, target: Path) -> Path:
    """A copy of ``source`` whose first weight is stored with ``use_pickle`` (what a hostile file would use)."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as copy:
        for item in archive.infolist():
            data = archive.read(item.filename)
            if item.filename.endswith("model_weights_config.json"):
                config = json.loads(data)
                first = next(iter(config["config"].values()))
                first["use_pickle"] = True
                data = json.dumps(config).encode()
            copy.writestr(item, data)
    return target


def test_archive_with_pickled_members_is_refused_without_trust(program_file, tmp_path):
    hostile = _with_pickled_weight(program_file, tmp_path / "hostile.pt2")
    with pytest.raises(ModelLoadError) as caught:
        load_model(hostile)
    message = str(caught.value)
    assert "pickled" in message and "conv1.weight" in message and "--trust-model" in message, message


def test_program_that_bakes_in_its_batch_size_is_refused_with_the_fix(tmp_path):
    class FixedBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x).reshape(1, -1)

    path = _save_program(FixedBatch(), tmp_path / "fixed.pt2", dynamic=False)
    with pytest.raises(ModelLoadError) as caught:
        load_model(path)
    message = str(caught.value)
    assert "[1, 3, 32, 32]" in message and "dynamic_shapes" in message, message


def test_arch_with_a_program_is_refused(program_file):
    with pytest.raises(ModelLoadError, match="--arch is only for state_dict"):
        load_model(program_file, arch="tests.models_for_cli:tiny_net")
