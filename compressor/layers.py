"""The one place where factors become modules: plain ``nn.Conv2d`` stacks in an ``nn.Sequential``.

Every hyperparameter of the original conv is either copied to the factor that must carry it or
deliberately replaced (and the replacement is what makes the stack exact): stride, padding and
dilation go to the spatial factor (split per axis for the spatially separable form), bias goes to
the last factor, dtype and device to all. ``padding_mode`` other than ``zeros`` is refused rather
than dropped, and so are ``groups != 1`` except by the methods that keep a grouped conv's groups in
every factor (``low_rank``, ``grouped``). :func:`check_stack` then compares the stack with the original on
everything observable without running a model: channels, dtype, device, bias, and the output size
for two probe input sizes (which catches any stride/padding/dilation mistake).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

_Pair = tuple[int, int]


def unsupported_reason(conv: nn.Conv2d, *, grouped: bool = False) -> str | None:
    """Why a conv cannot be factorized exactly, or ``None``; ``grouped``: for a method that keeps a
    grouped conv's groups (depthwise convs are still refused)."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} subclasses nn.Conv2d; its forward may differ from a plain conv"
    if grouped and conv.groups == conv.in_channels and conv.groups > 1:
        return f"depthwise conv (groups={conv.groups}); nothing to factorize across channels"
    if conv.groups != 1 and not grouped:
        kind = "depthwise" if conv.groups == conv.in_channels else "grouped"
        return f"{kind} conv (groups={conv.groups}); only dense convs (groups=1) are factorized"
    if conv.padding_mode != "zeros":
        return f"padding_mode='{conv.padding_mode}'; the factor chain is exact only for zero padding"
    if isinstance(conv.padding, str) and conv.padding not in ("same", "valid"):
        return f"padding='{conv.padding}' is not understood"
    return None


def _make_conv(
    template: nn.Conv2d,
    weight: torch.Tensor,
    *,
    stride: _Pair = (1, 1),
    padding: _Pair | str = (0, 0),
    dilation: _Pair = (1, 1),
    groups: int = 1,
    bias: torch.Tensor | None = None,
) -> nn.Conv2d:
    conv = nn.Conv2d(
        in_channels=weight.shape[1] * groups,
        out_channels=weight.shape[0],
        kernel_size=tuple(weight.shape[2:]),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=bias is not None,
        padding_mode="zeros",
        device=template.weight.device,
        dtype=template.weight.dtype,
    )
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def _original_bias(conv: nn.Conv2d) -> torch.Tensor | None:
    return None if conv.bias is None else conv.bias.detach()


class DecoupledSeparable(nn.Sequential):
    """A depthwise conv with multiplier ``M > 1`` and its pointwise conv, run as ``M`` branches.

    The parameters are the plain chain's (``self[0]``: depthwise, ``in -> in*M``, ``groups=in``;
    ``self[1]``: pointwise), so decompositions, refits and fine-tuning see one depthwise and one
    pointwise conv. The forward is Network Decoupling's own form (Guo et al., BMVC 2018): the sum
    over ``m`` of a multiplier-1 depthwise conv (output channels ``i*M + m``) and the matching
    pointwise columns. Same outputs; but ONNX Runtime runs multiplier-1 depthwise convs on its NCHWc
    kernel and fuses each branch's sum into the pointwise conv, while a multiplier above 1 falls off
    that kernel: measured 1.4-1.7x faster than the chain at M=2 (ResNet-18 layer shapes, 1 thread).
    Slicing (``stack[:-1]``) gives the plain chain of those modules.
    """

    def __getitem__(self, index):
        if isinstance(index, slice):
            return nn.Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)

    def forward(self, x):  # unannotated: FX would carry the string annotation into portable()'s pickle
        depthwise, pointwise = self[0], self[1]
        multiplier = depthwise.out_channels // depthwise.in_channels
        total = None
        for m in range(multiplier):
            hidden = F.conv2d(
                x, depthwise.weight[m::multiplier], None, depthwise.stride, depthwise.padding, depthwise.dilation,
                depthwise.in_channels,
            )
            part = F.conv2d(hidden, pointwise.weight[:, m::multiplier], pointwise.bias if m == 0 else None)
            total = part if total is None else total + part
        return total


