"""The MRML bridge on Slicer's real MRML classes (slicer-core), headless.

Masks are built in numpy with known positions; every placement check is made in physical space,
reading the segment back through Slicer's own image-to-world matrices.
"""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

from TextSegmentLib.colors import inferno, lookup
from TextSegmentLib.engine import SegmentationResult, SegmentationRun
from TextSegmentLib.errors import Cancelled, InputError, OutputExistsError
from TextSegmentLib.slicer_bridge import (
    OWN_COLOR_TABLE,
    SALIENCY_ATTRIBUTE,
    add_saliency_volumes,
    add_segmentation,
    export_segmentation,
    load_segmentation,
    node_from_volume,
    saliency_color_node,
    segment_node,
    show_overlay,
    volume_from_node,
)
from TextSegmentLib.volume import Volume, direction_from_axes

GEOMETRIES = {
    "identity": dict(direction=np.eye(3), origin=(0.0, 0.0, 0.0), spacing=(1.0, 1.0, 1.0)),
    "flipped": dict(direction=np.diag([-1.0, -1.0, 1.0]), origin=(10.0, 20.0, 30.0), spacing=(0.8, 0.7, 2.0)),
    "oblique": dict(
        direction=direction_from_axes([[0.9, 0.3, 0.1], [-0.3, 0.9, 0.2], [0.0, -0.2, 1.0]]),
        origin=(-12.5, 40.0, -7.0),
        spacing=(0.6, 0.9, 2.5),
    ),
}


def _ct(geometry: str, shape=(6, 9, 11)) -> Volume:
    rng = np.random.default_rng(7)
    return Volume(rng.integers(-1000, 1500, shape).astype(np.int16), **GEOMETRIES[geometry])


def _box_mask(volume: Volume, lo, hi) -> np.ndarray:
    mask = np.zeros(volume.shape, dtype=np.uint8)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = 1
    return mask


def _result(volume: Volume, prompt: str, mask: np.ndarray) -> SegmentationResult:
    return SegmentationResult(prompt, volume.with_array(mask.astype(np.float32)), volume.with_array(mask))


def _ras_points_of_mask(volume: Volume, mask: np.ndarray) -> np.ndarray:
    kji = np.argwhere(mask > 0)
    ijk = kji[:, ::-1].astype(np.float64)
    m = volume.ijk_to_ras()
    return _sorted(ijk @ m[:3, :3].T + m[:3, 3])


def _sorted(points: np.ndarray) -> np.ndarray:
    points = np.round(points, 3)
    return points[np.lexsort(points.T[::-1])]


def _ras_points_of_segment(segmentation_node, name: str, *, world: bool = True) -> np.ndarray:
    """Physical (RAS) centres of a segment's voxels, from Slicer's own labelmap and matrix."""
    segment_id = segmentation_node.GetSegmentation().GetSegmentIdBySegmentName(name)
    assert segment_id, f"no segment named {name!r}"
    image = slicer.vtkOrientedImageData()
    assert slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation_node, segment_id, image, world)
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    values = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    # a shared labelmap stores each segment as one label value
    label = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    kji = np.argwhere(values == label) + [z0, y0, x0]
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    m = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    ijk = kji[:, ::-1].astype(np.float64)
    return _sorted(ijk @ m[:3, :3].T + m[:3, 3])


def _translation(context, name: str, *, x: float = 0.0, z: float = 0.0):
    """A linear transform node that shifts by (x, 0, z) mm."""
    transform = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, x)
    matrix.SetElement(2, 3, z)
    transform.SetMatrixTransformToParent(matrix)
    return transform


def _node_count(context) -> int:
    return context.scene.GetNumberOfNodes()


def _node_array(node) -> np.ndarray:
    return numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).copy()


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


# volumes -------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_volume_round_trip_keeps_voxels_and_geometry(context, geometry):
    ct = _ct(geometry)
    node = node_from_volume(ct, context=context, name="CT")
    back = volume_from_node(node)
    assert np.array_equal(back.array, ct.array) and back.array.dtype == ct.array.dtype
    assert np.allclose(back.ijk_to_lps(), ct.ijk_to_lps(), atol=1e-9)
    assert np.allclose(back.spacing, ct.spacing) and np.allclose(back.direction, ct.direction, atol=1e-9)


