"""Small models for argument-form and fallback tests."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, pool, residual add, global pool, linear: (N, C_out) output."""

    def __init__(self, in_channels: int = 3, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = x + torch.relu(self.conv2(x))
        return torch.relu(self.conv3(self.pool(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean((2, 3)))


class ScaledCNN(SmallCNN):
    """Takes an additional per-example tensor and a Python flag."""

    def forward(self, x, scale, negate=False):
        out = self.fc(self.features(x).mean((2, 3))) * scale[:, None]
        return -out if negate else out


class IntInputCNN(SmallCNN):
    def forward(self, x):
        return super().forward(x.float() / 10.0)


class SingleOutputCNN(SmallCNN):
    """Output (N,) or (N, 1)."""

    def __init__(self, keepdim: bool):
        super().__init__(classes=1)
        self.keepdim = keepdim

    def forward(self, x):
        out = super().forward(x)
        return out if self.keepdim else out[:, 0]


class DenseHeadCNN(SmallCNN):
    """Output (N, C, H, W): a segmentation-style map, selected by tuple targets."""

    def forward(self, x):
        return self.features(x)


def small_cnn(cls=SmallCNN, *args) -> nn.Module:
    torch.manual_seed(1)
    model = cls(*args)
    model.bn1.running_mean.uniform_(-0.3, 0.3)
    model.bn1.running_var.uniform_(0.5, 1.5)
    return model.eval()


@torch.library.custom_op("krypton_tests::fail_on_large_batch", mutates_args=())
def fail_on_large_batch(x: torch.Tensor, limit: int) -> torch.Tensor:
    """Raises once a batch holds more than `limit` rows: an opaque op, captured as
    one node, that fails at run time (as a layer failing midway would)."""
    if x.shape[0] > limit:
        raise RuntimeError(f"batch of {x.shape[0]} is too large")
    return x.clone()


@fail_on_large_batch.register_fake
def _(x: torch.Tensor, limit: int) -> torch.Tensor:
    return torch.empty_like(x)


class FailsMidwayCNN(SmallCNN):
    def forward(self, x):
        return self.fc(fail_on_large_batch(self.features(x), 4).mean((2, 3)))


class DataDependentCNN(SmallCNN):
    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor: not traceable
            x = -x
        return super().forward(x)


class TwoInputCNN(SmallCNN):
    def forward(self, x, y):
        return super().forward(x + y)


class SummedCNN(SmallCNN):
    def forward(self, x):
        return super().forward(x).sum()