def portable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that unpickles with torch alone: every :class:`DecoupledSeparable` (a class
    of this package) becomes the ``torch.fx.GraphModule`` of its forward, same parameters and outputs."""
    import copy

    import torch.fx

    from compressor import tree

    copied = copy.deepcopy(model)
    if isinstance(copied, DecoupledSeparable):
        return torch.fx.symbolic_trace(copied)
    branched = [name for name, module in tree.named_modules(copied) if isinstance(module, DecoupledSeparable)]
    for name in branched:
        parent_name, _, child = name.rpartition(".")
        parent = tree.get_submodule(copied, parent_name) if parent_name else copied
        parent._modules[child] = torch.fx.symbolic_trace(parent._modules[child])
    return copied


def conv_view(module: nn.Module) -> nn.Module:
    """``module`` itself, or for an ``nn.Linear`` the 1x1 conv computing the same map at every position.

    The view shares the Linear's weight and bias storage (no copy), so planning, decomposition and
    the last-factor refit treat a Linear as the 1x1 conv it is; writing into the view's parameters
    writes into the Linear's. Its parameters do not require grad: it is never trained.
    """
    if type(module) is not nn.Linear:
        return module
    conv = nn.Conv2d(module.in_features, module.out_features, 1, bias=module.bias is not None, device="meta")
    conv.weight = nn.Parameter(module.weight.detach().view(module.out_features, module.in_features, 1, 1), requires_grad=False)
    if module.bias is not None:
        conv.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return conv


def as_conv_input(tensor: torch.Tensor) -> torch.Tensor:
    """A Linear's input or output ``(N, ..., features)`` as 1x1-conv activations ``(positions, features, 1, 1)``."""
    return tensor.reshape(-1, tensor.shape[-1], 1, 1)


