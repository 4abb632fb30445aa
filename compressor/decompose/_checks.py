"""Argument checks shared by the decompositions."""

from __future__ import annotations

import torch


def check_kernel(weight: torch.Tensor) -> None:
    if weight.dim() != 4:
        raise ValueError(f"Expected a 4-d conv kernel (out, in, kh, kw), got shape {tuple(weight.shape)}")


def check_positive_int(value: int, what: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Expected a positive integer {what}, got {value!r}")


def check_rank(rank: int, maximum: int, what: str) -> None:
    check_positive_int(rank, what)
    if rank > maximum:
        raise ValueError(f"Expected {what} <= {maximum} (full rank), got {rank}")
