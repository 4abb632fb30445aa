"""ONNX export and its verification in ONNX Runtime: every export is re-run and compared."""

from __future__ import annotations

import io
import contextlib
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from compressor import tree
from compressor.errors import ExportError

MIN_OPSET = 17


@dataclass
class Parity:
    """ONNX Runtime vs PyTorch on one batch: max |diff| over all outputs, and ||diff|| / ||torch|| of
    each output (``outputs``) and of the worst one (``rel``), so a small output cannot hide behind a
    large one."""

    max_abs: float
    rel: float
    outputs: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def flatten_outputs(output) -> list[torch.Tensor]:
    """Model outputs as a flat list of tensors (a tensor, or nested tuples/lists/dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for value in output.values() for t in flatten_outputs(value)]
    if isinstance(output, (tuple, list)):
        return [t for value in output for t in flatten_outputs(value)]
    raise ExportError(f"model output of type {type(output).__name__} is not a tensor, tuple, list or dict")


def relative_error(got: list[np.ndarray], expected: list[np.ndarray]) -> Parity:
    diff = np.concatenate([(g.astype(np.float64) - e.astype(np.float64)).ravel() for g, e in zip(got, expected)])
    ref = np.concatenate([e.astype(np.float64).ravel() for e in expected])
    max_abs = float(np.abs(diff).max()) if diff.size else 0.0
    per_output = [
        float(np.linalg.norm(g.astype(np.float64) - e.astype(np.float64)) / max(np.linalg.norm(e.astype(np.float64)), 1e-30))
        for g, e in zip(got, expected)
    ]
    overall = float(np.linalg.norm(diff) / max(np.linalg.norm(ref), 1e-30))
    return Parity(max_abs=max_abs, rel=max([overall, *per_output]), outputs=per_output)


class _Root(nn.Module):
    """Holds the model being exported: the exporter calls ``modules()`` and ``train()`` on its root,
    and a user's model may have shadowed those methods with plain attributes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model(x)


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | Path, opset: int = MIN_OPSET) -> Path:
    """Write ``model`` to ``path`` (dynamic batch axis) and check the file with ``onnx.checker``.

    Uses the TorchScript-based exporter (``dynamo=False``): it handles FX GraphModules and
    untraceable-by-FX models alike, needs no onnxscript, and takes a fraction of a second per model.
    """
    if opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is below the supported minimum {MIN_OPSET}")
    path = Path(path)
    model = tree.set_training_(model, False)
    with torch.no_grad():
        outputs = flatten_outputs(model(example_input))
    output_names = [f"output_{i}" for i in range(len(outputs))]
    dynamic_axes = {name: {0: "batch"} for name in ["input", *output_names]}
    captured = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(captured):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Root(model),
                (example_input,),
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                # Eval mode is set above; EVAL would call model.train(), which a model can shadow.
                training=torch.onnx.TrainingMode.PRESERVE,
            )
        onnx.checker.check_model(str(path))
    except Exception as err:
        raise ExportError(f"ONNX export of {type(model).__name__} to {path} failed: {' '.join(str(err).split())}") from err
    return path


def run_onnx(path: str | Path, batch: torch.Tensor) -> list[np.ndarray]:
    """Run the ONNX file on ``batch`` with the CPU execution provider."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: batch.detach().cpu().numpy()})
    except Exception as err:
        raise ExportError(f"ONNX Runtime could not run {path}: {' '.join(str(err).split())}") from err


def onnx_predictor(path: str | Path):
    """A callable running the ONNX model at ``path`` in one ONNX Runtime session: inputs -> every output."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: torch.Tensor) -> list[torch.Tensor]:
        return [torch.from_numpy(out) for out in session.run(None, {name: batch.detach().cpu().numpy()})]

    return predict


def parity(model: nn.Module, path: str | Path, batch: torch.Tensor) -> Parity:
    """Compare ONNX Runtime on ``path`` with ``model`` in PyTorch on the same batch."""
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in flatten_outputs(tree.set_training_(model, False)(batch))]
    got = run_onnx(path, batch)
    if len(got) != len(expected):
        raise ExportError(f"{path} has {len(got)} outputs, PyTorch gives {len(expected)}")
    return relative_error(got, expected)


def torch_relative_error(reference: nn.Module, other: nn.Module, batch: torch.Tensor) -> float:
    """Relative error of ``other``'s outputs against ``reference``'s on ``batch``, both in PyTorch."""
    with torch.no_grad():
        expected = [t.detach().cpu().numpy() for t in flatten_outputs(reference(batch))]
        got = [t.detach().cpu().numpy() for t in flatten_outputs(other(batch))]
    return relative_error(got, expected).rel


def parity_batch(example_input: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A random batch of another batch size than the export's, to exercise the dynamic axis."""
    batch_size = 2 if example_input.shape[0] == 1 else example_input.shape[0] + 1
    generator = torch.Generator().manual_seed(seed)
    shape = (batch_size, *example_input.shape[1:])
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(example_input.device, example_input.dtype)
