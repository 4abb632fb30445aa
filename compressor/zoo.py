"""Small, self-written CNN architectures for the demo, the tests and the benchmarks.

torchvision and timm cannot be installed in the environments this project is developed and
tested in, so the architectures the converter is meant for are re-written here in plain
``torch.nn`` / ``torch.nn.functional``.  They mimic the *layer patterns* of the real ones (and,
for the ResNets and MobileNetV2, torchvision's attribute names, so qualified names such as
``layer1.0.conv1`` or ``features.3.conv.1.0`` look familiar), but they are not weight-compatible
with torchvision checkpoints and are not meant to be.  The one exception is
:func:`resnet20_cifar`, which loads the real pretrained CIFAR-10 ResNet-20 state dict
(``resnet20-cifar10.pth``) exactly.

Every factory

* can be called with no arguments (``--arch compressor.zoo:resnet18`` works),
* takes keyword-only options ``num_classes`` and ``width`` (the base channel count, so tests can
  build tiny versions; :func:`mobilenet_v2` takes ``width_mult`` instead),
* returns an ``nn.Module`` whose convolutions are ``nn.Conv2d`` submodules with stable qualified
  names (the only exception is the deliberate functional ``F.conv2d`` in :func:`edge_cases`),
* initialises weights from the global torch RNG only, so ``torch.manual_seed`` makes it
  deterministic.

All classes are defined at module top level, so ``torch.save(model)`` pickles and reloads in a
fresh process (as long as ``compressor.zoo`` is importable there).

Weights are randomly initialised (Kaiming-normal convs, BatchNorm weight 1 / bias 0 and running
statistics 0 / 1).  Call :func:`randomize_batchnorm` to give every BatchNorm layer random,
non-trivial affine parameters and running statistics, so that tests exercise BN numerics.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CIFAR10_MEAN",
    "resnet32_cifar",
    "CIFAR10_STD",
    "ZOO",
    "default_input_shape",
    "randomize_batchnorm",
    "resnet18",
    "resnet50",
    "resnet20_cifar",
    "vgg11_bn",
    "mobilenet_v2",
    "inception_style",
    "deeplab_style",
    "edge_cases",
    "untraceable",
    "unet",
    "shadowed_unet",
    "yolo_style",
]

#: Normalisation the pretrained ``resnet20-cifar10.pth`` was trained with (these are the
#: ImageNet statistics, as used by akamaster/pytorch_resnet_cifar10, not CIFAR-10's own).
CIFAR10_MEAN: Tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR10_STD: Tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _scale(channels: int, width: int, base: int) -> int:
    """``channels`` scaled by ``width / base``, at least 1."""
    return max(1, int(round(channels * width / base)))


def _init_weights(model: nn.Module, residual_gain: float = 0.5) -> nn.Module:
    """Deterministic initialisation from the global RNG.

    Like torchvision, except that convs use Kaiming-normal with ``mode="fan_in"`` (torchvision's
    ``fan_out`` makes depthwise convs shrink the signal, so a random MobileNetV2 outputs ~1e-9)
    and the last conv of every residual branch is scaled by ``residual_gain`` (otherwise, with
    BatchNorm in eval mode at identity statistics, a random ResNet-50 outputs values ~1e3).  The
    result: random models give outputs of order 1, which keeps numerical comparisons meaningful.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Bottleneck):
                m.conv3.weight.mul_(residual_gain)
            elif isinstance(m, (BasicBlock, CifarBasicBlock)):
                m.conv2.weight.mul_(residual_gain)
    return model


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm layer random, non-trivial parameters and running statistics.

    weight ~ U(0.5, 1.5), bias ~ N(0, 0.2^2), running_mean ~ N(0, 0.2^2),
    running_var ~ U(0.5, 2.0).  Uses a private generator seeded with ``seed`` (the global RNG is
    untouched), walks modules in ``named_modules`` order, and modifies ``model`` in place.
    Returns ``model`` for chaining.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            n = m.num_features
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(n, generator=gen))
            if m.bias is not None:
                m.bias.copy_(0.2 * torch.randn(n, generator=gen))
            if m.running_mean is not None:
                m.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            if m.running_var is not None:
                m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=gen))
    return model


