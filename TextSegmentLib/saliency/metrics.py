"""How good is a saliency map? Plain numpy scores on one 2D map and its target mask.

All take a map of non-negative scores (rescaled to [0, 1] where a threshold is involved) and a
boolean mask of the same shape; a map with no energy at all gives NaN rather than a flattering
number, so the benchmark can count and report such cases instead of averaging them away.
"""

from __future__ import annotations

import numpy as np


def energy_inside(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's total energy that falls inside ``mask`` (1.0 = all of it)."""
    values = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, None)
    total = values.sum()
    return float(values[np.asarray(mask, dtype=bool)].sum() / total) if total > 0 else float("nan")


def pointing_game(saliency: np.ndarray, mask: np.ndarray) -> float:
    """1.0 if the map's maximum lies inside ``mask``, else 0.0 (ties: the first maximum in row-major order).

    Give it the raw map: a percentile-clipped one has many tied maxima.
    """
    values = np.asarray(saliency, dtype=np.float64)
    if not np.isfinite(values).all() or values.max() <= values.min():
        return float("nan")
    peak = np.unravel_index(int(np.argmax(values)), values.shape)
    return float(bool(np.asarray(mask, dtype=bool)[peak]))


def thresholded_overlap(saliency: np.ndarray, mask: np.ndarray, *, threshold: float = 0.5) -> tuple[float, float]:
    """(Dice, IoU) between ``saliency >= threshold`` and ``mask``; NaN when both are empty."""
    hot = np.asarray(saliency) >= threshold
    truth = np.asarray(mask, dtype=bool)
    overlap = np.logical_and(hot, truth).sum()
    union = np.logical_or(hot, truth).sum()
    if union == 0:
        return float("nan"), float("nan")
    return float(2.0 * overlap / (hot.sum() + truth.sum())), float(overlap / union)


def prompt_swap_correlation(first: np.ndarray, second: np.ndarray) -> float:
    """Pearson correlation of two maps of the same slice for two prompts: near 1 means the prompt is ignored."""
    a = np.asarray(first, dtype=np.float64).ravel()
    b = np.asarray(second, dtype=np.float64).ravel()
    if not (a.size and b.size and np.ptp(a) > 0 and np.ptp(b) > 0):  # empty or constant: centred values are round-off
        return float("nan")
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")
