"""The demo CNN: small, fully convolutional up to a global pool, trained on shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from captum_krypton.demo.data import CLASSES

WEIGHTS = Path(__file__).with_name("shapes_cnn.pt")
RESNET_WEIGHTS = Path(__file__).with_name("shapes_resnet.pt")


def _block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class ShapesNet(nn.Module):
    """Five conv blocks (two strided, one max-pool), global average pool, linear."""

    def __init__(self, num_classes: int = len(CLASSES)):
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, 16),
            *_block(16, 24, stride=2),
            *_block(24, 32),
            nn.MaxPool2d(2),
            *_block(32, 48),
            *_block(48, 64, stride=2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (a 1x1 projection when shapes change)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            *_block(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ShapesResNet(nn.Module):
    """A small ResNet: stem, three stages of two basic blocks, global pool, linear."""

    def __init__(self, num_classes: int = len(CLASSES), widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        layers: list[nn.Module] = list(_block(3, widths[0]))
        cin = widths[0]
        for stage, width in enumerate(widths):
            layers += [
                BasicBlock(cin, width, stride=1 if stage == 0 else 2),
                BasicBlock(width, width),
            ]
            cin = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


#: The trained demo models: constructor and the weights shipped in the package.
DEMO_MODELS = {"cnn": (ShapesNet, WEIGHTS), "resnet": (ShapesResNet, RESNET_WEIGHTS)}


def load_demo_model(name: str = "cnn") -> nn.Module:
    """A trained demo model ("cnn" or "resnet"), in eval mode, from the package's weights."""
    if name not in DEMO_MODELS:
        raise ValueError(f"demo model must be one of {sorted(DEMO_MODELS)}, not {name!r}")
    constructor, weights = DEMO_MODELS[name]
    model = constructor()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model.eval()
