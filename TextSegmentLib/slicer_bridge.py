"""The MRML bridge: the one engine file that touches Slicer's scene.

It imports only numpy, VTK and MRML classes (no Qt, no ``slicer.app``), so the same code runs inside
Slicer and, headless, on ``slicer-core`` in CI. Nothing reaches for a global scene: every function
takes a ``SlicerContext`` (the scene and the module logics), built by ``slicer_context()`` inside
Slicer (the default) or ``headless_context()`` for scripts and tests::

    context = headless_context()
    ct = node_from_volume(read_volume("ct.nii.gz"), context=context, name="CT")
    run = segment(volume_from_node(ct), ["liver"], model=model)
    segmentation = add_segmentation(run.results, reference_node=ct, context=context)
    export_segmentation(segmentation, "liver.seg.nrrd", context=context)

Geometry: a volume node's IJK→RAS matrix is turned into the engine's LPS ``Volume`` and back, so
flipped and oblique volumes keep every voxel where it is. The bridge reads a node's own (local)
geometry; results are placed under the same parent transform as their reference node. Inputs are
never modified: results go into new or given output nodes only, and only after a run succeeded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .colors import SegmentStyle, inferno, lookup
from .errors import InputError
from .volume import LPS_TO_RAS, Volume

log = logging.getLogger(__name__)

DICOM_UIDS_ATTRIBUTE = "DICOM.instanceUIDs"  # set by Slicer's DICOM module: the SOP Instance UIDs a volume was loaded from
SALIENCY_ATTRIBUTE = "TextSegment.Saliency"  # "<prompt>|<layer>" on every saliency volume we add
SALIENCY_REFERENCE_ROLE = "TextSegment.SaliencyReference"  # node reference: the volume a saliency map explains
OWN_COLOR_TABLE = "TextSegment Inferno"
SLICER_INFERNO_ID = "vtkMRMLColorTableNodeFileInferno.txt"
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass
class SlicerContext:
    """The scene and the module logics the bridge needs (trame-slicer's ``SlicerApp``, scaled down)."""

    scene: Any
    app_logic: Any = None
    segmentations_logic: Any = None
    volumes_logic: Any = None
    colors_logic: Any = None
    slice_logics: list = field(default_factory=list)  # headless only: keeps the slice views alive


def headless_context(*, slice_views: Sequence[str] = ("Red", "Yellow", "Green")) -> SlicerContext:
    """A fresh scene with colour, volume and segmentation logics and slice views, without Slicer.

    The segmentations logic must be attached for ``AddEmptySegment`` to work (it registers the
    representation converters); the slice views give the scene its slice composite nodes, where
    ``show_overlay`` sets the background and foreground as in the application.
    """
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    logics = {}
    warnings_shown = vtk.vtkObject.GetGlobalWarningDisplay()
    vtk.vtkObject.GlobalWarningDisplayOff()  # the colour logic complains that no colour files ship with slicer-core
    try:
        for name, cls in (
            ("Colors", slicer.vtkSlicerColorLogic),
            ("Volumes", slicer.vtkSlicerVolumesLogic),
            ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ):
            logic = cls()
            logic.SetMRMLApplicationLogic(app)
            logic.SetMRMLScene(scene)
            app.SetModuleLogic(name, logic)
            logics[name] = logic
    finally:
        vtk.vtkObject.SetGlobalWarningDisplay(warnings_shown)
    slice_logics = vtk.vtkCollection()
    for layout_name in slice_views:
        slice_logic = slicer.vtkMRMLSliceLogic()
        slice_logic.SetMRMLApplicationLogic(app)
        slice_logic.SetMRMLScene(scene)
        slice_logic.AddSliceNode(layout_name)
        slice_logics.AddItem(slice_logic)
    app.SetSliceLogics(slice_logics)
    return SlicerContext(
        scene=scene,
        app_logic=app,
        segmentations_logic=logics["Segmentations"],
        volumes_logic=logics["Volumes"],
        colors_logic=logics["Colors"],
        slice_logics=[slice_logics.GetItemAsObject(i) for i in range(slice_logics.GetNumberOfItems())],
    )


def slicer_context() -> SlicerContext:
    """The running application's scene and logics (inside Slicer only)."""
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no Slicer application is running: pass context=headless_context() outside Slicer")
    return SlicerContext(
        scene=scene,
        app_logic=slicer.app.applicationLogic(),
        segmentations_logic=slicer.modules.segmentations.logic(),
        volumes_logic=slicer.modules.volumes.logic(),
        colors_logic=slicer.modules.colors.logic(),
    )


def _context(context: Optional[SlicerContext]) -> SlicerContext:
    return context if context is not None else slicer_context()


# volumes ---------------------------------------------------------------------------------------
def _matrix_to_numpy(matrix: Any) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> Any:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _ijk_to_lps(node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return LPS_TO_RAS @ _matrix_to_numpy(matrix)  # LPS_TO_RAS is its own inverse


def _shape(node: Any) -> tuple[int, int, int]:
    image = node.GetImageData()
    if image is None:
        raise InputError(f"volume {node.GetName()!r} holds no image data")
    x, y, z = image.GetDimensions()
    return (z, y, x)


def volume_from_node(node: Any) -> Volume:
    """The engine's ``Volume`` (LPS, array (z, y, x), a copy) of a scalar volume node."""
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"volume {node.GetName()!r} holds no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError(f"volume {node.GetName()!r} has {image.GetNumberOfScalarComponents()} components; select a scalar (CT) volume")
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(_shape(node)).copy()
    m = _ijk_to_lps(node)
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    return Volume(
        array=array,
        spacing=tuple(spacing),
        origin=tuple(m[:3, 3]),
        direction=m[:3, :3] / spacing,
        source=f"Slicer volume {node.GetName()!r}",
        metadata={"mrml_node_id": node.GetID()},
    )


def node_from_volume(volume: Volume, *, context: Optional[SlicerContext] = None, name: str,
                     node: Any = None) -> Any:
    """A scalar volume node (new, or ``node`` updated) holding ``volume`` with its geometry, shown in grey."""
    context = _context(context)
    array = np.asarray(volume.array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    image = vtk.vtkImageData()
    z, y, x = array.shape
    image.SetDimensions(x, y, z)
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    image.GetPointData().SetScalars(vtk_array)
    if node is None:
        node = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras()))
    node.SetAndObserveImageData(image)
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    return node


def dicom_source_files(node: Any, *, file_for_instance: Union[Callable[[str], Any], Mapping[str, Any], None] = None) -> list[Path]:
    """The DICOM files a volume node was loaded from, found by the SOP Instance UIDs Slicer's DICOM
    module records on it (``DICOM.instanceUIDs``), so outputs such as DICOM SEG can reference them.

    ``file_for_instance`` maps a UID to its file path (a callable or a mapping; default inside
    Slicer: ``slicer.dicomDatabase.fileForInstance``). A node not loaded from DICOM, or a UID whose
    file the database no longer has, is an ``InputError`` that says which.
    """
    uids = list(dict.fromkeys((node.GetAttribute(DICOM_UIDS_ATTRIBUTE) or "").split()))
    if not uids:
        raise InputError(
            f"volume {node.GetName()!r} was not loaded from DICOM (it has no {DICOM_UIDS_ATTRIBUTE} attribute); "
            "load the series through Slicer's DICOM module to export results that reference it"
        )
    if file_for_instance is None:
        database = getattr(slicer, "dicomDatabase", None)
        if database is None:
            raise InputError("Slicer's DICOM database is not available here; pass file_for_instance (UID -> file path)")
        file_for_instance = database.fileForInstance
    lookup = file_for_instance.get if isinstance(file_for_instance, Mapping) else file_for_instance
    files, missing = [], []
    for uid in uids:
        try:
            found = lookup(uid)
        except KeyError:
            found = None
        if found and Path(found).is_file():
            files.append(Path(found))
        else:
            missing.append((uid, found))
    if missing:
        uid, found = missing[0]
        where = f"its file {found} no longer exists" if found else "it is not in the DICOM database"
        raise InputError(
            f"volume {node.GetName()!r}: {len(missing)} of its {len(uids)} source image(s) cannot be found, "
            f"e.g. SOP Instance UID {uid} ({where}); re-import the series into the DICOM database"
        )
    return files


def node_holds(node: Any, volume: Volume) -> bool:
    """Whether ``node`` still holds ``volume``'s voxels on its grid (a run's input, before its results are added)."""
    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None or image.GetNumberOfScalarComponents() != 1:
        return False
    if _shape(node) != volume.shape or not np.allclose(volume.ijk_to_lps(), _ijk_to_lps(node), atol=GEOMETRY_TOLERANCE_MM):
        return False
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(volume.shape)  # a view: no copy
    return bool(np.array_equal(voxels, volume.array))


def _check_grid(volume: Volume, reference_node: Any, what: str) -> None:
    shape = _shape(reference_node)
    if volume.shape != shape or not np.allclose(volume.ijk_to_lps(), _ijk_to_lps(reference_node), atol=GEOMETRY_TOLERANCE_MM):
        raise InputError(
            f"{what} does not lie on the voxel grid of {reference_node.GetName()!r} "
            f"(shape {volume.shape} vs {shape}); it must come from a run on that volume"
        )


def _check_extent(volume: Volume, reference_node: Any, what: str) -> None:
    """Like ``_check_grid``, but a coarser grid over the same extent (compact saliency maps) passes too."""
    from .grid import same_extent

    shape = _shape(reference_node)
    if not same_extent(volume.ijk_to_lps(), volume.shape, _ijk_to_lps(reference_node), shape,
                       tolerance_mm=GEOMETRY_TOLERANCE_MM):
        raise InputError(
            f"{what} does not cover the volume {reference_node.GetName()!r} "
            f"(shape {volume.shape} vs {shape}); it must come from a run on that volume"
        )


# subject hierarchy -----------------------------------------------------------------------------
def _place_beside(node: Any, reference_node: Any, context: SlicerContext) -> None:
    """Put ``node`` under the reference's study (or its parent folder) and its parent transform."""
    node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(context.scene)
    if sh is None:
        return
    parent = sh.GetSceneItemID()
    ref_item = sh.GetItemByDataNode(reference_node)
    if ref_item:
        parent = sh.GetItemParent(ref_item)
        study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
        ancestor = parent
        while ancestor and ancestor != sh.GetSceneItemID():
            if sh.GetItemLevel(ancestor) == study_level:
                parent = ancestor
                break
            ancestor = sh.GetItemParent(ancestor)
    item = sh.GetItemByDataNode(node)
    if item:
        sh.SetItemParent(item, parent)
    else:
        sh.CreateItem(parent, node)


# segmentations ---------------------------------------------------------------------------------
def terminology_string(style: SegmentStyle) -> str:
    """Slicer's serialised terminology entry for a segment style (category, type, modifier, region)."""

    def triple(code: Any) -> tuple[str, str, str]:
        return (code.value, code.scheme, code.meaning) if code is not None else ("", "", "")

    region_context = "Anatomic codes - DICOM master list" if style.region is not None else ""
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, *triple(style.category), *triple(style.type), *triple(style.modifier),
        region_context, *triple(style.region), *triple(style.region_modifier),
    )


