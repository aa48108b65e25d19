"""A picture of a result: one axial slice of the CT with the mask and a saliency layer over it.

Rendered by Slicer's own slice pipeline (``vtkMRMLSliceLogic``'s blend of background, foreground
and label layers), not redrawn with matplotlib, so the picture is what the module's slice views
show: the same window/level, Inferno colour node, zero-transparent saliency, foreground opacity and
label layer. No Qt and no render window: the blend output is read back as an array, so it runs
headless on ``slicer-core`` (the README screenshot, tests) as well as inside Slicer::

    image = render_slice_overlay(ct, mask=run[0].mask, saliency=run.features[0].maps["combined"], prompt="liver")
    save_png(image, "liver.png", title="“liver”", legend={"liver mask": lookup("liver").rgb_float})

Images are RGB ``uint8`` arrays, row 0 anterior, column 0 the patient's right (radiological view).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .colors import lookup
from .errors import InputError
from .slicer_bridge import (
    SlicerContext,
    add_saliency_volumes,
    headless_context,
    node_from_volume,
    show_overlay,
    volume_from_node,
)
from .volume import Volume

CT_WINDOW = (350.0, 40.0)  # (width, level): Slicer's "CT-Abdomen" preset
SCREENSHOT_VIEW = "TextSegmentScreenshot"  # the private slice view used inside a running Slicer
SALIENCY_LAYER = "saliency"  # layer name given to a saliency Volume passed on its own
AUTO = "auto"
MARGIN_PX, COLORBAR_PX, TITLE_PX, FOOTNOTE_PX = 10, 100, 40, 26  # save_png's frame around the slice

VolumeOrNode = Any  # a ``Volume`` or a scalar/label-map volume node


def render_slice_overlay(
    ct: VolumeOrNode,
    *,
    mask: Optional[VolumeOrNode] = None,
    saliency: Optional[VolumeOrNode] = None,
    prompt: str = "",
    slice_index: Union[int, str] = AUTO,
    opacity: float = 0.5,
    outline: bool = True,
    label_opacity: float = 1.0,
    label_color: Optional[Sequence[float]] = None,
    saliency_threshold: Optional[float] = None,
    width: int = 800,
    window: Optional[tuple[float, float]] = CT_WINDOW,
    context: Optional[SlicerContext] = None,
) -> np.ndarray:
    """One axial slice as Slicer blends it: CT, ``saliency`` at ``opacity``, ``mask`` as a label layer.

    Why the slice logic: the picture then cannot drift from what users see in Slicer. ``ct``,
    ``mask`` and ``saliency`` are ``Volume``s on one grid (turned into nodes here: the CT shown with
    ``window``, the mask in ``label_color`` or else ``prompt``'s segment colour, the saliency through
    ``add_saliency_volumes``, transparent below ``saliency_threshold`` if given, else only where zero)
    or existing volume nodes, shown as their display nodes say and never modified. ``slice_index``
    counts canonical axial slices (inferior → superior, as ``textsegment explain --slice``); "auto"
    picks the slice where the mask is largest (else where the saliency is). ``outline`` draws the
    mask's outline instead of a fill. ``width`` is in pixels; the height follows the CT's aspect.

    ``context`` None renders in a throw-away headless scene. A given context keeps the nodes made
    here, and its slice views show the overlay afterwards, as after ``show_overlay``.
    """
    if not 0.0 <= label_opacity <= 1.0:
        raise InputError(f"label opacity must lie between 0 and 1, got {label_opacity}")
    if saliency_threshold is not None and not 0.0 <= saliency_threshold < 1.0:
        raise InputError(f"saliency threshold must lie in [0, 1), got {saliency_threshold}")
    if int(width) < 16:
        raise InputError(f"a picture needs to be at least 16 pixels wide, got {width}")
    own_context = context is None
    context = headless_context(slice_views=("Red",)) if own_context else context
    slice_logic, private = _slice_logic(context)
    try:
        ct_node = _ct_node(ct, context=context, window=window)
        ct_volume = ct if isinstance(ct, Volume) else volume_from_node(ct_node)
        saliency_node = None
        if saliency is not None:
            saliency_node = saliency if _is_node(saliency) else _saliency_node(
                saliency, ct_node=ct_node, context=context, prompt=prompt, threshold=saliency_threshold)
        label_node = None if mask is None else _label_node(mask, ct_node=ct_node, context=context, prompt=prompt,
                                                           color=label_color)
        show_overlay(ct_node, saliency_node, context=context, opacity=opacity)
        composite = slice_logic.GetSliceCompositeNode()
        composite.SetLabelVolumeID(label_node.GetID() if label_node is not None else None)
        composite.SetLabelOpacity(float(label_opacity))
        index = _choose_slice(ct_volume, slice_index, mask=mask, saliency=saliency)
        return _render(slice_logic, ct_node, ct_volume, index, width=int(width), outline=outline)
    finally:
        if private is not None:
            for node in (slice_logic.GetSliceCompositeNode(), slice_logic.GetSliceNode()):
                if node is not None:
                    context.scene.RemoveNode(node)
        if own_context:
            context.scene.Clear(True)


def save_png(
    image: np.ndarray,
    path: Union[str, os.PathLike],
    *,
    title: Optional[str] = None,
    footnote: Optional[str] = None,
    legend: Optional[Mapping[str, Sequence[float]]] = None,
    colorbar: Optional[str] = "saliency (0–1)",
    overwrite: bool = False,
) -> Path:
    """Write a rendered slice as a PNG, pixel for pixel, with the words a reader needs around it.

    A bare slice does not say what it shows, so ``title`` (prompt, model, weights), ``legend``
    (``{label: rgb in [0, 1]}``, e.g. the mask colour), an Inferno ``colorbar`` (None: none) and a
    small ``footnote`` frame it. The slice is not rescaled (a one-pixel outline would alias away):
    render it ``slice_width_for(picture width)`` wide. Matplotlib's object interface only (no
    ``pyplot``), so a host application's backend is left alone. Atomic; refuses to overwrite unless asked.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from .colors import inferno
    from .io.writers import atomic_write

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    dpi = 100
    h, w = image.shape[:2]
    top = TITLE_PX if title else MARGIN_PX
    bottom = FOOTNOTE_PX if footnote else MARGIN_PX
    fig_w = w + 2 * MARGIN_PX + (COLORBAR_PX if colorbar else 0)
    fig_h = h + top + bottom
    figure = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="black")
    FigureCanvasAgg(figure)
    ax = figure.add_axes((MARGIN_PX / fig_w, bottom / fig_h, w / fig_w, h / fig_h))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    if legend:
        handles = [Line2D([], [], color=tuple(rgb), linewidth=3, label=name) for name, rgb in legend.items()]
        ax.legend(handles=handles, loc="lower left", fontsize=9, framealpha=0.6, facecolor="black",
                  edgecolor="none", labelcolor="white")
    if colorbar:
        cax = figure.add_axes(((MARGIN_PX + w + 30) / fig_w, (bottom + 0.1 * h) / fig_h, 16 / fig_w, 0.8 * h / fig_h))
        bar = figure.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=ListedColormap(inferno(256))), cax=cax)
        bar.set_label(colorbar, color="white", fontsize=9)
        bar.ax.tick_params(colors="white", labelsize=8)
    if title:
        figure.text(0.5, 1.0 - (top / 2) / fig_h, title, ha="center", va="center", color="white", fontsize=11)
    if footnote:
        figure.text(0.5, (bottom / 2) / fig_h, footnote, ha="center", va="center", color="#bbbbbb", fontsize=7.5)

    def write(tmp: Path) -> None:
        figure.savefig(tmp, format="png", dpi=dpi, facecolor=figure.get_facecolor())

    return atomic_write(path, write, overwrite=overwrite, suffixes=(".png",))


