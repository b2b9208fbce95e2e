"""Plot speedup vs heatmap SSIM from a benchmarks/approximate.py result into docs/.

python -m benchmarks.plot_approximate [--results PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json

import matplotlib

from benchmarks.approximate import SSIM_TARGET, TARGETS

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def kind(setting: str) -> str:
    if setting.startswith("target_ssim"):
        return "target_ssim"
    if setting.startswith("frozen"):
        return "frozen context (+ drill-down)"
    if "drill-down" in setting and setting.startswith("tau"):
        return "tau + drill-down"
    if "drill-down" in setting:
        return "drill-down"
    return "tau"


def _share_point(row: dict) -> float:
    """The SSIM that 90% of the images reach or beat (the targets' criterion)."""
    ssim = sorted(row["ssim"])
    return ssim[int(0.1 * len(ssim))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results/approximate_issue16.json")
    parser.add_argument("--out", default="docs/approximate.png")
    args = parser.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    results = data["results"]
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), sharey=False)
    markers = {
        "tau": "o",
        "tau + drill-down": "s",
        "drill-down": "^",
        "frozen context (+ drill-down)": "D",
        "target_ssim": "*",
    }
    for axis, result in zip(axes, results):
        for name, marker in markers.items():
            rows = [r for r in result["rows"] if kind(r["setting"]) == name]
            axis.scatter(
                [_share_point(r) for r in rows],
                [r["speedup_vs_naive"] for r in rows],
                marker=marker,
                s=110 if marker == "*" else 40,
                label=name,
            )
        target = TARGETS.get(result["model"])
        if target:
            axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        axis.axvline(SSIM_TARGET, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{result['model']} ({result['size']} px, trained on shapes)")
        axis.set_xlabel("10th-percentile SSIM vs exact over held-out images")
        axis.set_ylabel("speedup vs naive re-inference")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Approximate occlusion on {data['device']}, window 16, stride 4")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