def add_segmentation(
    results: Iterable[Any],
    *,
    reference_node: Any,
    context: Optional[SlicerContext] = None,
    segmentation_node: Any = None,
    name: Optional[str] = None,
) -> Any:
    """One segment per result (named after its prompt) in a new or the given segmentation node.

    A prompt that already has a segment in ``segmentation_node`` gets its labelmap, colour and
    terminology replaced, so re-running a prompt never duplicates it. Every result is checked
    against the reference grid before the scene is touched.
    """
    context = _context(context)
    results = list(results)
    if segmentation_node is not None:
        check_output_segmentation(segmentation_node)
    for result in results:
        _check_grid(result.mask, reference_node, f"the mask for {result.prompt!r}")
    seen: dict[str, str] = {}
    for count, result in enumerate(results, 1):  # Slicer finds segments by name regardless of case
        other = seen.setdefault(result.prompt.casefold(), result.prompt)
        if len(seen) < count:  # one would overwrite the other's segment
            raise InputError(f"the prompts {other!r} and {result.prompt!r} would both be the segment {other!r}; "
                             "segment names ignore case, so give each prompt once")
    if segmentation_node is None:
        segmentation_node = context.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{reference_node.GetName()} TextSegment"
        )
        _place_beside(segmentation_node, reference_node, context)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    if segmentation_node.GetSegmentation().GetSourceRepresentationName() != labelmap_name:  # empty: nothing to convert
        segmentation_node.GetSegmentation().SetSourceRepresentationName(labelmap_name)
    if not segmentation_node.GetNodeReferenceID(segmentation_node.GetReferenceImageGeometryReferenceRole()):
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    segmentation = segmentation_node.GetSegmentation()
    for result in results:
        style = lookup(result.prompt)
        segment_id = segmentation.GetSegmentIdBySegmentName(result.prompt)
        if not segment_id:
            segment_id = segmentation.AddEmptySegment("", result.prompt, style.rgb_float)
            if not segment_id:
                raise RuntimeError("AddEmptySegment failed: is a vtkSlicerSegmentationsModuleLogic attached to the scene?")
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(*style.rgb_float)
        segment.SetNameAutoGenerated(False)
        segment.SetColorAutoGenerated(False)
        segment.SetTerminology(terminology_string(style))
        labelmap = _oriented_labelmap(result.mask.array, reference_node, segmentation_node)
        _separate_from_other_grids(segmentation, segment_id, labelmap)
        if not logic.SetBinaryLabelmapToSegment(labelmap, segmentation_node, segment_id, logic.MODE_REPLACE):
            raise RuntimeError(f"could not set the labelmap of segment {result.prompt!r}")
    return segmentation_node


