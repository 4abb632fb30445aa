"""The peers we compare against, applied to the same layers at the same ranks.

- AIMET Spatial SVD (Qualcomm). aimet-torch 2.42 installs only with torchvision, which has no CPU
  build here, so this is its definition re-implemented line for line from
  ``aimet_torch/common/svd_pruner.py`` (``SpatialSvdPruner.lingalg_spatial_svd``) and
  ``aimet_torch/svd/svd_splitter.py`` (``SpatialSvdModuleSplitter.split_module``): the SVD of the
  kernel unfolded to (in*kh) x (out*kw), split sqrt(s) to both sides, kx1 conv without bias then
  1xk conv with the bias; dilation must be 1 (AIMET asserts it). It is the weight-only
  initialization of our ``spatial_separable``; what we add is the data-aware init and fine-tune.
- TensorLy-Torch ``FactorizedConv.from_conv`` (CP and Tucker), when ``tltorch`` is installed
  (``pip install tensorly-torch``). Tucker gets rank ``[R, R, kh, kw]`` (Tucker-2, as our
  ``grouped`` with one group), CP rank ``R``.
"""

from __future__ import annotations

import copy
from importlib.metadata import PackageNotFoundError, version

import numpy as np
import torch
from torch import nn

AIMET_SPATIAL_SVD = "aimet_spatial_svd (re-implemented)"
TLTORCH_CP = "tltorch_cp"
TLTORCH_TUCKER = "tltorch_tucker"


def tltorch_version() -> str | None:
    try:
        import tltorch  # noqa: F401
    except ImportError:
        return None
    try:
        return version("tensorly-torch")
    except PackageNotFoundError:
        return "unknown"


def aimet_spatial_svd(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """AIMET's Spatial SVD split of ``conv`` at ``rank`` (see the module docstring)."""
    assert conv.dilation == (1, 1), "AIMET's spatial SVD requires dilation 1"
    weight = conv.weight.detach().cpu().numpy()
    out_channels, in_channels, height, width = weight.shape
    assert rank <= in_channels * height
    unfolded = np.transpose(weight, [1, 2, 0, 3]).reshape(in_channels * height, out_channels * width)
    v, s, h = np.linalg.svd(unfolded, full_matrices=False)
    v, s, h = v[:, :rank], s[:rank], h[:rank, :]
    root = np.sqrt(s)
    v = v * root
    h = root.reshape(-1, 1) * h
    h = np.transpose(h.reshape([rank, out_channels, width, 1]), [1, 0, 3, 2])
    v = np.transpose(v.reshape((in_channels, 1, height, rank)), [3, 0, 2, 1])
    first = nn.Conv2d(in_channels, rank, (height, 1), stride=(conv.stride[0], 1), padding=(conv.padding[0], 0), bias=False)
    second = nn.Conv2d(rank, out_channels, (1, width), stride=(1, conv.stride[1]), padding=(0, conv.padding[1]), bias=conv.bias is not None)
    first.weight.data = torch.from_numpy(np.ascontiguousarray(v)).to(conv.weight)
    second.weight.data = torch.from_numpy(np.ascontiguousarray(h)).to(conv.weight)
    if conv.bias is not None:
        second.bias.data = conv.bias.detach().clone()
    return nn.Sequential(first, second)


def tltorch_factorized(conv: nn.Conv2d, factorization: str, rank: int) -> nn.Module:
    """``tltorch.FactorizedConv.from_conv`` (``factorized`` implementation: the factors run as convs)."""
    import tltorch

    kh, kw = conv.kernel_size
    tl_rank = [rank, rank, kh, kw] if factorization == "tucker" else rank
    torch.manual_seed(0)  # tensorly's decompositions start from random factors in places
    return tltorch.FactorizedConv.from_conv(
        conv, rank=tl_rank, factorization=factorization, decompose_weights=True, implementation="factorized"
    )


def replace_convs(model: nn.Module, ranks: dict[str, int], build) -> nn.Module:
    """A copy of ``model`` with each named conv replaced by ``build(conv, rank)``."""
    model = copy.deepcopy(model)
    for name, rank in ranks.items():
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attribute, build(getattr(parent, attribute), rank))
    return model.eval()


def macs_and_params(model: nn.Module, shape) -> tuple[int, int]:
    """(MACs per sample, params), counted by torch's flop counter the same way for every tool (so also
    for tltorch's modules, which are not ``nn.Conv2d``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(shape))
    return counter.get_total_flops() // 2 // shape[0], sum(p.numel() for p in model.parameters())
