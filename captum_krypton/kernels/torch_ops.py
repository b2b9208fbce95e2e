"""Tile operations of the engine, in torch ops.

These are the engine's only data-movement primitives; a GPU backend replaces
them with kernels of the same math. All tensors here are channels-last:
`(rows, *spatial, channels)`, so each gathered position is one contiguous vector.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _axis_index(starts: torch.Tensor, size: Sequence[int], dim: int) -> torch.Tensor:
    """Index of spatial axis `dim`, shaped to broadcast as (rows, *size)."""
    rows, ndim = starts.shape
    shape = [rows] + [1] * ndim
    shape[dim + 1] = size[dim]
    offsets = torch.arange(size[dim], device=starts.device)
    return (starts[:, dim].unsqueeze(1) + offsets).view(shape)


def gather_tiles(
    source: torch.Tensor, source_row: torch.Tensor, starts: torch.Tensor, size: Sequence[int]
) -> torch.Tensor:
    """Row r gets source[source_row[r]] at [starts[r], starts[r] + size): all in range."""
    rows, ndim = starts.shape
    index = [source_row.view([rows] + [1] * ndim)]
    index += [_axis_index(starts, size, d) for d in range(ndim)]
    return source[tuple(index)]


def overlay_box(
    tile: torch.Tensor, tile_starts: torch.Tensor, box: torch.Tensor, box_starts: torch.Tensor
) -> torch.Tensor:
    """Write each row's box over its tile where they overlap (offsets in map coordinates).

    When every box lies inside its tile the box is scattered (box-sized work);
    otherwise each tile position picks the box or the tile (tile-sized work).
    """
    rows, ndim = tile_starts.shape
    tile_size = tile.shape[1:-1]
    box_size = box.shape[1:-1]
    relative = box_starts - tile_starts
    if not all(box_size):
        return tile
    inside = bool(
        (
            (relative >= 0)
            & (
                relative + torch.tensor(box_size, device=relative.device)
                <= torch.tensor(tile_size, device=relative.device)
            )
        ).all()
    )
    row_index = torch.arange(rows, device=tile.device).view([rows] + [1] * ndim)
    if inside:
        index = [row_index] + [_axis_index(relative, box_size, d) for d in range(ndim)]
        tile[tuple(index)] = box
        return tile
    # Positions of the tile expressed in box coordinates.
    inverse = tile_starts - box_starts
    mask = torch.ones((), dtype=torch.bool, device=tile.device)
    index = [row_index]
    for d in range(ndim):
        position = _axis_index(inverse, tile_size, d)
        mask = mask & (position >= 0) & (position < box_size[d])
        index.append(position.clamp(0, box_size[d] - 1))
    from_box = box[tuple(index)]
    return torch.where(mask.unsqueeze(-1), from_box, tile)


def scatter_boxes(full: torch.Tensor, box: torch.Tensor, box_starts: torch.Tensor) -> torch.Tensor:
    """Projection: write each row's box into its full map (in place), boxes inside maps."""
    rows, ndim = box_starts.shape
    row_index = torch.arange(rows, device=full.device).view([rows] + [1] * ndim)
    size = box.shape[1:-1]
    index = [row_index] + [_axis_index(box_starts, size, d) for d in range(ndim)]
    full[tuple(index)] = box
    return full


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
    """Torch reference of the Triton `compose_region` (same arguments, same math).

    Each row's region of (N, C, *map) `view` at `starts`: the row's box where the
    region meets it, the view of example[row] elsewhere in the map, `pad_value`
    outside the map. Returns (rows, C, *size).
    """
    source = view.movedim(1, -1)
    rows, ndim = starts.shape
    index = [example.view([rows] + [1] * ndim)]
    in_map = torch.ones((), dtype=torch.bool, device=view.device)
    for d in range(ndim):
        position = _axis_index(starts, size, d)
        limit = source.shape[d + 1]
        in_map = in_map & (position >= 0) & (position < limit)
        index.append(position.clamp(0, limit - 1))
    tile = source[tuple(index)]
    pad = torch.full((), pad_value, dtype=tile.dtype, device=tile.device)
    tile = torch.where(in_map.unsqueeze(-1), tile, pad)
    if box is not None:
        tile = overlay_box(tile, starts, box.movedim(1, -1), box_starts)
    result = tile.movedim(-1, 1)
    if out is None:
        return result
    return out.copy_(result)


_CONV = {
    1: torch.nn.functional.conv1d,
    2: torch.nn.functional.conv2d,
    3: torch.nn.functional.conv3d,
}


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
) -> torch.Tensor:
    """Torch reference of the Triton `conv_region`: read-in tile (box | view | zero)
    at `starts`, an unpadded conv over it, bias, then the activation."""
    extent = [(k - 1) * d + 1 for k, d in zip(weight.shape[2:], dilation)]
    size = [(o - 1) * s + e for o, s, e in zip(out_size, stride, extent)]
    tile = compose_region(view, example, starts, size, 0.0, box, box_starts)
    out = _CONV[len(out_size)](tile, weight, bias, tuple(stride), 0, tuple(dilation))
    if activation == "relu":
        out = torch.relu_(out)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}")
    return out
