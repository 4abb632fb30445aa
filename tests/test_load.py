"""Unit tests of compressor.load: what model files are accepted, refused, and how the refusal reads."""

from __future__ import annotations

import random

import pytest
import torch
from onnx import TensorProto, helper

from compressor.errors import CompressorError, ModelLoadError
from compressor.load import build_architecture, load_model
from tests.conftest import sha256
from tests.models_for_cli import INPUT_SHAPE, TinyNet, Tripwire, tiny_net

ARCH = "tests.models_for_cli:tiny_net"


def load_error(path, **kwargs) -> str:
    """The one-line message of the ModelLoadError that load_model raises."""
    with pytest.raises(ModelLoadError) as info:
        load_model(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert info.value.exit_code == 2 and isinstance(info.value, CompressorError)
    return message


def arch_error(spec: str) -> str:
    with pytest.raises(ModelLoadError) as info:
        build_architecture(spec)
    message = str(info.value)
    assert "\n" not in message, f"message is not one line: {message!r}"
    assert repr(spec) in message or spec in message, f"the spec {spec!r} is not named: {message!r}"
    return message


def assert_contains(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"expected {part!r} in: {message!r}"


def outputs(model: torch.nn.Module) -> torch.Tensor:
    x = torch.randn((2, *INPUT_SHAPE[1:]), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(x)


def assert_same_model(model: torch.nn.Module) -> None:
    assert isinstance(model, TinyNet), type(model)
    assert not model.training, "load_model must return the model in eval mode"
    assert all(not m.training for m in model.modules()), "a submodule is still in training mode"
    assert all(p.device.type == "cpu" for p in model.parameters())
    reference = tiny_net()
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), f"{key} differs from the saved tensor"
    max_abs = (outputs(model) - outputs(reference)).abs().max().item()
    assert max_abs == 0.0, f"loaded model output differs: max|diff| {max_abs:.3e}"


# ------------------------------------------------------------------------------------------------ accepted


def test_state_dict_with_arch(model_files):
    digest = sha256(model_files["state_dict"])
    before = sorted(p.name for p in model_files["state_dict"].parent.iterdir())
    assert_same_model(load_model(model_files["state_dict"], arch=ARCH))
    assert sha256(model_files["state_dict"]) == digest, "load_model changed the model file"
    assert sorted(p.name for p in model_files["state_dict"].parent.iterdir()) == before, "load_model wrote a file"


def test_accepts_str_path(model_files):
    assert_same_model(load_model(str(model_files["state_dict"]), arch=ARCH))


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_checkpoint_dict(tmp_path, tiny_state_dict, key):
    path = tmp_path / "checkpoint.pth"
    torch.save({key: tiny_state_dict, "epoch": 12, "best_acc": 0.91, "args": {"lr": 0.1, "name": "run"}}, path)
    assert_same_model(load_model(path, arch=ARCH))


def test_state_dict_loads_train_mode_model_in_eval_mode(tmp_path):
    model = tiny_net().train()
    path = tmp_path / "sd.pt"
    torch.save(model.state_dict(), path)
    assert_same_model(load_model(path, arch=ARCH))


def test_pickled_module_with_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(tiny_net().train(), path)  # saved in training mode: load_model must switch to eval
    digest = sha256(path)
    assert_same_model(load_model(path, trust_model=True))
    assert sha256(path) == digest


# ------------------------------------------------------------------------------------------------ refused


def test_state_dict_without_arch(model_files, tiny_state_dict):
    message = load_error(model_files["state_dict"])
    assert_contains(message, "--arch", "state_dict", str(len(tiny_state_dict)), str(model_files["state_dict"]))


def test_checkpoint_without_arch(tmp_path, tiny_state_dict):
    path = tmp_path / "checkpoint.pth"
    torch.save({"state_dict": tiny_state_dict, "epoch": 1}, path)
    assert_contains(load_error(path), "--arch")


def test_pickled_module_without_trust(model_files):
    message = load_error(model_files["module"])
    assert_contains(message, "--trust-model", "--arch", str(model_files["module"]))
    assert_contains(message, "that import", "tests.models_for_cli.TinyNet", "torch.nn.modules.conv.Conv2d")


def test_pickled_module_with_arch(model_files):
    assert_contains(load_error(model_files["module"], arch=ARCH, trust_model=True), "--arch", "TinyNet")


def test_untrusted_pickle_runs_no_code(tmp_path):
    """Without trust_model the file's code must not run: unpickling Tripwire would create a file."""
    marker = tmp_path / "tripwire-fired"
    path = tmp_path / "malicious.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Tripwire(str(marker))}, path)
    assert not marker.exists()
    assert_contains(load_error(path, arch=ARCH), "--trust-model", "that import io.open")  # what its __reduce__ calls
    assert not marker.exists(), "loading an untrusted pickle ran code from the file"
    # Control: the tripwire does fire when the file is trusted.
    load_error(path, arch=ARCH, trust_model=True)
    assert marker.exists(), "the tripwire did not fire with trust_model=True: this test proves nothing"


@pytest.mark.parametrize("kind", ["script", "trace"])
@pytest.mark.parametrize("trust", [False, True])
def test_torchscript_is_refused(model_files, kind, trust):
    message = load_error(model_files[kind], trust_model=trust)
    assert_contains(message, "TorchScript", "cannot be rewritten", str(model_files[kind]))


def _onnx_bytes() -> bytes:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return helper.make_model(graph).SerializeToString()


NOT_TORCH = {
    "random_bytes": lambda: random.Random(0).randbytes(4096),
    "zero_led_bytes": lambda: b"\x00" + random.Random(1).randbytes(4095),
    "text": lambda: b"hello, this is not a model\n",
    "empty": lambda: b"",
    "onnx": _onnx_bytes,
    "png": lambda: b"\x89PNG\r\n\x1a\n" + bytes(64),
}


@pytest.mark.parametrize("kind", list(NOT_TORCH))
@pytest.mark.parametrize("trust", [False, True])
def test_non_torch_file(tmp_path, kind, trust):
    """A file that is not a PyTorch file at all is reported as such; in particular the user is not told
    that it holds pickled objects and to pass --trust-model (which cannot help)."""
    path = tmp_path / f"{kind}.pt"
    path.write_bytes(NOT_TORCH[kind]())
    message = load_error(path, arch=ARCH, trust_model=trust)
    assert_contains(message, str(path))
    assert "--trust-model" not in message and "pickled Python objects" not in message, (
        f"{kind}: a non-PyTorch file is reported as an untrusted pickle: {message!r}"
    )


@pytest.mark.parametrize("payload", [[1, 2, 3], {}, {"weights": "not tensors"}, torch.zeros(3)])
def test_torch_file_without_model(tmp_path, payload):
    path = tmp_path / "other.pt"
    torch.save(payload, path)
    assert_contains(load_error(path, arch=ARCH), "neither an nn.Module nor a state_dict", type(payload).__name__)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    assert_contains(load_error(path, arch=ARCH), "not found", str(path))


def test_directory(tmp_path):
    """A directory exists: the message must say it is a directory, not that it was not found."""
    message = load_error(tmp_path, arch=ARCH)
    assert_contains(message, str(tmp_path))
    assert "director" in message and "not found" not in message, f"directory reported as: {message!r}"


# ------------------------------------------------------------------------------------------------ architecture fit


def test_wrong_arch(model_files, tiny_state_dict):
    message = load_error(model_files["state_dict"], arch="tests.models_for_cli:other_net")
    assert_contains(
        message, "tests.models_for_cli:other_net", "missing 4 key(s)", "features.0.weight",
        f"unexpected {len(tiny_state_dict)} key(s)", "conv1.weight", "and 9 more",
    )


def test_state_dict_missing_one_key(tmp_path, tiny_state_dict):
    path = tmp_path / "partial.pt"
    torch.save({k: v for k, v in tiny_state_dict.items() if k != "fc.bias"}, path)
    message = load_error(path, arch=ARCH)
    assert_contains(message, "missing 1 key(s): fc.bias")
    assert "unexpected" not in message, message


def test_state_dict_extra_key(tmp_path, tiny_state_dict):
    path = tmp_path / "extra.pt"
    torch.save({**tiny_state_dict, "extra.weight": torch.zeros(2)}, path)
    message = load_error(path, arch=ARCH)
    assert_contains(message, "unexpected 1 key(s): extra.weight")
    assert "missing" not in message, message


def test_data_parallel_prefix(tmp_path, tiny_state_dict):
    path = tmp_path / "dp.pt"
    torch.save({f"module.{k}": v for k, v in tiny_state_dict.items()}, path)
    assert_contains(load_error(path, arch=ARCH), "missing", "unexpected", "module.conv1.weight")


def test_state_dict_shape_mismatch(tmp_path):
    """Same keys, other shapes (a 5-class head loaded into a 10-class model): a ModelLoadError that names
    the tensor and both shapes, not torch's multi-line RuntimeError."""
    path = tmp_path / "five_classes.pt"
    torch.save(TinyNet(num_classes=5).state_dict(), path)
    message = load_error(path, arch=ARCH)
    assert_contains(message, "fc.weight", "5", "10")


# ------------------------------------------------------------------------------------------------ build_architecture


def test_build_architecture_ok():
    model = build_architecture(ARCH)
    assert isinstance(model, TinyNet), type(model)


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("tests.models_for_cli", ["MODULE:CALLABLE"]),
        (":tiny_net", ["MODULE:CALLABLE"]),
        ("tests.models_for_cli:", ["MODULE:CALLABLE"]),
        ("", ["MODULE:CALLABLE"]),
        ("no_such_module_xyz:net", ["no_such_module_xyz"]),
        ("tests.models_for_cli:no_such_factory", ["no_such_factory"]),
        ("tests.models_for_cli:needs_argument", ["no arguments", "TypeError"]),
        ("tests.models_for_cli:raises", ["RuntimeError", "factory exploded"]),
        ("tests.models_for_cli:NOT_CALLABLE", ["no arguments"]),
        ("tests.models_for_cli:not_a_module", ["dict", "nn.Module"]),
    ],
)
def test_build_architecture_errors(spec, needles):
    assert_contains(arch_error(spec), *needles)


def test_load_model_reports_arch_errors(model_files):
    assert_contains(load_error(model_files["state_dict"], arch="tests.models_for_cli"), "MODULE:CALLABLE")
    assert_contains(load_error(model_files["state_dict"], arch="tests.models_for_cli:raises"), "factory exploded")


def test_a_whole_model_shadowing_children_loads_in_eval_mode(tmp_path):
    # eval() runs self.children(), which this model replaced by a plain list.
    from compressor import tree, zoo

    model = tree.set_training_(zoo.shadowed_unet(num_classes=3, width=4), True)
    torch.save(model, tmp_path / "shadowed.pt")
    loaded = load_model(tmp_path / "shadowed.pt", trust_model=True)
    training = [name for name, module in tree.named_modules(loaded) if module.training]
    assert isinstance(loaded.children, list) and not training, f"still training: {training[:5]}"
