"""Command line: `captum-krypton demo` (or `python -m captum_krypton demo`), and
`captum-krypton attribute` for data sets (under torchrun for several processes)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence


def _best_time(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def demo(args: argparse.Namespace) -> int:
    """Explain the bundled shapes model on a generated image; save a PNG; compare times."""
    import matplotlib
    import numpy as np
    import torch

    matplotlib.use("Agg")
    from captum.attr import Occlusion
    from captum.attr import visualization as viz

    from captum_krypton import IncrementalOcclusion
    from captum_krypton.demo.data import CLASSES, make_image, normalize
    from captum_krypton.demo.model import load_demo_model

    model = load_demo_model()
    image, centre = make_image(np.random.default_rng(args.seed), args.seed % len(CLASSES))
    image = torch.from_numpy(image)[None]
    inputs = normalize(image)
    with torch.no_grad():
        probabilities = model(inputs).softmax(1)[0]
    target = int(probabilities.argmax())
    print(
        f"image seed {args.seed}: a {CLASSES[args.seed % len(CLASSES)]} at {centre}; "
        f"model says {CLASSES[target]} ({probabilities[target]:.1%})"
    )
    window = (3, args.window, args.window)
    occlusion = IncrementalOcclusion(model)
    options = dict(sliding_window_shapes=window, strides=args.stride, target=target, baselines=0.0)
    plan = occlusion.plan(inputs, window, strides=args.stride)
    windows = plan.nodes[plan.captured.input_node].geometry.starts.shape[0]
    print(f"{windows} windows of {window}, stride {args.stride}, on {tuple(inputs.shape)}")
    print(plan.summary())

    ours_time, attribution = _best_time(
        lambda: occlusion.attribute(inputs, **options), args.repeats
    )
    print(f"IncrementalOcclusion:              {ours_time:7.3f} s")
    if not args.skip_captum:
        captum_time, expected = _best_time(
            lambda: Occlusion(model).attribute(inputs, perturbations_per_eval=64, **options),
            args.repeats,
        )
        difference = (attribution - expected).abs().max().item()
        print(f"captum Occlusion (perturbations_per_eval=64): {captum_time:7.3f} s")
        print(
            f"speedup {captum_time / ours_time:.2f}x (plan's FLOP limit "
            f"{plan.theoretical_speedup:.2f}x); largest difference {difference:.2e}"
        )

    figure, _ = viz.visualize_image_attr_multiple(
        attribution[0].permute(1, 2, 0).numpy(),
        image[0].permute(1, 2, 0).numpy(),
        methods=["original_image", "heat_map", "blended_heat_map"],
        signs=["all", "positive", "positive"],
        titles=["input", f"occlusion for '{CLASSES[target]}'", "overlay"],
        show_colorbar=True,
        use_pyplot=False,
        fig_size=(12, 4),
    )
    figure.savefig(args.out, bbox_inches="tight", dpi=100)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="captum-krypton", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help=demo.__doc__)
    demo_parser.add_argument("--out", default="occlusion_demo.png", help="PNG to write")
    demo_parser.add_argument("--seed", type=int, default=2, help="which generated image")
    demo_parser.add_argument("--window", type=int, default=12, help="window side (pixels)")
    demo_parser.add_argument("--stride", type=int, default=3, help="window step (pixels)")
    demo_parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    demo_parser.add_argument("--skip-captum", action="store_true", help="don't time Captum")
    run_parser = commands.add_parser(
        "attribute",
        help="occlusion maps of a data set into a Zarr array or .npy files (torchrun-ready)",
        description=attribute.__doc__,
        epilog="example: captum-krypton attribute --model mymodels:load --data images/ "
        "--out maps/ --window 16 --stride 8 --target top  (MODULE is imported from the "
        "current folder, as `python -m` does; with --nproc-per-node or under torchrun the "
        "ranks share the items; Ctrl-C stops with one line per rank, and the same command "
        "resumes)",
    )
    run_parser.add_argument(
        "--model", required=True, help="MODULE:FN, a function returning the model (nn.Module)"
    )
    run_parser.add_argument(
        "--data",
        required=True,
        help="a directory of (C, H, W) .npy images, already normalized (+ labels.npy, one "
        "label per image in file-name order), or MODULE:FN returning (images, labels)",
    )
    run_parser.add_argument(
        "--out",
        required=True,
        help="directory for the maps and their manifest.json (settings, item names, "
        "versions); items already there are skipped, so the same command resumes",
    )
    run_parser.add_argument(
        "--format",
        choices=("zarr", "npy"),
        default="zarr",
        help="zarr (default): one Zarr v3 array OUT/attributions, float32 (items, H, W), "
        "one chunk per item, NaN where not computed, and OUT/targets (needs zarr, "
        "pip install 'captum-krypton[dataset]'); npy: one (H, W) float32 .npy per item, "
        "named after its input file, or NNNNNN.npy by index for MODULE:FN data (for "
        "items of several sizes). The window spans all channels, so every channel's "
        "map is the same and one map is kept per item",
    )
    run_parser.add_argument(
        "--window", type=int, default=12, help="window side in pixels (default 12)"
    )
    run_parser.add_argument(
        "--stride", type=int, default=6, help="window step in pixels (default 6)"
    )
    run_parser.add_argument(
        "--target",
        default="label",
        help="'label' (from the data), 'top' (the model's top class) or a class index",
    )
    run_parser.add_argument(
        "--baseline",
        type=float,
        default=0.0,
        help="value of occluded pixels, in the input's normalized units (default 0, "
        "Captum's default)",
    )
    run_parser.add_argument(
        "--nproc-per-node",
        default=None,
        metavar="N",
        help="run N ranks on this machine, one per GPU ('gpu': as many as there are "
        "GPUs), without torchrun: this process is rank 0 and starts the others first, "
        "so their start overlaps its work (use torchrun for several machines)",
    )
    run_parser.add_argument(
        "--no-tf32",
        action="store_true",
        help="float32 convolutions and matrix products without TF32 on GPUs "
        "(torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = "
        "False): slower, and maps that agree across GPUs and processes to float32 "
        "rounding; with TF32 (PyTorch's default for convolutions) each process's "
        "cuDNN choices round differently",
    )
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return {"demo": demo, "attribute": attribute}[args.command](args)


def attribute(args: argparse.Namespace) -> int:
    """Attribute every item of a data set (this rank's share under torchrun)."""
    from captum_krypton.parallel.launch import LocalRanks, RankFailed, rank_command

    local_ranks = None
    if args.nproc_per_node is not None and "WORLD_SIZE" not in os.environ:
        count = args.nproc_per_node
        if count == "gpu":
            import torch

            processes = torch.cuda.device_count()
        else:
            processes = int(count)
        if processes > 1:
            local_ranks = LocalRanks(rank_command(args.argv), processes)
            local_ranks.start()  # before the imports below: the others start meanwhile

    import math

    import torch

    from captum_krypton import IncrementalOcclusion
    from captum_krypton.parallel.distributed import run

    if not math.isfinite(args.baseline):
        raise SystemExit("captum-krypton attribute: --baseline must be a finite number")
    if args.target not in ("label", "top") and not (
        args.target.isdigit() and int(args.target) >= 0
    ):
        raise SystemExit(
            f"captum-krypton attribute: --target must be 'label', 'top' or a class index "
            f"(0, 1, ...), not {args.target!r}"
        )

    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # MODULE:FN from the current folder, as `python -m`
    try:
        run(
            args.model,
            args.data,
            args.out,
            args.window,
            args.stride,
            args.target,
            baseline=args.baseline,
            make_occlusion=IncrementalOcclusion,
            output_format=args.format,
            local_ranks=local_ranks,
        )
    except KeyboardInterrupt:  # the rank has said where it stopped
        return 130
    except RankFailed as exc:
        print(f"rank 0: stopped: {exc}", file=sys.stderr)
        return exc.status if exc.status > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