def test_flipped_volume_lands_at_hand_computed_ras(context):
    ct = _ct("flipped")  # LPS axes -x, -y, +z from LPS (10, 20, 30)
    node = node_from_volume(ct, context=context, name="CT")
    m = _ijk_to_ras(node)
    # voxel (i, j, k) = (2, 3, 1): LPS = (10 - 2*0.8, 20 - 3*0.7, 30 + 1*2) -> RAS negates x and y
    assert np.allclose(m @ [2, 3, 1, 1], [-(10 - 1.6), -(20 - 2.1), 32.0, 1.0])


def test_slicer_reader_and_ours_agree_on_real_ct(context, shared_data):
    """Slicer's own NIfTI reader (RAS) and the engine's Volume (LPS) describe the same voxels."""
    from TextSegmentLib.io import read_volume

    path = shared_data / "ct" / "totalseg_example_ct_sm" / "example_ct_sm.nii.gz"
    node = context.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    ours = read_volume(path)
    theirs = volume_from_node(node)
    assert np.array_equal(theirs.array, ours.array)
    assert np.allclose(theirs.ijk_to_lps(), ours.ijk_to_lps(), atol=1e-4)


# segmentations -------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_segments_land_exactly_where_the_masks_are(context, geometry):
    ct = _ct(geometry)
    node = node_from_volume(ct, context=context, name="CT")
    before_array, before_matrix = _node_array(node), _ijk_to_ras(node)
    liver = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    kidney = _box_mask(ct, (0, 0, 0), (2, 3, 2))
    kidney[5, 8, 10] = 1  # the far corner: catches any flipped axis
    seg = add_segmentation([_result(ct, "liver", liver), _result(ct, "left kidney", kidney)], reference_node=node, context=context)

    assert np.array_equal(_ras_points_of_segment(seg, "liver"), _ras_points_of_mask(ct, liver))
    assert np.array_equal(_ras_points_of_segment(seg, "left kidney"), _ras_points_of_mask(ct, kidney))
    # reference geometry is the CT's, and the CT itself is untouched
    assert seg.GetNodeReferenceID(seg.GetReferenceImageGeometryReferenceRole()) == node.GetID()
    assert np.array_equal(_node_array(node), before_array) and np.array_equal(_ijk_to_ras(node), before_matrix)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_written_seg_nrrd_opens_in_slicer_with_the_prompts_as_segments_where_the_masks_are(context, geometry, tmp_path):
    """A NIfTI label map opened in Slicer as Segment_1, Segment_2: the prompts were in the JSON legend only."""
    from TextSegmentLib.export import LABEL_MAP, SLICER_SEGMENTATION, write_segmentation
    from TextSegmentLib.io import read_image_file

    ct = _ct(geometry)
    liver = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    kidney = _box_mask(ct, (0, 0, 0), (2, 3, 2))
    kidney[5, 8, 10] = 1  # the far corner: catches any flipped axis
    run = SegmentationRun([_result(ct, "liver", liver), _result(ct, "left kidney", kidney)], "cpu", 1, 0.0, ct.shape[0], 0)
    written = write_segmentation(run, out_dir=tmp_path)
    assert tmp_path / SLICER_SEGMENTATION in written

    seg = load_segmentation(tmp_path / SLICER_SEGMENTATION, context=context)
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert names == ["liver", "left kidney"]
    kidney_segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("left kidney"))
    assert np.allclose(kidney_segment.GetColor(), lookup("left kidney").rgb_float, atol=1e-4)
    # the voxels of the label map, placed by Slicer's own matrices where the masks are
    labels = np.asarray(read_image_file(tmp_path / LABEL_MAP).array)
    assert np.array_equal(_ras_points_of_segment(seg, "liver"), _ras_points_of_mask(ct, labels == 1))
    assert np.array_equal(_ras_points_of_segment(seg, "left kidney"), _ras_points_of_mask(ct, kidney))