def as_linear_stack(linear: nn.Linear, stack: nn.Sequential) -> nn.Sequential:
    """The stack built for :func:`conv_view` of ``linear`` (plain 1x1 convs) as the same chain of
    ``nn.Linear`` layers, which take the Linear's ``(N, ..., in)`` inputs; bias stays on the last."""
    converted = []
    for conv in stack:
        pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.dilation == (1, 1)
        if type(conv) is not nn.Conv2d or not pointwise or conv.groups != 1 or conv.padding not in ((0, 0), "valid"):
            raise AssertionError(f"only a chain of plain 1x1 convs becomes Linear layers, got {conv}")
        layer = nn.Linear(
            conv.in_channels, conv.out_channels, bias=conv.bias is not None,
            device=linear.weight.device, dtype=linear.weight.dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(conv.weight[:, :, 0, 0])
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        converted.append(layer)
    result = nn.Sequential(*converted)
    probe = torch.zeros(2, 3, linear.in_features, dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        if result(probe).shape != linear(probe).shape:
            raise AssertionError(f"Linear stack gives {tuple(result(probe).shape)}, {linear} gives {tuple(linear(probe).shape)}")
    return result


def build_depthwise_separable(conv: nn.Conv2d, depthwise: torch.Tensor, pointwise: torch.Tensor) -> nn.Sequential:
    """kxk depthwise (stride, padding, dilation of the original) then 1x1 pointwise (bias); with a
    depth multiplier above 1, in the branched form of :class:`DecoupledSeparable`."""
    factors = (
        _make_conv(
            conv,
            depthwise,
            stride=conv.stride,
            padding=factor_padding(conv),
            dilation=conv.dilation,
            groups=conv.in_channels,
        ),
        _make_conv(conv, pointwise, bias=_original_bias(conv)),
    )
    multiplier = depthwise.shape[0] // conv.in_channels
    return DecoupledSeparable(*factors) if multiplier > 1 else nn.Sequential(*factors)


def build_low_rank(conv: nn.Conv2d, first: torch.Tensor, last: torch.Tensor) -> nn.Sequential:
    """kxk conv to R channels (stride, padding, dilation of the original), then 1x1 to out (bias);
    both with the original's groups."""
    groups = conv.groups
    return nn.Sequential(
        _make_conv(conv, first, stride=conv.stride, padding=factor_padding(conv), dilation=conv.dilation, groups=groups),
        _make_conv(conv, last, bias=_original_bias(conv), groups=groups),
    )


def factor_padding(conv: nn.Conv2d) -> _Pair | str:
    """The original's padding, with 'same' spelled out as numbers wherever it is symmetric.

    Same output, but exported to ONNX as explicit pads instead of ``auto_pad=SAME_UPPER``, which
    ONNX Runtime refuses together with dilation. An asymmetric 'same' (odd ``d*(k-1)``) stays a
    string: only it can express the extra pad on one side.
    """
    if conv.padding != "same":
        return conv.padding
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
    if any(total % 2 for total in totals):
        return "same"
    return (totals[0] // 2, totals[1] // 2)


def _axis_padding(conv: nn.Conv2d, axis: int) -> _Pair | str:
    """Padding of the original along one axis only, for a factor whose kernel spans only that axis.

    'same' becomes numbers when that axis' padding is symmetric (see :func:`factor_padding`); it
    stays 'same' otherwise, which for a (k x 1) or (1 x k) factor pads only along its own axis.
    """
    padding = conv.padding
    if padding == "same":
        total = conv.dilation[axis] * (conv.kernel_size[axis] - 1)
        if total % 2:
            return "same"
        return (total // 2, 0) if axis == 0 else (0, total // 2)
    if isinstance(padding, str):
        return padding
    return (padding[0], 0) if axis == 0 else (0, padding[1])


def build_spatial_separable(conv: nn.Conv2d, vertical: torch.Tensor, horizontal: torch.Tensor) -> nn.Sequential:
    """(kh x 1) conv with the vertical stride/padding/dilation, then (1 x kw) with the horizontal ones.

    Exact because zero padding of the intermediate along W equals the vertical conv of the W-padded
    input (the vertical conv has no bias and acts column by column).
    """
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    return nn.Sequential(
        _make_conv(conv, vertical, stride=(sh, 1), padding=_axis_padding(conv, 0), dilation=(dh, 1)),
        _make_conv(
            conv,
            horizontal,
            stride=(1, sw),
            padding=_axis_padding(conv, 1),
            dilation=(1, dw),
            bias=_original_bias(conv),
        ),
    )


def build_grouped(
    conv: nn.Conv2d, first: torch.Tensor, core: torch.Tensor, last: torch.Tensor, groups: int
) -> nn.Sequential:
    """1x1 reduce, grouped kxk core (stride, padding, dilation of the original), 1x1 expand (bias).

    The padding belongs to the core: the bias-free 1x1 before it maps zero padding to zero padding.
    A grouped conv's 1x1 factors keep its groups (one Tucker-2 per group; ``groups`` is then the conv's).
    """
    outer = conv.groups
    return nn.Sequential(
        _make_conv(conv, first[:, :, None, None], groups=outer),
        _make_conv(conv, core, stride=conv.stride, padding=factor_padding(conv), dilation=conv.dilation, groups=groups),
        _make_conv(conv, last[:, :, None, None], bias=_original_bias(conv), groups=outer),
    )


def build_cp(
    conv: nn.Conv2d, first: torch.Tensor, vertical: torch.Tensor, horizontal: torch.Tensor, last: torch.Tensor
) -> nn.Sequential:
    """1x1 (in -> R), (kh x 1) depthwise, (1 x kw) depthwise, 1x1 (R -> out, bias): a CP kernel.

    The vertical depthwise carries the stride, padding and dilation along H, the horizontal one those
    along W. Zero padding stays exact: the bias-free 1x1 before them maps the zero-padded input to
    the zero-padded intermediate, and since the vertical depthwise has no bias and acts column by
    column, zero-padding its output along W equals running it on the W-padded input.
    """
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    rank = first.shape[0]
    return nn.Sequential(
        _make_conv(conv, first[:, :, None, None]),
        _make_conv(
            conv,
            vertical[:, None, :, None],
            stride=(sh, 1),
            padding=_axis_padding(conv, 0),
            dilation=(dh, 1),
            groups=rank,
        ),
        _make_conv(
            conv,
            horizontal[:, None, None, :],
            stride=(1, sw),
            padding=_axis_padding(conv, 1),
            dilation=(1, dw),
            groups=rank,
        ),
        _make_conv(conv, last[:, :, None, None], bias=_original_bias(conv)),
    )


def _probe_sizes(conv: nn.Conv2d) -> Sequence[_Pair]:
    extent = [d * (k - 1) + 1 for d, k in zip(conv.dilation, conv.kernel_size)]
    base = [e + 2 * s + 3 for e, s in zip(extent, conv.stride)]
    return [(base[0], base[1]), (base[0] + 1, base[1] + 2)]


def check_stack(conv: nn.Conv2d, stack: nn.Sequential) -> None:
    """Raise ``AssertionError`` if ``stack`` cannot stand in for ``conv`` (a bug, not a user error)."""
    convs = [m for m in stack if isinstance(m, nn.Conv2d)]
    problems = []
    if convs[0].in_channels != conv.in_channels or convs[-1].out_channels != conv.out_channels:
        problems.append(
            f"channels {convs[0].in_channels}->{convs[-1].out_channels}, expected {conv.in_channels}->{conv.out_channels}"
        )
    for factor in convs:
        if factor.weight.dtype != conv.weight.dtype or factor.weight.device != conv.weight.device:
            problems.append(f"factor on {factor.weight.dtype}/{factor.weight.device}")
        if factor.padding_mode != conv.padding_mode:
            problems.append(f"padding_mode {factor.padding_mode}")
    if (convs[-1].bias is None) != (conv.bias is None) or any(f.bias is not None for f in convs[:-1]):
        problems.append("bias must sit on the last factor only, as in the original")
    with torch.no_grad():
        for height, width in _probe_sizes(conv):
            probe = torch.zeros(1, conv.in_channels, height, width, dtype=conv.weight.dtype, device=conv.weight.device)
            expected, got = conv(probe).shape, stack(probe).shape
            if expected != got:
                problems.append(f"output {tuple(got)} for input {height}x{width}, expected {tuple(expected)}")
    if problems:
        raise AssertionError(f"factor stack does not match {conv}: " + "; ".join(problems))


def build_patch_extractor(
    conv: nn.Conv2d,
    kernel_size: _Pair,
    *,
    stride: _Pair = (1, 1),
    padding: _Pair | str = (0, 0),
    dilation: _Pair = (1, 1),
) -> nn.Conv2d:
    """A depthwise conv with one-hot kernels whose outputs are the input patches (im2col).

    Output channel ``c*kh*kw + i*kw + j`` is input channel ``c`` shifted by tap ``(i, j)``, in the
    order of ``weight.reshape(out, -1)`` columns. Built with the geometry of the factor that reads
    the patches, so 'same' padding, strides and dilations agree with it exactly.
    """
    kh, kw = kernel_size
    channels = conv.in_channels
    one_hot = torch.eye(kh * kw, dtype=conv.weight.dtype, device=conv.weight.device).reshape(kh * kw, 1, kh, kw)
    weight = one_hot.repeat(channels, 1, 1, 1)
    extractor = _make_conv(conv, weight, stride=stride, padding=padding, dilation=dilation, groups=channels)
    return extractor.requires_grad_(False)


def patch_extractor_for(conv: nn.Conv2d, statistic: str) -> nn.Conv2d | None:
    """The patches a method's first factor reads: ``None`` for plain channels (a 1x1 factor).

    ``patches`` are the original conv's whole input patches (``in*kh*kw``, for ``low_rank``).
    """
    if statistic == "channels":
        return None
    if statistic == "patches":
        pointwise = conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding in ((0, 0), "valid", "same")
        if pointwise:
            return None  # a plain 1x1 conv's patches are its input channels
        return build_patch_extractor(
            conv, conv.kernel_size, stride=conv.stride, padding=factor_padding(conv), dilation=conv.dilation
        )
    if statistic == "channel_patches":
        return build_patch_extractor(
            conv, conv.kernel_size, stride=conv.stride, padding=factor_padding(conv), dilation=conv.dilation
        )
    if statistic == "column_patches":
        return build_patch_extractor(
            conv,
            (conv.kernel_size[0], 1),
            stride=(conv.stride[0], 1),
            padding=_axis_padding(conv, 0),
            dilation=(conv.dilation[0], 1),
        )
    raise ValueError(f"Expected a statistic in channels, patches, channel_patches, column_patches, got {statistic!r}")
