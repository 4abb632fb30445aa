"""Argument checks shared by the decompositions."""

from __future__ import annotations

import torch


def check_kernel(weight: torch.Tensor) -> None:
    if weight.dim() != 4:
        raise ValueError(f"Expected a 4-d conv kernel (out, in, kh, kw), got shape {tuple(weight.shape)}")


def check_rank(rank: int, maximum: int, what: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"Expected a positive integer {what}, got {rank!r}")
    if rank > maximum:
        raise ValueError(f"Expected {what} <= {maximum} (full rank), got {rank}")