def test_segments_carry_prompt_names_colours_and_terminology(context):
    ct = _ct("identity")
    node = node_from_volume(ct, context=context, name="CT")
    mask = _box_mask(ct, (1, 1, 1), (3, 3, 3))
    seg = add_segmentation([_result(ct, "Left kidney", mask), _result(ct, "a shiny unicorn", mask)], reference_node=node, context=context)
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["Left kidney", "a shiny unicorn"]
    kidney = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Left kidney"))
    assert np.allclose(kidney.GetColor(), lookup("Left kidney").rgb_float)
    terminology = kidney.GetTerminology()
    assert "SCT^64033007^Kidney" in terminology and "SCT^7771000^Left" in terminology
    unicorn = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("a shiny unicorn"))
    assert "SCT^85756007^Tissue" in unicorn.GetTerminology()


def test_rerunning_a_prompt_replaces_its_segment(context):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    first = _box_mask(ct, (0, 0, 0), (2, 2, 2))
    second = _box_mask(ct, (3, 4, 5), (6, 9, 11))
    seg = add_segmentation([_result(ct, "spleen", first)], reference_node=node, context=context)
    again = add_segmentation([_result(ct, "spleen", second), _result(ct, "liver", first)], reference_node=node,
                             context=context, segmentation_node=seg)
    assert again is seg
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    assert np.array_equal(_ras_points_of_segment(seg, "spleen"), _ras_points_of_mask(ct, second))
    assert np.array_equal(_ras_points_of_segment(seg, "liver"), _ras_points_of_mask(ct, first))


def test_transformed_volume_keeps_its_transform_and_local_voxels(context):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    transform = _translation(context, "shift", x=25.0)
    node.SetAndObserveTransformNodeID(transform.GetID())
    mask = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    seg = add_segmentation([_result(ct, "liver", mask)], reference_node=node, context=context)
    assert seg.GetTransformNodeID() == transform.GetID()
    expected = _ras_points_of_mask(ct, mask)
    assert np.array_equal(_ras_points_of_segment(seg, "liver", world=False), expected)
    assert np.array_equal(_ras_points_of_segment(seg, "liver"), _sorted(expected + [25.0, 0.0, 0.0]))


def test_reused_segmentation_under_another_transform_keeps_the_segment_over_the_mask(context):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    transform = _translation(context, "registration", x=25.0, z=-4.0)
    output = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "the user's output")
    output.SetAndObserveTransformNodeID(transform.GetID())  # e.g. a segmentation of a registered series
    mask = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    add_segmentation([_result(ct, "liver", mask)], reference_node=node, context=context, segmentation_node=output)
    assert output.GetTransformNodeID() == transform.GetID()  # the user's node stays where they put it
    assert np.array_equal(_ras_points_of_segment(output, "liver"), _ras_points_of_mask(ct, mask))


def test_users_segments_on_another_grid_are_kept_voxel_for_voxel(context):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    other = Volume(np.zeros((3, 4, 5), np.int16), spacing=(2.0, 2.0, 5.0), origin=(0.0, 0.0, 0.0))
    other_node = node_from_volume(other, context=context, name="another series")
    theirs = np.zeros(other.shape, np.uint8)
    theirs[1, 1:3, 1:3] = 1
    output = add_segmentation([_result(other, "my tumour", theirs)], reference_node=other_node, context=context)
    before = _ras_points_of_segment(output, "my tumour")
    mask = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    add_segmentation([_result(ct, "liver", mask)], reference_node=node, context=context, segmentation_node=output)
    assert np.array_equal(_ras_points_of_segment(output, "liver"), _ras_points_of_mask(ct, mask))
    assert np.array_equal(_ras_points_of_segment(output, "my tumour"), before)  # not resampled onto the CT's grid


