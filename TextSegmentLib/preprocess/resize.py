"""Fit slices into the model's square input without distorting anatomy, and map outputs back.

A slice of H×W pixels of (row, col) spacing (sr, sc) mm covers H·sr × W·sc mm. ``fit_to_square``
resamples it to square pixels, scales the longer physical side to ``size`` and centres it with
padding; ``inverse_fit`` crops the padding and resamples back to exactly H×W. Anisotropic pixels
therefore never squash an organ, and model outputs land on the source grid.

Batches go through ``torch.nn.functional.interpolate`` (the engine works in torch); numpy arrays
are accepted and returned as numpy for convenience.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError

_MODES = {"linear": "bilinear", "nearest": "nearest-exact"}


@dataclass(frozen=True)
class FitTransform:
    """What ``fit_to_square`` did, so ``inverse_fit`` can undo it exactly."""

    source_shape: tuple[int, int]  # (H, W) of the source slices
    resized_shape: tuple[int, int]  # (h, w) of the image inside the square
    padding: tuple[int, int, int, int]  # (top, bottom, left, right) in output pixels
    size: int
    source_spacing: tuple[float, float]  # (row, col) mm of the source pixels
    output_spacing: float  # mm per (square) output pixel

    @property
    def crop(self) -> tuple[slice, slice]:
        """Row and column slices of the image inside the padded square."""
        top, _, left, _ = self.padding
        h, w = self.resized_shape
        return slice(top, top + h), slice(left, left + w)


def plan_fit(
    source_shape: tuple[int, int], *, size: int, pixel_spacing: tuple[float, float] = (1.0, 1.0)
) -> FitTransform:
    """The ``FitTransform`` for slices of ``source_shape`` (H, W) with ``pixel_spacing`` (row, col) mm."""
    height, width = (int(s) for s in source_shape)
    spacing_r, spacing_c = (float(s) for s in pixel_spacing)
    if height < 1 or width < 1:
        raise InputError(f"cannot fit an empty slice of shape {source_shape}")
    if int(size) < 1:
        raise InputError(f"model input size must be a positive number of pixels, got {size}")
    if not (np.isfinite(spacing_r) and np.isfinite(spacing_c) and spacing_r > 0 and spacing_c > 0):
        raise InputError(f"pixel spacing must be two positive numbers (row, col) in mm, got {pixel_spacing}")
    size = int(size)
    output_spacing = max(height * spacing_r, width * spacing_c) / size
    h = min(size, max(1, round(height * spacing_r / output_spacing)))
    w = min(size, max(1, round(width * spacing_c / output_spacing)))
    top, left = (size - h) // 2, (size - w) // 2
    return FitTransform(
        source_shape=(height, width),
        resized_shape=(h, w),
        padding=(top, size - h - top, left, size - w - left),
        size=size,
        source_spacing=(spacing_r, spacing_c),
        output_spacing=output_spacing,
    )


def fit_to_square(
    images: Any,
    *,
    size: int,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    pad_value: float = 0.0,
    mode: str = "linear",
) -> tuple[Any, FitTransform]:
    """Resize (N, H, W) or (N, C, H, W) slices to (…, size, size), keeping physical aspect.

    ``mode="linear"`` is bilinear with antialiasing when shrinking (images, probabilities);
    ``"nearest"`` keeps label values. Padding is filled with ``pad_value``.
    """
    tensor, restore = _as_batch(images, "fit_to_square")
    transform = plan_fit(tensor.shape[-2:], size=size, pixel_spacing=pixel_spacing)
    resized = _resample(tensor, transform.resized_shape, mode)
    out = resized.new_full(resized.shape[:2] + (transform.size, transform.size), pad_value)
    out[..., transform.crop[0], transform.crop[1]] = resized
    return restore(out), transform


def inverse_fit(maps: Any, transform: FitTransform, *, mode: str = "linear") -> Any:
    """Bring (N, size, size) or (N, C, size, size) model outputs back to the source (N[, C], H, W)."""
    tensor, restore = _as_batch(maps, "inverse_fit")
    if tuple(tensor.shape[-2:]) != (transform.size, transform.size):
        raise ValueError(f"maps of size {tuple(tensor.shape[-2:])} do not match the fitted size {transform.size}")
    cropped = tensor[..., transform.crop[0], transform.crop[1]]
    return restore(_resample(cropped, transform.source_shape, mode))


def _resample(batch: torch.Tensor, shape: tuple[int, int], mode: str) -> torch.Tensor:
    """Interpolate an (N, C, h, w) batch to ``shape``; integer data goes through float and back."""
    if mode not in _MODES:
        raise InputError(f"unknown resize mode {mode!r}; choose one of {', '.join(_MODES)}")
    if tuple(batch.shape[-2:]) == tuple(shape):
        return batch.clone()
    dtype = batch.dtype
    values = batch if dtype.is_floating_point else batch.to(torch.float32)
    if mode == "linear":
        shrinking = shape[0] < values.shape[-2] or shape[1] < values.shape[-1]
        return F.interpolate(values, size=shape, mode="bilinear", align_corners=False, antialias=shrinking)
    out = F.interpolate(values, size=shape, mode=_MODES[mode])
    return out if dtype.is_floating_point else out.round().to(dtype)


def _as_batch(values: Any, what: str) -> tuple[torch.Tensor, Any]:
    """(N, C, H, W) tensor view of the input and a function giving results back in the input's form."""
    is_numpy = not isinstance(values, torch.Tensor)
    tensor = torch.from_numpy(np.ascontiguousarray(values)) if is_numpy else values
    if tensor.ndim not in (3, 4):
        raise InputError(f"{what} needs (N, H, W) or (N, C, H, W) slices, got shape {tuple(tensor.shape)}")
    had_channels = tensor.ndim == 4
    if not had_channels:
        tensor = tensor.unsqueeze(1)

    def restore(result: torch.Tensor) -> Any:
        result = result if had_channels else result.squeeze(1)
        return result.numpy() if is_numpy else result

    return tensor, restore
