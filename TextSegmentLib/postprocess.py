"""Optional 3D clean-up of a binary mask: slice-wise models leave specks and holes between slices."""

from __future__ import annotations

import numpy as np


def clean_mask(
    mask: np.ndarray, *, largest_component: bool = True, fill_holes: bool = True, min_component_voxels: int = 0
) -> np.ndarray:
    """Drop 26-connected islands under ``min_component_voxels``, keep the largest component and/or
    fill enclosed holes; returns uint8."""
    from scipy import ndimage

    out = np.asarray(mask).astype(bool)
    if min_component_voxels > 1 and out.any():
        labels, count = ndimage.label(out, structure=np.ones((3, 3, 3), dtype=bool))
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_component_voxels
        keep[0] = False
        out = keep[labels]
    if largest_component and out.any():
        labels, count = ndimage.label(out, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out = labels == int(np.argmax(sizes))
    if fill_holes and out.any():
        out = ndimage.binary_fill_holes(out)
    return out.astype(np.uint8)


def largest_component_voxels(mask: np.ndarray) -> int:
    """Voxels in the largest 26-connected component (0 for an empty mask): a speck or a real finding?"""
    from scipy import ndimage

    mask = np.asarray(mask).astype(bool)
    if not mask.any():
        return 0
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    return int(np.bincount(labels.ravel())[1:].max())