def test_prompts_that_differ_only_in_case_are_refused_before_the_scene_changes(context):
    ct = _ct("identity")
    node = node_from_volume(ct, context=context, name="CT")
    results = [_result(ct, "Liver", _box_mask(ct, (1, 1, 1), (3, 3, 3))), _result(ct, "liver", _box_mask(ct, (4, 4, 4), (5, 5, 5)))]
    count = _node_count(context)
    with pytest.raises(InputError, match="'Liver' and 'liver'"):  # Slicer's segment names ignore case
        add_segmentation(results, reference_node=node, context=context)
    assert _node_count(context) == count


def _closed_surface_segmentation(context, *segment_names):
    """A segmentation whose source representation is closed surfaces (e.g. an STL imported as segments)."""
    output = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "imported model")
    output.GetSegmentation().SetSourceRepresentationName(slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName())
    for name in segment_names:
        sphere = vtk.vtkSphereSource()
        sphere.SetRadius(3.0)
        sphere.Update()
        output.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), name, (1.0, 0.0, 0.0))
    return output


def test_a_segmentation_of_closed_surfaces_is_refused_untouched_and_an_empty_one_takes_masks(context):
    """Slicer cannot set a labelmap there: it failed with a RuntimeError after adding an empty segment."""
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    mask = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    output = _closed_surface_segmentation(context, "tumour model")
    with pytest.raises(InputError, match="Closed surface.*Binary labelmap"):
        add_segmentation([_result(ct, "liver", mask)], reference_node=node, context=context, segmentation_node=output)
    segmentation = output.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == ["tumour model"]
    assert not output.GetNodeReferenceID(output.GetReferenceImageGeometryReferenceRole())

    empty = _closed_surface_segmentation(context)  # nothing to lose: it takes the masks
    add_segmentation([_result(ct, "liver", mask)], reference_node=node, context=context, segmentation_node=empty)
    assert np.array_equal(_ras_points_of_segment(empty, "liver"), _ras_points_of_mask(ct, mask))


def test_segmentation_goes_under_the_source_study(context):
    ct = _ct("identity")
    node = node_from_volume(ct, context=context, name="CT")
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(context.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, node)
    seg = add_segmentation([_result(ct, "liver", _box_mask(ct, (1, 1, 1), (2, 2, 2)))], reference_node=node, context=context)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


def test_mask_on_another_grid_is_refused_before_the_scene_changes(context):
    ct = _ct("identity")
    node = node_from_volume(ct, context=context, name="CT")
    moved = Volume(ct.array, spacing=ct.spacing, origin=(5.0, 0.0, 0.0))
    good = _result(ct, "liver", _box_mask(ct, (1, 1, 1), (2, 2, 2)))
    bad = _result(moved, "spleen", _box_mask(moved, (1, 1, 1), (2, 2, 2)))
    count = _node_count(context)
    with pytest.raises(InputError, match="voxel grid"):
        add_segmentation([good, bad], reference_node=node, context=context)
    assert _node_count(context) == count


def test_cancelled_run_leaves_the_scene_unchanged(context):
    ct = _ct("flipped")
    node = node_from_volume(ct, context=context, name="CT")
    seen = []

    def cancelled_segmenter(volume, prompts, *, model, progress=None, **options):
        seen.append(volume)
        progress(0.5, "slice 3/6")
        raise Cancelled("cancelled by the user; no output was written")

    count = _node_count(context)
    with pytest.raises(Cancelled):
        segment_node(node, ["liver"], model=None, context=context, segmenter=cancelled_segmenter, progress=lambda f, m: None)
    assert seen and np.array_equal(seen[0].array, ct.array)  # the run did start on this volume
    assert _node_count(context) == count
    assert context.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0

    mask = _box_mask(ct, (2, 2, 2), (4, 5, 6))

    def finished_segmenter(volume, prompts, *, model, **options):
        results = [_result(volume, p, mask) for p in prompts]
        return SegmentationRun(results=results, device="cpu", batch_size=1, seconds=0.0, slices=6, skipped_slices=0)

    seg, run = segment_node(node, ["liver"], model=None, context=context, segmenter=finished_segmenter)
    assert context.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert np.array_equal(_ras_points_of_segment(seg, "liver"), _ras_points_of_mask(ct, mask))


