"""CUDA tensors: the same engine on the GPU (torch ops), against Captum on the GPU."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import check_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
torchvision = pytest.importorskip("torchvision")


@pytest.mark.parametrize(
    "name", ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121", "efficientnet_b0"]
)
def test_cuda_model_matches_captum(name, exact_cuda_math):
    model = getattr(torchvision.models, name)(weights=None).eval().cuda()
    inputs = torch.randn(2, 3, 64, 64, device="cuda")
    expected, actual = check_model(
        model, inputs, sliding_window_shapes=(3, 16, 16), strides=8, target=[1, 2]
    )
    assert actual.device.type == "cuda"


def test_cuda_per_example_baseline_and_extra_args(exact_cuda_math):
    from tests import models

    model = models.small_cnn(models.ScaledCNN).cuda()
    inputs = torch.randn(2, 3, 16, 16, device="cuda")
    check_model(
        model,
        inputs,
        additional_forward_args=(torch.tensor([0.5, 2.0], device="cuda"),),
        sliding_window_shapes=(1, 5, 5),
        strides=(1, 3, 3),
        target=1,
        baselines=torch.rand(2, 3, 16, 16, device="cuda"),
    )


def test_cuda_graph_replay_equals_eager(exact_cuda_math):
    from captum_krypton import IncrementalOcclusion

    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(2, 3, 48, 48, device="cuda")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=[0, 5], windows_per_batch=16)
    graphed = occlusion.attribute(inputs, cuda_graphs=True, **args)  # 121 windows: a partial batch
    eager = occlusion.attribute(inputs, cuda_graphs=False, **args)
    torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    check_model(
        model,
        inputs,
        sliding_window_shapes=(3, 8, 8),
        strides=4,
        target=[0, 5],
        options={"windows_per_batch": 16},
    )


from benchmarks.gpu import MODELS as BENCHMARK_MODELS  # noqa: E402  (after importorskip)

#: With TF32 (PyTorch's default for cuDNN convolutions) conv inputs are rounded
#: to 10-bit mantissas (relative error up to 2^-11 = 4.9e-4 per rounding), and how
#: the errors add up depends on the algorithm picked for each batch shape. Results
#: agree with Captum's to this share of max(|map|, |output|).
TF32_TOLERANCE = 2e-3


def _benchmark_model(name):
    # Inception with torchvision's own weight init: with PyTorch's default init its
    # output does not move under occlusion, which would make the check empty.
    extra = {"init_weights": True, "aux_logits": False} if name == "inception_v3" else {}
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **extra).eval().cuda()


@pytest.mark.parametrize("name", list(BENCHMARK_MODELS))
def test_benchmark_models_match_captum_without_tf32(name, exact_cuda_math):
    size = BENCHMARK_MODELS[name]
    inputs = torch.randn(1, 3, size, size, device="cuda")
    check_model(
        _benchmark_model(name),
        inputs,
        sliding_window_shapes=(3, 16, 16),
        strides=12,
        target=0,
        ppe=256,
    )


@pytest.mark.parametrize("name", list(BENCHMARK_MODELS))
def test_benchmark_models_match_captum_with_default_settings(name):
    from captum.attr import Occlusion

    from captum_krypton import IncrementalOcclusion

    size = BENCHMARK_MODELS[name]
    model = _benchmark_model(name)
    inputs = torch.randn(1, 3, size, size, device="cuda")
    args = dict(sliding_window_shapes=(3, 16, 16), strides=12, target=0)
    captum_256 = Occlusion(model).attribute(inputs, perturbations_per_eval=256, **args)
    captum_64 = Occlusion(model).attribute(inputs, perturbations_per_eval=64, **args)
    ours = IncrementalOcclusion(model).attribute(inputs, **args)
    with torch.no_grad():
        scale = max(captum_256.abs().max().item(), model(inputs).abs().max().item())
    noise = (captum_64 - captum_256).abs().max().item() / scale
    deviation = (ours - captum_256).abs().max().item() / scale
    print(f"{name}: deviation {deviation:.2e}, Captum's own {noise:.2e} (of the scale)")
    assert captum_256.abs().max() > 0  # the model's output moves under occlusion
    assert deviation <= TF32_TOLERANCE


def test_fastest_measures_once_and_drops_failing_candidates():
    from captum_krypton.kernels import choice

    x = torch.randn(64, 64, device="cuda")
    key = ("test", 64)

    def broken():
        raise RuntimeError("no kernel for this shape")

    first = choice.fastest(key, {"matmul": lambda: x @ x, "broken": broken}, x.device)
    assert choice.chosen(key) == "matmul"
    assert set(choice.measurements()[key]) == {"matmul"}
    again = choice.fastest(key, {"matmul": lambda: x @ x, "broken": broken}, x.device)
    torch.testing.assert_close(first, again)


def test_cuda_approximations_stream_and_drilldown_of_every_window(exact_cuda_math):
    """On CUDA: drill-down over every window equals exact occlusion, tau runs, the
    stream ends with the returned map, and a target SSIM picks settings."""
    from captum_krypton import IncrementalOcclusion, attribution_ssim

    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(1, 3, 64, 64, device="cuda")
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=3)
    exact = occlusion.attribute(inputs, **args)
    every = occlusion.attribute(inputs, drilldown=1.0, windows_per_batch=32, **args)
    with torch.no_grad():
        scale = max(exact.abs().max().item(), model(inputs).abs().max().item())
    torch.testing.assert_close(every, exact, rtol=0, atol=1e-5 * scale)
    reports = []
    result = occlusion.attribute(inputs, tau=0.6, drilldown=0.3, on_progress=reports.append, **args)
    assert reports[-1].attribution is result and result.device.type == "cuda"
    assert reports[0].stage == "coarse" and torch.isfinite(result).all()
    chosen = occlusion.attribute(inputs, target_ssim=0.9, **args)
    assert occlusion.last_run.approximation.estimated_ssim >= 0.9
    assert attribution_ssim(chosen, exact).shape == (1,)


def test_cuda_calibration_maps_and_ssims_equal_the_cpus():
    """On CUDA the accumulation, the calibration's maps and their SSIMs run on
    the GPU: the sums are the CPU's bits, the SSIMs agree to 1e-12, and a
    target_ssim call in float64 chooses what the same call on the CPU chooses."""
    import numpy as np

    from captum_krypton import IncrementalOcclusion
    from captum_krypton.approx.quality import attribution_ssim_many
    from captum_krypton.demo.data import make_dataset, normalize
    from captum_krypton.demo.model import load_demo_model
    from captum_krypton.engine.windows import WindowGrid

    grid = WindowGrid((3, 64, 64), (3, 8, 8), (1, 2, 2))
    diffs = torch.randn(grid.num_windows, 4, dtype=torch.float64)
    total, count = grid.accumulate(diffs)
    cuda_total, cuda_count = grid.accumulate(diffs.cuda())
    assert cuda_total.is_cuda and torch.equal(cuda_total.cpu(), total)
    assert torch.equal(cuda_count.cpu(), count)
    maps = torch.randn(5, 1, 60, 61, dtype=torch.float64)
    noisy = maps + 0.3 * torch.randn_like(maps)
    np.testing.assert_allclose(
        attribution_ssim_many(noisy.cuda(), maps.cuda()),
        attribution_ssim_many(noisy, maps),
        atol=1e-12,
    )
    images, labels = make_dataset(3, seed=2027)
    for name in ("cnn", "resnet"):
        model = load_demo_model(name).double()
        for image, label in zip(images, labels):
            x = normalize(image)[None].double()
            args = dict(sliding_window_shapes=(3, 6, 6), strides=2, target=int(label))
            chosen = {}
            for device in ("cpu", "cuda"):
                occlusion = IncrementalOcclusion(model.to(device))
                occlusion.attribute(x.to(device), target_ssim=0.9, **args)
                run = occlusion.last_run
                chosen[device] = (run.approximation, run.windows_computed)
            approximation, windows = chosen["cuda"]
            expected, expected_windows = chosen["cpu"]
            assert windows == expected_windows
            assert approximation.drilldown == expected.drilldown
            assert approximation.estimated_ssim == pytest.approx(expected.estimated_ssim, abs=1e-9)


def test_cuda_many_images_equal_per_image_calls(exact_cuda_math):
    from captum_krypton import IncrementalOcclusion

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(256, 3, 64, 64, device="cuda")
    targets = torch.randint(0, 1000, (256,), device="cuda")
    args = dict(sliding_window_shapes=(3, 16, 16), strides=8)
    occlusion = IncrementalOcclusion(model)
    batched = occlusion.attribute(inputs, target=targets, **args)
    assert occlusion.last_run.engine == "incremental"
    singles = torch.cat(
        [
            occlusion.attribute(inputs[i : i + 1], target=int(targets[i]), **args)
            for i in range(0, 256, 32)
        ]
    )
    with torch.no_grad():
        scale = max(batched.abs().max().item(), model(inputs).abs().max().item())
    torch.testing.assert_close(batched[::32], singles, rtol=0, atol=1e-5 * scale)
    check_model(model, inputs[:64], target=targets[:64], ppe=16, **args)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("sharing", ["workers", "threads"])
def test_two_gpus_equal_one(exact_cuda_math, sharing, monkeypatch):
    """Default: a worker process computes cuda:1's shard. Threads (when workers are
    unavailable): one thread per GPU, each replaying a CUDA graph of its own."""
    from captum_krypton import IncrementalOcclusion
    from captum_krypton.engine.graphs import GraphedBatch
    from captum_krypton.parallel import sharded

    if sharing == "threads":
        monkeypatch.setattr(sharded, "uses_workers", lambda devices: False)
    replays = []
    replay = GraphedBatch.run
    monkeypatch.setattr(
        GraphedBatch, "run", lambda self, ids: replays.append(ids.device) or replay(self, ids)
    )
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(4, 3, 64, 64, device="cuda")
    # 225 windows, 4 examples: batches of 32 windows on each GPU and a partial last one
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=[0, 1, 2, 3])
    occlusion = IncrementalOcclusion(model)
    one = occlusion.attribute(inputs, **args)
    two = occlusion.attribute(inputs, devices=["cuda:0", "cuda:1"], windows_per_batch=32, **args)
    assert two.device == inputs.device
    with torch.no_grad():
        scale = max(one.abs().max().item(), model(inputs).abs().max().item())
    torch.testing.assert_close(two, one, rtol=0, atol=1e-5 * scale)
    workers = occlusion._sharded.pool._workers
    if sharing == "workers":
        assert len(workers) == 1 and replays == []
        with torch.no_grad():  # a new model version reaches the worker
            model.fc.weight.mul_(2.0)
        again = occlusion.attribute(inputs, devices=["cuda:0", "cuda:1"], **args)
        expected = occlusion.attribute(inputs, **args)
        torch.testing.assert_close(again, expected, rtol=0, atol=2e-5 * scale)
        occlusion.close()
        assert not workers
    else:
        assert not workers
        assert set(replays) == {torch.device("cuda", 0), torch.device("cuda", 1)}


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_gpus_equal_one_with_tau_and_region(exact_cuda_math):
    """The worker for cuda:1 computes its shards with the call's tau, inside the
    region, as cuda:0 alone does (window choices that depend on values, as
    drill-down's, are compared on the CPU: tests/test_devices.py)."""
    from captum_krypton import IncrementalOcclusion

    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(2, 3, 64, 64, device="cuda")
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=[0, 1])
    occlusion = IncrementalOcclusion(model)
    exact = occlusion.attribute(inputs, **args)
    scale = exact.abs().max().item()
    for options in (dict(tau=0.3), dict(tau=0.3, region=(0, 8, 40, 64))):
        one = occlusion.attribute(inputs, **options, **args)
        windows = occlusion.last_run.windows_computed
        two = occlusion.attribute(inputs, devices=["cuda:0", "cuda:1"], **options, **args)
        assert two.device == inputs.device and occlusion.last_run.windows_computed == windows
        torch.testing.assert_close(two, one, rtol=0, atol=1e-5 * scale, equal_nan=True)
        if "region" not in options:
            assert not torch.allclose(one, exact, rtol=0, atol=1e-3 * scale)  # tau changed it
    assert len(occlusion._sharded.pool._workers) == 1
    occlusion.close()


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "inception_v3"])
def test_cuda_self_check_passes_with_tf32_on(name):
    """With PyTorch's default TF32 convolutions the check's tolerance follows the
    measured rounding: no false fallback, and the report is filled in."""
    import warnings

    from captum_krypton import FallbackWarning, IncrementalOcclusion

    extra = {"init_weights": False, "aux_logits": False} if name == "inception_v3" else {}
    model = getattr(torchvision.models, name)(weights=None, **extra).eval().cuda()
    size = 96 if name == "inception_v3" else 64
    inputs = torch.randn(2, 3, size, size, device="cuda")
    occlusion = IncrementalOcclusion(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        occlusion.attribute(inputs, (3, 16, 16), strides=8, target=[1, 2])
    report = occlusion.last_run.self_check
    assert occlusion.last_run.engine == "incremental" and report is not None
    assert len(report.windows) == 6 and report.max_error <= report.tolerance


def test_cuda_broken_rule_is_caught(monkeypatch, exact_cuda_math):
    from captum.attr import Occlusion

    from captum_krypton import FallbackWarning, IncrementalOcclusion
    from captum_krypton.ops import convolution

    original = convolution.ConvRule.run_box

    def wrong(self, run, info, spec):
        box = original(self, run, info, spec)
        return box + 0.01 * (box.max() - box.min())

    monkeypatch.setattr(convolution.ConvRule, "run_box", wrong)
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    inputs = torch.randn(1, 3, 64, 64, device="cuda")
    with pytest.warns(FallbackWarning, match="windows vs forward"):
        actual = IncrementalOcclusion(model).attribute(
            inputs, (3, 8, 8), strides=8, target=3, full_threshold=1.0
        )
    expected = Occlusion(model).attribute(inputs, (3, 8, 8), strides=8, target=3)
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_graphs_kept_across_calls_replay_each_calls_own_values(exact_cuda_math, monkeypatch):
    """Default CUDA graphs: a batch size is captured the second time the plan runs
    it and replayed on later calls, each with its own input, baseline and target,
    every map equal to Captum's (engine/graphs.py)."""
    import warnings

    from captum.attr import Occlusion

    from captum_krypton import FallbackWarning, IncrementalOcclusion
    from captum_krypton.engine.graphs import GraphedBatch
    from captum_krypton.kernels import wait_for_compilation
    from tests.conftest import assert_close_to_captum

    replays = []
    replay = GraphedBatch.run
    monkeypatch.setattr(
        GraphedBatch, "run", lambda self, ids: replays.append(len(ids)) or replay(self, ids)
    )
    model = torchvision.models.resnet18(weights=None).eval().cuda()
    occlusion = IncrementalOcclusion(model)
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4)
    noise = torch.rand(2, 2, 3, 64, 64, device="cuda")
    baselines = [0.0, 0.0, noise[0], noise[1], 0.0]
    # A capture waits for background compilations (kernels.choices_settled):
    # one call starts them, then they end.
    warm_up = torch.randn(2, 3, 64, 64, device="cuda")
    occlusion.attribute(warm_up, baselines=0.0, target=0, windows_per_batch=32, **args)
    wait_for_compilation()
    counts = []
    for step, baseline in enumerate(baselines):
        x = torch.randn(2, 3, 64, 64, device="cuda")
        target = [step, step + 1]
        before = len(replays)
        expected = Occlusion(model).attribute(
            x, baselines=baseline, target=target, perturbations_per_eval=64, **args
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error", FallbackWarning)
            actual = occlusion.attribute(
                x, baselines=baseline, target=target, windows_per_batch=32, **args
            )
        with torch.no_grad():
            scale = model(x).abs().max().item()
        assert_close_to_captum(expected, actual, scale)
        counts.append(len(replays) - before)
    # 225 windows in batches of 32 (the last padded to 32): the size was seen, so
    # every batch replays; a new baseline runs its first batch eagerly
    assert counts == [8, 8, 7, 8, 8]


@pytest.mark.parametrize(
    "name",
    ["googlenet", "densenet121", "mobilenet_v3_large", "inception_v3", "regnet_y_400mf"],
)
def test_replayed_batches_match_captum_across_architectures(name, exact_cuda_math, monkeypatch):
    """A second call replays the graphs the first captured: its map is Captum's."""
    import warnings

    from captum.attr import Occlusion

    from captum_krypton import FallbackWarning, IncrementalOcclusion
    from captum_krypton.engine.graphs import GraphedBatch
    from captum_krypton.kernels import wait_for_compilation
    from tests.conftest import assert_close_to_captum

    replays = []
    replay = GraphedBatch.run
    monkeypatch.setattr(
        GraphedBatch, "run", lambda self, ids: replays.append(len(ids)) or replay(self, ids)
    )
    extra = {}
    if name in ("googlenet", "inception_v3"):
        extra = {"init_weights": False, "aux_logits": False}
    model = getattr(torchvision.models, name)(weights=None, **extra).eval().cuda()
    size = 96 if name == "inception_v3" else 64
    first, second = torch.randn(2, 2, 3, size, size, device="cuda")
    args = dict(sliding_window_shapes=(3, 8, 8), strides=4, target=[3, 7])
    occlusion = IncrementalOcclusion(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        occlusion.attribute(first, windows_per_batch=64, **args)
        wait_for_compilation()
        before = len(replays)
        actual = occlusion.attribute(second, windows_per_batch=64, **args)
    assert len(replays) > before
    expected = Occlusion(model).attribute(second, perturbations_per_eval=64, **args)
    with torch.no_grad():
        scale = model(second).abs().max().item()
    assert_close_to_captum(expected, actual, scale)


@pytest.mark.parametrize("kind", ["inf", "nan"])
def test_cuda_non_finite_windows_give_captums_map(kind, exact_cuda_math):
    """The NaN spread of non-finite windows (tests/test_non_finite.py) on the
    GPU, where the windows' sums run there; and a target_ssim series of calls
    on CUDA times each call to the end of its device work."""
    from captum.attr import Occlusion

    from captum_krypton import IncrementalOcclusion
    from tests.test_non_finite import ARGS, OneBadPixel

    model = OneBadPixel(kind).eval().cuda()
    x = torch.ones(2, 1, 12, 12, device="cuda")
    baselines = torch.zeros_like(x)
    baselines[1] = 5.0
    expected = Occlusion(model).attribute(x, baselines=baselines, **ARGS)
    occlusion = IncrementalOcclusion(model)
    actual = occlusion.attribute(x, baselines=baselines, engine="incremental", **ARGS)
    torch.testing.assert_close(actual, expected, equal_nan=True, rtol=0, atol=1e-6)
    finite = torch.ones(1, 1, 12, 12, device="cuda") * 3.0
    for _ in range(3):
        occlusion.attribute(finite, target_ssim=0.9, **ARGS)
    assert occlusion.last_run.target_ssim_choice is not None
