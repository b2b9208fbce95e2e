"""Train the demo model on generated shapes and save the weights into the package.

python -m captum_krypton.demo.train [--model cnn|resnet] [--out PATH] [--epochs N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from captum_krypton.demo.data import make_dataset, normalize
from captum_krypton.demo.model import DEMO_MODELS


def train(
    name: str = "cnn", epochs: int = 6, train_count: int = 6000, seed: int = 0
) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    images, labels = make_dataset(train_count, seed=seed)
    test_images, test_labels = make_dataset(800, seed=seed + 1)
    model = DEMO_MODELS[name][0]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = epochs * (train_count // 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(train_count)
        for first in range(0, train_count - 63, 64):
            batch = order[first : first + 64]
            x = normalize(images[batch])
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            loss = loss_fn(model(x), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        accuracy = evaluate(model, test_images, test_labels)
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, held-out accuracy {accuracy:.3f}")
    return model.eval(), accuracy


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    predictions = torch.cat([model(normalize(x)).argmax(1) for x in images.split(200)])
    return (predictions == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="cnn")
    parser.add_argument("--out", help="default: the package's weights of that model")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-count", type=int, default=6000)
    args = parser.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    start = time.perf_counter()
    model, accuracy = train(args.model, args.epochs, args.train_count)
    out = args.out or str(DEMO_MODELS[args.model][1])
    torch.save(model.state_dict(), out)
    print(f"saved {out} (held-out accuracy {accuracy:.3f}, {time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