# saliency overlays ---------------------------------------------------------------------------
def _saliency_maps(ct: Volume) -> dict[str, Volume]:
    ramp = np.linspace(0, 1, ct.array.size, dtype=np.float32).reshape(ct.shape)
    return {
        "vit.3": ct.with_array(np.rint(ramp * 255).astype(np.uint8)),  # the sink's uint8 encoding
        "vit.11": ct.with_array((1 - ramp).astype(np.float16)),
    }


def test_saliency_layers_become_float_volumes_with_our_inferno(context):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    maps = _saliency_maps(ct)
    nodes = add_saliency_volumes(maps, reference_node=node, context=context, prompt="liver")
    assert list(nodes) == ["vit.3", "vit.11"]
    for layer, volume_node in nodes.items():
        back = volume_from_node(volume_node)
        assert back.array.dtype == np.float32
        expected = maps[layer].array / 255.0 if layer == "vit.3" else maps[layer].array.astype(np.float32)
        assert np.allclose(back.array, expected, atol=1e-6)
        assert np.allclose(back.ijk_to_lps(), ct.ijk_to_lps(), atol=1e-9)
        assert volume_node.GetAttribute(SALIENCY_ATTRIBUTE) == f"liver|{layer}"
        display = volume_node.GetDisplayNode()
        assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    color = context.scene.GetNodeByID(nodes["vit.3"].GetDisplayNode().GetColorNodeID())
    assert color.GetName() == OWN_COLOR_TABLE and color.GetNumberOfColors() == 256
    table = np.array([color.GetLookupTable().GetTableValue(i)[:3] for i in range(256)])
    assert np.allclose(table, inferno(256), atol=0.51 / 255)  # the lookup table keeps 8 bits per channel
    # a second run updates the same nodes and reuses the table
    again = add_saliency_volumes(maps, reference_node=node, context=context, prompt="liver")
    assert [n.GetID() for n in again.values()] == [n.GetID() for n in nodes.values()]
    assert sum(context.scene.GetNthNodeByClass(i, "vtkMRMLColorTableNode").GetName() == OWN_COLOR_TABLE
               for i in range(context.scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode"))) == 1


def test_saliency_of_another_volume_for_the_same_prompt_is_left_alone(context):
    first = node_from_volume(_ct("flipped"), context=context, name="CT 1")
    second_ct = _ct("oblique")
    second = node_from_volume(second_ct, context=context, name="CT 2")
    transform = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    first.SetAndObserveTransformNodeID(transform.GetID())
    ones = _ct("flipped").with_array(np.ones(_ct("flipped").shape, np.float32))
    kept = add_saliency_volumes({"vit.3": ones}, reference_node=first, context=context, prompt="liver")["vit.3"]
    kept_matrix, kept_values = _ijk_to_ras(kept), _node_array(kept)
    added = add_saliency_volumes(_saliency_maps(second_ct), reference_node=second, context=context, prompt="liver")
    assert added["vit.3"] is not kept
    assert np.array_equal(_ijk_to_ras(kept), kept_matrix) and np.array_equal(_node_array(kept), kept_values)
    assert np.allclose(_ijk_to_ras(added["vit.3"]), _ijk_to_ras(second)) and added["vit.3"].GetTransformNodeID() is None
    # the same volume again: updated in place, as before
    again = add_saliency_volumes({"vit.3": ones}, reference_node=first, context=context, prompt="liver")["vit.3"]
    assert again is kept
    context.scene.RemoveNode(second)
    count = _node_count(context)
    with pytest.raises(InputError, match="not in the scene"):
        add_saliency_volumes(_saliency_maps(second_ct), reference_node=second, context=context, prompt="liver")
    assert _node_count(context) == count


def test_updated_saliency_volumes_follow_the_inputs_current_transform(context):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    first = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "first registration")
    node.SetAndObserveTransformNodeID(first.GetID())
    added = add_saliency_volumes(_saliency_maps(ct), reference_node=node, context=context, prompt="liver")
    assert {n.GetTransformNodeID() for n in added.values()} == {first.GetID()}
    second = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "second registration")
    node.SetAndObserveTransformNodeID(second.GetID())  # the user moved the CT meanwhile
    again = add_saliency_volumes(_saliency_maps(ct), reference_node=node, context=context, prompt="liver")
    assert [n.GetID() for n in again.values()] == [n.GetID() for n in added.values()]  # updated in place
    assert {n.GetTransformNodeID() for n in again.values()} == {second.GetID()}
    node.SetAndObserveTransformNodeID(None)
    again = add_saliency_volumes(_saliency_maps(ct), reference_node=node, context=context, prompt="liver")
    assert {n.GetTransformNodeID() for n in again.values()} == {None}


