"""Detection and segmentation models end to end: the zoo's YOLO-style detector (three outputs), U-Net
(dense logits) and a U-Net that shadows ``modules``/``children`` with plain attributes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.fx

import compressor
from compressor import tree, zoo
from compressor.export import flatten_outputs
from compressor.methods import METHODS
from compressor.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
EXACT = 1e-4  # relative error of a float32 model rewritten at full rank, per output
SIZE = 32  # the smallest input the detector takes (stride 32): the tests stay fast
# Every method; grouped also with groups 2 (its group structure is what changes the factors).
METHOD_GROUPS = [(name, 1) for name in METHODS] + [("grouped", 2)]


def _build(name: str, classes: int = 5):
    torch.manual_seed(0)
    model = zoo.randomize_batchnorm(zoo.ZOO[name](num_classes=classes, width=4))
    return tree.set_training_(model, False), torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _direct_errors(original, compressed, x) -> list[float]:
    with torch.no_grad():
        expected, got = flatten_outputs(original(x)), flatten_outputs(compressed(x))
    return [float((g - e).norm() / e.norm()) for g, e in zip(got, expected)]


@pytest.mark.parametrize("method, groups", METHOD_GROUPS, ids=str)
@pytest.mark.parametrize("name", ["yolo_style", "unet"])
def test_full_rank_is_exact_on_every_output(name, method, groups):
    model, x = _build(name)
    recipe = {"rules": [{"match": "*", "method": method, "groups": groups, "rank": "full"}]}
    result = compressor.compress(model, recipe, x)
    rewritten = [layer["name"] for layer in result.report["layers"] if layer["method"] != "keep"]
    assert len(rewritten) >= 10, f"{name} {method}: only {rewritten} rewritten"
    errors = _direct_errors(model, result.model, x)
    assert len(errors) == (3 if name == "yolo_style" else 1), errors
    assert max(errors) < EXACT, f"{name} {method} g{groups}: per-output relative errors {errors}"


def _mobile(steps: int):
    """recipes/mobile.yaml, sized for a test: a MACs target stands in for its latency target (which times
    every candidate layer in ONNX Runtime, minutes on a busy CI machine), 8 calibration images and a
    2-step fine-tune."""
    return load_recipe(
        REPO / "recipes" / "mobile.yaml",
        [f"input_shape=[1,3,{SIZE},{SIZE}]", "target={macs: 0.5}", f"finetune.steps={steps}", "finetune.batch_size=4",
         "finetune.evaluations=1", "calibration.samples=8", "bench.runs=0"],
    )


# shadowed_unet is the U-Net with shadowing attributes: it covers the U-Net and the shadowing in one run.
@pytest.mark.parametrize("name", ["yolo_style", "shadowed_unet"])
def test_mobile_recipe_with_a_fine_tune_and_onnx_on_every_output(name, tmp_path):
    model, x = _build(name)
    generator = torch.Generator().manual_seed(2)
    images = torch.randn(24, 3, SIZE, SIZE, generator=generator)
    if name == "yolo_style":
        data, held = [images], [torch.randn(6, 3, SIZE, SIZE, generator=generator)]
    else:  # segmentation labels: (N, H, W) class masks, with ignored pixels
        masks = torch.randint(0, 5, (24, SIZE, SIZE), generator=generator)
        masks[:, :4] = 255
        data, held = [(images, masks)], [(torch.randn(6, 3, SIZE, SIZE, generator=generator), masks[:6])]
    result = compressor.compress(model, _mobile(2), x, data=data, eval_data=held, device="cpu", progress=False)
    report = result.report
    assert report["totals"]["macs_ratio"] < 1, report["totals"]
    kind = "other" if name == "yolo_style" else "segmentation"
    assert report["task"]["kind"] == kind and report["task"]["source"] == "detected", report["task"]
    tuned = report["finetune"]
    assert tuned["steps"] == 2 and tuned["task"] == kind, {k: tuned.get(k) for k in ("steps", "stopped_by", "task")}
    assert tuned["loss"]["first"] is not None and tuned["loss"]["first"] > 0, tuned["loss"]
    # 8 images give a deep 3x3 layer fewer positions than patch dimensions: the spatial ALS refit then
    # scaled rank-1 factors by 1e3-1e5 to fit noise (ONNX parity 4e-3) until its weight ridge.
    largest = {
        layer["name"]: float(max(p.abs().max() for p in result.model.get_submodule(layer["name"]).parameters()))
        for layer in report["layers"] if layer["method"] != "keep"
    }
    assert max(largest.values()) < 100, sorted(largest.items(), key=lambda item: -item[1])[:3]
    result.save(tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"task {kind} (detected;" in markdown, markdown[:2000]
    assert ("mIoU vs the original's prediction" in markdown) == (kind == "segmentation"), markdown[:2000]
    onnx = report["onnx"]
    outputs = 3 if name == "yolo_style" else 1
    assert onnx["passed"] and len(onnx["parity_rel_outputs"]) == outputs, onnx
    assert len(onnx["original_parity_rel_outputs"]) == outputs, onnx
    for label, metrics in (("torch", report["metrics"]), ("onnx", report["metrics"]["onnx"])):
        assert len(metrics["output_rel_errors"]) == outputs, (label, metrics)
        if kind == "segmentation":
            for key in ("agreement", "accuracy_original", "accuracy_compressed", "miou_vs_original", "miou_original", "miou_compressed"):
                assert 0.0 <= metrics[key] <= 1.0, (label, key, metrics)
        else:
            assert metrics["agreement"] is None, (label, metrics)


@pytest.mark.parametrize("graph", ["fx", "module-swap"])
def test_a_model_shadowing_modules_and_children_compresses_on_both_graph_paths(graph, tmp_path, monkeypatch):
    model, x = _build("shadowed_unet")
    assert isinstance(model.modules, list) and isinstance(model.children, list), "the zoo model no longer shadows"
    if graph == "module-swap":
        def refuse(_):
            raise torch.fx.proxy.TraceError("forced by the test")

        monkeypatch.setattr(torch.fx, "symbolic_trace", refuse)
    recipe = {"rules": [{"match": "*", "method": "low_rank", "rank": "full"}]}  # exact at full rank, and quick
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = compressor.compress(model, recipe, x, eval_data=[torch.randn(2, 3, SIZE, SIZE)])
    assert result.report["graph"] == graph, result.report["trace_error"]
    errors = _direct_errors(model, result.model, x)
    assert max(errors) < EXACT, f"{graph}: relative output error {errors}"
    result.export_onnx(tmp_path / "c.onnx", original_path=tmp_path / "o.onnx")
    assert result.report["onnx"]["passed"], result.report["onnx"]
    assert result.report["metrics"]["agreement"] == 1.0, result.report["metrics"]
