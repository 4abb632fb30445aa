"""INT8 copies of the compressed ONNX model (onnxruntime.quantization), checked against the float one.

``static``: QDQ format, per-channel symmetric int8 weights, uint8 activations whose ranges are
calibrated (MinMax) on the ``--data`` batches: U8S8, what ORT's x86 CPU kernels run fastest. Signed
activations (S8S8) ran ResNet-18 1.7x slower than U8S8 on an AVX2 machine without VNNI (float
86.7 ms; INT8 S8S8 79.9 ms, U8S8 46.0 ms; its depthwise-separable compression 34.7 ms float, 53.2 ms
S8S8, 28.2 ms U8S8; 1 thread, one run, machine loaded), so S8S8 was why INT8 compressed models ran
slower than float.
``dynamic``: int8 weights, activation ranges computed at run time; needs no data, but ORT runs its
convs as ConvInteger, which is often *slower* than float on CPU: measure before shipping it.

Every INT8 model is verified: top-1 agreement with the float compressed model on the evaluation
data (or the calibration data, or a random batch, in that order of preference; the report says which).
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from compressor.errors import CompressorError, ParityError, describe_error
from compressor.evaluate import evaluate
from compressor.export import onnx_predictor

INT8_FILE = "compressed.int8.onnx"


class Int8AgreementError(ParityError):
    """The INT8 model disagrees with the float compressed model beyond ``export.int8_tolerance``.

    A verification failure like ONNX parity (exit 1, outputs kept for inspection).
    """


class _BatchReader:
    """``CalibrationDataReader`` over in-memory NCHW batches (float32 numpy)."""

    def __init__(self, input_name: str, batches: Sequence[torch.Tensor]) -> None:
        self.input_name = input_name
        self._batches = [b.detach().cpu().to(torch.float32).numpy() for b in batches]
        self._position = 0

    def get_next(self):
        if self._position >= len(self._batches):
            return None
        batch = self._batches[self._position]
        self._position += 1
        return {self.input_name: batch}

    def rewind(self) -> None:
        self._position = 0


@contextlib.contextmanager
def _quiet():
    """onnxruntime.quantization logs and warns per node; keep the terminal summary short."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def quantize_onnx(
    float_path: str | Path, out_path: str | Path, mode: str, calibration: Sequence[torch.Tensor] | None = None
) -> Path:
    """Write an INT8 version of ``float_path`` to ``out_path``; ``calibration`` batches for ``static``."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import onnx

    out_path = Path(out_path)
    if mode not in ("static", "dynamic"):
        raise ValueError(f"Expected quantize mode 'static' or 'dynamic', got {mode!r}")
    if mode == "static" and not calibration:
        raise CompressorError("export.quantize: static needs calibration batches (pass --data)")
    try:
        with _quiet(), tempfile.TemporaryDirectory(prefix="compressor-int8-") as folder:
            # Shape inference and constant folding first, as onnxruntime recommends: the quantizer
            # needs every tensor's shape to choose per-channel axes.
            prepared = Path(folder) / "prepared.onnx"
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            if mode == "static":
                input_name = onnx.load(str(prepared), load_external_data=False).graph.input[0].name
                quantize_static(
                    str(prepared), str(out_path), _BatchReader(input_name, calibration),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            else:
                quantize_dynamic(str(prepared), str(out_path), per_channel=True, weight_type=QuantType.QUInt8)
    except CompressorError:
        raise
    except Exception as err:
        raise CompressorError(f"INT8 ({mode}) quantization of {float_path} failed: {describe_error(err)}") from err
    return out_path


def verify_int8(
    float_path: str | Path,
    int8_path: str | Path,
    batches: Sequence[tuple],
    tolerance: float,
) -> dict:
    """Top-1 agreement of the INT8 model with the float model on ``(inputs, labels)`` batches."""
    compared = evaluate(onnx_predictor(float_path), onnx_predictor(int8_path), batches)
    # Outputs without classes (detection heads, features) have no agreement: the tolerance then
    # bounds their relative error against the float model.
    disagreement = compared["output_rel_error"] if compared["agreement"] is None else 1.0 - compared["agreement"]
    return {
        "agreement_with_float": compared["agreement"],
        "output_rel_error_vs_float": compared["output_rel_error"],
        "samples": compared["samples"],
        "tolerance": tolerance,
        "passed": disagreement <= tolerance,
    }


def check_batches(eval_batches, calibration, random_batch: torch.Tensor) -> tuple[list[tuple], str]:
    """The batches INT8 agreement is measured on, and what they are."""
    if eval_batches:
        return list(eval_batches), "eval-data"
    if calibration:
        return [(batch, None) for batch in calibration], "calibration data (in-sample for static quantization)"
    return [(random_batch, None)], "a random batch (no --data/--eval-data: a weak check)"


def int8_step(result, out: Path, final_dir: Path | None) -> Path | None:
    """Quantize ``out/compressed.onnx`` as the recipe says; record and verify; return the INT8 path.

    Raises :class:`Int8AgreementError` (after recording) when agreement is below the tolerance.
    """
    settings = result.recipe.export
    if settings.quantize == "none":
        return None
    path = quantize_onnx(out / "compressed.onnx", out / INT8_FILE, settings.quantize, result.calibration)
    generator = torch.Generator().manual_seed(1)
    random_batch = torch.randn((8, *result.example_input.shape[1:]), generator=generator)
    batches, source = check_batches(result.eval_batches, result.calibration, random_batch)
    record = {"mode": settings.quantize, "path": str(Path(final_dir or out) / INT8_FILE), "checked_on": source}
    if settings.quantize == "static":
        record.update(format="QDQ", weights="int8 per-channel", activations="int8 (MinMax calibration)",
                      calibration_samples=sum(b.shape[0] for b in result.calibration or ()))
    else:
        record.update(format="dynamic (ConvInteger/MatMulInteger)", weights="uint8 per-channel")
    record.update(verify_int8(out / "compressed.onnx", path, batches, settings.int8_tolerance))
    result.report["int8"] = record
    if result.eval_batches and (out / "original.onnx").exists():
        result.report["int8"]["metrics"] = evaluate(
            onnx_predictor(out / "original.onnx"), onnx_predictor(path), result.eval_batches
        )
    if not record["passed"]:
        raise Int8AgreementError(
            f"INT8 ({settings.quantize}) model disagrees with the float compressed model on "
            f"{1 - record['agreement_with_float']:.2%} of {record['samples']} samples ({source}); "
            f"export.int8_tolerance is {settings.int8_tolerance:.2%}"
        )
    return path


__all__ = ["INT8_FILE", "Int8AgreementError", "check_batches", "int8_step", "quantize_onnx", "verify_int8"]
