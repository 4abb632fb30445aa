"""Whitening transforms from input covariances, for data-aware decompositions.

A conv's output error for a weight error ``dW`` (rows = output channels, columns = one input
mode) on inputs with second-moment matrix ``S`` is ``tr(dW S dW^T) = ||dW S^(1/2)||_F^2``. So the
best rank-``r`` approximation *for the outputs* is the truncated SVD of ``W S^(1/2)``, mapped back
with ``S^(-1/2)``: Zhang, Zou, He, Sun, "Accelerating Very Deep Convolutional Networks for
Classification and Detection", TPAMI 2016; Wang et al., "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression", ICLR 2025.

``S`` is often singular (dead ReLU channels, the constant zeros of padding, more dimensions than
samples), so eigenvalues are floored at ``ridge`` times their mean before taking roots: the
directions the data never excites are then treated as nearly free, but the inverse stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DEFAULT_RIDGE = 1e-4


@dataclass(frozen=True)
class Whitening:
    """Symmetric ``root`` (``root @ root ~= S``) and its ``inverse``, float64, batched like ``S``."""

    root: torch.Tensor
    inverse: torch.Tensor

    @property
    def size(self) -> int:
        return self.root.shape[-1]


def whitening(covariance: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> Whitening:
    """Regularized symmetric square root of ``covariance`` (``(n, n)`` or batched ``(..., n, n)``).

    An all-zero (or non-finite) covariance, as a never-excited layer gives, yields the identity:
    with no information about the inputs, the weight-only decomposition is the sensible one.
    """
    if covariance.shape[-1] != covariance.shape[-2]:
        raise ValueError(f"Expected square covariance matrices, got shape {tuple(covariance.shape)}")
    matrix = covariance.detach().to(torch.float64)
    matrix = (matrix + matrix.transpose(-1, -2)) / 2
    size = matrix.shape[-1]
    eye = torch.eye(size, dtype=torch.float64, device=matrix.device).expand_as(matrix)
    scale = torch.diagonal(matrix, dim1=-2, dim2=-1).mean(-1, keepdim=True)
    usable = torch.isfinite(matrix).all(dim=(-1, -2), keepdim=True) & (scale.unsqueeze(-1) > 0)
    matrix = torch.where(usable, matrix, eye)
    values, vectors = torch.linalg.eigh(matrix)
    floor = ridge * values.clamp_min(0).mean(-1, keepdim=True).clamp_min(1e-300)
    values = torch.maximum(values, floor)
    root = (vectors * values.sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    inverse = (vectors * values.rsqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)
    return Whitening(root, inverse)


def whiten_input_mode(weight: torch.Tensor, transform: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in, kh, kw) with its input-channel mode multiplied by ``transform`` (in x in).

    ``whiten_input_mode(W, w.root)`` is the tensor to decompose; applying ``w.inverse`` the same way
    to the decomposed input factor maps it back.
    """
    return torch.einsum("oc...,cd->od...", weight.to(torch.float64), transform.to(torch.float64))
