"""The compact saliency grid: same extent and orientation as the input, fewer voxels in-plane."""

from __future__ import annotations

import numpy as np
import pytest

from TextSegmentLib.grid import compact_slice_shape, on_grid_of, over_extent, same_extent
from TextSegmentLib.volume import Volume, direction_from_axes

OBLIQUE = direction_from_axes([[np.cos(0.3), np.sin(0.3), 0], [-np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])


def _volume(shape=(4, 12, 8)) -> Volume:
    return Volume(np.zeros(shape, np.float32), spacing=(0.7, 0.9, 2.5), origin=(-3.0, 5.0, 11.0), direction=OBLIQUE)


@pytest.mark.parametrize(
    "shape, limit, expected",
    [((512, 512), 128, (128, 128)), ((101, 122), 128, (101, 122)), ((300, 600), 128, (64, 128)), ((3, 900), 128, (1, 128))],
)
def test_compact_slice_shape_keeps_the_aspect_and_never_enlarges(shape, limit, expected):
    assert compact_slice_shape(shape, limit) == expected


@pytest.mark.parametrize(
    "shape, spacing, limit, expected",
    [((40, 512), (5.0, 0.7), 128, (40, 128)), ((40, 512), (2.5, 0.5), 128, (40, 128)),
     ((512, 512), (0.5, 1.0), 128, (64, 128)), ((16, 128), (4.0, 0.5), 32, (16, 32)),
     ((300, 600), (1.0, 1.0), 128, (64, 128))],
)
def test_compact_slice_shape_keeps_the_physical_aspect_of_anisotropic_pixels(shape, spacing, limit, expected):
    """A coronal slice of a 5 mm CT: 40 rows span 200 mm, 512 columns 358 mm. The network's square
    gives the rows 71 pixels, so all 40 stay (a voxel-count aspect kept 10, 20 mm apart)."""
    assert compact_slice_shape(shape, limit, spacing) == expected


def test_a_coarser_grid_covers_the_same_box_and_each_voxel_sits_on_the_block_it_replaces():
    volume = _volume()
    coarse = over_extent(volume, np.zeros((4, 6, 4), np.uint8))
    assert coarse.spacing == pytest.approx((1.4, 1.8, 2.5))
    assert same_extent(coarse.ijk_to_lps(), coarse.shape, volume.ijk_to_lps(), volume.shape, tolerance_mm=1e-9)
    # coarse voxel (i, j, k) replaces the 2 × 2 block of source voxels (2i..2i+1, 2j..2j+1, k)
    block = volume.physical_points(np.array([[2, 4, 3], [3, 4, 3], [2, 5, 3], [3, 5, 3]]))
    assert np.allclose(coarse.physical_points(np.array([[1, 2, 3]]))[0], block.mean(axis=0), atol=1e-9)


def test_a_shifted_or_transposed_grid_is_not_the_same_extent():
    volume = _volume()
    shifted = Volume(volume.array, spacing=volume.spacing, origin=(-2.0, 5.0, 11.0), direction=OBLIQUE)
    assert not same_extent(shifted.ijk_to_lps(), shifted.shape, volume.ijk_to_lps(), volume.shape, tolerance_mm=1e-3)
    swapped = np.eye(4)
    swapped[:3, :3] = volume.ijk_to_lps()[:3, :3][:, [1, 0, 2]] * [[0.9 / 0.7, 0.7 / 0.9, 1.0]]  # i and j swap roles
    swapped[:3, 3] = volume.origin
    assert not same_extent(swapped, (4, 8, 12), volume.ijk_to_lps(), volume.shape, tolerance_mm=1e-3)


def test_back_on_the_source_grid_a_linear_field_is_exact_inside():
    """Trilinear resampling reproduces a linear field, so the placement of ``on_grid_of`` is ``over_extent``'s."""
    volume = _volume((3, 16, 12))
    coarse = over_extent(volume, np.zeros((3, 4, 3), np.float32))
    field = lambda points: points @ np.array([0.3, -0.2, 0.05]) + 1.0  # noqa: E731
    k, j, i = np.indices(coarse.shape)
    values = field(coarse.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))).reshape(coarse.shape)
    back = on_grid_of(values.astype(np.float32), volume.shape)
    k, j, i = np.indices(volume.shape)
    expected = field(volume.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))).reshape(volume.shape)
    inside = (slice(None), slice(2, -2), slice(2, -2))  # within the outermost coarse voxel centres
    assert np.allclose(back[inside], expected[inside], atol=1e-4)
    assert on_grid_of(values, values.shape) is values


def test_image_inside_marks_the_image_and_is_none_without_padding():
    import torch

    from TextSegmentLib.preprocess import fit_to_square
    from TextSegmentLib.saliency.sink import image_inside

    _, padded = fit_to_square(torch.zeros(1, 3, 20, 32), size=32)
    inside = image_inside(padded, 32)
    assert inside is not None and inside.sum() == 32 * int(inside[:, 0].sum()) and inside[0, 0] == 0
    assert bool((inside[padded.crop[0], padded.crop[1]] == 1).all())
    _, square = fit_to_square(torch.zeros(1, 3, 32, 32), size=32)
    assert image_inside(square, 32) is None
