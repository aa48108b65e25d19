"""Where output maps are stored: on the source grid, or on a compact grid over the same extent.

A map holds no detail finer than what it came from. A saliency map is no finer than its feature
map (the sink keeps none finer than ``max_map_size`` cells a side), and a probability map no finer
than the network's input square (128 px for the tiny presets). On a 512 × 512 CT a map on the
source grid is therefore up to 16× more voxels than information: ten uint8 saliency maps per
prompt of a 300-slice study are 790 MB. The compact grid keeps the slice axis and shrinks the two
in-plane axes to at most a given size, over the same physical extent and orientation. Slicer and
other viewers interpolate it like any volume; ``on_grid_of`` brings it back onto the source grid
where voxel-by-voxel comparisons need it (metrics, montages, the label map's overlaps).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .volume import Volume

GRIDS = ("source", "compact")


def compact_slice_shape(
    shape: tuple[int, int], limit: int, spacing: tuple[float, float] = (1.0, 1.0)
) -> tuple[int, int]:
    """(H, W) shrunk so that neither side exceeds ``limit``, physical aspect kept; no axis ever enlarged.

    ``spacing`` is the (row, column) size of a pixel: the longer physical side gets ``limit`` cells
    and the other as many cells of that size as cover it (as ``fit_to_square`` lays a slice into
    the network's square), each axis capped at its own pixel count.
    """
    extent = (shape[0] * float(spacing[0]), shape[1] * float(spacing[1]))
    scale = limit / max(extent)
    return (min(int(shape[0]), max(1, round(extent[0] * scale))),
            min(int(shape[1]), max(1, round(extent[1] * scale))))


def compact_plan(plan: Any, limit: int) -> Any:
    """The slice plan of the compact grid over ``plan``'s extent: its in-plane axes at most ``limit`` voxels.

    Cells are as square in millimetres as the network's input pixels (the slice's longer physical
    side gets ``limit`` of them), so a thick-slice CT sliced coronally keeps every slice row the
    network resolved. Its ``restore`` puts compact slices back into the volume's axis order, ready
    for ``over_extent``. Slices no larger than that keep ``plan`` itself: their compact grid is the
    source grid.
    """
    rows, cols = compact_slice_shape(plan.shape[1:], limit, plan.pixel_spacing)
    if (rows, cols) == tuple(plan.shape[1:]):
        return plan
    shape = list(plan.source_shape)
    shape[plan.axes[1]], shape[plan.axes[2]] = rows, cols
    return dataclasses.replace(plan, source_shape=tuple(shape))


def over_extent(volume: Volume, array: np.ndarray, **changes: Any) -> Volume:
    """``array`` as a ``Volume`` covering ``volume``'s extent and orientation on its own grid.

    Along each axis the voxels of ``array`` tile the same span as ``volume``'s: the spacing grows by
    the size ratio and the first voxel's centre moves to the middle of the span it now covers.
    """
    factors = [volume.shape[axis] / array.shape[axis] for axis in range(3)]  # array order (z, y, x)
    origin = np.asarray(volume.origin, dtype=np.float64)
    spacing = list(volume.spacing)
    for axis, factor in enumerate(factors):
        index = 2 - axis  # spacing, origin and direction columns are in (x, y, z) order
        origin = origin + volume.direction[:, index] * volume.spacing[index] * (factor - 1.0) / 2.0
        spacing[index] *= factor
    return dataclasses.replace(volume, array=np.asarray(array), spacing=tuple(spacing), origin=tuple(origin), **changes)


def on_grid_of(values: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """float32 ``values`` over some extent resampled onto the ``shape`` grid over that extent (trilinear).

    The inverse placement of ``over_extent``: voxel centres at ``(i + 0.5) · ratio − 0.5``, which is
    ``interpolate(..., align_corners=False)``. An axis of equal size is left as it is.
    """
    if tuple(values.shape) == tuple(shape):
        return values
    import torch
    import torch.nn.functional as F

    source = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))[None, None]
    return F.interpolate(source, size=tuple(shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def same_extent(
    ijk_to_lps: np.ndarray, shape: tuple[int, int, int], reference_ijk_to_lps: np.ndarray,
    reference_shape: tuple[int, int, int], *, tolerance_mm: float,
) -> bool:
    """Whether two grids (4 × 4 index-to-LPS matrices, (z, y, x) shapes) span the same box, axis for axis.

    Compares the outer corner of the first voxel and the far ends of the three index axes: equal
    extent and orientation, whatever the voxel counts.
    """

    def corners(matrix: np.ndarray, zyx: tuple[int, int, int]) -> np.ndarray:
        size = np.asarray(zyx[::-1], dtype=np.float64)
        points = np.full((4, 3), -0.5)
        for axis in range(3):
            points[axis + 1, axis] = size[axis] - 0.5
        return (np.asarray(matrix)[:3, :3] @ points.T).T + np.asarray(matrix)[:3, 3]

    return bool(np.allclose(corners(ijk_to_lps, shape), corners(reference_ijk_to_lps, reference_shape), atol=tolerance_mm))
