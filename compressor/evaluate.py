"""Compare the compressed model with the original on user data: agreement, accuracy, output error."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.export import flatten_outputs


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise CompressorError("eval_data must yield tensors or (inputs, labels) pairs")


Predictor = Callable[[torch.Tensor], torch.Tensor]
"""Inputs in, logits (N, classes, ...) out: a PyTorch model or an ONNX Runtime session."""


def torch_predictor(model: nn.Module) -> Predictor:
    """The model's first output, as logits."""
    return lambda inputs: flatten_outputs(model(inputs))[0]


def evaluate(original: nn.Module | Predictor, compressed: nn.Module | Predictor, eval_data: Iterable) -> dict[str, float | int | None]:
    """Top-1 agreement with the original, accuracy of both when labels are given, output error.

    ``original``/``compressed`` are models (their first output is the logits, class dimension 1)
    or predictors. ``agreement`` is the fraction of samples where both predict the same class.
    """
    if isinstance(original, nn.Module):
        original = torch_predictor(original)
    if isinstance(compressed, nn.Module):
        compressed = torch_predictor(compressed)
    samples = agree = right_original = right_compressed = 0
    labelled = True
    squared_diff = squared_ref = 0.0
    with torch.no_grad():
        for batch in eval_data:
            inputs, labels = _split(batch)
            reference = original(inputs).to(torch.float64)
            output = compressed(inputs).to(torch.float64)
            squared_diff += float(((output - reference) ** 2).sum())
            squared_ref += float((reference**2).sum())
            predicted_ref, predicted = reference.argmax(1), output.argmax(1)
            labels = None if labels is None else torch.as_tensor(labels).to(predicted.device)
            agree += int((predicted_ref == predicted).sum())
            samples += inputs.shape[0]
            if labels is None:
                labelled = False
            else:
                right_original += int((predicted_ref == labels).sum())
                right_compressed += int((predicted == labels).sum())
    if samples == 0:
        raise CompressorError("eval_data yielded no samples")
    return {
        "samples": samples,
        "agreement": agree / samples,
        "accuracy_original": right_original / samples if labelled else None,
        "accuracy_compressed": right_compressed / samples if labelled else None,
        "output_rel_error": (squared_diff / max(squared_ref, 1e-300)) ** 0.5,
    }
