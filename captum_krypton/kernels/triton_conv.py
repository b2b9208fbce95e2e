"""Implicit-GEMM convolution that reads its input straight from (box | view | zero).

`conv_region` computes, for every row, a conv's output box without building the
read-in tile: each input value is taken from the row's box where the receptive
field meets it, from the clean view (of the row's example) elsewhere in the map,
and zero outside the map. Bias and a ReLU run in the epilogue. The GEMM is
rows x positions (M) by output channels (N) over kernel taps x input channels (K).
Its torch reference is `torch_ops.conv_region`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import triton
import triton.language as tl

from captum_krypton.kernels import choice
from captum_krypton.kernels.triton_ops import LAUNCH_LOCK, MAX_DIMS, _padded3, _starts3, _strides3

#: Epilogue activations the kernel knows.
ACTIVATIONS = (None, "relu")


#: Sizes and offsets vary from layer to layer; specializing on them (value 1,
#: multiples of 16) would compile a kernel per layer. Channel counts and memory
#: strides stay specialized: they decide vectorized loads.
_VARYING = [
    "total",
    "positions",
    "size1",
    "size2",
    "kernel0",
    "kernel1",
    "kernel2",
    "stride0",
    "stride1",
    "stride2",
    "dil0",
    "dil1",
    "dil2",
    "map0",
    "map1",
    "map2",
    "bsize0",
    "bsize1",
    "bsize2",
]


@triton.jit(do_not_specialize=_VARYING)
def _conv_region_kernel(
    out_ptr,
    view_ptr,
    box_ptr,
    weight_ptr,  # (k0, k1, k2, C_in, C_out) contiguous
    bias_ptr,
    example_ptr,
    starts_ptr,  # (rows, 3): map coordinate of each row's read-in origin
    box_starts_ptr,
    total,  # rows x output positions
    positions,
    channels_in,
    channels_out,
    size1,
    size2,
    kernel0,
    kernel1,
    kernel2,
    stride0,
    stride1,
    stride2,
    dil0,
    dil1,
    dil2,
    map0,
    map1,
    map2,
    bsize0,
    bsize1,
    bsize2,
    view_sn,
    view_sc,
    view_s0,
    view_s1,
    view_s2,
    box_sr,
    box_sc,
    box_s0,
    box_s1,
    box_s2,
    out_sr,
    out_sc,
    out_s0,
    out_s1,
    out_s2,
    HAS_BOX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < total
    n_ok = n < channels_out
    row = (m // positions).to(tl.int64)
    p = m % positions
    t2 = p % size2
    t1 = (p // size2) % size1
    t0 = p // (size2 * size1)
    origin0 = tl.load(starts_ptr + row * 3 + 0, mask=m_ok, other=0) + t0 * stride0
    origin1 = tl.load(starts_ptr + row * 3 + 1, mask=m_ok, other=0) + t1 * stride1
    origin2 = tl.load(starts_ptr + row * 3 + 2, mask=m_ok, other=0) + t2 * stride2
    example = tl.load(example_ptr + row, mask=m_ok, other=0)
    if HAS_BOX:
        box0 = tl.load(box_starts_ptr + row * 3 + 0, mask=m_ok, other=0)
        box1 = tl.load(box_starts_ptr + row * 3 + 1, mask=m_ok, other=0)
        box2 = tl.load(box_starts_ptr + row * 3 + 2, mask=m_ok, other=0)
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    channel_blocks = tl.cdiv(channels_in, BLOCK_K)
    # One flat loop over (kernel tap, channel block), so the compiler can pipeline
    # the loads of the next step under the current dot.
    for step in range(kernel0 * kernel1 * kernel2 * channel_blocks):
        tap = step // channel_blocks
        c = (step % channel_blocks) * BLOCK_K + k
        k2 = tap % kernel2
        k1 = (tap // kernel2) % kernel1
        k0 = tap // (kernel2 * kernel1)
        c0 = origin0 + k0 * dil0
        c1 = origin1 + k1 * dil1
        c2 = origin2 + k2 * dil2
        in_map = m_ok & (c0 >= 0) & (c0 < map0) & (c1 >= 0) & (c1 < map1)
        in_map = in_map & (c2 >= 0) & (c2 < map2)
        c_ok = c < channels_in
        if HAS_BOX:
            b0 = c0 - box0
            b1 = c1 - box1
            b2 = c2 - box2
            in_box = m_ok & (b0 >= 0) & (b0 < bsize0) & (b1 >= 0) & (b1 < bsize1)
            in_box = in_box & (b2 >= 0) & (b2 < bsize2)
            in_map = in_map & ~in_box
        view_at = example * view_sn + c0 * view_s0 + c1 * view_s1 + c2 * view_s2
        a_mask = in_map[:, None] & c_ok[None, :]
        a = tl.load(
            view_ptr + view_at[:, None] + c[None, :].to(tl.int64) * view_sc,
            mask=a_mask,
            other=0.0,
        )
        if HAS_BOX:
            box_at = row * box_sr + b0 * box_s0 + b1 * box_s1 + b2 * box_s2
            box_mask = in_box[:, None] & c_ok[None, :]
            from_box = tl.load(
                box_ptr + box_at[:, None] + c[None, :].to(tl.int64) * box_sc,
                mask=box_mask,
                other=0.0,
            )
            a = tl.where(box_mask, from_box, a)
        w_at = (tap * channels_in + c)[:, None].to(tl.int64) * channels_out + n[None, :]
        w = tl.load(weight_ptr + w_at, mask=c_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc = acc + tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    out_at = row * out_sr + t0 * out_s0 + t1 * out_s1 + t2 * out_s2
    out_offset = out_at[:, None] + n[None, :].to(tl.int64) * out_sc
    tl.store(
        out_ptr + out_offset,
        acc.to(out_ptr.dtype.element_ty),
        mask=m_ok[:, None] & n_ok[None, :],
    )


#: Tile shapes measured on CUDA, per channel counts, kernel size, dtype and epilogue:
#: (BLOCK_M, BLOCK_N, num_warps, num_stages), BLOCK_K 32.
CUDA_TILES = ((128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 4))
#: Compilations of the tile shapes, by what specializes the kernel; each a Future.
_compiles: dict[tuple, Future] = {}
_compiles_lock = threading.Lock()
_background: ThreadPoolExecutor | None = None
#: Background compilations not finished yet.
_in_flight: list[Future] = []
#: Kernels compiled at once in the background (each at its tile shapes in parallel).
BACKGROUND_COMPILES = 4


def _tile_kwargs(tile: tuple[int, int, int, int]) -> dict:
    block_m, block_n, warps, stages = tile
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": 32,
        "num_warps": warps,
        "num_stages": stages,
    }


def _compile_tiles(args: list, flags: dict, device: torch.device) -> None:
    """Compile the kernel at every tile shape, in parallel where Triton can
    (AsyncCompileMode: ptxas runs in subprocesses), without launching it."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # older Triton: one after the other
        AsyncCompileMode = None
    with torch.cuda.device(device), contextlib.ExitStack() as stack:
        if AsyncCompileMode is not None:
            pool = stack.enter_context(ThreadPoolExecutor(len(CUDA_TILES)))
            stack.enter_context(AsyncCompileMode(pool))
        for tile in CUDA_TILES:
            _conv_region_kernel.warmup(*args, grid=(1,), **flags, **_tile_kwargs(tile))


