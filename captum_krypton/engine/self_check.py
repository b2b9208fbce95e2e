"""Every incremental call checks itself against the user's own forward function.

Rules can be wrong, and forward functions can do what no rule foresaw: mix the
examples of a batch, expect one example, share an extra tensor. Three checks:

1. Batch layout (once per plan, before any window runs; always on): the traced
   graph runs two windows in one batch; every node must keep one row per
   example (graph/batch_dims.py). Failing it is a reason for Captum's path.
2. Batch coupling (once per plan, with the self-check): the same two windows
   through the user's forward one at a time, exactly as Captum runs them at its
   default perturbations_per_eval=1, against their rows of the batch.
3. Windows (every call, with the self-check): a few windows - the first and
   the last, windows on other borders, the centre - through the user's forward
   in one batch, their output differences compared with the engine's.

Tolerances come from the model's own rounding, measured: the output change when
every value the traced model computes moves by a random fraction of its last
place, as rounding moves it, and the spread between a window run alone and in a
batch. A model whose own spread is large is
checked loosely and says so in `SelfCheckReport.loose`; it does not fail.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from captum._utils.common import _expand_target, _select_targets
from captum._utils.typing import TargetType

from captum_krypton.capture import (
    UnsupportedForIncremental,
    evaluate,
    expand_additional_args,
    find_batch_coupling,
    find_batch_mixing,
)
from captum_krypton.engine.occlusion import PreparedOcclusion, cudnn_autotuning

#: Differences up to this many units in the last place of the output scale are
#: rounding whatever was measured (each of the two outputs rounds on its own).
FLOOR_ULPS = 128
#: ... and up to this multiple of the model's measured rounding spread.
SPREAD_FACTOR = 16
#: A measured spread above this share of the output scale makes the check loose.
LOOSE_SPREAD = 1e-3
#: Windows recomputed per call: at most, and the share of the call's estimated
#: cost (in forwards) that they may take on the CPU (on CUDA a small batch costs
#: about one launch-bound forward whatever its size).
MAX_CHECK_WINDOWS = 6
MIN_CHECK_WINDOWS = 2
CPU_CHECK_SHARE = 0.01


#: The checks' names, as warnings give them.
BATCH_CHECK = "batch of windows vs one at a time"
WINDOWS_CHECK = "windows vs forward"


class SelfCheckFailed(Exception):
    """The engine's numbers disagree with the user's forward; `check` names the check."""

    def __init__(self, check: str, detail: str):
        super().__init__(check, detail)
        self.check, self.detail = check, detail

    def __str__(self) -> str:
        return f"self-check '{self.check}' failed: {self.detail}"


@dataclass(frozen=True)
class BatchBehaviour:
    """What the once-per-plan checks measured (kept with the plan), relative to
    the largest |output| of the model (all outputs, whatever the target)."""

    #: Largest difference between a window's outputs alone and in a batch.
    batch_spread: float
    #: Largest output change when every computed value moves within its last place.
    rounding_noise: float

    @property
    def rounding_spread(self) -> float:
        return max(self.batch_spread, self.rounding_noise)


@dataclass(frozen=True)
class SelfCheckReport:
    """The self-check of one call (`IncrementalOcclusion.last_run.self_check`).

    windows: ids (Captum's numbering) of the windows recomputed through the forward.
    max_error: largest |engine - forward| over their output differences.
    tolerance: what max_error was allowed, in output units.
    output_scale: largest |output| among the compared outputs.
    rounding_spread: the model's own rounding spread, measured, relative to its
        largest |output| over all outputs.
    loose: the spread is above LOOSE_SPREAD of the output: the check cannot see
        errors below `tolerance`.
    seconds: time the check took.
    """

    windows: tuple[int, ...]
    max_error: float
    tolerance: float
    output_scale: float
    rounding_spread: float
    loose: bool
    seconds: float


def check_window_ids(
    grid_counts: tuple[int, ...], candidates: np.ndarray, count: int
) -> np.ndarray:
    """Up to `count` of `candidates` (window ids), in order of preference: the first
    and last, the grid's other corners (windows on other borders), the centre,
    then evenly spread ones."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) == 0:
        return candidates
    counts = list(grid_counts)
    corners = []
    for corner in range(2 ** len(counts)):
        index = [(n - 1) if corner >> d & 1 else 0 for d, n in enumerate(counts)]
        corners.append(int(np.ravel_multi_index(index, counts)))
    centre = int(np.ravel_multi_index([n // 2 for n in counts], counts))
    spread = candidates[np.linspace(0, len(candidates) - 1, num=count).round().astype(int)]
    allowed = set(candidates.tolist())
    preferred = [int(candidates[0]), int(candidates[-1]), *corners, centre, *spread.tolist()]
    chosen: list[int] = []
    for window in preferred:
        if window in allowed and window not in chosen:
            chosen.append(window)
        if len(chosen) == count:
            break
    return np.asarray(chosen, dtype=np.int64)


def check_window_count(prepared: PreparedOcclusion, windows: int) -> int:
    """How many windows the per-call check recomputes (see CPU_CHECK_SHARE), at
    most as many as fit beside the clean input in a batch the model allows."""
    if prepared.inputs.device.type == "cuda":
        count = MAX_CHECK_WINDOWS
    else:
        forwards = windows / max(prepared.plan.theoretical_speedup, 1.0)
        affordable = math.floor(CPU_CHECK_SHARE * forwards)
        count = min(MAX_CHECK_WINDOWS, max(MIN_CHECK_WINDOWS, affordable))
    limit = prepared.captured.max_rows
    if limit is not None:
        count = min(count, max(1, limit // prepared.inputs.shape[0] - 1))
    return int(count)


def occluded_inputs(prepared: PreparedOcclusion, window_ids: np.ndarray) -> torch.Tensor:
    """The whole occluded inputs of the given windows, (windows x examples, ...)
    window-major, by Captum's formula input * (1 - mask) + baseline * mask (the
    0/1 mask in the input's dtype, as Captum casts it)."""
    inputs = prepared.inputs
    device = inputs.device
    lo, hi = (torch.from_numpy(b).to(device) for b in prepared.grid.bounds(np.asarray(window_ids)))
    shape = inputs.shape[1:]
    mask = torch.ones((), dtype=torch.bool, device=device)
    for dim, size in enumerate(shape):
        position = torch.arange(size, device=device)
        position = position.view(1, *[size if d == dim else 1 for d in range(len(shape))])
        low = lo[:, dim].view(-1, *[1] * len(shape))
        high = hi[:, dim].view(-1, *[1] * len(shape))
        mask = mask & (position >= low) & (position < high)
    mask = mask.unsqueeze(1).to(inputs.dtype)  # (windows, 1, *shape)
    occluded = inputs.unsqueeze(0) * (1 - mask) + prepared.baseline * mask
    return occluded.reshape(-1, *shape)


def _selected(output: torch.Tensor, target: TargetType, copies: int) -> torch.Tensor:
    """Captum's selected outputs of a batch of `copies` perturbations, (copies, outputs)."""
    return _select_targets(output, _expand_target(target, copies)).reshape(copies, -1)


def _forward(prepared: PreparedOcclusion, window_ids: np.ndarray, check: str) -> torch.Tensor:
    """The user's forward on the given windows in one batch, as Captum would run
    them; its failure fails `check`."""
    examples = prepared.inputs.shape[0]
    inputs = occluded_inputs(prepared, window_ids)
    copies = inputs.shape[0] // examples
    extra = expand_additional_args(prepared.additional_args, examples, copies)
    try:
        with torch.no_grad(), cudnn_autotuning(prepared.inputs.device):
            output = prepared.forward(inputs, *extra)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"it returned {type(output).__name__}")
        if output.dim() == 0 or output.shape[0] != inputs.shape[0]:
            raise ValueError(f"its output has shape {tuple(output.shape)}")
        return output
    except Exception as exc:  # any failure of the user's forward fails the check
        raise SelfCheckFailed(
            check,
            f"the forward function on {copies} input(s) raised {type(exc).__name__}: {exc}",
        ) from exc


def check_trace_matches(traced: torch.Tensor, eager: Any, spread: float = 0.0) -> None:
    """The trace must compute what the model's forward computes on this input. A
    trace keeps the branch Python took while tracing (`isinstance(x, Tensor)` is
    False for a traced value; a flag read in forward keeps its old value), so one
    forward of the model itself is compared with the traced clean run, within
    1e-4 of the output or `spread` (the model's measured rounding, relative),
    whichever is larger: the forward may have run in a larger batch."""
    if not isinstance(eager, torch.Tensor) or eager.shape != traced.shape:
        raise UnsupportedForIncremental("the model's forward and its trace disagree")
    scale = float(eager.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) if eager.numel() else 0.0
    relative = max(1e-4, SPREAD_FACTOR * spread)
    tolerance = relative * max(scale, 1e-30) if eager.is_floating_point() else 0.0
    if not torch.allclose(traced, eager, rtol=1e-4, atol=tolerance, equal_nan=True):
        raise UnsupportedForIncremental(
            "the model's forward and its trace disagree on this input (Python control "
            "flow or state that tracing cannot follow)"
        )


def run_clean_forward(
    prepared: PreparedOcclusion,
    window_ids: np.ndarray,
    behaviour: BatchBehaviour | None = None,
) -> None:
    """The user's forward on the clean input, kept on `prepared` for the checks,
    then the trace check against the traced clean run; and, once the plan's
    batch checks have passed (`behaviour`), the given windows in one batch.

    The clean input and the windows run as two forwards, the batch shapes of the
    first call (where the checks come one by one): a new batch shape would cost
    a cuDNN algorithm search (cudnn.benchmark) in the second call, and a model
    with a batch limit would meet a larger batch than the first call gave it."""
    if len(window_ids) and behaviour is not None:
        output = _forward(prepared, window_ids, WINDOWS_CHECK)
        prepared.checked_windows, prepared.checked_outputs = window_ids, output
    with torch.no_grad():
        eager = prepared.forward(prepared.inputs, *prepared.additional_args)
    check_trace_matches(prepared.output, eager)
    prepared.eager_output = eager


def _epsilon(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _compute_epsilon(dtype: torch.dtype, device: torch.device) -> float:
    """The relative rounding of float32 products on `device`: TF32's (10 mantissa
    bits) where CUDA convolutions or matmuls may use it, as by default; else the
    dtype's own."""
    if dtype == torch.float32 and device.type == "cuda":
        precision = torch.get_float32_matmul_precision()
        if precision == "medium":
            return 2.0**-7
        if torch.backends.cudnn.allow_tf32 or precision == "high":
            return 2.0**-10
    return _epsilon(dtype)


def _floor_ulps(dtype: torch.dtype) -> float:
    return FLOOR_ULPS if torch.finfo(dtype).bits > 16 else FLOOR_ULPS / 8


def _largest(*tensors: torch.Tensor) -> torch.Tensor:
    """Largest |value| of the tensors (NaN and inf left out), a float64 scalar."""
    values = [t.detach().abs().nan_to_num(0.0, 0.0, 0.0).amax().double() for t in tensors]
    return torch.stack(values).amax()


def _difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest |a - b| (float64 scalar), NaN where exactly one of them is NaN
    counting as infinite; positions NaN in both count as equal."""
    a64, b64 = a.detach().double(), b.detach().double()
    both = torch.isnan(a64) & torch.isnan(b64)
    gap = (a64 - b64).abs().masked_fill(both, 0.0).nan_to_num(float("inf"), float("inf"))
    return gap.amax() if gap.numel() else torch.zeros((), dtype=torch.float64)


def _floats(*scalars: torch.Tensor) -> list[float]:
    """Scalars to Python floats with one wait for the device."""
    return torch.stack([s.to(scalars[0].device) for s in scalars]).tolist()


def check_batch_layout(prepared: PreparedOcclusion, window_ids: np.ndarray) -> torch.Tensor:
    """Check 1: run the traced graph on the given windows in one batch; raise
    UnsupportedForIncremental, naming the node, if the model mixes its rows or
    fails on a batch. Returns the batch's model output."""
    captured = prepared.captured
    coupling = find_batch_coupling(captured)
    if coupling is not None:
        raise UnsupportedForIncremental(f"{coupling}: the model mixes the examples of a batch")
    examples = prepared.inputs.shape[0]
    copies = len(window_ids)
    extra = {
        node: expand_additional_args((value,), examples, copies)[0]
        for node, value in captured.placeholder_values.items()
    }
    batch_env: dict = {}
    failure: Exception | None = None
    with torch.no_grad():
        try:
            evaluate(captured, occluded_inputs(prepared, window_ids), extra, batch_env)
        except Exception as exc:  # any failure of a batch: judged below
            failure = exc
    reason = find_batch_mixing(captured, prepared.views.env, batch_env, examples, copies)
    if reason is None and failure is not None:
        reason = (
            f"the model fails on a batch of {copies} windows ({type(failure).__name__}: "
            f"{failure}): it assumes one batch size"
        )
    if reason is not None:
        raise UnsupportedForIncremental(reason)
    output = batch_env[captured.output_node]
    if not isinstance(output, torch.Tensor):
        raise UnsupportedForIncremental(f"the model returns {type(output).__name__}")
    return output


def rounding_noise(prepared: PreparedOcclusion) -> float:
    """The model's own rounding, measured: the traced clean run again with every
    computed floating-point value moved by a random fraction of its last place
    (as rounding moves it), and the largest change of any output."""
    generator = torch.Generator(device=prepared.inputs.device).manual_seed(0)

    def rounded(value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            return value
        noise = torch.rand(value.shape, generator=generator, device=value.device) * 2 - 1
        return value * (1 + _compute_epsilon(value.dtype, value.device) * noise.to(value.dtype))

    with torch.no_grad():
        env = evaluate(prepared.captured, prepared.inputs, perturb=rounded)
    moved = env[prepared.captured.output_node]
    if not isinstance(moved, torch.Tensor) or moved.shape != prepared.output.shape:
        return 0.0
    return float(_difference(moved, prepared.output))


def measure_batch_behaviour(
    prepared: PreparedOcclusion, window_ids: np.ndarray, batch_output: torch.Tensor
) -> BatchBehaviour:
    """Check 2: each window through the user's forward alone, as Captum runs it,
    against its rows of the batch; and the model's rounding noise. Raises
    SelfCheckFailed when the batch differs beyond rounding."""
    copies = len(window_ids)
    alone = torch.cat(
        [_forward(prepared, window_ids[i : i + 1], BATCH_CHECK) for i in range(copies)]
    )
    noise = rounding_noise(prepared)
    scale, spread = _floats(
        _largest(alone, batch_output, prepared.eager_output), _difference(batch_output, alone)
    )
    scale = max(scale, 1e-300)
    dtype = batch_output.dtype
    allowed = max(_floor_ulps(dtype) * _epsilon(dtype) * scale, SPREAD_FACTOR * noise)
    if spread > allowed:
        raise SelfCheckFailed(
            BATCH_CHECK,
            f"{copies} windows in one batch differ from the same windows run one at a time "
            f"by {spread:.3g} (allowed {allowed:.3g}, outputs up to {scale:.3g}): the forward "
            "function mixes the examples of a batch or treats an additional argument per "
            "example that is shared",
        )
    return BatchBehaviour(spread / scale, noise / scale)


class WindowCheck:
    """Check 3 in two halves. Made before the engine runs: the checked windows -
    up to `check_window_count` of `candidates`, chosen by `check_window_ids` -
    through the user's forward in one batch, as Captum would run them (taken
    from the clean input's forward where they ran with it, see prepare_checks).
    `finish`: their output differences against the engine's, once it has them.
    Raises SelfCheckFailed (the forward failing, or a difference beyond the
    measured tolerance)."""

    def __init__(
        self,
        prepared: PreparedOcclusion,
        target: TargetType,
        behaviour: BatchBehaviour,
        candidates: np.ndarray,
    ):
        started = time.perf_counter()
        count = check_window_count(prepared, len(candidates))
        ids = check_window_ids(prepared.grid.counts, candidates, count)
        self._behaviour = behaviour
        self._clean = _selected(prepared.eager_output, target, 1)
        self._output_scale = _largest(prepared.eager_output)
        if (
            prepared.checked_windows is not None
            and np.isin(prepared.checked_windows, candidates).all()
        ):  # run already, after the clean input
            ids, outputs = prepared.checked_windows, prepared.checked_outputs
        else:
            outputs = _forward(prepared, ids, WINDOWS_CHECK) if len(ids) else None
        self.window_ids = ids
        self._occluded = None if outputs is None else _selected(outputs, target, len(ids))
        self._seconds = time.perf_counter() - started

    def finish(
        self,
        engine_diffs: Callable[[np.ndarray], torch.Tensor],
        computed: np.ndarray | None = None,
    ) -> SelfCheckReport | None:
        """Compare with `engine_diffs(ids)` ((ids, outputs)) on the checked windows
        that `computed` (a mask over all windows; None: all) marks as done exactly;
        None when there are none."""
        started = time.perf_counter()
        keep = np.ones(len(self.window_ids), dtype=bool)
        if computed is not None:
            keep = computed[self.window_ids]
        if self._occluded is None or not keep.any():
            return None
        ids = self.window_ids[keep]
        occluded = self._occluded[torch.from_numpy(keep).to(self._occluded.device)]
        expected = self._clean - occluded
        dtype = expected.dtype
        actual = engine_diffs(ids).to(expected.device, dtype)
        scale, output_scale, error = _floats(
            _largest(self._clean, occluded), self._output_scale, _difference(actual, expected)
        )
        spread = self._behaviour.rounding_spread
        tolerance = max(
            _floor_ulps(dtype) * _epsilon(dtype) * scale, SPREAD_FACTOR * spread * output_scale
        )
        if error > tolerance:
            worst = int(ids[int((actual - expected).abs().amax(dim=1).argmax())])
            raise SelfCheckFailed(
                WINDOWS_CHECK,
                f"window {worst}'s output difference is off by {error:.3g} (allowed "
                f"{tolerance:.3g}, outputs up to {scale:.3g}) against the forward function "
                "run as Captum runs it",
            )
        return SelfCheckReport(
            tuple(int(w) for w in ids),
            error,
            tolerance,
            scale,
            spread,
            SPREAD_FACTOR * spread > LOOSE_SPREAD,
            self._seconds + time.perf_counter() - started,
        )


def prepare_checks(
    prepared: PreparedOcclusion, self_check: bool, candidates: np.ndarray | None = None
) -> None:
    """The checks that come before any window: the forward on the clean input and
    the trace check (every call); check 1 (once per plan) and, with
    `self_check`, check 2 (once per plan; afterwards the default checked windows
    run here too, right after the clean input). Outcomes are kept with the plan, a failure
    included; `prepared.batch_behaviour` holds what check 2 measured.
    candidates: the windows the call's first pass computes (None: every one),
    among which the default checked windows are chosen.

    Raises UnsupportedForIncremental (trace or batch layout) or SelfCheckFailed."""
    plan = prepared.plan
    if plan.batch_failure is not None:
        raise plan.batch_failure
    grid = prepared.grid
    every = np.arange(grid.num_windows)
    if self_check and plan.batch_behaviour is not None:
        count = check_window_count(prepared, grid.num_windows)
        first = every if candidates is None else candidates
        run_clean_forward(
            prepared, check_window_ids(grid.counts, first, count), plan.batch_behaviour
        )
        prepared.batch_behaviour = plan.batch_behaviour
        return
    run_clean_forward(prepared, np.zeros(0, dtype=np.int64))
    if plan.batch_layout_checked and not self_check:
        return
    ids = check_window_ids(grid.counts, every, MIN_CHECK_WINDOWS)
    if len(ids) < 2:  # one window: two copies of it still make a batch
        ids = np.repeat(ids, 2)
    try:
        output = check_batch_layout(prepared, ids)
        plan.batch_layout_checked = True
        if self_check:
            plan.batch_behaviour = measure_batch_behaviour(prepared, ids, output)
    except (UnsupportedForIncremental, SelfCheckFailed) as exc:
        plan.batch_failure = exc
        raise
    prepared.batch_behaviour = plan.batch_behaviour if self_check else None