def check_output_segmentation(node: Any) -> None:
    """Refuse an output node that masks cannot go into, before anything changes (and before a run).

    A segmentation whose segments are stored as closed surfaces (imported models, STL) takes no
    labelmap: Slicer would fail after an empty segment was already added."""
    if not node.IsA("vtkMRMLSegmentationNode"):
        raise InputError(f"{node.GetName()!r} is a {node.GetClassName()}, not a segmentation: choose a segmentation "
                         "node for the output, or none to get a new one")
    segmentation = node.GetSegmentation()
    source = segmentation.GetSourceRepresentationName()
    if segmentation.GetNumberOfSegments() and source != slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName():
        raise InputError(f"segmentation {node.GetName()!r} stores its segments as {source!r}, which cannot take a mask: "
                         "choose another output segmentation (or none for a new one), or set its source "
                         "representation to 'Binary labelmap' in the Segmentations module")


def _separate_from_other_grids(segmentation: Any, segment_id: str, labelmap: Any) -> None:
    """Give the segment a layer of its own when it shares one with segments on another voxel grid
    (a reused node holding the user's segments from another volume): setting the mask would make
    Slicer resample the whole shared layer, those other segments included, onto the mask's grid."""
    sharing: list[str] = []
    segmentation.GetSegmentIDsSharingBinaryLabelmapRepresentation(segment_id, sharing, False)
    if not sharing:
        return
    layer = segmentation.GetSegment(segment_id).GetRepresentation(
        slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if layer is not None and not slicer.vtkOrientedImageDataResample.DoGeometriesMatch(layer, labelmap):
        segmentation.SeparateSegmentLabelmap(segment_id)


def _oriented_labelmap(mask: np.ndarray, reference_node: Any, segmentation_node: Any) -> Any:
    """``mask`` (z, y, x) as oriented image data on the reference's grid, in the segmentation's own frame.

    Like ``CreateOrientedImageDataFromVolumeNode`` but without copying the CT's voxels. A new
    segmentation node sits under the reference's parent transform, so the reference's local frame
    is right; a reused node under another transform gets the mask moved into its frame (as
    Slicer's ``ImportLabelmapToSegmentationNode`` does), so the segment stays where the mask is.
    """
    labelmap = slicer.vtkOrientedImageData()
    z, y, x = mask.shape
    labelmap.SetExtent(0, x - 1, 0, y - 1, 0, z - 1)
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(ijk_to_ras)
    labelmap.SetImageToWorldMatrix(ijk_to_ras)
    values = np.ascontiguousarray(mask, dtype=np.uint8).ravel()
    labelmap.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values, deep=True))
    if reference_node.GetTransformNodeID() != segmentation_node.GetTransformNodeID():
        to_segmentation = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
            reference_node.GetParentTransformNode(), segmentation_node.GetParentTransformNode(), to_segmentation)
        slicer.vtkOrientedImageDataResample.TransformOrientedImage(labelmap, to_segmentation)
    return labelmap


