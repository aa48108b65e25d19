"""Optional 3D clean-up of a binary mask: slice-wise models leave specks and holes between slices."""

from __future__ import annotations

import numpy as np


def clean_mask(mask: np.ndarray, *, largest_component: bool = True, fill_holes: bool = True) -> np.ndarray:
    """Keep the largest 26-connected component and/or fill enclosed holes; returns uint8."""
    from scipy import ndimage

    out = np.asarray(mask).astype(bool)
    if largest_component and out.any():
        labels, count = ndimage.label(out, structure=np.ones((3, 3, 3), dtype=bool))
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            out = labels == int(np.argmax(sizes))
    if fill_holes and out.any():
        out = ndimage.binary_fill_holes(out)
    return out.astype(np.uint8)
