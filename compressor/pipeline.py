"""The steps in order: recipe -> trace -> profile -> plan -> factorize -> rewrite -> verify."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor import export as onnx_export
from compressor.errors import CompressorError, ParityError, describe_error
from compressor.evaluate import evaluate
from compressor.methods import METHODS, factorize
from compressor.passes import LayerPlan, Traced, plan_layers, rewrite_, trace
from compressor.profile import LayerProfile, profile_model, totals
from compressor.recipe import Recipe, load_recipe
from compressor.report import layer_record, totals_record

OUTPUT_FILES = ("compressed.pt", "original.onnx", "compressed.onnx", "report.json")


@dataclass
class Plan:
    """What :func:`compress` would do, computed without changing any weight."""

    traced: Traced
    layers: list[LayerPlan]
    profiles: dict[str, LayerProfile]
    recipe: Recipe

    def report(self) -> dict:
        return {
            "graph": self.traced.graph,
            "trace_error": self.traced.trace_error,
            "layers": [layer_record(layer) for layer in self.layers],
        }


def example_input_for(model: nn.Module, shape: Sequence[int]) -> torch.Tensor:
    """A seeded random input of ``shape`` in the model's parameter dtype and device."""
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    return torch.randn(tuple(shape), generator=generator).to(dtype=dtype, device=device)


def _profile(module: nn.Module, example_input: torch.Tensor) -> dict[str, LayerProfile]:
    try:
        return profile_model(module, example_input)
    except Exception as err:
        raise CompressorError(
            f"the model's forward failed on an input of shape {tuple(example_input.shape)}: "
            f"{describe_error(err)} (set the input shape with --input-shape N,C,H,W)"
        ) from err


def plan(model: nn.Module, recipe: Recipe | dict | str | Path, example_input: torch.Tensor) -> Plan:
    """Trace a copy of ``model``, profile it and assign rules and ranks. ``model`` is not modified."""
    recipe = load_recipe(recipe)
    working = copy.deepcopy(model).eval()
    traced = trace(working)
    profiles = _profile(traced.module, example_input)
    return Plan(traced, plan_layers(traced.module, recipe, profiles), profiles, recipe)


@dataclass
class Result:
    """A compressed model and its report (the content of report.json)."""

    model: nn.Module
    report: dict
    original: nn.Module = field(repr=False)
    example_input: torch.Tensor = field(repr=False)
    recipe: Recipe = field(repr=False)

    def export_onnx(self, path: str | Path, *, original_path: str | Path | None = None) -> onnx_export.Parity:
        """Export the compressed model (and optionally the original) and verify it in ONNX Runtime.

        Records the paths and parity numbers in ``report["onnx"]``; raises ``ParityError`` (after
        recording) when the relative error exceeds the recipe's ``export.tolerance``.
        """
        settings = self.recipe.export
        batch = onnx_export.parity_batch(self.example_input)
        record: dict = {"opset": settings.opset, "tolerance": settings.tolerance, "batch_size": batch.shape[0]}
        if original_path is not None:
            onnx_export.export_onnx(self.original, self.example_input, original_path, settings.opset)
            original_parity = onnx_export.parity(self.original, original_path, batch)
            record.update(
                original=str(original_path),
                original_parity_max_abs=original_parity.max_abs,
                original_parity_rel=original_parity.rel,
            )
        onnx_export.export_onnx(self.model, self.example_input, path, settings.opset)
        result = onnx_export.parity(self.model, path, batch)
        worst = max(result.rel, record.get("original_parity_rel", 0.0))
        record.update(
            compressed=str(path), parity_max_abs=result.max_abs, parity_rel=result.rel, passed=worst <= settings.tolerance
        )
        record.setdefault("original", None)
        self.report["onnx"] = record
        if not record["passed"]:
            raise ParityError(
                f"ONNX Runtime disagrees with PyTorch: relative error {worst:.3e} > tolerance {settings.tolerance:.1e} "
                f"(compressed max|diff| {result.max_abs:.3e}, rel {result.rel:.3e})"
            )
        return result

    def save(self, out_dir: str | Path) -> Path:
        """Write compressed.pt, original.onnx, compressed.onnx and report.json into ``out_dir``.

        report.json is written even when parity fails, so the numbers are there to inspect.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            torch.save(self.model, out / "compressed.pt")
        except Exception as err:  # pickling runs arbitrary __reduce__ code of user modules
            raise CompressorError(
                f"cannot pickle the compressed model to {out / 'compressed.pt'}: {describe_error(err)}"
            ) from err
        try:
            self.export_onnx(out / "compressed.onnx", original_path=out / "original.onnx")
        finally:
            self.report.setdefault("seconds", {})["save_and_verify"] = time.perf_counter() - started
            (out / "report.json").write_text(json.dumps(self.report, indent=2) + "\n")
        return out


def _versions() -> dict[str, str]:
    """Versions of the packages whose numerics the report depends on."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("compressor", "torch", "tensorly", "onnx", "onnxruntime"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "not installed as a distribution"
    return found


def _output_rel_error(original: nn.Module, compressed: nn.Module, batch: torch.Tensor) -> float:
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in onnx_export.flatten_outputs(original(batch))]
        got = [t.detach().cpu().numpy() for t in onnx_export.flatten_outputs(compressed(batch))]
    return onnx_export.relative_error(got, expected).rel


def compress(
    model: nn.Module,
    recipe: Recipe | dict | str | Path,
    example_input: torch.Tensor,
    *,
    data: Iterable | None = None,
    eval_data: Iterable | None = None,
) -> Result:
    """Rewrite the convs of ``model`` as ``recipe`` says and return the new model with its report.

    ``model`` is left untouched (a deep copy is rewritten). ``recipe`` is a YAML path, a dict or a
    :class:`~compressor.recipe.Recipe`. ``example_input`` fixes the input shape used for tracing,
    MAC counts and export. ``eval_data`` (tensors or ``(inputs, labels)`` batches) adds an ``eval``
    section comparing both models. ``data`` (calibration batches) is reserved for data-aware
    initialization, which this version does not implement: passing it raises ``CompressorError``.
    """
    if data is not None:
        raise CompressorError("calibration data (data=...) is not supported yet: initialization is weights-only")
    started = time.perf_counter()
    # The caller's module keeps its train/eval flags: compare against an eval-mode copy if needed.
    original = copy.deepcopy(model).eval() if any(m.training for m in model.modules()) else model
    layer_plan = plan(original, recipe, example_input)
    replacements: dict[str, nn.Sequential] = {}
    for layer in layer_plan.layers:
        if layer.rewrites:
            conv = layer_plan.traced.module.get_submodule(layer.name)
            replacements[layer.name], layer.weight_rel_error = factorize(
                METHODS[layer.method], conv, layer.rank, layer.groups
            )
    compressed = rewrite_(layer_plan.traced.module, replacements).eval()
    report = layer_plan.report()
    report["input_shape"] = list(example_input.shape)
    report["versions"] = _versions()
    report["recipe"] = layer_plan.recipe.model_dump(mode="json")
    # The plan profiled the traced copy before the rewrite: the same convs and MACs as the original.
    report["totals"] = totals_record(totals(layer_plan.profiles), totals(_profile(compressed, example_input)))
    report["output_rel_error"] = _output_rel_error(original, compressed, onnx_export.parity_batch(example_input))
    if eval_data is not None:
        report["eval"] = evaluate(original, compressed, eval_data)
    report["seconds"] = {"compress": time.perf_counter() - started}
    return Result(compressed, report, original, example_input, layer_plan.recipe)