def segment_node(
    reference_node: Any,
    prompts: Union[str, Sequence[str]],
    *,
    model: Any,
    context: Optional[SlicerContext] = None,
    segmentation_node: Any = None,
    segmenter: Optional[Callable[..., Any]] = None,
    **options: Any,
) -> tuple[Any, Any]:
    """Segment a volume node and add the results: the scene changes only if the whole run succeeds.

    ``options`` go to ``engine.segment`` (progress, cancel, threshold, ...). A cancelled or failed
    run raises before anything is added. ``segmenter`` replaces ``engine.segment`` (tests).
    Returns ``(segmentation_node, run)``.
    """
    if segmenter is None:
        from .engine import segment as segmenter
    context = _context(context)
    run = segmenter(volume_from_node(reference_node), prompts, model=model, **options)
    node = add_segmentation(run.results, reference_node=reference_node, context=context,
                            segmentation_node=segmentation_node)
    return node, run


# saliency overlays -----------------------------------------------------------------------------
def saliency_color_node(*, context: Optional[SlicerContext] = None, colormap: str = "Inferno") -> Any:
    """Slicer's colour table ``colormap`` if the scene has it, else (for Inferno) our own 256-colour table."""
    context = _context(context)
    scene = context.scene
    node = _scene_color_node(scene, colormap)
    if node is not None:
        return node
    check_colormap(colormap, context=context)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode")
        if node.GetName() == OWN_COLOR_TABLE:
            return node
    node = slicer.vtkMRMLColorTableNode()
    node.SetName(OWN_COLOR_TABLE)
    node.SetTypeToUser()
    table = inferno(256)
    node.SetNumberOfColors(len(table))
    for i, (r, g, b) in enumerate(table):
        node.SetColor(i, f"inferno {i}", float(r), float(g), float(b), 1.0)
    node.GetLookupTable().SetRange(0, len(table) - 1)
    scene.AddNode(node)
    return node


