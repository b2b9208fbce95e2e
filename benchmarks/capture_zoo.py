"""Graph capture and exactness over a zoo of image classifiers, on the CPU.

    PYTHONPATH=. python benchmarks/capture_zoo.py --label before [--only name,...] [--make-fx]

For each architecture of ZOO (torchvision and timm classifiers, plus a few small
hand-written models) this measures:

  - `incremental`: whether IncrementalOcclusion(model).attribute(...) (default
    options) runs without a FallbackWarning; the warning's text when not;
  - `equal`: whether its map equals captum.attr.Occlusion's with the same
    arguments: max |ours - Captum's| <= 1e-9 max |Captum's| + 1e-12, computed in
    float64 (`relative_difference` is max |ours - Captum's| / max |Captum's|);
  - `capture_seconds`: the package's own graph capture alone
    (captum_krypton.capture.capture(module, input, ()) where it exists, else
    captum_krypton.graph.capture.capture(module, ())), or `capture_error`;
  - three capture methods of PyTorch, independent of the package: (a)
    torch.fx.symbolic_trace(model); (b) non-strict torch.export.export on the
    input repeated to batch 2 with dynamic_shapes=({0: Dim.AUTO},), and whether the
    exported input kept a symbolic batch dim; (c) only with --make-fx (slow: seconds to
    minutes a model): make_fx of a torch.func.functional_call wrapper with
    tracing_mode="symbolic", on the MAKE_FX subset (--make-fx all: every model);
  - `attribute_seconds` of ours and of Captum's (for information).

Every model has random weights and random BatchNorm statistics (tests/zoo.py's
build_model and randomize_statistics), runs in eval mode and float64 on one
float64 example of 3 x S x S (S = 64 unless the architecture wants more, at
most 96), with window (3, 16, 16), stride min(16, ceil((S - 16) / 4)) (25
windows, 36 at S = 96) and target 3.
Attribution runs first, on the model as built; then every capture method runs on
its own untouched copy of it (tracing can leave state on a model). Each capture
method also runs once on a tiny model before the zoo, so one-time initialization
is not charged to the first architecture.

Results go to benchmarks/results/capture_zoo_<label>.json (rewritten after every
model) and a markdown table plus a summary are printed. Runs single-threaded by
default (--threads).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
# tests/zoo.py (model builders) and this tree's captum_krypton, whatever is installed.
sys.path.insert(0, str(ROOT))

WINDOW = 16
TARGET = 3
#: max |ours - Captum's| <= RTOL * max |Captum's| + ATOL.
RTOL, ATOL = 1e-9, 1e-12
ERROR_CHARS = 300


@dataclass(frozen=True)
class Case:
    library: str  # "torchvision", "timm" or "custom"
    name: str
    size: int = 64
    kwargs: dict[str, Any] = field(default_factory=dict, hash=False)
    #: BatchNorm statistics measured on activations (tests/zoo.py); None: as
    #: tests/zoo.py has it for the same architecture, else False.
    measured: bool | None = None

    @property
    def id(self) -> str:
        return f"{self.library}:{self.name}"

    @property
    def stride(self) -> int:
        """5 windows a side where the window's side allows (Captum wants a stride
        no larger than the window): 25 windows up to S = 80, 36 at S = 96."""
        return min(WINDOW, -(-(self.size - WINDOW) // 4))

    @property
    def num_windows(self) -> int:
        return (-(-(self.size - WINDOW) // self.stride) + 1) ** 2


def _tv(name: str, **options: Any) -> Case:
    return Case("torchvision", name, **options)


def _timm(name: str, **options: Any) -> Case:
    return Case("timm", name, **options)


_NO_AUX = {"aux_logits": False, "init_weights": False}
_IMG64 = {"img_size": 64}

ZOO = [
    # torchvision
    _tv("alexnet"),
    _tv("vgg11"),
    _tv("resnet18"),
    _tv("resnet50"),
    _tv("resnext50_32x4d"),
    _tv("wide_resnet50_2"),
    _tv("densenet121"),
    _tv("mobilenet_v2"),
    _tv("mobilenet_v3_small"),
    _tv("mobilenet_v3_large"),
    _tv("efficientnet_b0"),
    _tv("regnet_x_400mf"),
    _tv("regnet_y_400mf"),
    _tv("shufflenet_v2_x1_0"),
    _tv("squeezenet1_1"),
    _tv("mnasnet1_0"),
    _tv("googlenet", kwargs=_NO_AUX),
    # Valid (unpadded) stem convolutions: at least 75 pixels.
    _tv("inception_v3", size=96, kwargs=_NO_AUX),
    _tv("convnext_tiny"),
    _tv("swin_t"),
    # timm
    # TensorFlow 'same' padding, computed from the input size.
    _timm("tf_efficientnet_b0"),
    # DINO-style ViT: position embeddings interpolated to the input's token grid.
    _timm("vit_small_patch16_224", size=96, kwargs={"dynamic_img_size": True}),
    # BiT: weight-standardized convolutions.
    _timm("resnetv2_50x1_bit"),
    _timm("nf_resnet26"),
    _timm("convnext_atto"),
    _timm("efficientnet_b0"),
    _timm("mobilenetv3_small_100", measured=True),
    _timm("regnety_002"),
    _timm("resnet18d"),
    _timm("seresnext26d_32x4d"),
    _timm("ecaresnet26t"),
    _timm("skresnet18"),
    _timm("resnest14d"),
    _timm("res2net50_14w_8s"),
    _timm("rexnet_100"),
    _timm("ghostnet_100"),
    _timm("cspresnet50"),
    _timm("dla34"),
    _timm("hrnet_w18_small"),
    _timm("dpn48b"),
    _timm("repvgg_a0"),
    _timm("selecsls42b"),
    _timm("tinynet_e"),
    _timm("lcnet_050"),
    _timm("mixnet_s"),
    _timm("fbnetc_100"),
    _timm("hgnetv2_b0"),
    _timm("mobileone_s0"),
    _timm("repvit_m0_9"),
    _timm("poolformer_s12"),
    _timm("edgenext_xx_small"),
    _timm("mobilevit_xxs"),
    _timm("efficientformerv2_s0", kwargs=_IMG64),
    _timm("coat_lite_tiny", kwargs=_IMG64),
    _timm("coatnet_nano_rw_224", kwargs=_IMG64),
    _timm("deit_tiny_patch16_224", kwargs=_IMG64),
    _timm("pvt_v2_b0"),
    # hand-written (build_custom)
    Case("custom", "weight_norm_hooks"),
    Case("custom", "weight_norm_parametrized"),
    Case("custom", "guarded_batchnorm"),
]

#: The models make_fx runs on with a bare --make-fx.
MAKE_FX = [
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
    "torchvision:googlenet",
    "timm:tf_efficientnet_b0",
    "timm:vit_small_patch16_224",
    "timm:resnetv2_50x1_bit",
    "timm:nf_resnet26",
    "timm:convnext_atto",
    "timm:mobilevit_xxs",
    "custom:weight_norm_hooks",
    "custom:weight_norm_parametrized",
    "custom:guarded_batchnorm",
]


# --------------------------------------------------------------------------- models


class GuardedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that checks its input's rank in Python before normalizing."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"expected a 4-d input, got {x.dim()}-d")
        return super().forward(x)


class SmallCNN(nn.Module):
    def __init__(self, norm: type[nn.BatchNorm2d] = nn.BatchNorm2d, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = norm(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.bn2 = norm(32)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x)) + x
        return self.fc(self.pool(x).flatten(1))


def build_custom(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "weight_norm_hooks":
        model = SmallCNN()
        with warnings.catch_warnings():  # deprecated in favour of parametrizations
            warnings.simplefilter("ignore")
            torch.nn.utils.weight_norm(model.conv2)
    elif name == "weight_norm_parametrized":
        model = SmallCNN()
        torch.nn.utils.parametrizations.weight_norm(model.conv2)
    elif name == "guarded_batchnorm":
        model = SmallCNN(norm=GuardedBatchNorm2d)
    else:
        raise KeyError(name)
    return model


def build(case: Case) -> nn.Module:
    """Random weights and BatchNorm statistics, eval mode, float64 (tests/zoo.py)."""
    from tests import zoo

    if case.library == "custom":
        model = build_custom(case.name)
        zoo.randomize_statistics(model, torch.Generator().manual_seed(0))
        return model.eval().double()
    known = {(c.library, c.name): c for c in (*zoo.TORCHVISION_CASES, *zoo.TIMM_CASES)}
    measured = case.measured
    if measured is None:
        known_case = known.get((case.library, case.name))
        measured = known_case.measured if known_case is not None else False
    zoo_case = zoo.ZooCase(
        case.library,
        case.name,
        size=case.size,
        window=WINDOW,
        stride=case.stride,
        kwargs=case.kwargs,
        measured=measured,
    )
    return zoo.build_model(zoo_case)


# ------------------------------------------------------------------------ capture


def package_capture() -> tuple[str, Callable[[nn.Module, torch.Tensor], Any]]:
    """The package's capture entry point: its name and a call on (module, input).

    captum_krypton.capture is looked up inside the imported package's own folder
    only: an editable install's finder would otherwise supply a submodule this
    tree lacks from the installed tree."""
    import importlib
    from importlib.machinery import PathFinder

    import captum_krypton

    if PathFinder.find_spec("captum_krypton.capture", captum_krypton.__path__) is None:
        name = "captum_krypton.graph.capture"
    else:
        name = "captum_krypton.capture"
    try:
        capture = importlib.import_module(name).capture
    except (ImportError, AttributeError):
        if name == "captum_krypton.graph.capture":
            raise
        name = "captum_krypton.graph.capture"
        capture = importlib.import_module(name).capture
    module_file = Path(sys.modules[name].__file__).resolve()
    if Path(captum_krypton.__file__).resolve().parent not in module_file.parents:
        raise SystemExit(f"{name} comes from {module_file}, outside {captum_krypton.__file__}")
    if name == "captum_krypton.capture":
        return f"{name}.capture", lambda module, x: capture(module, x, ())
    return f"{name}.capture", lambda module, x: capture(module, ())


def short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


def timed(fn: Callable[[], Any]) -> tuple[dict[str, Any], Any]:
    """Runs fn; {"ok", "seconds"[, "error"]} and its result (None on failure)."""
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
    except Exception as exc:  # every failure is a data point
        return {
            "ok": False,
            "seconds": time.perf_counter() - start,
            "error": short_error(exc),
        }, None
    return {"ok": True, "seconds": time.perf_counter() - start}, result


def fx_trace(model: nn.Module, x: torch.Tensor) -> Any:
    return torch.fx.symbolic_trace(model)


def export_trace(model: nn.Module, x: torch.Tensor) -> Any:
    x2 = x.repeat(2, 1, 1, 1)
    return torch.export.export(
        model, (x2,), dynamic_shapes=({0: torch.export.Dim.AUTO},), strict=False
    )


def exported_batch_is_symbolic(program: Any) -> bool:
    user_inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user_inputs:
            return isinstance(node.meta["val"].shape[0], torch.SymInt)
    return False


def make_fx_trace(model: nn.Module, x: torch.Tensor) -> Any:
    from torch.func import functional_call
    from torch.fx.experimental.proxy_tensor import make_fx

    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def forward(state: dict[str, torch.Tensor], inputs: torch.Tensor) -> Any:
        return functional_call(model, state, (inputs,))

    return make_fx(forward, tracing_mode="symbolic")(state, x.repeat(2, 1, 1, 1))


def warm_up(capture: Callable[[nn.Module, torch.Tensor], Any], make_fx: bool) -> dict:
    """One run of each capture method on a tiny model; their first-call costs."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14**2, 5))
    model = model.eval().double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    methods = {"package": capture, "fx": fx_trace, "export": export_trace}
    if make_fx:
        methods["make_fx"] = make_fx_trace
    return {name: timed(lambda f=f: f(model, x))[0] for name, f in methods.items()}


