"""CT preprocessing: HU windows, contrast (stretch + CLAHE), canonical slices, aspect-preserving fit.

The usual path from a volume to model input::

    plan = slice_plan(volume, axis="axial")
    slices = plan.extract(volume.array)                       # (N, H, W) HU, canonical orientation
    images, fit = fit_to_square(window_composite(slices), size=352, pixel_spacing=plan.pixel_spacing)
    ...                                                       # model → (N, 352, 352) probabilities
    mask = plan.restore(inverse_fit(probs, fit) > 0.5)        # back on the volume's (z, y, x) grid

The resize functions need torch; they are loaded on first use so that windowing and slicing
(e.g. for display) never pay for importing it.
"""

from __future__ import annotations

from typing import Any

from .clahe import ContrastConfig, clahe, enhance_contrast, percentile_stretch
from .slicing import VIEWS, SlicePlan, slice_plan
from .windows import DEFAULT_COMPOSITE, WINDOW_PRESETS, Window, apply_window, get_window, window_composite

_TORCH_EXPORTS = ("FitTransform", "fit_to_square", "inverse_fit", "plan_fit")

__all__ = [
    "DEFAULT_COMPOSITE",
    "VIEWS",
    "WINDOW_PRESETS",
    "ContrastConfig",
    "SlicePlan",
    "Window",
    "apply_window",
    "clahe",
    "enhance_contrast",
    "get_window",
    "percentile_stretch",
    "slice_plan",
    "window_composite",
    *_TORCH_EXPORTS,
]


def __getattr__(name: str) -> Any:
    if name in _TORCH_EXPORTS:
        from . import resize

        return getattr(resize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