def _scene_color_node(scene: Any, colormap: str) -> Any:
    for node_id in (f"vtkMRMLColorTableNodeFile{colormap}.txt", f"vtkMRMLColorTableNode{colormap}",
                    f"vtkMRMLProceduralColorNode{colormap}", f"vtkMRMLPETProceduralColorNode{colormap}"):
        node = scene.GetNodeByID(node_id)
        if node is not None:
            return node
    return None


def check_colormap(colormap: str, *, context: Optional[SlicerContext] = None) -> None:
    """An unknown colour map is an ``InputError``; adds nothing to the scene, so a run can check it before it starts."""
    context = _context(context)
    if colormap.lower() != "inferno" and _scene_color_node(context.scene, colormap) is None:
        raise InputError(f"colour table {colormap!r} is not in the scene; use 'Inferno' or one of Slicer's colour tables")


def _unit_values(volume: Volume) -> np.ndarray:
    """A saliency map as float32 in [0, 1] (uint8 maps store value × 255)."""
    array = np.asarray(volume.array)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def add_saliency_volumes(
    maps: Any,
    *,
    reference_node: Any,
    context: Optional[SlicerContext] = None,
    prompt: Optional[str] = None,
    colormap: str = "Inferno",
    drop_other_layers: bool = False,
) -> dict[str, Any]:
    """One float volume per layer, coloured with ``colormap``, window 0–1, zero transparent.

    ``maps`` is a ``{layer: Volume}`` mapping or a saliency ``PromptSaliency`` (its ``.maps`` and
    ``.prompt``). Volumes added before for the same prompt, layer and reference volume are updated
    in place (another volume's maps for the same prompt are left alone) and put under the reference's
    current parent transform, as new ones are. ``drop_other_layers`` (a new run's maps) removes
    that prompt's volumes of layers not given, so no map of an older run that explained other
    layers is left looking current. Returns ``{layer: node}`` in the order given.
    """
    context = _context(context)
    prompt = prompt if prompt is not None else getattr(maps, "prompt", "")
    maps = getattr(maps, "maps", maps)
    if not isinstance(maps, Mapping) or not maps:
        raise InputError("no saliency maps given: expected {layer: Volume} or a prompt's saliency result")
    if reference_node.GetScene() is not context.scene:  # e.g. recolouring the maps of a run on a closed scene
        raise InputError(f"the volume {reference_node.GetName()!r} is not in the scene any more; "
                         "nothing to show its saliency maps over")
    for layer, volume in maps.items():
        _check_extent(volume, reference_node, f"the saliency map {layer!r}")
    color_node = saliency_color_node(context=context, colormap=colormap)
    existing = _saliency_nodes(context, reference_node)
    nodes = {}
    for layer, volume in maps.items():
        key = f"{prompt}|{layer}"
        title = f"{prompt} saliency {layer}" if prompt else f"saliency {layer}"
        node = node_from_volume(volume.with_array(_unit_values(volume)), context=context, name=title,
                                node=existing.get(key))
        node.SetAttribute(SALIENCY_ATTRIBUTE, key)
        node.SetNodeReferenceID(SALIENCY_REFERENCE_ROLE, reference_node.GetID())
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID(color_node.GetID())
        display.SetAutoWindowLevel(False)
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(True)  # voxels without saliency stay transparent over the CT
        display.SetThreshold(1e-3, 1.0)
        if key in existing:  # the input may have moved under another transform since: follow it
            node.SetAndObserveTransformNodeID(reference_node.GetTransformNodeID())
        else:
            _place_beside(node, reference_node, context)
        nodes[layer] = node
    if drop_other_layers:
        remove_saliency_volumes(reference_node=reference_node, prompt=prompt, keep=maps, context=context)
    return nodes


