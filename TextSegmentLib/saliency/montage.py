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
from .sink import COMBINED, PromptSaliency, mask_on_grid

NOTICE = (
    "Saliency shows which image regions resemble the target in each layer, not whether the mask is right. "
    "Research use only."
)
COLUMNS = 5
COLORMAP = "inferno"
ZOOM_AT_LEAST = 2.0  # "auto" zooms only when the window is this many times smaller than the slice
ZOOM_AT_MOST = 4.0  # more shows the network's patch grid and the CT's pixels, not more detail
ZOOM_MARGIN = 1.0  # the zoomed window shows this many target sizes of context on each side


def choose_slice(saliency: PromptSaliency, *, plan: Any, mask: Optional[Volume] = None) -> int:
    """The canonical slice with the largest target (the mask if given), else the one with the most saliency.

    An empty mask (a prompt not found) marks no slice: argmax of its all-zero areas would be slice 0.
    Maps that are 0 everywhere (no slice had a target) give the middle slice, not the first one.
    """
    if mask is not None:
        area = plan.extract(np.asarray(mask.array) > 0).reshape(plan.num_slices, -1).sum(axis=1)
        if area.any():
            return int(np.argmax(area))
    area = plan.extract(saliency.values(_reference_layer(saliency))).reshape(plan.num_slices, -1).sum(axis=1)
    return int(np.argmax(area)) if area.any() else plan.num_slices // 2