# --------------------------------------------------------------------------- runs


def run_case(case: Case, capture: Callable, make_fx: bool) -> dict[str, Any]:
    from captum.attr import Occlusion

    from captum_krypton import FallbackWarning, IncrementalOcclusion

    record: dict[str, Any] = {
        "id": case.id,
        "library": case.library,
        "name": case.name,
        "size": case.size,
        "stride": case.stride,
        "windows": case.num_windows,
        "kwargs": {k: v for k, v in case.kwargs.items()},
    }
    start = time.perf_counter()
    try:
        model = build(case)
    except Exception as exc:
        record["build_error"] = short_error(exc)
        return record
    record["build_seconds"] = time.perf_counter() - start
    record["parameters"] = sum(p.numel() for p in model.parameters())
    x = torch.randn(
        1, 3, case.size, case.size, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    kwargs = dict(sliding_window_shapes=(3, WINDOW, WINDOW), strides=case.stride, target=TARGET)

    # Tracing can leave state on a model (timm's efficientformerv2 caches a traced
    # attention bias, keyed by the device's str, which a later trace then finds),
    # so every capture method gets its own untouched copy.
    try:
        pristine = copy.deepcopy(model)
        record["copies"] = "deepcopy"
    except Exception:  # e.g. the non-leaf weight of torch.nn.utils.weight_norm
        pristine = None
        record["copies"] = "rebuilt"

    def on_copy(method: Callable[[nn.Module, torch.Tensor], Any]) -> tuple[dict, Any]:
        fresh = build(case) if pristine is None else copy.deepcopy(pristine)
        return timed(lambda: method(fresh, x))

    # Ours (default options) against Captum, on the model as built.
    occlusion = IncrementalOcclusion(model)
    ours = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            ours = occlusion.attribute(x, **kwargs)
        except Exception as exc:
            record["ours_error"] = short_error(exc)
            record["ours_traceback"] = traceback.format_exc(limit=-3)
        record["attribute_seconds_ours"] = time.perf_counter() - start
    last_run = getattr(occlusion, "last_run", None)
    record["engine"] = getattr(last_run, "engine", None)
    close = getattr(occlusion, "close", None)
    if close is not None:
        close()
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, FallbackWarning)]
    record["incremental"] = ours is not None and not fallbacks
    record["fallback_warning"] = " | ".join(fallbacks) or None

    start = time.perf_counter()
    expected = None
    try:
        expected = Occlusion(model).attribute(x, **kwargs)
    except Exception as exc:
        record["captum_error"] = short_error(exc)
    record["attribute_seconds_captum"] = time.perf_counter() - start
    record["equal"] = False
    record["relative_difference"] = None
    if expected is not None:
        scale = expected.double().abs().max().item()
        record["captum_map_max"] = scale
        record["map_dtype"] = str(expected.dtype).replace("torch.", "")
    if expected is not None and ours is not None:
        record["ours_dtype"] = str(ours.dtype).replace("torch.", "")
        if ours.shape == expected.shape:
            difference = (ours.double() - expected.double()).abs().max().item()
            record["equal"] = difference <= RTOL * scale + ATOL
            record["relative_difference"] = difference / scale if scale else difference
    del ours, expected, occlusion

    del model

    outcome, _ = on_copy(capture)
    record["capture_seconds"] = outcome["seconds"]
    record["capture_error"] = outcome.get("error")

    # Raw capture methods of PyTorch.
    record["fx"], _ = on_copy(fx_trace)
    record["export"], program = on_copy(export_trace)
    if program is not None:
        record["export"]["symbolic_batch"] = exported_batch_is_symbolic(program)
    del program
    if make_fx:
        record["make_fx"], _ = on_copy(make_fx_trace)
    return record


