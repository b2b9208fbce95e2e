"""Plot speedup vs heatmap SSIM from results/approximate.json into docs/approximate.png.

python benchmarks/plot_approximate.py [--results PATH] [--out PATH]
"""

from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: The speedups vs naive re-inference that the approximations aim for.
TARGETS = {"vgg16": 20.0, "resnet18": 8.0, "inception_v3": 6.0}


def kind(setting: str) -> str:
    if setting.startswith("target_ssim"):
        return "target_ssim 0.9"
    if "drill-down" in setting and setting.startswith("tau"):
        return "tau + drill-down 0.2"
    if "drill-down" in setting:
        return "drill-down only"
    return "tau only"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="benchmarks/results/approximate.json")
    parser.add_argument("--out", default="docs/approximate.png")
    args = parser.parse_args()
    with open(args.results) as f:
        data = json.load(f)
    results = data["results"]
    figure, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4.2), sharey=False)
    markers = {
        "tau only": "o",
        "tau + drill-down 0.2": "s",
        "drill-down only": "^",
        "target_ssim 0.9": "*",
    }
    for axis, result in zip(axes, results):
        for name, marker in markers.items():
            rows = [r for r in result["rows"] if kind(r["setting"]) == name]
            axis.scatter(
                [r["ssim_min"] for r in rows],
                [r["speedup_vs_naive"] for r in rows],
                marker=marker,
                s=110 if marker == "*" else 40,
                label=name,
            )
        target = TARGETS.get(result["model"])
        if target:
            axis.axhline(target, color="grey", linestyle="--", linewidth=1, label="target")
        axis.axvline(0.9, color="grey", linestyle=":", linewidth=1)
        axis.set_title(f"{result['model']} ({result['size']} px, trained on shapes)")
        axis.set_xlabel("worst SSIM vs exact over held-out images")
        axis.set_ylabel("speedup vs naive re-inference")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Approximate occlusion on {data['device']}, window 16, stride 4")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