def slice_width_for(picture_width: int, *, colorbar: bool = True) -> int:
    """How wide to render a slice so that ``save_png`` makes a picture ``picture_width`` pixels wide."""
    return int(picture_width) - 2 * MARGIN_PX - (COLORBAR_PX if colorbar else 0)


# helpers ---------------------------------------------------------------------------------------
def _is_node(thing: Any) -> bool:
    return hasattr(thing, "GetImageData") and hasattr(thing, "GetID")


def _slice_logic(context: SlicerContext) -> tuple[Any, Any]:
    """The context's first headless slice view, else (inside Slicer) a private one, removed afterwards."""
    if context.slice_logics:
        return context.slice_logics[0], None
    import slicer

    logic = slicer.vtkMRMLSliceLogic()
    logic.SetMRMLApplicationLogic(context.app_logic)
    logic.SetMRMLScene(context.scene)
    logic.AddSliceNode(SCREENSHOT_VIEW)
    return logic, logic


def _ct_node(ct: VolumeOrNode, *, context: SlicerContext, window: Optional[tuple[float, float]]) -> Any:
    if _is_node(ct):
        return ct
    if not isinstance(ct, Volume):
        raise InputError(f"expected a CT Volume or volume node, got {type(ct).__name__}")
    node = node_from_volume(ct, context=context, name="CT")
    if window is not None:
        display = node.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(float(window[0]), float(window[1]))
    return node


def _saliency_node(saliency: Volume, *, ct_node: Any, context: SlicerContext, prompt: str,
                   threshold: Optional[float]) -> Any:
    node = add_saliency_volumes({SALIENCY_LAYER: saliency}, reference_node=ct_node, context=context,
                                prompt=prompt)[SALIENCY_LAYER]
    if threshold is not None and threshold > 0.0:
        node.GetDisplayNode().SetThreshold(float(threshold), 1.0)
    return node