# ------------------------------------------------------------------------ reports


def failure_reason(record: dict[str, Any]) -> str | None:
    """Why a model is not incremental-and-equal (None when it is)."""
    if "build_error" in record:
        return f"build failed: {record['build_error']}"
    reasons = []
    if not record["incremental"]:
        reasons.append(record.get("ours_error") or record["fallback_warning"] or "no result")
    if "captum_error" in record:
        reasons.append(f"Captum failed: {record['captum_error']}")
    elif not record["equal"] and "ours_error" not in record:
        rel = record["relative_difference"]
        reasons.append(
            "maps differ in shape" if rel is None else f"maps differ: relative difference {rel:.2e}"
        )
    return "; ".join(reasons) or None


def _mark(value: Any) -> str:
    if value is None:
        return "-"
    return "yes" if value else "**no**"


def _method(entry: dict | None) -> str:
    if entry is None:
        return "-"
    mark = f"{entry['seconds']:.2f}" if entry["ok"] else "**fail**"
    if entry.get("symbolic_batch") is False:
        mark += " (static batch)"
    return mark


def table(records: list[dict[str, Any]]) -> str:
    lines = [
        "| model | S | stride | incremental | equal | rel. diff | capture s | fx s "
        "| export s | make_fx s | ours s | Captum s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "build_error" in r:
            lines.append(f"| {r['id']} | {r['size']} | {r['stride']} | build failed |" + " |" * 8)
            continue
        rel = r["relative_difference"]
        capture = "**fail**" if r["capture_error"] else f"{r['capture_seconds']:.3f}"
        lines.append(
            f"| {r['id']} | {r['size']} | {r['stride']} | {_mark(r['incremental'])} "
            f"| {_mark(r['equal'])} | {'-' if rel is None else f'{rel:.1e}'} | {capture} "
            f"| {_method(r['fx'])} | {_method(r['export'])} | {_method(r.get('make_fx'))} "
            f"| {r['attribute_seconds_ours']:.2f} | {r['attribute_seconds_captum']:.2f} |"
        )
    return "\n".join(lines)


def _seconds(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "max": None}
    return {"median": statistics.median(values), "max": max(values)}


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    built = [r for r in records if "build_error" not in r]
    n = len(built)

    def share(count: int, of: int) -> dict[str, Any]:
        return {"count": count, "of": of, "share": count / of if of else None}

    summary: dict[str, Any] = {
        "models": len(records),
        "built": n,
        "incremental": share(sum(r["incremental"] for r in built), n),
        "equal": share(sum(r["equal"] for r in built), n),
        "incremental_and_equal": share(sum(r["incremental"] and r["equal"] for r in built), n),
        "package_capture": {
            **share(sum(not r["capture_error"] for r in built), n),
            **_seconds([r["capture_seconds"] for r in built if not r["capture_error"]]),
        },
    }
    for method in ("fx", "export", "make_fx"):
        ran = [r for r in built if r.get(method) is not None]
        ok = [r for r in ran if r[method]["ok"]]
        summary[method] = {
            **share(len(ok), len(ran)),
            **_seconds([r[method]["seconds"] for r in ok]),
        }
    exported = [r for r in built if r["export"]["ok"]]
    summary["export"]["symbolic_batch"] = share(
        sum(bool(r["export"].get("symbolic_batch")) for r in exported), len(exported)
    )
    summary["fx_not_export"] = [r["id"] for r in built if r["fx"]["ok"] and not r["export"]["ok"]]
    summary["export_not_fx"] = [r["id"] for r in built if r["export"]["ok"] and not r["fx"]["ok"]]
    loads = [r["load_average"] for r in records if "load_average" in r]
    summary["load_average"] = _seconds(loads)  # same statistics, not seconds
    summary["failures"] = {r["id"]: failure_reason(r) for r in records if failure_reason(r)}
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    def pct(entry: dict[str, Any]) -> str:
        share = entry["share"]
        return f"{entry['count']}/{entry['of']}" + (f" ({100 * share:.0f}%)" if share else "")

    def secs(entry: dict[str, Any]) -> str:
        if entry["median"] is None:
            return ""
        return f", median {entry['median']:.3f} s, max {entry['max']:.3f} s"

    print(f"\nModels: {summary['models']} ({summary['built']} built)")
    print(f"Incremental and equal to Captum: {pct(summary['incremental_and_equal'])}")
    print(f"  incremental (no FallbackWarning): {pct(summary['incremental'])}")
    print(f"  equal within 1e-9: {pct(summary['equal'])}")
    capture = summary["package_capture"]
    print(f"Package capture: {pct(capture)}{secs(capture)}")
    for method in ("fx", "export", "make_fx"):
        entry = summary[method]
        if entry["of"]:
            print(f"Raw {method}: {pct(entry)}{secs(entry)}")
    print(f"  export kept a symbolic batch dim: {pct(summary['export']['symbolic_batch'])}")
    print(f"fx captures, export does not: {', '.join(summary['fx_not_export']) or 'none'}")
    print(f"export captures, fx does not: {', '.join(summary['export_not_fx']) or 'none'}")
    load = summary["load_average"]
    if load["median"] is not None:
        print(
            f"1-minute load average after each model: median {load['median']:.1f}, "
            f"max {load['max']:.1f}"
        )
    if summary["failures"]:
        print("Failures (incremental=False or equal=False):")
        for name, reason in summary["failures"].items():
            print(f"  {name}: {reason}")


def environment(capture_api: str, threads: int) -> dict[str, Any]:
    import captum

    import captum_krypton

    def version(module: str) -> str | None:
        try:
            return __import__(module).__version__
        except ImportError:
            return None

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return result.stdout.strip()

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "timm": version("timm"),
        "captum": captum.__version__,
        "captum_krypton": captum_krypton.__file__,
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "capture_api": capture_api,
        "threads": threads,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "window": WINDOW,
        "target": TARGET,
        "tolerance": {"rtol": RTOL, "atol": ATOL},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="results file: capture_zoo_<label>.json")
    parser.add_argument("--only", help="comma-separated ids or names (e.g. timm:resnet18d,vgg11)")
    parser.add_argument(
        "--make-fx",
        nargs="?",
        const="subset",
        help="also run make_fx: on the MAKE_FX subset, 'all', or comma-separated ids/names",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cases = ZOO
    if args.only:
        wanted = {w.strip() for w in args.only.split(",") if w.strip()}
        cases = [c for c in ZOO if c.id in wanted or c.name in wanted]
        unknown = wanted - {c.id for c in cases} - {c.name for c in cases}
        if unknown:
            parser.error(f"not in the zoo: {', '.join(sorted(unknown))}")
    if args.make_fx is None:
        make_fx_ids: set[str] = set()
    elif args.make_fx == "all":
        make_fx_ids = {c.id for c in ZOO}
    else:
        names = MAKE_FX if args.make_fx == "subset" else args.make_fx.split(",")
        make_fx_ids = {c.id for c in ZOO if c.id in names or c.name in names}

    capture_api, capture = package_capture()
    out = ROOT / "benchmarks" / "results" / f"capture_zoo_{args.label}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "label": args.label,
        "environment": environment(capture_api, args.threads),
        "warm_up": warm_up(capture, bool(make_fx_ids)),
        "models": [],
    }
    print(f"capture: {capture_api}; {len(cases)} models; make_fx on {len(make_fx_ids)}", flush=True)
    for i, case in enumerate(cases, 1):
        start = time.perf_counter()
        record = run_case(case, capture, case.id in make_fx_ids)
        record["load_average"] = os.getloadavg()[0]  # other processes skew the times
        gc.collect()
        results["models"].append(record)
        results["summary"] = summarize(results["models"])
        out.write_text(json.dumps(results, indent=1) + "\n")
        reason = failure_reason(record)
        print(
            f"[{i}/{len(cases)}] {case.id}: {time.perf_counter() - start:.1f} s"
            + (f" -- {reason}" if reason else ""),
            flush=True,
        )
    print()
    print(table(results["models"]))
    print_summary(results["summary"])
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
