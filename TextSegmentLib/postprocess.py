"""Optional 3D clean-up of a binary mask: slice-wise models leave specks and holes between slices."""

from __future__ import annotations

import numpy as np


def clean_mask(
    mask: np.ndarray, *, largest_component: bool = True, fill_holes: bool = True, min_component_voxels: int = 0
) -> np.ndarray:
    """Drop 26-connected islands under ``min_component_voxels``, keep the largest component and/or
    fill enclosed holes (in 2D where the volume is one slice thick); returns uint8."""
    from scipy import ndimage

    out = np.asarray(mask).astype(bool)
    if (largest_component or min_component_voxels > 1) and out.any():
        labels, sizes = _components(out)
        keep = sizes >= max(min_component_voxels, 1)  # the background has size 0: never kept
        if largest_component:
            keep &= np.arange(sizes.size) == int(np.argmax(sizes))
        out = keep[labels]
    if fill_holes and out.any():
        # along an axis one voxel thick every voxel lies on the volume's face, so no hole is enclosed in
        # 3D: a one-slice volume's holes are filled in its plane (a line, thin along two axes, has none)
        thin = tuple(i for i, n in enumerate(out.shape) if n == 1)
        core = out.squeeze(axis=thin)
        if core.ndim >= 2:
            out = ndimage.binary_fill_holes(core).reshape(out.shape)
    return out.astype(np.uint8)


def largest_component_voxels(mask: np.ndarray) -> int:
    """Voxels in the largest 26-connected component (0 for an empty mask): a speck or a real finding?"""
    return int(_components(np.asarray(mask).astype(bool))[1].max())


def _components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """26-connected labels of a boolean mask and each label's voxel count (the background's set to 0)."""
    from scipy import ndimage

    labels, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels, sizes
