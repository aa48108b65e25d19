"""HU windows: how single-channel CT becomes the [0, 1] "RGB" images the models were built for.

A window maps ``[center - width/2, center + width/2]`` HU linearly onto ``[0, 1]`` and clips the
rest. The presets are common radiology values (level/width in HU):

========== ======= ======= ==========================================================
preset      width   center  why
========== ======= ======= ==========================================================
abdomen       400      40  soft-tissue organs of the abdomen
liver         150      60  narrow window around parenchyma; centred at 60 (rather than
                            Radiopaedia's 30) so both unenhanced (~55 HU) and
                            portal-venous (~100-120 HU) liver stay inside it
lung         1500    -600  aerated lung and its vessels
bone         1800     400  cortical and trabecular bone
mediastinum   350      50  vessels, heart and nodes of the chest
soft_tissue   400      50  general soft tissue (neck, limbs)
========== ======= ======= ==========================================================

The default composite (abdomen, lung, bone) gives the three channels three different tissue
ranges, so a model trained on natural RGB still sees fat/organ, air/lung and bone contrast.

Everything here works on numpy arrays and, unchanged, on torch tensors (the engine windows on the
GPU); torch is never imported by this module.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Window:
    """A HU window: ``center`` (level) and ``width``, both in HU."""

    center: float
    width: float

    @property
    def low(self) -> float:
        return self.center - self.width / 2.0

    @property
    def high(self) -> float:
        return self.center + self.width / 2.0


WINDOW_PRESETS: dict[str, Window] = {
    "abdomen": Window(center=40.0, width=400.0),
    "liver": Window(center=60.0, width=150.0),
    "lung": Window(center=-600.0, width=1500.0),
    "bone": Window(center=400.0, width=1800.0),
    "mediastinum": Window(center=50.0, width=350.0),
    "soft_tissue": Window(center=50.0, width=400.0),
}

DEFAULT_COMPOSITE = ("abdomen", "lung", "bone")

WindowSpec = Union[str, Window, tuple[float, float]]


def get_window(spec: WindowSpec) -> Window:
    """A ``Window`` from a preset name, a ``Window`` or a ``(center, width)`` pair."""
    if isinstance(spec, Window):
        window = spec
    elif isinstance(spec, str):
        key = spec.strip().lower().replace("-", "_").replace(" ", "_")
        if key not in WINDOW_PRESETS:
            raise InputError(f"unknown HU window preset {spec!r}; choose one of {', '.join(WINDOW_PRESETS)}")
        window = WINDOW_PRESETS[key]
    else:
        try:
            center, width = (float(v) for v in spec)
        except (TypeError, ValueError):
            raise InputError(f"HU window {spec!r} must be a preset name or a (center, width) pair") from None
        window = Window(center=center, width=width)
    if not np.isfinite(window.center) or not np.isfinite(window.width) or window.width <= 0:
        raise InputError(f"HU window {spec!r}: width must be positive and both values finite")
    return window


def apply_window(
    hu: Any,
    *,
    preset: Optional[str] = None,
    center: Optional[float] = None,
    width: Optional[float] = None,
) -> Any:
    """Map HU to [0, 1] float32 through a window given by ``preset`` or by ``center`` and ``width``."""
    if preset is not None and (center is not None or width is not None):
        raise InputError("give either a window preset or center and width, not both")
    if preset is not None:
        window = get_window(preset)
    elif center is not None and width is not None:
        window = get_window((center, width))
    else:
        raise InputError("a HU window needs a preset name or both center and width")
    return _window(_as_numeric(hu), window)


def window_composite(
    hu: Any, *, windows: Union[WindowSpec, Sequence[WindowSpec]] = DEFAULT_COMPOSITE, out: Any = None
) -> Any:
    """Stack one windowed image per entry of ``windows`` as channels: (N, H, W) → (N, C, H, W).

    A single (H, W) slice gives (C, H, W). The channel axis is always the one just before H, W.
    Each channel is windowed in place in the output, straight from the HU values (an int16 CT is
    not first copied to float32), so a whole volume (training windows whole cases) costs its output
    and no temporaries. ``out``, a float32 array or tensor of the output's shape, is written and
    returned: a caller windowing slice after slice reuses one buffer. A single preset name or
    ``Window`` is one window (one channel), not a sequence of characters.
    """
    windows = window_specs(windows)
    if len(windows) == 0:
        raise InputError("window_composite needs at least one window")
    image = _as_numeric(hu)
    if image.ndim < 2:
        raise InputError(f"window_composite needs an (H, W) or (N, H, W) image, got shape {tuple(image.shape)}")
    shape = tuple(image.shape[:-2]) + (len(windows),) + tuple(image.shape[-2:])
    if out is None:
        out = _empty(image, shape)
    elif tuple(out.shape) != shape or str(out.dtype).rpartition(".")[2] != "float32":
        raise InputError(f"window_composite: out must be float32 of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    for c, spec in enumerate(windows):
        _window(image, get_window(spec), out=out[..., c, :, :])
    return out


def window_specs(windows: Union[WindowSpec, Sequence[WindowSpec]]) -> tuple:
    """``windows`` as a tuple of specs: a lone name or ``Window`` is one window (a str is a sequence too)."""
    if isinstance(windows, (str, Window)):
        return (windows,)
    return tuple(windows)


def _window(image: Any, window: Window, *, out: Any = None) -> Any:
    """``(image - low) / width`` clipped to [0, 1], computed in ``out`` (a new array if not given)."""
    if out is None:
        out = _empty(image, tuple(image.shape))
    out[...] = image
    out -= window.low
    out /= window.width
    if _torch_module_of(out) is not None:
        return out.clamp_(0.0, 1.0)
    return np.clip(out, 0.0, 1.0, out=out)


def _empty(image: Any, shape: tuple) -> Any:
    """An uninitialised float32 array or tensor (on ``image``'s device) of ``shape``."""
    torch = _torch_module_of(image)
    if torch is not None:
        return image.new_empty(shape, dtype=torch.float32)
    return np.empty(shape, dtype=np.float32)


def _as_numeric(values: Any) -> Any:
    """Tensors and numeric arrays as they are (writing them into a float32 output converts them); else float32."""
    if _torch_module_of(values) is not None:
        return values
    if isinstance(values, np.ndarray) and values.dtype.kind in "biuf":
        return values
    return np.asarray(values, dtype=np.float32)


def _torch_module_of(values: Any) -> Any:
    """``torch`` if ``values`` is a tensor; a tensor cannot exist unless torch is already imported."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return torch
    return None
