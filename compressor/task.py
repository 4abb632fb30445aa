"""What a model's outputs are, which decides how it is distilled and measured.

Three kinds, detected from the outputs on the example input (or set by the recipe's ``task:``):

* ``classification``: the first output is logits (N, K);
* ``segmentation``: the first output is dense logits (N, K, H, W), one class per position;
* ``other``: anything else (detection heads, several outputs, features, a single-channel map).

With logits, the first output is compared by its argmax (class dimension 1) and distilled by KL;
every other output (all of them for ``other``) by its relative error and a normalized MSE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.errors import CompressorError, DataError
from compressor.export import flatten_outputs

__all__ = ["KINDS", "Task", "check_labels", "detect_kind", "resolve_task", "task_of"]

KINDS = ("classification", "segmentation", "other")


@dataclass(frozen=True)
class Task:
    """The resolved task of one model: its kind, output shapes (batch excluded) and loss weights."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    weights: tuple[float, ...]
    ignore_index: int = 255
    #: ``"detected"`` from the outputs, or ``"recipe"`` when ``task.kind`` set it.
    source: str = "detected"

    @property
    def logits(self) -> bool:
        """Whether the first output is class logits (compared by argmax, distilled by KL)."""
        return self.kind != "other"

    @property
    def classes(self) -> int | None:
        return self.shapes[0][0] if self.logits else None

    def record(self) -> dict:
        """The report's ``task`` entry."""
        return {
            "kind": self.kind,
            "source": self.source,
            "outputs": [list(shape) for shape in self.shapes],
            "loss_weights": list(self.weights),
            "ignore_index": self.ignore_index if self.kind == "segmentation" else None,
        }


def detect_kind(outputs: list[torch.Tensor]) -> str:
    """``classification`` for one (N, K) output, ``segmentation`` for one (N, K, H, W) output with
    K >= 2 floating-point channels, ``other`` for anything else (including several outputs: which of
    them would be the logits is the user's call, through ``task.kind``)."""
    if len(outputs) != 1 or not outputs[0].is_floating_point():
        return "other"
    shape = tuple(outputs[0].shape)
    if len(shape) == 2 and shape[1] >= 2:
        return "classification"
    if len(shape) == 4 and shape[1] >= 2:
        return "segmentation"
    return "other"


def _check_kind(kind: str, first: torch.Tensor) -> None:
    wanted = {"classification": (2, "(N, classes)"), "segmentation": (4, "(N, classes, H, W)")}.get(kind)
    if wanted is None:
        return
    dims, text = wanted
    if first.dim() != dims or first.shape[1] < 2 or not first.is_floating_point():
        raise CompressorError(
            f"task.kind {kind} expects the model's first output to be {text} logits with at least 2 classes; "
            f"got shape {tuple(first.shape)} ({first.dtype}); use task.kind other"
        )


def resolve_task(settings, outputs: list[torch.Tensor]) -> Task:
    """The task for a model whose flattened outputs on the example input are ``outputs``.

    ``settings``: the recipe's ``task`` section (``kind``, ``ignore_index``, ``weights``) or ``None``
    for detection with the defaults.
    """
    if not outputs:
        raise CompressorError("the model returned no tensor output: nothing to compare or distill")
    requested = getattr(settings, "kind", "auto")
    kind = detect_kind(outputs) if requested == "auto" else requested
    _check_kind(kind, outputs[0])
    weights = getattr(settings, "weights", None)
    if weights is None:
        weights = [1.0] * len(outputs)
    elif len(weights) != len(outputs):
        raise CompressorError(
            f"task.weights has {len(weights)} value(s) but the model has {len(outputs)} output(s) "
            f"(shapes {', '.join(str(tuple(o.shape)) for o in outputs)}); give one weight per output"
        )
    return Task(
        kind=kind,
        shapes=tuple(tuple(o.shape[1:]) for o in outputs),
        weights=tuple(float(w) for w in weights),
        ignore_index=int(getattr(settings, "ignore_index", 255)),
        source="detected" if requested == "auto" else "recipe",
    )


def check_labels(task: Task, labels: torch.Tensor, first: torch.Tensor, what: str, *, training: bool = False) -> torch.Tensor:
    """``labels`` as int64 class indices fitting the first output: (N,) for classification, (N, H, W)
    for segmentation (``task.ignore_index`` marks positions without a label).

    Class indices outside the model's classes are refused where they would break the computation
    (segmentation's confusion matrices, any cross-entropy: ``training``); a classification
    evaluation just counts them as wrong, as a top-1 accuracy does."""
    expected = (first.shape[0],) if task.kind == "classification" else (first.shape[0], *first.shape[2:])
    if tuple(labels.shape) != expected:
        per = "sample" if task.kind == "classification" else "position of the output"
        raise DataError(
            f"{what}: labels of shape {tuple(labels.shape)} do not fit the model output {tuple(first.shape)} "
            f"(expected {expected}, one class index per {per})"
        )
    labels = labels.to(torch.int64)
    if task.kind == "classification" and not training:
        return labels
    valid = labels[labels != task.ignore_index] if task.kind == "segmentation" else labels
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= first.shape[1]):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        ignore = f", ignore index {task.ignore_index}" if task.kind == "segmentation" else ""
        raise DataError(f"{what}: label {bad} is outside the model's classes 0..{first.shape[1] - 1}{ignore}")
    return labels


def task_of(model, example_input: torch.Tensor, settings) -> Task:
    """Run ``model`` on ``example_input`` once and resolve its task from the outputs."""
    with torch.no_grad():
        outputs = flatten_outputs(model(example_input))
    return resolve_task(settings, outputs)
