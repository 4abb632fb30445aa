"""U-Net (Ronneberger et al. 2015) for the zoo: dense logits (N, classes, H, W).

Encoder of double 3x3 conv blocks and max-pooling, decoder of 2x2 stride-2 transposed convs whose
outputs are concatenated with the encoder's skip features. :class:`ShadowedUNet` is the same
network written the way a published segmentation model is: plain attributes named ``modules`` and
``children`` shadow the ``nn.Module`` methods, which the tool must never call through the instance.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["UNet", "ShadowedUNet", "unet", "shadowed_unet"]


class DoubleConv(nn.Sequential):
    """(3x3 conv, BatchNorm, ReLU) twice."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    """Transposed-conv upsampling by 2, concatenation with the skip, double conv."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = DoubleConv(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """Four resolutions (H, H/2, H/4, H/8); H and W must be multiples of 8."""

    def __init__(self, num_classes: int = 21, width: int = 16) -> None:
        super().__init__()
        self.inc = DoubleConv(3, width)
        self.pool = nn.MaxPool2d(2)
        self.down1 = DoubleConv(width, 2 * width)
        self.down2 = DoubleConv(2 * width, 4 * width)
        self.bottom = DoubleConv(4 * width, 8 * width)
        self.up2 = Up(8 * width, 4 * width)
        self.up1 = Up(4 * width, 2 * width)
        self.up0 = Up(2 * width, width)
        self.head = nn.Conv2d(width, num_classes, 1)
        for m in nn.Module.modules(self):
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.inc(x)
        x1 = self.down1(self.pool(x0))
        x2 = self.down2(self.pool(x1))
        x3 = self.bottom(self.pool(x2))
        y = self.up2(x3, x2)
        y = self.up1(y, x1)
        y = self.up0(y, x0)
        return self.head(y)


class ShadowedUNet(UNet):
    """A :class:`UNet` whose root and one block hold plain lists named ``modules`` and ``children``."""

    def __init__(self, num_classes: int = 21, width: int = 16) -> None:
        super().__init__(num_classes=num_classes, width=width)
        # Plain lists are not registered as submodules: they shadow nn.Module.modules() / children().
        self.modules = [self.inc, self.down1, self.down2, self.bottom]
        self.children = [self.up2, self.up1, self.up0]
        self.up1.modules = [self.up1.up, self.up1.conv]
        self.up1.children = [self.up1.up]


def unet(*, num_classes: int = 21, width: int = 16) -> nn.Module:
    """U-Net with base width ``width``; input (N, 3, H, W) with H, W multiples of 8."""
    return UNet(num_classes=num_classes, width=width)


def shadowed_unet(*, num_classes: int = 21, width: int = 16) -> nn.Module:
    """:func:`unet` with ``modules``/``children`` shadowed by plain attributes (as a published model does)."""
    return ShadowedUNet(num_classes=num_classes, width=width)
