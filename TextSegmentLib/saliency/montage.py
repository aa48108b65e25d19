"""A picture people would rather look at than read: one PNG per prompt.

Panels: the CT slice (percentile stretch + CLAHE, as the saliency paper displays it), the same
slice with the target outlined, one heat overlay per layer in depth order, the combined map, and
a shared colour bar. Slices are shown in the canonical radiological orientation of
``slice_plan`` with their physical aspect ratio, however the volume is stored.

Matplotlib is used through its object interface (``Figure`` + Agg canvas), never ``pyplot``, so
rendering works headless and leaves any host application's backend alone.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError, OutputExistsError
from ..volume import Volume
from .sink import COMBINED, PromptSaliency

NOTICE = (
    "Saliency shows which image regions resemble the target in each layer, not whether the mask is right. "
    "Research use only."
)
COLUMNS = 5
COLORMAP = "inferno"


def choose_slice(saliency: PromptSaliency, *, plan: Any, mask: Optional[Volume] = None) -> int:
    """The canonical slice with the largest target (the mask if given), else the one with the most saliency.

    An empty mask (a prompt not found) marks no slice: argmax of its all-zero areas would be slice 0.
    """
    if mask is not None:
        area = plan.extract(np.asarray(mask.array) > 0).reshape(plan.num_slices, -1).sum(axis=1)
        if area.any():
            return int(np.argmax(area))
    layer = COMBINED if COMBINED in saliency.maps else saliency.layers[-1]
    area = plan.extract(saliency.values(layer)).reshape(plan.num_slices, -1).sum(axis=1)
    return int(np.argmax(area))


def save_montage(
    saliency: PromptSaliency,
    *,
    volume: Volume,
    path: os.PathLike | str,
    mask: Optional[Volume] = None,
    slice_index: Optional[int] = None,
    axis: str = "axial",
    layers: Optional[Sequence[str]] = None,
    contrast: bool = True,
    overwrite: bool = False,
    dpi: int = 110,
) -> Path:
    """Render ``saliency`` over ``volume`` on one slice and write it as a PNG (atomically); returns the path.

    ``slice_index`` counts canonical slices along ``axis`` (inferior → superior for axial); by
    default the slice with the largest target. ``mask`` is outlined (e.g. the segmentation).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from ..preprocess import enhance_contrast, percentile_stretch, slice_plan

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists already; choose another folder (CLI: --out) or pass overwrite=True (CLI: --overwrite)")
    plan = slice_plan(volume, axis=axis)
    if slice_index is None:
        slice_index = choose_slice(saliency, plan=plan, mask=mask)
    if not 0 <= slice_index < plan.num_slices:
        raise InputError(f"slice {slice_index} is outside the {plan.num_slices} {axis} slices of this volume")
    names = list(layers) if layers is not None else saliency.layers
    unknown = [n for n in names if n not in saliency.maps]
    if unknown:
        raise InputError(f"no saliency map for layer(s) {unknown}; there are {saliency.layers}")

    ct = plan.extract(np.asarray(volume.array, dtype=np.float32))[slice_index]
    ct = enhance_contrast(ct) if contrast else percentile_stretch(ct)
    outline = None if mask is None else plan.extract(np.asarray(mask.array) > 0)[slice_index]
    aspect = plan.pixel_spacing[0] / plan.pixel_spacing[1]

    panels = ["CT", "target"] + names
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    figure = Figure(figsize=(2.6 * columns + 0.8, 2.7 * rows + 0.9), dpi=dpi)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.06], wspace=0.08, hspace=0.22)
    norm = Normalize(vmin=0.0, vmax=1.0)
    for n, panel in enumerate(panels):
        ax = figure.add_subplot(grid[n // COLUMNS, n % COLUMNS])
        ax.imshow(ct, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        if panel == "target":
            target = outline if outline is not None else _hot_region(saliency, plan, slice_index)
            if target is not None and target.any():
                _outline(ax, target, linewidth=1.0, aspect=aspect)
            title = "mask outline" if outline is not None else "combined map ≥ 0.5"
        elif panel != "CT":
            heat = plan.extract(saliency.values(panel))[slice_index]
            ax.imshow(heat, cmap=COLORMAP, norm=norm, alpha=0.55, aspect=aspect, interpolation="bilinear")
            if outline is not None and outline.any():
                _outline(ax, outline, linewidth=0.6, aspect=aspect)
            title = _panel_title(saliency, panel)
        else:
            title = f"CT ({axis} slice {slice_index})"
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    bar_ax = figure.add_subplot(grid[:, columns])
    figure.colorbar(ScalarMappable(norm=norm, cmap=COLORMAP), cax=bar_ax, label="saliency (0–1)")
    figure.suptitle(f"“{saliency.prompt}”: layer-wise saliency", fontsize=11)
    figure.text(0.5, 0.005, NOTICE, ha="center", va="bottom", fontsize=6.5, color="#555555")
    return _save_atomically(figure, path, overwrite=overwrite)


def _outline(ax: Any, region: np.ndarray, *, linewidth: float, aspect: float) -> None:
    """Outline ``region`` in green; a slice one pixel thin (contour needs 2 × 2) gets it filled instead."""
    if min(region.shape) >= 2:
        ax.contour(region.astype(np.float32), levels=[0.5], colors=["#39ff14"], linewidths=linewidth)
        return
    from matplotlib.colors import ListedColormap

    shown = np.ma.masked_where(~region.astype(bool), np.ones(region.shape, np.float32))
    ax.imshow(shown, cmap=ListedColormap(["#39ff14"]), alpha=0.6, aspect=aspect, interpolation="nearest")


def _panel_title(saliency: PromptSaliency, layer: str) -> str:
    entry = saliency.legend.get(layer, {})
    if layer == COMBINED:
        return "combined (mean)"
    stage = entry.get("stage")
    return f"{layer} · stage {stage}" if stage is not None else layer


def _hot_region(saliency: PromptSaliency, plan: Any, slice_index: int) -> Optional[np.ndarray]:
    """Without a mask to outline, outline where the combined map is hot (≥ 0.5)."""
    layer = COMBINED if COMBINED in saliency.maps else saliency.layers[-1]
    return plan.extract(saliency.values(layer))[slice_index] >= 0.5


def _save_atomically(figure: Any, path: Path, *, overwrite: bool) -> Path:
    from ..io.writers import exists_error

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(tmp, format="png")
        if path.exists() and not overwrite:
            raise exists_error(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