def _reference_layer(saliency: PromptSaliency) -> str:
    return COMBINED if COMBINED in saliency.maps else saliency.layers[-1]


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
    outline_label: str = "mask outline",
    zoom: str = "auto",
) -> Path:
    """Render ``saliency`` over ``volume`` on one slice and write it as a PNG (atomically); returns the path.

    ``slice_index`` counts canonical slices along ``axis`` (inferior → superior for axial); by
    default the slice with the largest target. ``mask`` is outlined (e.g. the segmentation) and
    ``outline_label`` titles its panel (say "ROI box outline" when the mask is not the segmentation).
    A slice without a target has maps of 0 (nothing to explain): its panels say so instead of
    showing a dark overlay that would read as low saliency. ``zoom="auto"`` crops the overlay panels
    to the target when it is small on the slice (a lesion is a few pixels of a 512² panel), the CT
    panel keeping the whole slice with the window drawn on it; ``"off"`` never crops, ``"on"`` always.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: exists already; choose another folder (CLI: --out) or pass overwrite=True (CLI: --overwrite)")
    figure = render_montage(saliency, volume=volume, mask=mask, slice_index=slice_index, axis=axis, layers=layers,
                            contrast=contrast, dpi=dpi, outline_label=outline_label, zoom=zoom)
    return _save_atomically(figure, path, overwrite=overwrite)


def render_montage(
    saliency: PromptSaliency,
    *,
    volume: Volume,
    mask: Optional[Volume] = None,
    slice_index: Optional[int] = None,
    axis: str = "axial",
    layers: Optional[Sequence[str]] = None,
    contrast: bool = True,
    dpi: int = 110,
    outline_label: str = "mask outline",
    zoom: str = "auto",
) -> Any:
    """The montage of ``save_montage`` as a matplotlib ``Figure``, not yet written (so it can be inspected)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    from ..preprocess import enhance_contrast, percentile_stretch, slice_plan

    explained = tuple(saliency.source_shape or next(iter(saliency.maps.values())).shape)
    if explained != tuple(volume.shape):  # another volume's slices under these maps would mislead
        raise InputError(f"these saliency maps explain a volume of shape {explained}, not this one of shape "
                         f"{tuple(volume.shape)}; pass the volume they were computed on")
    plan = slice_plan(volume, axis=axis)
    if mask is not None:  # outlined voxel for voxel: on the CT's grid, or reordered onto it, or refused
        mask = mask_on_grid(mask, volume, what="montage mask")
    if slice_index is None:
        slice_index = choose_slice(saliency, plan=plan, mask=mask)
    if not 0 <= slice_index < plan.num_slices:
        raise InputError(f"slice {slice_index} is outside the {plan.num_slices} {axis} slices of this volume")
    names = list(layers) if layers is not None else saliency.layers
    unknown = [n for n in names if n not in saliency.maps]
    if unknown:
        raise InputError(f"no saliency map for layer(s) {unknown}; there are {saliency.layers}")
    if zoom not in ZOOMS:
        raise InputError(f"zoom must be one of {', '.join(ZOOMS)}, got {zoom!r}")

    ct = plan.extract(np.asarray(volume.array, dtype=np.float32))[slice_index]
    ct = enhance_contrast(ct) if contrast else percentile_stretch(ct)
    outline = None if mask is None else plan.extract(np.asarray(mask.array) > 0)[slice_index]
    aspect = plan.pixel_spacing[0] / plan.pixel_spacing[1]
    heats = {name: plan.extract(saliency.values(name))[slice_index] for name in saliency.layers}  # each once
    # every map is 0 on a slice without a target; one flat layer alone is 0 too, so all of them are asked
    untargeted = not any(heat.any() for heat in heats.values())
    target = outline if outline is not None else _hot_region(saliency, plan, slice_index)
    window = None if untargeted else zoom_window(target, spacing=plan.pixel_spacing, zoom=zoom)
    crop = (slice(None), slice(None)) if window is None else window

    panels = ["CT", "target"] + names
    rows = math.ceil(len(panels) / COLUMNS)
    columns = min(COLUMNS, len(panels))
    figure = Figure(figsize=(2.6 * columns + 0.8, 2.7 * rows + 0.9), dpi=dpi)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.06], wspace=0.08, hspace=0.22)
    norm = Normalize(vmin=0.0, vmax=1.0)
    for n, panel in enumerate(panels):
        ax = figure.add_subplot(grid[n // COLUMNS, n % COLUMNS])
        shown = slice(None) if panel == "CT" else crop  # the CT panel keeps the whole slice for context
        ax.imshow(ct[shown], cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
        if panel == "target":
            if target is not None and target.any():
                _outline(ax, target[crop], linewidth=1.0, aspect=aspect)
            title = outline_label if outline is not None else "combined map ≥ 0.5"
            if outline is not None and not outline.any():
                title += " (none on this slice)"
            if window is not None:
                title += f", zoom ×{ct.shape[0] / (window[0].stop - window[0].start):.1f}"
        elif panel != "CT" and untargeted:
            ax.text(0.5, 0.5, "no target:\nnothing to explain", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="white", bbox={"facecolor": "black", "alpha": 0.6})
            title = _panel_title(saliency, panel)
        elif panel != "CT":
            ax.imshow(heats[panel][crop], cmap=COLORMAP, norm=norm, alpha=0.55, aspect=aspect, interpolation="bilinear")
            if outline is not None and outline[crop].any():
                _outline(ax, outline[crop], linewidth=0.6, aspect=aspect)
            title = _panel_title(saliency, panel)
        else:
            title = _ct_title(plan, slice_index)
            if window is not None:
                _frame(ax, window)
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    bar_ax = figure.add_subplot(grid[:, columns])
    # each layer has its own bounds (legend), so a colour compares places within a layer, not across layers
    figure.colorbar(ScalarMappable(norm=norm, cmap=COLORMAP), cax=bar_ax,
                    label="saliency (0–1, each layer rescaled on its own)")
    figure.suptitle(f"“{displayable(saliency.prompt)}”: layer-wise saliency", fontsize=11)
    if untargeted:
        why = ("nothing found for this prompt: no slice has a target" if saliency.target_slices == 0 else
               f"this slice has no target ({saliency.target_slices} other slice(s) have one)")
        figure.text(0.5, 0.93, f"{why}, so its maps are 0: nothing to explain, not low saliency",
                    ha="center", va="top", fontsize=9, color="#b00020")
    figure.text(0.5, 0.005, NOTICE, ha="center", va="bottom", fontsize=6.5, color="#555555")
    return figure


ZOOMS = ("auto", "on", "off")


def zoom_window(region: Optional[np.ndarray], *, spacing: Sequence[float], zoom: str = "auto") -> Optional[tuple[slice, slice]]:
    """Rows and columns of the slice to show around ``region``, or None for the whole slice.

    Why: a 2 cm lesion is a dozen pixels of a 512² slice; at panel size its outline and the maps
    around it cannot be told apart. The window is square in millimetres, centred on the target's
    box with ``ZOOM_MARGIN`` box sizes of context each side, at least ``1 / ZOOM_AT_MOST`` of the slice, and
    shifted (not shrunk) where the target lies near an edge. ``"auto"`` zooms only when that
    magnifies ``ZOOM_AT_LEAST`` times or more, ``"on"`` whenever the window is smaller than the
    slice; an empty region is never zoomed.
    """
    if zoom == "off" or region is None or not region.any():
        return None
    shape = np.asarray(region.shape)
    rows, cols = np.nonzero(region)
    low, high = np.array([rows.min(), cols.min()]), np.array([rows.max(), cols.max()]) + 1
    spacing = np.asarray(spacing, dtype=float)
    half_mm = max(float(np.max((high - low) * spacing)) * (0.5 + ZOOM_MARGIN), float(np.min(shape * spacing)) / (2 * ZOOM_AT_MOST))
    half = np.minimum(np.ceil(half_mm / spacing), shape / 2).astype(int)  # pixels each side, per axis
    centre = (low + high) // 2
    start = np.clip(centre - half, 0, shape - 2 * half)
    stop = start + 2 * half
    if np.all(start == 0) and np.all(stop == shape) or zoom == "auto" and np.any(shape < ZOOM_AT_LEAST * 2 * half):
        return None
    return slice(int(start[0]), int(stop[0])), slice(int(start[1]), int(stop[1]))


def _frame(ax: Any, window: tuple[slice, slice]) -> None:
    """The zoomed window drawn on the whole-slice CT panel, so the crop is placed in its context."""
    from matplotlib.patches import Rectangle

    rows, cols = window
    ax.add_patch(Rectangle((cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start, rows.stop - rows.start,
                           fill=False, edgecolor="#39ff14", linewidth=0.8, linestyle="--"))


def displayable(text: str) -> str:
    """``text`` with the characters the montage's font lacks written as \\uXXXX escapes.

    Missing glyphs were drawn as empty boxes (a CJK prompt became "□□") with a warning per glyph on
    stderr; an escape can at least be read back. The legend JSON keeps the prompt as typed.
    """
    from matplotlib.font_manager import FontProperties, findfont, get_font

    font = get_font(findfont(FontProperties()))
    return "".join(
        c if c.isascii() or font.get_char_index(ord(c)) else c.encode("unicode_escape").decode() for c in text
    )


def _outline(ax: Any, region: np.ndarray, *, linewidth: float, aspect: float) -> None:
    """Outline ``region`` in green; a slice one pixel thin (contour needs 2 × 2) gets it filled instead."""
    if min(region.shape) >= 2:
        ax.contour(region.astype(np.float32), levels=[0.5], colors=["#39ff14"], linewidths=linewidth)
        return
    from matplotlib.colors import ListedColormap

    shown = np.ma.masked_where(~region.astype(bool), np.ones(region.shape, np.float32))
    ax.imshow(shown, cmap=ListedColormap(["#39ff14"]), alpha=0.6, aspect=aspect, interpolation="nearest")


def _ct_title(plan: Any, slice_index: int) -> str:
    """The slice as the montage counts it and as the file does: a --roi K range or a viewer uses the latter."""
    n = plan.num_slices
    stored = n - 1 - slice_index if plan.flips[0] else slice_index
    return f"CT: {plan.view} slice {slice_index}/{n} (voxel {'kji'[plan.axes[0]]} = {stored})"


def _panel_title(saliency: PromptSaliency, layer: str) -> str:
    entry = saliency.legend.get(layer, {})
    if layer == COMBINED:
        return "combined (mean)"
    stage = entry.get("stage")
    if stage is None:
        return layer
    if entry.get("stage_requested") not in (None, stage):  # the layer could not take the stage asked for
        return f"{layer} · stage {stage} (fallback)"
    if entry.get("note"):  # stage 3 without its prompt term
        return f"{layer} · stage {stage}, no prompt"
    return f"{layer} · stage {stage}"


def _hot_region(saliency: PromptSaliency, plan: Any, slice_index: int) -> Optional[np.ndarray]:
    """Without a mask to outline, outline where the combined map is hot (≥ 0.5)."""
    layer = COMBINED if COMBINED in saliency.maps else saliency.layers[-1]
    return plan.extract(saliency.values(layer))[slice_index] >= 0.5


def _save_atomically(figure: Any, path: Path, *, overwrite: bool) -> Path:
    from ..io.writers import exists_error, replace_whole

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format="png")
        if path.exists() and not overwrite:  # made while the figure was drawn
            raise exists_error(path)

    path.parent.mkdir(parents=True, exist_ok=True)
    replace_whole(path, write, suffix=".png")
    return path
