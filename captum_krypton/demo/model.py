"""The demo CNN: small, fully convolutional up to a global pool, trained on shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from captum_krypton.demo.data import CLASSES

WEIGHTS = Path(__file__).with_name("shapes_cnn.pt")


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


def load_demo_model() -> ShapesNet:
    """The trained demo model, in eval mode, from the weights shipped in the package."""
    model = ShapesNet()
    model.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    return model.eval()