def test_compact_saliency_maps_keep_their_own_grid_over_the_ct_and_others_are_refused(context):
    from TextSegmentLib.grid import over_extent

    ct = _ct("oblique", shape=(6, 12, 8))
    node = node_from_volume(ct, context=context, name="CT")
    compact = over_extent(ct, np.full((6, 6, 4), 128, np.uint8))  # half the voxels each way in-plane
    added = add_saliency_volumes({"vit.11": compact}, reference_node=node, context=context, prompt="liver")["vit.11"]
    back = volume_from_node(added)
    assert back.shape == (6, 6, 4)
    assert np.allclose(back.ijk_to_lps(), compact.ijk_to_lps(), atol=1e-9)
    assert np.allclose(back.array, 128 / 255.0, atol=1e-6)
    moved = Volume(compact.array, spacing=compact.spacing, origin=np.add(compact.origin, (0.5, 0.0, 0.0)),
                   direction=compact.direction)
    count = _node_count(context)
    with pytest.raises(InputError, match="does not cover"):
        add_saliency_volumes({"vit.3": moved}, reference_node=node, context=context, prompt="liver")
    assert _node_count(context) == count


def test_our_inferno_is_matplotlibs():
    from matplotlib import colormaps

    reference = colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3]
    assert np.abs(inferno(256) - reference).max() < 5 / 255
    assert np.all(np.diff(inferno(256).sum(axis=1)) > -1e-9)  # dark to bright


def test_slicer_inferno_is_used_when_the_scene_has_it(context):
    slicer_inferno = slicer.vtkMRMLColorTableNode()
    slicer_inferno.SetTypeToGrey()
    slicer_inferno.SetSingletonTag("FileInferno.txt")  # the id Slicer gives its Inferno.txt table
    context.scene.AddNode(slicer_inferno)
    assert saliency_color_node(context=context).GetID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert saliency_color_node(context=context, colormap="Iron").GetID() == "vtkMRMLColorTableNodeIron"
    with pytest.raises(InputError, match="not in the scene"):
        saliency_color_node(context=context, colormap="NoSuchTable")


def test_switching_layers_switches_the_foreground(context):
    ct = _ct("identity")
    node = node_from_volume(ct, context=context, name="CT")
    nodes = add_saliency_volumes(_saliency_maps(ct), reference_node=node, context=context, prompt="liver")
    composites = show_overlay(node, nodes["vit.3"], context=context, opacity=0.4)
    assert len(composites) == 3  # Red, Yellow, Green
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == node.GetID()
        assert composite.GetForegroundVolumeID() == nodes["vit.3"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.4)
    show_overlay(node, nodes["vit.11"], context=context, opacity=0.6)
    for i in range(context.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = context.scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        assert composite.GetForegroundVolumeID() == nodes["vit.11"].GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)
    with pytest.raises(InputError):
        show_overlay(node, nodes["vit.11"], context=context, opacity=1.5)


