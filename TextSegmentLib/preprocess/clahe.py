"""Contrast for the display/saliency path: percentile stretch, then CLAHE (as the saliency paper does).

CLAHE here follows OpenCV's conventions, because that is what papers quote: ``clip_limit`` is
relative to the mean bin count of a tile (2.0 = no bin may hold more than twice the average), and
``tiles`` is the (rows, cols) grid of contextual regions. Each tile's histogram is clipped, the
excess is redistributed over all bins (repeatedly, so bins end at or under the limit as in
Zuiderveld's original), and every pixel blends the equalisation maps of its four nearest tile
centres bilinearly. Tile centres sit at pixel centres, so a flipped image gives the flipped result.

Plain numpy (no OpenCV/scikit-image in the runtime stack); the tests check it against
``skimage.exposure.equalize_adapthist``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..errors import InputError

_REDISTRIBUTION_ROUNDS = 32


@dataclass(frozen=True)
class ContrastConfig:
    """Percentile stretch followed by optional CLAHE; the defaults are the saliency paper's."""

    low_percentile: float = 0.5
    high_percentile: float = 99.5
    clahe: bool = True
    clip_limit: float = 2.0
    tiles: tuple[int, int] = (8, 8)
    nbins: int = 256


def enhance_contrast(image: Any, *, config: Optional[ContrastConfig] = None) -> np.ndarray:
    """Stretch then (optionally) CLAHE an (H, W) or (N, H, W) image, slice by slice; float32 in [0, 1]."""
    config = config or ContrastConfig()
    out = percentile_stretch(image, low=config.low_percentile, high=config.high_percentile)
    if config.clahe:
        out = clahe(out, clip_limit=config.clip_limit, tiles=config.tiles, nbins=config.nbins)
    return out


def percentile_stretch(image: Any, *, low: float = 0.5, high: float = 99.5, per_slice: bool = True) -> np.ndarray:
    """Map the ``low``..``high`` percentiles to 0..1 (clipped): robust to a few extreme pixels.

    With ``per_slice`` each (H, W) slice of a stack gets its own percentiles; a flat slice gives zeros.
    """
    if not 0.0 <= low < high <= 100.0:
        raise InputError(f"percentile stretch needs 0 <= low < high <= 100, got low={low}, high={high}")
    values = _as_image_stack(image, "percentile_stretch")
    axes = (-2, -1) if per_slice else None
    lo, hi = np.percentile(values, [low, high], axis=axes, keepdims=True)
    span = hi - lo
    stretched = (values - lo) / np.where(span > 0, span, 1.0)
    stretched = np.where(span > 0, stretched, 0.0)
    return np.clip(stretched, 0.0, 1.0).astype(np.float32)


def clahe(
    image: Any,
    *,
    clip_limit: float = 2.0,
    tiles: tuple[int, int] = (8, 8),
    nbins: int = 256,
) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of an (H, W) or (N, H, W) image in [0, 1].

    Values outside [0, 1] are clipped first (stretch or window the image before). ``clip_limit``
    <= 0 disables clipping (plain adaptive equalisation). Returns float32 in [0, 1].
    """
    values = _as_image_stack(image, "clahe")
    if nbins < 2:
        raise InputError(f"CLAHE needs at least 2 histogram bins, got {nbins}")
    if len(tiles) != 2 or min(tiles) < 1:
        raise InputError(f"CLAHE tiles must be two positive integers (rows, cols), got {tiles}")
    stack = values.reshape((-1,) + values.shape[-2:])
    n, h, w = stack.shape
    tiles_y, tiles_x = min(int(tiles[0]), h), min(int(tiles[1]), w)
    tile_h, tile_w = math.ceil(h / tiles_y), math.ceil(w / tiles_x)

    bins = np.minimum((np.clip(stack, 0.0, 1.0) * nbins).astype(np.int64), nbins - 1)
    # Like OpenCV: extend bottom/right by reflection so the tiles cover the image evenly.
    padded = np.pad(bins, ((0, 0), (0, tiles_y * tile_h - h), (0, tiles_x * tile_w - w)), mode="reflect")
    hist = _tile_histograms(padded, tiles_y, tiles_x, nbins)

    area = tile_h * tile_w
    if clip_limit > 0:
        hist = _clip_and_redistribute(hist, limit=max(clip_limit * area / nbins, 1.0))
    luts = np.cumsum(hist, axis=-1) / area  # (n, tiles_y, tiles_x, nbins): each tile's equalisation map

    y0, y1, wy = _neighbour_tiles(h, tile_h, tiles_y)
    x0, x1, wx = _neighbour_tiles(w, tile_w, tiles_x)
    idx = np.arange(n)[:, None, None]
    y0, y1, wy = y0[None, :, None], y1[None, :, None], wy[None, :, None]
    x0, x1, wx = x0[None, None, :], x1[None, None, :], wx[None, None, :]
    top = luts[idx, y0, x0, bins] * (1 - wx) + luts[idx, y0, x1, bins] * wx
    bottom = luts[idx, y1, x0, bins] * (1 - wx) + luts[idx, y1, x1, bins] * wx
    out = top * (1 - wy) + bottom * wy
    return np.clip(out, 0.0, 1.0).astype(np.float32).reshape(values.shape)


def _tile_histograms(bins: np.ndarray, tiles_y: int, tiles_x: int, nbins: int) -> np.ndarray:
    """Per-tile histograms in one ``bincount``: (n, tiles_y, tiles_x, nbins) float64 counts."""
    n, ph, pw = bins.shape
    tile_row = np.arange(ph) // (ph // tiles_y)
    tile_col = np.arange(pw) // (pw // tiles_x)
    tile = (np.arange(n)[:, None, None] * tiles_y + tile_row[None, :, None]) * tiles_x + tile_col[None, None, :]
    counts = np.bincount((tile * nbins + bins).ravel(), minlength=n * tiles_y * tiles_x * nbins)
    return counts.reshape(n, tiles_y, tiles_x, nbins).astype(np.float64)


def _clip_and_redistribute(hist: np.ndarray, *, limit: float) -> np.ndarray:
    """Clip bins at ``limit`` and spread the excess evenly, until (almost) nothing is left over."""
    nbins = hist.shape[-1]
    for _ in range(_REDISTRIBUTION_ROUNDS):
        excess = np.maximum(hist - limit, 0.0).sum(axis=-1, keepdims=True)
        if excess.max() < 1e-3:
            break
        hist = np.minimum(hist, limit) + excess / nbins
    return hist


def _neighbour_tiles(size: int, tile: int, count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each pixel: the tiles whose centres bracket it and the weight of the second one."""
    position = (np.arange(size) + 0.5) / tile - 0.5
    first = np.floor(position)
    weight = position - first
    first = first.astype(np.int64)
    return np.clip(first, 0, count - 1), np.clip(first + 1, 0, count - 1), weight


def _as_image_stack(image: Any, what: str) -> np.ndarray:
    values = np.asarray(image, dtype=np.float32)
    if values.ndim not in (2, 3) or values.size == 0:
        raise InputError(f"{what} needs an (H, W) or (N, H, W) image, got shape {values.shape}")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{what}: the image holds NaN or infinite values; fill them before enhancing contrast")
    return values
