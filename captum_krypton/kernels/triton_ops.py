"""Triton kernels of the engine's data movement, one pass each.

`compose_region` builds, for every row, a region of a feature map from three
sources at once: the row's box where the region meets it, the clean view (of
the row's example) elsewhere inside the map, and a pad value outside the map.
The conv/pool read-in (channels-last tile) and the projection to full maps
(written straight into the clean value's NCHW layout) are both this kernel.
Its torch reference is `torch_ops.compose_region`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_DIMS = 3

#: Held around every launch: Triton's autotuner and compile caches are not safe to
#: fill from several threads at once (devices= runs one thread per GPU).
LAUNCH_LOCK = threading.Lock()


@triton.jit(
    do_not_specialize=[
        "positions",
        "position_blocks",
        "size1",
        "size2",
        "map0",
        "map1",
        "map2",
        "bsize0",
        "bsize1",
        "bsize2",
    ]
)
def _compose_region_kernel(
    out_ptr,
    view_ptr,
    box_ptr,
    example_ptr,
    starts_ptr,
    box_starts_ptr,
    channels,
    positions,
    position_blocks,
    size1,
    size2,
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
    pad_value,
    HAS_BOX: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    # One program: one row, a block of positions x a block of channels. Per-row
    # offsets are scalars; position arithmetic is done once per position.
    row = tl.program_id(0) // position_blocks
    p = (tl.program_id(0) % position_blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = row.to(tl.int64)
    p_ok = p < positions
    c_ok = c < channels
    t2 = p % size2
    t1 = (p // size2) % size1
    t0 = p // (size2 * size1)
    m0 = tl.load(starts_ptr + r * 3 + 0) + t0
    m1 = tl.load(starts_ptr + r * 3 + 1) + t1
    m2 = tl.load(starts_ptr + r * 3 + 2) + t2
    in_map = p_ok & (m0 >= 0) & (m0 < map0) & (m1 >= 0) & (m1 < map1) & (m2 >= 0) & (m2 < map2)
    example = tl.load(example_ptr + r)
    view_at = example * view_sn + m0 * view_s0 + m1 * view_s1 + m2 * view_s2
    view_offset = view_at[:, None] + c[None, :].to(tl.int64) * view_sc
    value = tl.load(view_ptr + view_offset, mask=in_map[:, None] & c_ok[None, :], other=pad_value)
    if HAS_BOX:
        b0 = m0 - tl.load(box_starts_ptr + r * 3 + 0)
        b1 = m1 - tl.load(box_starts_ptr + r * 3 + 1)
        b2 = m2 - tl.load(box_starts_ptr + r * 3 + 2)
        in_box = p_ok & (b0 >= 0) & (b0 < bsize0) & (b1 >= 0) & (b1 < bsize1)
        in_box = in_box & (b2 >= 0) & (b2 < bsize2)
        box_at = r * box_sr + b0 * box_s0 + b1 * box_s1 + b2 * box_s2
        box_offset = box_at[:, None] + c[None, :].to(tl.int64) * box_sc
        box_mask = in_box[:, None] & c_ok[None, :]
        from_box = tl.load(box_ptr + box_offset, mask=box_mask, other=0.0)
        value = tl.where(box_mask, from_box, value)
    out_at = r * out_sr + t0 * out_s0 + t1 * out_s1 + t2 * out_s2
    out_offset = out_at[:, None] + c[None, :].to(tl.int64) * out_sc
    tl.store(out_ptr + out_offset, value, mask=p_ok[:, None] & c_ok[None, :])


def _padded3(values: Sequence[int], fill: int) -> list[int]:
    values = list(values)
    return [fill] * (MAX_DIMS - len(values)) + values


def _strides3(tensor: torch.Tensor) -> list[int]:
    """(row, channel, d0, d1, d2) strides of a logical (rows, C, *spatial) tensor."""
    strides = list(tensor.stride())
    return strides[:2] + _padded3(strides[2:], 0)


def _starts3(starts: torch.Tensor) -> torch.Tensor:
    rows, ndim = starts.shape
    if ndim == MAX_DIMS:
        return starts.contiguous()
    padding = starts.new_zeros(rows, MAX_DIMS - ndim)
    return torch.cat([padding, starts], 1).contiguous()


def compose_region(
    view: torch.Tensor,
    example: torch.Tensor,
    starts: torch.Tensor,
    size: Sequence[int],
    pad_value: float = 0.0,
    box: torch.Tensor | None = None,
    box_starts: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Region [starts, starts + size) of each row, logical (rows, C, *size).

    view: (N, C, *map) in any layout; box: (rows, C, *box size) in any layout.
    `out` (logical shape as returned) may be given in any layout, e.g. NCHW for a
    projection; by default a channels-last tensor is made.
    """
    rows = starts.shape[0]
    channels = view.shape[1]
    if out is None:
        out = torch.empty((rows, *size, channels), dtype=view.dtype, device=view.device).movedim(
            -1, 1
        )
    positions = 1
    for s in size:
        positions *= s
    if rows * channels * positions == 0:
        return out
    has_box = box is not None
    box_arg = box if has_box else view
    box_starts_arg = _starts3(box_starts) if has_box else _starts3(starts)
    box_size = _padded3(box.shape[2:], 1) if has_box else [1] * MAX_DIMS
    # Blocks follow the output's layout: channels innermost (tiles) or positions
    # innermost (NCHW projections), so stores stay contiguous.
    channel_block = min(triton.next_power_of_2(channels), 64)
    if out.stride(1) == 1:
        block_p, block_c = max(16, 1024 // channel_block), channel_block
    else:
        block_p, block_c = 256, min(channel_block, 4)
    position_blocks = triton.cdiv(positions, block_p)
    grid = (rows * position_blocks, triton.cdiv(channels, block_c))
    padded_size = _padded3(size, 1)
    with LAUNCH_LOCK:
        _compose_region_kernel[grid](
            out,
            view,
            box_arg,
            example.contiguous(),
            _starts3(starts),
            box_starts_arg,
            channels,
            positions,
            position_blocks,
            padded_size[1],
            padded_size[2],
            *_padded3(view.shape[2:], 1),
            *box_size,
            *_strides3(view),
            *_strides3(box_arg),
            *_strides3(out),
            pad_value,
            HAS_BOX=has_box,
            BLOCK_P=block_p,
            BLOCK_C=block_c,
        )
    return out