# files ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", ["flipped", "oblique"])
def test_seg_nrrd_written_and_read_back(context, tmp_path, geometry):
    ct = _ct(geometry)
    node = node_from_volume(ct, context=context, name="CT")
    liver = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    cyst = _box_mask(ct, (2, 3, 4), (3, 5, 6))  # overlaps the liver
    seg = add_segmentation([_result(ct, "liver", liver), _result(ct, "cyst in the liver", cyst)], reference_node=node, context=context)
    path = export_segmentation(seg, tmp_path / "out.seg.nrrd", context=context)
    assert path.is_file() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]

    loaded = load_segmentation(path, context=context)
    segmentation = loaded.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    assert np.array_equal(_ras_points_of_segment(loaded, "liver"), _ras_points_of_mask(ct, liver))
    assert np.array_equal(_ras_points_of_segment(loaded, "cyst in the liver"), _ras_points_of_mask(ct, cyst))
    cyst_segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("cyst in the liver"))
    assert "SCT^367643001^Cyst" in cyst_segment.GetTerminology() and "SCT^10200004^Liver" in cyst_segment.GetTerminology()

    size = path.stat().st_size
    with pytest.raises(OutputExistsError):
        export_segmentation(seg, path, context=context)
    assert path.stat().st_size == size


def test_nifti_export_goes_through_a_labelmap_in_lps(context, tmp_path):
    ct = _ct("oblique")
    node = node_from_volume(ct, context=context, name="CT")
    liver = _box_mask(ct, (1, 2, 3), (4, 6, 9))
    spleen = _box_mask(ct, (4, 0, 0), (6, 2, 3))
    seg = add_segmentation([_result(ct, "liver", liver), _result(ct, "spleen", spleen)], reference_node=node, context=context)
    count = _node_count(context)
    path = export_segmentation(seg, tmp_path / "labels.nii.gz", context=context, reference_node=node)
    assert _node_count(context) == count  # the temporary label map is gone again
    assert path.read_bytes()[:2] == b"\x1f\x8b"  # gzip, i.e. really .nii.gz and not NRRD bytes

    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image)
    assert labels.shape == ct.shape
    written = Volume(labels, spacing=image.GetSpacing(), origin=image.GetOrigin(), direction=np.reshape(image.GetDirection(), (3, 3)))
    assert np.allclose(written.ijk_to_lps(), ct.ijk_to_lps(), atol=1e-3)  # NIfTI stores float32
    assert np.array_equal(labels == 1, liver == 1) and np.array_equal(labels == 2, spleen == 1)
    with pytest.raises(InputError, match="unknown segmentation format"):
        export_segmentation(seg, tmp_path / "labels.png", context=context)


def test_a_segmentation_without_segments_is_no_label_map_and_leaves_no_folder_behind(context, tmp_path):
    """Slicer failed with 'the volume storage node could not write' and left a TempWrite folder in the output folder."""
    ct = _ct("identity")
    node = node_from_volume(ct, context=context, name="CT")
    empty = context.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing yet")
    count = _node_count(context)
    with pytest.raises(InputError, match="'nothing yet' has no segments"):
        export_segmentation(empty, tmp_path / "labels.nii.gz", context=context, reference_node=node)
    assert list(tmp_path.iterdir()) == [] and _node_count(context) == count


def test_real_label_survives_scene_and_seg_nrrd(context, tmp_path, shared_data):
    """TotalSegmentator's liver on the real CT: into a segment, out to .seg.nrrd, back, same voxels."""
    from TextSegmentLib.io import read_volume
    from TextSegmentLib.io import read_label_map

    folder = shared_data / "ct" / "totalseg_example_ct_sm"
    ct = read_volume(folder / "example_ct_sm.nii.gz")
    labels = read_label_map(folder / "example_seg_fast" / "liver.nii.gz")
    assert labels.same_geometry(ct)
    liver = (labels.array > 0).astype(np.uint8)
    assert liver.sum() > 1000
    node = node_from_volume(ct, context=context, name="CT")
    seg = add_segmentation([_result(ct, "liver", liver)], reference_node=node, context=context)
    loaded = load_segmentation(export_segmentation(seg, tmp_path / "liver.seg.nrrd", context=context), context=context)
    assert np.array_equal(_ras_points_of_segment(loaded, "liver"), _ras_points_of_mask(ct, liver))