def remove_saliency_volumes(*, reference_node: Any, prompt: str, keep: Sequence[str] = (),
                            context: Optional[SlicerContext] = None) -> list[str]:
    """Remove ``prompt``'s saliency volumes over ``reference_node``, except the layers in ``keep``.

    Maps that explain a mask a newer run replaced would look current; returns the layers removed.
    """
    context = _context(context)
    removed = []
    for key, node in _saliency_nodes(context, reference_node).items():
        owner, layer = key.rsplit("|", 1)
        if owner == prompt and layer not in keep:
            for i in reversed(range(node.GetNumberOfDisplayNodes())):  # the scene would keep them, orphaned
                context.scene.RemoveNode(node.GetNthDisplayNode(i))
            context.scene.RemoveNode(node)
            removed.append(layer)
    return removed


def saliency_volumes(reference_node: Any, *, context: Optional[SlicerContext] = None) -> dict[str, dict[str, Any]]:
    """The saliency volumes over ``reference_node`` in the scene: ``{prompt: {layer: node}}``, in the order added.

    Why: each volume keeps its prompt and layer (an attribute) and its CT (a node reference) in a saved
    scene, so the maps of a scene opened again can be browsed as those of a run just made.
    """
    grouped: dict[str, dict[str, Any]] = {}
    for key, node in _saliency_nodes(_context(context), reference_node).items():
        prompt, layer = key.rsplit("|", 1)
        grouped.setdefault(prompt, {})[layer] = node
    return grouped


