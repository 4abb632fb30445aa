"""A YOLOv8-style detector for the zoo: several outputs, one per scale.

The layer patterns of Ultralytics YOLOv8 (not its weights or its exact widths): a backbone of
stride-2 convs and C2f blocks (the CSP design: split, a chain of bottlenecks, concatenate every
intermediate), SPPF (three chained 5x5 max-pools concatenated), a PAN neck (upsample and concat
top-down, stride-2 conv and concat bottom-up), and a decoupled head per scale (box and class
branches concatenated). ``forward`` returns the raw per-scale maps ``(N, 4 * reg_max + classes, H/s, W/s)``
for s = 8, 16, 32, as a tuple: decoding boxes is post-processing, not part of the network.

Channel splits use slicing rather than ``chunk``/``split`` + unpacking, which ``torch.fx`` cannot trace.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["YoloStyle", "yolo_style"]


class ConvBnAct(nn.Module):
    """Conv2d (no bias), BatchNorm, SiLU: Ultralytics' ``Conv``."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.cv1 = ConvBnAct(channels, channels, 3)
        self.cv2 = ConvBnAct(channels, channels, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """CSP bottleneck with two convs: 1x1 to 2c, split, n bottlenecks on one half, concat all, 1x1."""

    def __init__(self, in_channels: int, out_channels: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        self.c = out_channels // 2
        self.cv1 = ConvBnAct(in_channels, 2 * self.c, 1)
        self.cv2 = ConvBnAct((2 + n) * self.c, out_channels, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        parts = [y[:, : self.c], y[:, self.c :]]
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: one 5x5 max-pool applied three times, all four concatenated."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        hidden = in_channels // 2
        self.cv1 = ConvBnAct(in_channels, hidden, 1)
        self.cv2 = ConvBnAct(4 * hidden, out_channels, 1)
        self.pool = nn.MaxPool2d(5, stride=1, padding=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = self.pool(x)
        y2 = self.pool(y1)
        return self.cv2(torch.cat([x, y1, y2, self.pool(y2)], 1))


class DetectHead(nn.Module):
    """Decoupled head for one scale: box regression (4 x reg_max) and class branches, concatenated."""

    def __init__(self, in_channels: int, num_classes: int, reg_max: int, box_width: int, cls_width: int) -> None:
        super().__init__()
        self.box = nn.Sequential(
            ConvBnAct(in_channels, box_width, 3), ConvBnAct(box_width, box_width, 3), nn.Conv2d(box_width, 4 * reg_max, 1)
        )
        self.cls = nn.Sequential(
            ConvBnAct(in_channels, cls_width, 3), ConvBnAct(cls_width, cls_width, 3), nn.Conv2d(cls_width, num_classes, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.box(x), self.cls(x)], 1)


class YoloStyle(nn.Module):
    """Backbone (strides 2..32), SPPF, PAN neck, three detection heads (strides 8, 16, 32).

    H and W must be multiples of 32.
    """

    def __init__(self, num_classes: int = 80, width: int = 16, reg_max: int = 4) -> None:
        super().__init__()
        w = width
        self.stem = ConvBnAct(3, w, 3, 2)  # /2
        self.down1 = ConvBnAct(w, 2 * w, 3, 2)  # /4
        self.stage1 = C2f(2 * w, 2 * w, n=1)
        self.down2 = ConvBnAct(2 * w, 4 * w, 3, 2)  # /8
        self.stage2 = C2f(4 * w, 4 * w, n=2)
        self.down3 = ConvBnAct(4 * w, 8 * w, 3, 2)  # /16
        self.stage3 = C2f(8 * w, 8 * w, n=2)
        self.down4 = ConvBnAct(8 * w, 8 * w, 3, 2)  # /32
        self.stage4 = C2f(8 * w, 8 * w, n=1)
        self.sppf = SPPF(8 * w, 8 * w)
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.top_down4 = C2f(16 * w, 8 * w, n=1, shortcut=False)
        self.top_down3 = C2f(12 * w, 4 * w, n=1, shortcut=False)
        self.bottom_up3 = ConvBnAct(4 * w, 4 * w, 3, 2)
        self.pan4 = C2f(12 * w, 8 * w, n=1, shortcut=False)
        self.bottom_up4 = ConvBnAct(8 * w, 8 * w, 3, 2)
        self.pan5 = C2f(16 * w, 8 * w, n=1, shortcut=False)
        box_width, cls_width = max(16, w), max(num_classes, 4 * w)
        self.heads = nn.ModuleList(
            DetectHead(c, num_classes, reg_max, box_width, cls_width) for c in (4 * w, 8 * w, 8 * w)
        )
        for m in nn.Module.modules(self):
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.stage1(self.down1(self.stem(x)))
        p3 = self.stage2(self.down2(x))
        p4 = self.stage3(self.down3(p3))
        p5 = self.sppf(self.stage4(self.down4(p4)))
        t4 = self.top_down4(torch.cat([self.upsample(p5), p4], 1))
        n3 = self.top_down3(torch.cat([self.upsample(t4), p3], 1))
        n4 = self.pan4(torch.cat([self.bottom_up3(n3), t4], 1))
        n5 = self.pan5(torch.cat([self.bottom_up4(n4), p5], 1))
        return tuple(head(feature) for head, feature in zip(self.heads, (n3, n4, n5)))


def yolo_style(*, num_classes: int = 80, width: int = 16) -> nn.Module:
    """YOLOv8-style detector, base width ``width``; input (N, 3, H, W) with H, W multiples of 32."""
    return YoloStyle(num_classes=num_classes, width=width)
