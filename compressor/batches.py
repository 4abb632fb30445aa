"""Calibration, evaluation and training data as checked ``(inputs, labels)`` batches in memory.

Data arrives as a :class:`compressor.data.Dataset` (npz, image folders, callables) or as any
iterable of tensors or ``(inputs, labels)`` pairs; :func:`materialize` reads up to a sample limit
of it, checks shapes and values against the model input, and returns a list (calibration makes
several passes, and a user's generator can only be read once). The pipeline and the fine-tune
both read their data through it.
"""

from __future__ import annotations

import torch

from compressor.errors import CompressorError

__all__ = ["materialize"]


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return batch[0], None if batch[1] is None else torch.as_tensor(batch[1])
    raise CompressorError(
        f"data batches must be input tensors or (inputs, labels) pairs; got {type(batch).__name__}"
    )


def _iter_batches(data, batch_size: int, limit: int | None):
    if hasattr(data, "batches"):  # compressor.data.Dataset
        yield from data.batches(batch_size, limit)
        return
    taken = 0
    for batch in data:
        inputs, labels = _split_batch(batch)
        if limit is not None:
            inputs = inputs[: limit - taken]
            labels = None if labels is None else labels[: inputs.shape[0]]
        if inputs.shape[0]:
            yield inputs, labels
        taken += inputs.shape[0]
        if limit is not None and taken >= limit:
            return


def materialize(data, example_input: torch.Tensor, batch_size: int, limit: int | None, what: str) -> list[tuple]:
    """Up to ``limit`` samples of ``data`` as a list of ``(inputs, labels)`` batches, shape-checked.

    A list, because calibration makes several passes and a user's generator can only be read once.
    """
    expected = tuple(example_input.shape[1:])
    batches = []
    for inputs, labels in _iter_batches(data, batch_size, limit):
        if inputs.dim() != example_input.dim() or tuple(inputs.shape[1:2]) != expected[:1]:
            raise CompressorError(
                f"{what}: batches of shape {tuple(inputs.shape)} do not fit the model input {tuple(example_input.shape)} "
                f"(expected 4-d batches with {expected[0]} channels)"
            )
        if not torch.isfinite(inputs).all():
            raise CompressorError(f"{what}: a batch contains NaN or infinite values")
        batches.append((inputs.to(device=example_input.device, dtype=example_input.dtype), labels))
    if not batches:
        raise CompressorError(f"{what}: no samples")
    return batches