def _saliency_nodes(context: SlicerContext, reference_node: Any) -> dict[str, Any]:
    """Our saliency volumes over ``reference_node``, by "<prompt>|<layer>"."""
    scene = context.scene
    found = {}
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
        key = node.GetAttribute(SALIENCY_ATTRIBUTE)
        if key and node.GetNodeReferenceID(SALIENCY_REFERENCE_ROLE) == reference_node.GetID():
            found[key] = node
    return found


def show_overlay(background: Any, foreground: Any = None, *, context: Optional[SlicerContext] = None,
                 opacity: float = 0.5) -> list[Any]:
    """Show ``foreground`` (e.g. a saliency layer) over ``background`` in every slice view.

    What ``slicer.util.setSliceViewerLayers`` does, without the application. Switching the saliency
    layer is calling this again with another foreground. Returns the slice composite nodes changed.
    """
    context = _context(context)
    if not 0.0 <= opacity <= 1.0:
        raise InputError(f"overlay opacity must lie between 0 and 1, got {opacity}")
    scene = context.scene
    composites = [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
                  for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]
    if not composites:
        log.warning("the scene has no slice views: nothing to show the overlay in")
    for composite in composites:
        composite.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(float(opacity))
    return composites


# files -----------------------------------------------------------------------------------------
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


def export_segmentation(
    segmentation_node: Any,
    path: Union[str, Path],
    *,
    context: Optional[SlicerContext] = None,
    reference_node: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write a segmentation: ``.seg.nrrd`` keeps every segment with its name, colour and terminology;
    ``.nii.gz``/``.nii``/``.nrrd``/``.mha`` get a label map (segment *n* → label *n*, later segments
    win where they overlap) on the reference volume's grid. Atomic; refuses to overwrite unless asked.

    The segmentation storage node writes NRRD bytes whatever the file name says, so other formats go
    through a temporary label map node (removed again: the scene is left as it was).
    """
    from .io.writers import atomic_write

    context = _context(context)
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".seg.nrrd"):
        def write(tmp: Path) -> None:
            storage = slicer.vtkMRMLSegmentationStorageNode()
            storage.SetFileName(str(tmp))
            if not storage.WriteData(segmentation_node):
                raise OSError("the segmentation storage node could not write the file")
    elif name.endswith(LABELMAP_SUFFIXES):
        if not segmentation_node.GetSegmentation().GetNumberOfSegments():  # Slicer would fail, leaving a TempWrite folder
            raise InputError(f"{path}: segmentation {segmentation_node.GetName()!r} has no segments, so there is no "
                             "label map to write; segment the volume first")

        def write(tmp: Path) -> None:
            _write_labelmap(segmentation_node, tmp, reference_node=reference_node, context=context)
    else:
        raise InputError(f"{path}: unknown segmentation format; use .seg.nrrd, or {', '.join(LABELMAP_SUFFIXES)} for a label map")
    return atomic_write(path, write, overwrite=overwrite, protected=())


def _write_labelmap(segmentation_node: Any, path: Path, *, reference_node: Any, context: SlicerContext) -> None:
    scene = context.scene
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TextSegment export")
    try:
        ids = vtk.vtkStringArray()
        segmentation_node.GetSegmentation().GetSegmentIDs(ids)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        extent_mode = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
        if not logic.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap, reference_node, extent_mode):
            raise OSError("exporting the segments to a label map failed")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(True)
        if not storage.WriteData(labelmap):
            raise OSError("the volume storage node could not write the label map")
    finally:  # leave the scene as it was: the label map and anything the export created
        for i in reversed(range(scene.GetNumberOfNodes())):
            node = scene.GetNthNode(i)
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)


def load_segmentation(path: Union[str, Path], *, context: Optional[SlicerContext] = None,
                      name: Optional[str] = None) -> Any:
    """Read a ``.seg.nrrd`` into a new segmentation node."""
    context = _context(context)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such segmentation file")
    node = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or path.name.split(".")[0])
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        context.scene.RemoveNode(node)
        raise InputError(f"{path}: could not be read as a Slicer segmentation")
    node.CreateDefaultDisplayNodes()
    return node
