"""Compare the compressed model with the original on user data, by task (see :mod:`compressor.task`).

* every kind: ``output_rel_error`` (all outputs together) and ``output_rel_errors`` (one per output),
  ||compressed - original|| / ||original||;
* classification: ``agreement`` (fraction of samples with the same top-1 class) and, with labels,
  ``accuracy_original`` / ``accuracy_compressed``;
* segmentation: ``agreement`` (fraction of *pixels* with the same class), ``miou_vs_original`` (mean
  IoU of the compressed prediction against the original's) and, with (N, H, W) labels, pixel
  accuracies and ``miou_original`` / ``miou_compressed`` over the labelled pixels (the ignore index
  excluded);
* other: ``agreement`` and accuracies are ``None`` (there is no class to agree on).

Agreement and accuracy are fractions of the units counted, so always within [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.export import flatten_outputs
from compressor.task import Task, check_labels, resolve_task

__all__ = ["Predictor", "Tally", "evaluate", "mean_iou", "torch_predictor"]


def _split(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], None if batch[1] is None else torch.as_tensor(batch[1])
    raise CompressorError("eval_data must yield tensors or (inputs, labels) pairs")


Predictor = Callable[[torch.Tensor], list[torch.Tensor]]
"""Inputs in, every output as a flat list of tensors: a PyTorch model or an ONNX Runtime session."""


def torch_predictor(model: nn.Module) -> Predictor:
    """All of the model's outputs, flattened."""
    return lambda inputs: flatten_outputs(model(inputs))


def _as_outputs(value) -> list[torch.Tensor]:
    return flatten_outputs(value) if not isinstance(value, list) else value


def mean_iou(confusion: torch.Tensor) -> float | None:
    """Mean over classes present (in either axis) of TP / (TP + FP + FN); ``None`` when nothing was counted."""
    confusion = confusion.to(torch.float64)
    true_positive = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - true_positive
    present = union > 0
    if not bool(present.any()):
        return None
    return float((true_positive[present] / union[present]).mean())


def _confusion(truth: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    index = truth.reshape(-1) * classes + predicted.reshape(-1)
    return torch.bincount(index, minlength=classes * classes).reshape(classes, classes).to(torch.float64)


class Tally:
    """Running sums for :func:`evaluate` and the fine-tune's held-out checks, as float64 tensors
    (``tensors()``), so that distributed ranks can all-reduce them before :meth:`result`."""

    def __init__(self, task: Task, device: torch.device | str = "cpu") -> None:
        self.task = task
        # samples, agreeing units, right (original), right (compressed), labelled units, units
        self.counts = torch.zeros(6, dtype=torch.float64, device=device)
        self.errors = torch.zeros(len(task.shapes), 2, dtype=torch.float64, device=device)  # squared diff, squared ref
        classes = task.classes if task.kind == "segmentation" else 0
        # compressed vs original, original vs labels, compressed vs labels (rows: the reference)
        self.confusion = torch.zeros(3, classes, classes, dtype=torch.float64, device=device)
        self.labelled = True

    def tensors(self) -> list[torch.Tensor]:
        return [self.counts, self.errors, self.confusion]

    def add(self, reference: list[torch.Tensor], output: list[torch.Tensor], labels: torch.Tensor | None, what: str) -> None:
        if len(output) != len(reference):
            raise CompressorError(f"{what}: the compressed model gives {len(output)} outputs, the original {len(reference)}")
        for i, (ref, out) in enumerate(zip(reference, output)):
            ref, out = ref.detach().to(torch.float64), out.detach().to(torch.float64).to(ref.device)
            self.errors[i, 0] += float(((out - ref) ** 2).sum())
            self.errors[i, 1] += float((ref**2).sum())
        self.counts[0] += reference[0].shape[0]
        if not self.task.logits:
            self.labelled = False
            return
        predicted_ref = reference[0].argmax(1)
        predicted = output[0].to(reference[0].device).argmax(1)
        self.counts[1] += float((predicted_ref == predicted).sum())
        self.counts[5] += predicted_ref.numel()
        classes = self.task.classes
        if self.task.kind == "segmentation":
            self.confusion[0] += _confusion(predicted_ref, predicted, classes).to(self.confusion.device)
        if labels is None:
            self.labelled = False
            return
        labels = check_labels(self.task, torch.as_tensor(labels).to(predicted.device), reference[0], what)
        valid = labels != self.task.ignore_index if self.task.kind == "segmentation" else torch.ones_like(labels, dtype=torch.bool)
        self.counts[2] += float((predicted_ref == labels)[valid].sum())
        self.counts[3] += float((predicted == labels)[valid].sum())
        self.counts[4] += float(valid.sum())
        if self.task.kind == "segmentation":
            self.confusion[1] += _confusion(labels[valid], predicted_ref[valid], classes).to(self.confusion.device)
            self.confusion[2] += _confusion(labels[valid], predicted[valid], classes).to(self.confusion.device)

    def result(self) -> dict:
        samples, agree, right_ref, right_out, labelled_units, units = (float(v) for v in self.counts)
        squared_diff, squared_ref = self.errors[:, 0], self.errors[:, 1]
        result: dict = {
            "task": self.task.kind,
            "samples": int(samples),
            "agreement": agree / units if self.task.logits and units else None,
            "accuracy_original": None,
            "accuracy_compressed": None,
            "output_rel_error": (float(squared_diff.sum()) / max(float(squared_ref.sum()), 1e-300)) ** 0.5,
            "output_rel_errors": [(float(d) / max(float(r), 1e-300)) ** 0.5 for d, r in zip(squared_diff, squared_ref)],
        }
        labelled = self.labelled and labelled_units > 0
        if labelled:
            result["accuracy_original"] = right_ref / labelled_units
            result["accuracy_compressed"] = right_out / labelled_units
        if self.task.kind == "segmentation":
            result["pixels"] = int(units)
            result["miou_vs_original"] = mean_iou(self.confusion[0])
            result["miou_original"] = mean_iou(self.confusion[1]) if labelled else None
            result["miou_compressed"] = mean_iou(self.confusion[2]) if labelled else None
        return result


def evaluate(
    original: nn.Module | Predictor, compressed: nn.Module | Predictor, eval_data: Iterable, task: Task | None = None
) -> dict:
    """Compare ``compressed`` with ``original`` on ``eval_data`` (tensors or ``(inputs, labels)`` batches).

    ``original``/``compressed`` are models or predictors (every output, flattened). ``task``: the
    resolved task; ``None`` detects it from the original's outputs on the first batch.
    """
    if isinstance(original, nn.Module):
        original = torch_predictor(original)
    if isinstance(compressed, nn.Module):
        compressed = torch_predictor(compressed)
    tally = None
    with torch.no_grad():
        for batch in eval_data:
            inputs, labels = _split(batch)
            reference = _as_outputs(original(inputs))
            output = _as_outputs(compressed(inputs))
            if tally is None:
                tally = Tally(task if task is not None else resolve_task(None, reference), reference[0].device)
            tally.add(reference, output, labels, "evaluation data")
    if tally is None or tally.counts[0] == 0:
        raise CompressorError("eval_data yielded no samples")
    return tally.result()
