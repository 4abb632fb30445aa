"""INT8 export: static QDQ keeps agreement with the float model; the pipeline records and verifies it."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from compressor import compress
from compressor.errors import CompressorError
from compressor.export import export_onnx
from compressor.quantize import INT8_FILE, Int8AgreementError, quantize_onnx, verify_int8
from tests.models_for_cli import INPUT_SHAPE, tiny_net

AGREEMENT = 0.9


def _batches(count: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((size, *INPUT_SHAPE[1:]), generator=generator) for _ in range(count)]


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    return export_onnx(tiny_net(), torch.randn(INPUT_SHAPE), tmp_path_factory.mktemp("q") / "float.onnx")


def test_static_int8_agrees_with_float_on_its_calibration_data(float_model, tmp_path):
    calibration = _batches(4)
    path = quantize_onnx(float_model, tmp_path / "int8.onnx", "static", calibration)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    checked = verify_int8(float_model, path, [(b, None) for b in calibration], tolerance=1 - AGREEMENT)
    assert checked["agreement_with_float"] >= AGREEMENT, f"static INT8 agreement {checked['agreement_with_float']:.4f}"
    assert checked["passed"] and checked["samples"] == 128, checked
    # U8S8: activations quantize to uint8 (x86 kernels without VNNI run S8S8 far slower), weights to int8.
    graph = onnx.load(str(path)).graph
    zero_points = {init.name: init.data_type for init in graph.initializer}
    activation_types = {zero_points[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    weight_types = {zero_points[n.input[2]] for n in graph.node
                    if n.op_type == "DequantizeLinear" and n.input[0] in zero_points and len(n.input) > 2}
    assert activation_types == {onnx.TensorProto.UINT8}, f"activation zero-point types {activation_types}"
    assert onnx.TensorProto.INT8 in weight_types, f"weight zero-point types {weight_types}"


def test_dynamic_int8_runs(float_model, tmp_path):
    path = quantize_onnx(float_model, tmp_path / "dyn.onnx", "dynamic")
    checked = verify_int8(float_model, path, [(b, None) for b in _batches(1)], tolerance=0.5)
    assert checked["agreement_with_float"] >= 0.5, checked


def test_static_without_calibration_is_refused(float_model, tmp_path):
    with pytest.raises(CompressorError, match="--data"):
        quantize_onnx(float_model, tmp_path / "x.onnx", "static", None)
    with pytest.raises(CompressorError, match="pass --data"):
        compress(tiny_net(), {"rules": [{"match": "*", "method": "keep"}], "export": {"quantize": "static"}},
                 torch.randn(INPUT_SHAPE))


def _recipe(**export) -> dict:
    return {
        "rules": [{"match": "conv3", "method": "spatial_separable"}, {"match": "*", "method": "keep"}],
        "export": {"quantize": "static", **export},
        "bench": {"threads": [1], "runs": 3},
    }


def test_pipeline_writes_benchmarks_and_verifies_static_int8(tmp_path):
    data = [(b, None) for b in _batches(2)]
    result = compress(tiny_net(), _recipe(), torch.randn(INPUT_SHAPE), data=data, eval_data=data)
    result.save(tmp_path)
    report = json.loads((tmp_path / "report.json").read_text())
    int8 = report["int8"]
    assert (tmp_path / INT8_FILE).is_file() and INT8_FILE in report["files"], report["files"]
    assert int8["passed"] and int8["agreement_with_float"] >= AGREEMENT, int8
    assert int8["checked_on"] == "eval-data" and int8["metrics"]["samples"] == 64, int8
    (latency,) = report["latency"]
    assert latency["int8_ms"] > 0 and latency["int8_speedup"] > 0, latency


def test_disagreement_beyond_the_tolerance_fails_loudly_after_writing_the_report(tmp_path, monkeypatch):
    data = [(b, None) for b in _batches(1)]
    result = compress(tiny_net(), _recipe(), torch.randn(INPUT_SHAPE), data=data)
    import compressor.quantize as quantize

    real = quantize.verify_int8
    monkeypatch.setattr(quantize, "verify_int8", lambda *a, **k: {**real(*a, **k), "agreement_with_float": 0.5, "passed": False})
    with pytest.raises(Int8AgreementError, match="disagrees with the float compressed model on 50.00%") as caught:
        result.save(tmp_path)
    assert caught.value.exit_code == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["int8"]["passed"] is False and (tmp_path / "report.md").is_file()


def test_int8_of_a_model_without_classes_is_judged_by_its_relative_error(tmp_path):
    """A detector's outputs have no top-1 to agree on: the check bounds their error instead of
    failing on a missing agreement."""

    class TwoHeads(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.box, self.score = torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(8, 1, 1)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.box(h), self.score(h)

    torch.manual_seed(0)
    path = export_onnx(TwoHeads().eval(), torch.randn(INPUT_SHAPE), tmp_path / "heads.onnx")
    calibration = _batches(2, size=8)
    int8 = quantize_onnx(path, tmp_path / "heads.int8.onnx", "static", calibration)
    checked = verify_int8(path, int8, [(b, None) for b in calibration], tolerance=0.2)
    assert checked["agreement_with_float"] is None, checked
    assert 0 < checked["output_rel_error_vs_float"] < 0.2 and checked["passed"], checked
    strict = verify_int8(path, int8, [(b, None) for b in calibration], tolerance=1e-6)
    assert not strict["passed"], strict