def _compiled(
    key: tuple, args: list, flags: dict, device: torch.device, background: bool
) -> Future:
    """The compilation of `key`'s kernels: started in a background thread when
    `background`, else done here."""
    global _background
    with _compiles_lock:
        compiling = _compiles.get(key)
        if compiling is None and background:
            if _background is None:
                _background = ThreadPoolExecutor(
                    BACKGROUND_COMPILES, thread_name_prefix="captum_krypton_compile"
                )
            compiling = _compiles[key] = _background.submit(_compile_tiles, args, flags, device)
            _in_flight.append(compiling)
            started = compiling
        else:
            started = None
    if started is not None:  # outside the lock: a finished job calls back at once
        started.add_done_callback(_finished)
    if compiling is None:
        compiling = Future()
        try:
            _compile_tiles(args, flags, device)
            compiling.set_result(None)
        except Exception as exc:
            compiling.set_exception(exc)
        with _compiles_lock:
            compiling = _compiles.setdefault(key, compiling)
    return compiling


def _stand_ins(args: list) -> list:
    """The launch's arguments with each 16-byte aligned tensor replaced by a
    one-element tensor of its dtype: Triton specializes a pointer on its dtype
    and alignment only, and a background compilation should not keep a batch's
    tensors alive."""
    return [
        torch.empty(1, dtype=a.dtype, device=a.device)
        if isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0
        else a
        for a in args
    ]


def _finished(compiling: Future) -> None:
    with _compiles_lock:
        if compiling in _in_flight:
            _in_flight.remove(compiling)


def compiling() -> bool:
    """Whether a background compilation is still running."""
    with _compiles_lock:
        return any(not compiling.done() for compiling in _in_flight)


def wait_for_compilation() -> None:
    """Until every background compilation started so far has ended."""
    with _compiles_lock:
        compiling = list(_compiles.values())
    for future in compiling:
        future.exception()  # waits; errors surface where the kernel is used