def _label_node(mask: VolumeOrNode, *, ct_node: Any, context: SlicerContext, prompt: str,
                color: Optional[Sequence[float]]) -> Any:
    """A label-map node (mask > 0 → label 1) in ``color`` (default: ``prompt``'s segment colour)."""
    if _is_node(mask):
        return mask
    import slicer

    if not isinstance(mask, Volume):
        raise InputError(f"expected a mask Volume or label-map node, got {type(mask).__name__}")
    name = f"{prompt} mask" if prompt else "mask"
    node = context.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    node_from_volume(mask.with_array((np.asarray(mask.array) > 0).astype(np.uint8)), context=context,
                     name=name, node=node)
    node.SetAndObserveTransformNodeID(ct_node.GetTransformNodeID())
    colors = slicer.vtkMRMLColorTableNode()
    colors.SetName(f"{name} colour")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(2)
    colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
    rgb = tuple(color) if color is not None else lookup(prompt or "mask").rgb_float
    colors.SetColor(1, prompt or "mask", *(float(c) for c in rgb[:3]), 1.0)
    context.scene.AddNode(colors)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    return node


def _values(thing: VolumeOrNode) -> np.ndarray:
    volume = volume_from_node(thing) if _is_node(thing) else thing
    return np.asarray(volume.array, dtype=np.float32)


def _choose_slice(ct: Volume, slice_index: Union[int, str], *, mask: Any, saliency: Any) -> int:
    """The canonical axial slice to show: the given one, or where the mask (else the saliency) is largest."""
    from .preprocess import slice_plan
    from .grid import on_grid_of

    plan = slice_plan(ct, axis="axial")
    if slice_index != AUTO:
        if isinstance(slice_index, bool) or not isinstance(slice_index, (int, np.integer)):
            raise InputError(f"slice index must be a whole number or 'auto', got {slice_index!r}")
        if not 0 <= slice_index < plan.num_slices:
            raise InputError(f"slice {slice_index} is outside the {plan.num_slices} axial slices of this volume")
        return int(slice_index)
    for thing in (mask, saliency):
        if thing is not None:
            values = _values(thing)
            if thing is saliency:  # a compact map covers the CT's extent on a coarser grid
                values = on_grid_of(values, ct.shape)
            if values.shape != ct.shape:
                raise InputError(f"the mask and saliency must lie on the CT's grid {ct.shape}, got {values.shape}")
            weight = values > 0 if thing is mask else values
            area = plan.extract(weight).reshape(plan.num_slices, -1).sum(axis=1)
            if area.max() > 0:
                return int(np.argmax(area))
    return plan.num_slices // 2


def _render(slice_logic: Any, ct_node: Any, ct: Volume, index: int, *, width: int, outline: bool) -> np.ndarray:
    """Point the slice view at canonical axial slice ``index`` and read back the blended RGB image."""
    from .preprocess import slice_plan

    slice_node = slice_logic.GetSliceNode()
    slice_node.SetOrientation("Axial")
    slice_node.SetUseLabelOutline(bool(outline))
    bounds = [0.0] * 6
    ct_node.GetRASBounds(bounds)
    extent_r, extent_a = bounds[1] - bounds[0], bounds[3] - bounds[2]
    height = max(1, int(round(width * extent_a / extent_r))) if extent_r > 0 else width
    slice_node.SetDimensions(width, height, 1)
    slice_logic.FitSliceToAll(width, height)
    # the RAS superior coordinate of the slice: the centre voxel of that canonical slice
    plan = slice_plan(ct, axis="axial")
    axis = plan.axes[0]  # array axis (z, y, x) that runs across axial slices
    position = [(n - 1) / 2.0 for n in ct.shape]
    position[axis] = plan.num_slices - 1 - index if plan.flips[0] else index
    kji = np.asarray(position)
    local = (ct.ijk_to_ras() @ np.append(kji[::-1], 1.0))[:3]
    world = [0.0, 0.0, 0.0]  # the slice offset is a world coordinate: follow the CT node's parent transform
    ct_node.TransformPointToWorld([float(v) for v in local], world)
    superior = world[2]
    slice_logic.SetSliceOffset(float(superior))
    slice_logic.SnapSliceOffsetToIJK()
    connection = slice_logic.GetImageDataConnection()
    producer = connection.GetProducer()
    producer.Update()
    image = producer.GetOutputDataObject(connection.GetIndex())
    from vtk.util import numpy_support  # here, not at import: the engine imports without VTK

    x, y, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(y, x, -1)
    pixels = pixels[::-1].astype(np.float32)  # VTK rows run bottom-up
    # over black, as a slice view shows it: pixels outside every volume have alpha 0
    rgb = pixels[..., :3] * (pixels[..., 3:4] / 255.0) if pixels.shape[2] == 4 else pixels[..., :3]
    return np.ascontiguousarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
