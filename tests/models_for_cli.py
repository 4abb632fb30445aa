"""Small models for the CLI and loader tests, at module top level so that pickles of them re-load.

Import this module as ``tests.models_for_cli`` (never as ``models_for_cli``): a pickle names the class
by its module, and subprocesses started in the repository root only know the ``tests.`` spelling.

No ``from __future__ import annotations`` here: it turns ``forward``'s annotations into strings, which
torch.fx copies into the traced graph, where they break pickling (see ``string_annotated_net``).
"""

import torch
from torch import nn

INPUT_SHAPE = (1, 3, 32, 32)
CONV_NAMES = ("conv1", "conv2", "conv3", "head")


class TinyNet(nn.Module):
    """Conv 3->8 3x3 + BN + ReLU, conv 8->16 3x3 stride 2, conv 16->16 3x3, 1x1 conv 16->16, pool, linear."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Conv2d(16, 16, 1)  # a 1x1 conv: spatial_separable must skip it
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.conv2(x))
        x = self.relu(self.conv3(x))
        x = self.head(x)
        return self.fc(self.flatten(self.pool(x)))


def tiny_net() -> TinyNet:
    """A TinyNet with seeded, non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(0)
    model = TinyNet()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    return model.eval()


class OtherNet(nn.Module):
    """A different architecture: its state_dict keys do not fit TinyNet (and vice versa)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def other_net() -> OtherNet:
    return OtherNet().eval()


def needs_argument(width: int) -> TinyNet:
    """A factory that cannot be called with no arguments."""
    return TinyNet(width)


def not_a_module() -> dict:
    """A factory that returns something other than an nn.Module."""
    return {"conv": 1}


def raises() -> nn.Module:
    raise RuntimeError("factory exploded")


NOT_CALLABLE = 42


class StringAnnotatedNet(TinyNet):
    """TinyNet whose ``forward`` has string annotations, as every module in a file with
    ``from __future__ import annotations`` has (compressor.zoo is such a file)."""

    def forward(self, x: "torch.Tensor") -> "torch.Tensor":
        return super().forward(x)


def string_annotated_net() -> StringAnnotatedNet:
    model = StringAnnotatedNet()
    model.load_state_dict(tiny_net().state_dict())
    return model.eval()


class Tripwire:
    """Unpickling this creates the file at ``path``: proof that a pickle ran code while loading."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def linear_only() -> nn.Module:
    """A model without any convolution."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10)).eval()