def gemm_weight(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, *kernel) -> (*kernel padded to 3, C_in, C_out), the K x N operand."""
    kernel = weight.shape[2:]
    shaped = weight.reshape(weight.shape[0], weight.shape[1], *_padded3(kernel, 1))
    return shaped.permute(2, 3, 4, 1, 0).contiguous()


def _precision(dtype: torch.dtype) -> str:
    if dtype != torch.float32:
        return "ieee"  # 16-bit inputs: exact products, fp32 accumulation
    return "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"


def conv_region(
    view: torch.Tensor,
    example: torch.Tensor,
    starts: torch.Tensor,
    out_size: Sequence[int],
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: Sequence[int],
    dilation: Sequence[int],
    box: torch.Tensor | None = None,
    box_starts: torch.Tensor | None = None,
    activation: str | None = None,
    gemm_weight_: torch.Tensor | None = None,
    background: bool = False,
) -> torch.Tensor:
    """Conv output box per row, logical (rows, C_out, *out_size), channels-last.

    `starts` (rows, ndim) is the map coordinate of each row's read-in origin (output
    start x stride - padding; may be negative). `gemm_weight_` is `gemm_weight(weight)`
    when the caller keeps it; the conv runs in the precision cuDNN would use.

    On CUDA the kernel is compiled at every tile shape of `CUDA_TILES` the first
    time its channel counts, kernel size, dtype and epilogue are met, and the
    fastest shape is measured (kernels.choice). With `background`, that
    compilation runs in a background thread and this raises
    `choice.CandidatePending` until it and every other background compilation
    are done (the caller runs something else meanwhile; measured beside
    compilations, Triton's launches would look slower than they are). A failed
    compilation raises RuntimeError.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, not {activation!r}")
    rows = starts.shape[0]
    channels_in, channels_out = weight.shape[1], weight.shape[0]
    out = torch.empty(
        (rows, *out_size, channels_out), dtype=view.dtype, device=view.device
    ).movedim(-1, 1)
    positions = 1
    for s in out_size:
        positions *= s
    total = rows * positions
    if total * channels_out == 0:
        return out
    w = gemm_weight(weight) if gemm_weight_ is None else gemm_weight_
    has_box = box is not None
    box_arg = box if has_box else view
    args = [
        out,
        view,
        box_arg,
        w,
        bias if bias is not None else w,
        example.contiguous(),
        _starts3(starts),
        _starts3(box_starts) if has_box else _starts3(starts),
        total,
        positions,
        channels_in,
        channels_out,
        *_padded3(out_size, 1)[1:],
        *_padded3(weight.shape[2:], 1),
        *_padded3(stride, 1),
        *_padded3(dilation, 1),
        *_padded3(view.shape[2:], 1),
        *(_padded3(box.shape[2:], 1) if has_box else [1] * MAX_DIMS),
        *_strides3(view),
        *_strides3(box_arg),
        *_strides3(out),
    ]
    flags = {
        "HAS_BOX": has_box,
        "HAS_BIAS": bias is not None,
        "RELU": activation == "relu",
        "PRECISION": _precision(view.dtype),
    }
    if not view.is_cuda:  # Triton's interpreter: one small tile shape
        grid = (triton.cdiv(total, 32), triton.cdiv(channels_out, 16))
        with LAUNCH_LOCK:
            _conv_region_kernel[grid](*args, **flags, BLOCK_M=32, BLOCK_N=16, BLOCK_K=16)
        return out
    shape_key = (channels_in, channels_out, *_padded3(weight.shape[2:], 1), view.dtype)
    key = (*shape_key, *flags.values(), view.device)
    compiling = _compiles.get(key)  # stand-ins only for a kernel not compiled yet
    if compiling is None:
        compiling = _compiled(key, _stand_ins(args), flags, view.device, background)
    if background and not compiling.done():
        raise choice.CandidatePending(compiling)
    running = next((f for f in _in_flight if not f.done()), None) if background else None
    if running is not None:  # measured once no compilation competes for the CPU
        raise choice.CandidatePending(running)
    if compiling.exception() is not None:
        raise RuntimeError(f"the conv kernel did not compile: {compiling.exception()}")

    def launch(tile: tuple[int, int, int, int]):
        def run() -> torch.Tensor:
            grid = (triton.cdiv(total, tile[0]), triton.cdiv(channels_out, tile[1]))
            with LAUNCH_LOCK:
                _conv_region_kernel[grid](*args, **flags, **_tile_kwargs(tile))
            return out

        return run

    tiles = {"x".join(map(str, tile)): launch(tile) for tile in CUDA_TILES}
    return choice.fastest(("conv_region tile", *shape_key, *flags.values()), tiles, view.device)
