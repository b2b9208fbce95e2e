"""The hybrid planner's cost model: the minimum cut against brute force, and its plans."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torchvision
from torch import nn

from captum_krypton import IncrementalOcclusion
from captum_krypton.plan.cost import CPU_COSTS, cheapest_full_set, device_costs


def _total(full_set, incremental, full, projection, consumers):
    cost = sum(full[n] if n in full_set else incremental[n] for n in full)
    cost += sum(
        projection[n]
        for n in full
        if n not in full_set and any(r in full_set for r in consumers[n])
    )
    return cost


def _closed(full_set, consumers):
    return all(r in full_set for n in full_set for r in consumers[n])


@pytest.mark.parametrize("seed", range(40))
def test_minimum_cut_matches_brute_force(seed):
    rng = random.Random(seed)
    count = rng.randint(2, 8)
    nodes = list(range(count))
    consumers = {
        n: sorted(rng.sample(nodes[n + 1 :], rng.randint(0, count - n - 1))) for n in nodes
    }
    consumers[count - 1] = []
    incremental = {n: float("inf") if rng.random() < 0.15 else rng.uniform(0, 10) for n in nodes}
    full = {n: rng.uniform(0, 10) for n in nodes}
    projection = {n: rng.uniform(0, 5) for n in nodes}
    chosen = cheapest_full_set(incremental, full, projection, consumers)
    assert _closed(chosen, consumers)
    best = min(
        _total(set(subset), incremental, full, projection, consumers)
        for size in range(count + 1)
        for subset in itertools.combinations(nodes, size)
        if _closed(set(subset), consumers)
    )
    assert _total(chosen, incremental, full, projection, consumers) == pytest.approx(
        best, rel=1e-6, abs=1e-6
    )


def test_full_nodes_make_their_consumers_full():
    model = torchvision.models.resnet18(weights=None).eval()
    plan = IncrementalOcclusion(model).plan(torch.randn(1, 3, 64, 64), (3, 8, 8), strides=4)
    assert plan.estimated_seconds is not None and plan.costs is CPU_COSTS
    for node, node_plan in plan.nodes.items():
        if node_plan.mode == "full":
            assert all(plan.nodes[user].mode == "full" for user in node.users)
    assert "cost model" in plan.summary()


def test_cost_model_keeps_early_layers_boxed_and_late_layers_full():
    model = torchvision.models.vgg11(weights=None).eval()
    plan = IncrementalOcclusion(model).plan(torch.randn(1, 3, 128, 128), (3, 8, 8), strides=8)
    modes = [row["mode"] for row in plan.table()]
    assert modes[1] == "box" and modes[-1] == "full"
    assert modes == sorted(modes, key=lambda m: m == "full")  # a chain switches once
    assert not plan.rerun_whole_model
    assert plan.estimated_full_seconds > plan.estimated_seconds


class GlobalFirst(nn.Module):
    """Squeeze-excite after a tiny first layer: the costly convs cannot stay boxed."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.body = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.Conv2d(32, 32, 3))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        y = self.stem(x)
        y = y * y.mean((2, 3), keepdim=True).sigmoid()
        return self.head(self.body(y).mean((2, 3)))


def test_plan_with_nothing_to_save_reruns_the_whole_model():
    plan = IncrementalOcclusion(GlobalFirst().eval()).plan(
        torch.randn(1, 3, 32, 32), (3, 4, 4), strides=4
    )
    assert plan.rerun_whole_model
    assert "plain re-inference of the whole model" in plan.summary()


def test_a_coverage_threshold_replaces_the_cost_model():
    model = torchvision.models.vgg11(weights=None).eval()
    occlusion = IncrementalOcclusion(model)
    x = torch.randn(1, 3, 64, 64)
    plan = occlusion.plan(x, (3, 8, 8), strides=8, full_threshold=0.2)
    assert plan.estimated_seconds is None and plan.costs is None
    for row in plan.table():
        if row["mode"] == "box" and row["map"]:
            box = torch.tensor(row["box"]).prod().item()
            assert box < 0.2 * torch.tensor(row["map"]).prod().item()


def test_cpu_rates_are_fixed():
    assert device_costs(torch.device("cpu"), torch.float32) is CPU_COSTS