# --------------------------------------------------------------------------------------------
# ResNet-18 / ResNet-50 (torchvision layout)
# --------------------------------------------------------------------------------------------


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1,
            dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (as in torchvision)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation,
                     groups=groups, bias=False, dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (as in torchvision)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision ``BasicBlock`` (with optional dilation, used by :func:`deeplab_style`)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride, dilation=dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu(out)
        return out


class Bottleneck(nn.Module):
    """torchvision ``Bottleneck`` (ResNet v1.5: the stride sits on the 3x3 conv)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation=dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision-style ImageNet ResNet with base width ``width`` (64 in torchvision)."""

    def __init__(self, block: type, layers: Sequence[int], num_classes: int = 1000,
                 width: int = 64) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        _init_weights(self)

    def _make_layer(self, block: type, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def resnet18(*, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """ResNet-18 (BasicBlock, [2, 2, 2, 2]) in torchvision's layout; ``width`` = base width."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, width=width)


def resnet50(*, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """ResNet-50 v1.5 (Bottleneck, [3, 4, 6, 3]) in torchvision's layout."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# CIFAR ResNet-20 (He et al. 2016, sec. 4.2; akamaster/pytorch_resnet_cifar10 layout)
# --------------------------------------------------------------------------------------------


class OptionAShortcut(nn.Module):
    """Parameter-free "option A" shortcut: subsample by 2, zero-pad the channel dimension.

    With the default ``in_planes = planes // 2`` this is exactly
    ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))``.
    """

    def __init__(self, planes: int, in_planes: Optional[int] = None) -> None:
        super().__init__()
        if in_planes is None:
            in_planes = planes // 2
        extra = planes - in_planes
        if extra < 0:
            raise ValueError(f"OptionAShortcut cannot shrink channels ({in_planes} -> {planes})")
        self.planes = planes
        self.in_planes = in_planes
        self.pad_front = extra // 2
        self.pad_back = extra - extra // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"{self.in_planes} -> {self.planes}, pad=({self.pad_front}, {self.pad_back})"


class CifarBasicBlock(nn.Module):
    """Basic block of the CIFAR ResNets (option-A shortcut)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = OptionAShortcut(planes, in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        out = F.relu(out)
        return out


class CifarResNet(nn.Module):
    """CIFAR ResNet (6n+2 layers); keys match akamaster/pytorch_resnet_cifar10."""

    def __init__(self, num_blocks: Sequence[int] = (3, 3, 3), num_classes: int = 10,
                 width: int = 16) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(width * 2, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(width * 4, num_blocks[2], stride=2)
        self.linear = nn.Linear(width * 4, num_classes)
        _init_weights(self)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(CifarBasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = F.adaptive_avg_pool2d(out, 1)
        out = torch.flatten(out, 1)
        out = self.linear(out)
        return out


def resnet20_cifar(*, num_classes: int = 10, width: int = 16) -> nn.Module:
    """CIFAR-10 ResNet-20; at the defaults it loads ``resnet20-cifar10.pth`` with strict=True.

    Inputs: RGB in [0, 1] normalised with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`, 32x32.
    """
    return CifarResNet((3, 3, 3), num_classes=num_classes, width=width)


def resnet32_cifar(*, num_classes: int = 10, width: int = 16) -> nn.Module:
    """CIFAR-10 ResNet-32 (5 blocks a stage); at the defaults it loads ``resnet32-cifar10.pth``."""
    return CifarResNet((5, 5, 5), num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# VGG-11 with BatchNorm
# --------------------------------------------------------------------------------------------

_VGG11_CFG: List[object] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG(nn.Module):
    """torchvision-style VGG: ``features`` / ``avgpool`` / ``classifier``."""

    def __init__(self, features: nn.Sequential, out_channels: int, hidden: int,
                 num_classes: int = 1000, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(out_channels * 7 * 7, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def vgg11_bn(*, num_classes: int = 1000, width: int = 64) -> nn.Module:
    """VGG-11 with BatchNorm (torchvision config "A"); channels and classifier scale with width.

    At the default width this has torchvision's sizes (about 133M parameters, most of them in
    the classifier); the classifier's hidden size is ``64 * width``.
    """
    layers: List[nn.Module] = []
    in_channels = 3
    for v in _VGG11_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            c = _scale(int(v), width, 64)  # type: ignore[arg-type]
            layers += [nn.Conv2d(in_channels, c, kernel_size=3, padding=1), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True)]
            in_channels = c
    return VGG(nn.Sequential(*layers), in_channels, _scale(4096, width, 64),
               num_classes=num_classes)


# --------------------------------------------------------------------------------------------
# MobileNetV2 (torchvision layout)
# --------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8, min_value: Optional[int] = None) -> int:
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:  # do not round down by more than 10%
        new_v += divisor
    return new_v


class ConvBNActivation(nn.Sequential):
    """Conv2d + BatchNorm2d + activation (torchvision's ``Conv2dNormActivation``)."""

    def __init__(self, in_planes: int, out_planes: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, activation: type = nn.ReLU6) -> None:
        padding = (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_planes, out_planes, kernel_size, stride, padding, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_planes),
            activation(inplace=True),
        )
        self.out_channels = out_planes


class InvertedResidual(nn.Module):
    """MobileNetV2 block: expand 1x1 -> depthwise 3x3 -> project 1x1 (+ residual)."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride should be 1 or 2, got {stride}")
        self.stride = stride
        hidden_dim = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNActivation(inp, hidden_dim, kernel_size=1))
        layers += [
            ConvBNActivation(hidden_dim, hidden_dim, stride=stride, groups=hidden_dim),
            nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    _SETTING = [
        # t, c, n, s
        [1, 16, 1, 1],
        [6, 24, 2, 2],
        [6, 32, 3, 2],
        [6, 64, 4, 2],
        [6, 96, 3, 1],
        [6, 160, 3, 2],
        [6, 320, 1, 1],
    ]

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0,
                 round_nearest: int = 8, dropout: float = 0.2) -> None:
        super().__init__()
        input_channel = _make_divisible(32 * width_mult, round_nearest)
        self.last_channel = _make_divisible(1280 * max(1.0, width_mult), round_nearest)
        features: List[nn.Module] = [ConvBNActivation(3, input_channel, stride=2)]
        for t, c, n, s in self._SETTING:
            output_channel = _make_divisible(c * width_mult, round_nearest)
            for i in range(n):
                features.append(InvertedResidual(input_channel, output_channel,
                                                  s if i == 0 else 1, expand_ratio=t))
                input_channel = output_channel
        features.append(ConvBNActivation(input_channel, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        x = self.classifier(x)
        return x


def mobilenet_v2(*, num_classes: int = 1000, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 in torchvision's layout (``features.N``, ``classifier``)."""
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult)


# --------------------------------------------------------------------------------------------
# Inception-v3-like
# --------------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv2d (no bias) + BatchNorm2d(eps=1e-3) + ReLU, as in torchvision's Inception3."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = self.bn(x)
        return F.relu(x, inplace=True)


class InceptionA(nn.Module):
    """1x1 / 5x5 / double-3x3 / avg-pool branches."""

    def __init__(self, in_channels: int, pool_features: int, width: int = 32) -> None:
        super().__init__()
        s = lambda c: _scale(c, width, 32)  # noqa: E731  (not stored on the module)
        self.branch1x1 = BasicConv2d(in_channels, s(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, s(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(s(48), s(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, s(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)
        self.out_channels = s(64) + s(64) + s(96) + pool_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch5x5, branch3x3dbl, branch_pool], 1)


class InceptionB(nn.Module):
    """Grid reduction: 3x3 stride 2 / double-3x3 stride 2 / max-pool."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        s = lambda c: _scale(c, width, 32)  # noqa: E731
        self.branch3x3 = BasicConv2d(in_channels, s(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, s(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(64), s(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(s(96), s(96), kernel_size=3, stride=2)
        self.out_channels = s(384) + s(96) + in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch3x3 = self.branch3x3(x)
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        branch_pool = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionC(nn.Module):
    """Factorised 7x7 branches (1x7 / 7x1) + 1x1 + avg-pool branch."""

    def __init__(self, in_channels: int, channels_7x7: int, width: int = 32) -> None:
        super().__init__()
        s = lambda c: _scale(c, width, 32)  # noqa: E731
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, s(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, s(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.out_channels = 4 * s(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        branch7x7dbl = self.branch7x7dbl_1(x)
        branch7x7dbl = self.branch7x7dbl_2(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_3(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_4(branch7x7dbl)
        branch7x7dbl = self.branch7x7dbl_5(branch7x7dbl)
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch7x7, branch7x7dbl, branch_pool], 1)


class InceptionE(nn.Module):
    """Expanded filter bank: 1x1 / (1x3 | 3x1) / 3x3 -> (1x3 | 3x1) / avg-pool branches."""

    def __init__(self, in_channels: int, width: int = 32) -> None:
        super().__init__()
        s = lambda c: _scale(c, width, 32)  # noqa: E731
        self.branch1x1 = BasicConv2d(in_channels, s(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, s(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(s(384), s(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(s(384), s(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, s(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(s(448), s(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(s(384), s(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(s(384), s(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, s(192), kernel_size=1)
        self.out_channels = s(320) + 4 * s(384) + s(192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch1x1 = self.branch1x1(x)
        branch3x3 = self.branch3x3_1(x)
        branch3x3 = torch.cat([self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], 1)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        branch3x3dbl = torch.cat(
            [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], 1)
        branch_pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1)
        branch_pool = self.branch_pool(branch_pool)
        return torch.cat([branch1x1, branch3x3, branch3x3dbl, branch_pool], 1)


class InceptionStyle(nn.Module):
    """A shortened Inception-v3: the v3 stem, Mixed_5b (A), Mixed_6a (B), Mixed_6b/6c (C),
    Mixed_7b (E), global pool, dropout, fc.  At ``width=32`` the channel counts of each block
    equal torchvision's.  Needs inputs of at least 75x75 (299x299 is the native size)."""

    def __init__(self, num_classes: int = 1000, width: int = 32, dropout: float = 0.5) -> None:
        super().__init__()
        s = lambda c: _scale(c, width, 32)  # noqa: E731
        self.Conv2d_1a_3x3 = BasicConv2d(3, s(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(s(32), s(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(s(32), s(64), kernel_size=3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(s(64), s(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(s(80), s(192), kernel_size=3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(s(192), pool_features=s(32), width=width)
        self.Mixed_6a = InceptionB(self.Mixed_5b.out_channels, width=width)
        self.Mixed_6b = InceptionC(self.Mixed_6a.out_channels, channels_7x7=s(128), width=width)
        self.Mixed_6c = InceptionC(self.Mixed_6b.out_channels, channels_7x7=s(160), width=width)
        self.Mixed_7b = InceptionE(self.Mixed_6c.out_channels, width=width)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(self.Mixed_7b.out_channels, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = self.maxpool1(x)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = self.maxpool2(x)
        x = self.Mixed_5b(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x = self.Mixed_7b(x)
        x = self.avgpool(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return x


def inception_style(*, num_classes: int = 1000, width: int = 32) -> nn.Module:
    """Small Inception-v3-like classifier (inputs >= 75x75; native 299x299)."""
    return InceptionStyle(num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# DeepLab-v3-like segmentation net
# --------------------------------------------------------------------------------------------


class DilatedResNetBackbone(nn.Module):
    """ResNet-18-like backbone, output stride 16: ``layer4`` uses dilation 2 instead of stride."""

    def __init__(self, width: int = 32, layers: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], dilation=2)
        self.out_channels = width * 8

    def _make_layer(self, planes: int, blocks: int, stride: int = 1,
                    dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, dilation=dilation)]
        self.inplanes = planes
        for _ in range(1, blocks):
            layers.append(BasicBlock(planes, planes, dilation=dilation))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x


class ASPPConv(nn.Sequential):
    """3x3 atrous conv (padding = dilation) + BN + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class ASPPPooling(nn.Sequential):
    """Image-pooling branch: global average pool -> 1x1 conv -> BN -> ReLU -> upsample back.

    Note (as in torchvision): its BatchNorm sees a 1x1 map, so train mode needs batch size > 1.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        for mod in self:
            x = mod(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, three atrous 3x3, image pooling; concat; project."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int],
                 out_channels: int = 256) -> None:
        super().__init__()
        modules: List[nn.Module] = [
            nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                          nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))
        ]
        for rate in atrous_rates:
            modules.append(ASPPConv(in_channels, out_channels, rate))
        modules.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res = [conv(x) for conv in self.convs]
        return self.project(torch.cat(res, dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP -> 3x3 conv + BN + ReLU -> 1x1 classifier conv (torchvision's DeepLabHead)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256,
                 atrous_rates: Sequence[int] = (6, 12, 18)) -> None:
        super().__init__(
            ASPP(in_channels, atrous_rates, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, num_classes, 1),
        )


class DeepLabStyle(nn.Module):
    """DeepLab-v3-like: dilated ResNet backbone + ASPP head, logits upsampled to input size."""

    def __init__(self, num_classes: int = 21, width: int = 32) -> None:
        super().__init__()
        self.backbone = DilatedResNetBackbone(width=width)
        self.classifier = DeepLabHead(self.backbone.out_channels, num_classes,
                                      channels=8 * width)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape[-2:]
        features = self.backbone(x)
        out = self.classifier(features)
        return F.interpolate(out, size=input_shape, mode="bilinear", align_corners=False)


def deeplab_style(*, num_classes: int = 21, width: int = 32) -> nn.Module:
    """DeepLab-v3-like segmentation net; returns logits (N, num_classes, H, W)."""
    return DeepLabStyle(num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# Edge cases for the converter
# --------------------------------------------------------------------------------------------


class EdgeCases(nn.Module):
    """One model containing the awkward convolution kinds a converter has to handle.

    Input (N, 3, 32, 32).  ``c = 2 * width`` channels in the middle (16 by default); the odd
    channel counts 7 and 13 are fixed.  In forward order:

    ============================  =============================================================
    ``conv_bias``                 3 -> 7, 3x3, padding 1, **with bias**, odd channel count
    ``conv_bn`` + ``bn``          7 -> 13, 3x3, no bias, followed by BatchNorm
    ``conv_stride2``              13 -> c, 3x3, stride 2, padding 1 (32x32 -> 16x16)
    ``conv_dilated``              3x3, dilation 2, padding 2
    ``conv_same_odd``             5x5, ``padding='same'``
    ``conv_same_even``            4x4, ``padding='same'`` (asymmetric padding inside torch)
    ``conv_1x5``, ``conv_5x1``    (1, 5) padding (0, 2); (5, 1) padding (2, 0)
    ``conv_fanout``               3x3 whose output feeds ``conv_branch``, a ReLU and an add
    ``conv_branch``               3x3 on the fan-out; the branches are summed
    ``conv_reflect``              3x3, ``padding_mode='reflect'``
    ``conv_grouped``              3x3, groups=2
    ``conv_depthwise``            3x3, groups=c
    ``func_weight``/``func_bias`` functional ``F.conv2d`` with registered nn.Parameters
    ``conv_shared``               3x3 module called twice (shared weights, same shapes)
    ``conv_1x1``                  c -> 13, 1x1
    ``conv_stride21``             13 -> 7, 3x3, stride (2, 1), padding (2, 1) (16x16 -> 9x16)
    ``fc``                        global average pool + Linear(7, num_classes)
    ============================  =============================================================
    """

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        c = 2 * width
        self.conv_bias = nn.Conv2d(3, 7, 3, padding=1, bias=True)
        self.conv_bn = nn.Conv2d(7, 13, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(13)
        self.conv_stride2 = nn.Conv2d(13, c, 3, stride=2, padding=1)
        self.conv_dilated = nn.Conv2d(c, c, 3, padding=2, dilation=2)
        self.conv_same_odd = nn.Conv2d(c, c, 5, padding="same")
        self.conv_same_even = nn.Conv2d(c, c, 4, padding="same")
        self.conv_1x5 = nn.Conv2d(c, c, (1, 5), padding=(0, 2))
        self.conv_5x1 = nn.Conv2d(c, c, (5, 1), padding=(2, 0))
        self.conv_fanout = nn.Conv2d(c, c, 3, padding=1)
        self.conv_branch = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv_reflect = nn.Conv2d(c, c, 3, padding=1, padding_mode="reflect")
        self.conv_grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.conv_depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.func_weight = nn.Parameter(torch.empty(c, c, 3, 3))
        self.func_bias = nn.Parameter(torch.zeros(c))
        self.conv_shared = nn.Conv2d(c, c, 3, padding=1)
        self.conv_1x1 = nn.Conv2d(c, 13, 1)
        self.conv_stride21 = nn.Conv2d(13, 7, 3, stride=(2, 1), padding=(2, 1))
        self.fc = nn.Linear(7, num_classes)
        _init_weights(self)
        nn.init.kaiming_normal_(self.func_weight, mode="fan_in", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv_bias(x))
        x = F.relu(self.bn(self.conv_bn(x)))
        x = F.relu(self.conv_stride2(x))
        x = F.relu(self.conv_dilated(x))
        x = F.relu(self.conv_same_odd(x))
        x = self.conv_same_even(x)
        x = self.conv_5x1(self.conv_1x5(x))
        y = self.conv_fanout(x)
        x = y + self.conv_branch(y) + F.relu(y)
        x = F.relu(self.conv_reflect(x))
        x = F.relu(self.conv_grouped(x))
        x = F.relu(self.conv_depthwise(x))
        x = F.conv2d(x, self.func_weight, self.func_bias, stride=1, padding=1)
        x = F.relu(self.conv_shared(x))
        x = self.conv_shared(x)
        x = F.relu(self.conv_1x1(x))
        x = self.conv_stride21(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.fc(x)


def edge_cases(*, num_classes: int = 10, width: int = 8) -> nn.Module:
    """Awkward conv kinds in one FX-traceable model; input (N, 3, 32, 32).

    See :class:`EdgeCases` for the list of layers.
    """
    return EdgeCases(num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# Not FX-traceable
# --------------------------------------------------------------------------------------------


class Untraceable(nn.Module):
    """Small conv net whose forward branches on tensor *values* (``if x.mean() > 0``), so
    ``torch.fx.symbolic_trace`` raises; it runs fine eagerly.  Input (N, 3, 32, 32)."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3a = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.conv3b = nn.Conv2d(2 * width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        if x.mean() > 0.5:  # data-dependent control flow: not symbolically traceable
            x = self.conv3a(x)
        else:
            x = self.conv3b(x)
        x = F.relu(x)
        x = F.adaptive_avg_pool2d(x, 1)
        x = torch.flatten(x, 1)
        return self.fc(x)


def untraceable(*, num_classes: int = 10, width: int = 8) -> nn.Module:
    """Conv net with data-dependent Python control flow (torch.fx.symbolic_trace fails)."""
    return Untraceable(num_classes=num_classes, width=width)


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

# Dense and multi-output heads live in their own modules (one model family each).
from compressor.zoo_unet import shadowed_unet, unet  # noqa: E402
from compressor.zoo_yolo import yolo_style  # noqa: E402

ZOO: Dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet50": resnet50,
    "resnet20_cifar": resnet20_cifar,
    "vgg11_bn": vgg11_bn,
    "mobilenet_v2": mobilenet_v2,
    "inception_style": inception_style,
    "deeplab_style": deeplab_style,
    "edge_cases": edge_cases,
    "untraceable": untraceable,
    "unet": unet,
    "shadowed_unet": shadowed_unet,
    "yolo_style": yolo_style,
}

_DEFAULT_INPUT_SHAPES: Dict[str, Tuple[int, int, int, int]] = {
    "resnet18": (1, 3, 224, 224),
    "resnet50": (1, 3, 224, 224),
    "resnet20_cifar": (1, 3, 32, 32),
    "vgg11_bn": (1, 3, 224, 224),
    "mobilenet_v2": (1, 3, 224, 224),
    "inception_style": (1, 3, 299, 299),
    "deeplab_style": (1, 3, 128, 128),
    "edge_cases": (1, 3, 32, 32),
    "untraceable": (1, 3, 32, 32),
    "unet": (1, 3, 128, 128),
    "shadowed_unet": (1, 3, 128, 128),
    "yolo_style": (1, 3, 256, 256),
}


def default_input_shape(name: str) -> Tuple[int, int, int, int]:
    """Natural NCHW input shape (batch 1) for a zoo model.

    ``name`` is a key of :data:`ZOO`; a ``module:function`` spec such as
    ``"compressor.zoo:resnet18"`` is accepted too.
    """
    key = name.rsplit(":", 1)[-1]
    try:
        return _DEFAULT_INPUT_SHAPES[key]
    except KeyError:
        known = sorted(_DEFAULT_INPUT_SHAPES)
        raise KeyError(f"unknown zoo model {name!r}; known: {known}") from None
