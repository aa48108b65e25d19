"""The screenshot renderer on Slicer's real slice pipeline (slicer-core), headless.

A small CT with known HU, a box mask and a box of saliency: each pixel's expected colour follows
from the CT window, the mask colour and the Inferno table, so a wrong slice, a flipped view, a
missing layer or a lost opacity shows up as a wrong pixel.
"""

from __future__ import annotations

import numpy as np
import pytest

from TextSegmentLib.colors import inferno, lookup
from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.slicer_screenshot import CT_WINDOW, render_slice_overlay, save_png, slice_width_for
from TextSegmentLib.volume import Volume

SHAPE = (6, 32, 48)  # (z, y, x), 1 mm voxels: the picture is 48 mm wide, 32 mm high
WIDTH = 96  # two pixels per millimetre
BODY_HU = 40.0  # the window's level: mid grey
RED = np.array([230, 30, 30], dtype=np.uint8)


def _grey(hu: float) -> float:
    width, level = CT_WINDOW
    return float(np.clip((hu - (level - width / 2)) / width, 0.0, 1.0) * 255.0)


def _volume(array: np.ndarray, flip_z: bool = False) -> Volume:
    direction = np.diag([1.0, 1.0, -1.0]) if flip_z else np.eye(3)
    return Volume(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=direction)


def _case(flip_z: bool = False, mask_slice: int = 2):
    """CT, mask on array slice ``mask_slice`` (patient right, anterior: x 4–15, y 4–11), saliency 1.0 on the left."""
    ct = _volume(np.full(SHAPE, BODY_HU, dtype=np.int16), flip_z)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[mask_slice, 4:12, 4:16] = 1
    saliency = np.zeros(SHAPE, dtype=np.float32)
    saliency[:, 16:28, 28:44] = 1.0
    return ct, ct.with_array(mask), ct.with_array(saliency)


def _block(image: np.ndarray, y0: int, y1: int, x0: int, x1: int, margin: int = 2) -> np.ndarray:
    """The picture's pixels inside voxel box [y0, y1) × [x0, x1) (row 0 anterior, column 0 patient right), edges left out."""
    s = image.shape[1] // SHAPE[2]  # pixels per voxel
    return image[y0 * s + margin : y1 * s - margin, x0 * s + margin : x1 * s - margin].reshape(-1, 3).astype(int)


def test_shape_dtype_and_plain_ct():
    ct, _, _ = _case()
    image = render_slice_overlay(ct, width=WIDTH)
    assert image.dtype == np.uint8 and image.shape == (WIDTH * SHAPE[1] // SHAPE[2], WIDTH, 3)
    assert np.abs(_block(image, 0, SHAPE[1], 0, SHAPE[2]) - _grey(BODY_HU)).max() <= 2  # the CT window, nothing else


def test_outside_the_volume_is_black_as_in_a_slice_view():
    angle = np.radians(30.0)  # rotated about S: the picture's corners lie outside the volume
    c, s = np.cos(angle), np.sin(angle)
    ct = Volume(np.full(SHAPE, BODY_HU, dtype=np.int16), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                direction=np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]))
    image = render_slice_overlay(ct, width=WIDTH)
    h, w = image.shape[:2]
    assert all(not image[y, x].any() for y, x in ((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1)))
    assert np.abs(image[h // 2, w // 2].astype(int) - _grey(BODY_HU)).max() <= 2


def test_mask_fill_has_the_label_colour_in_the_right_corner():
    ct, mask, _ = _case()
    bare = render_slice_overlay(ct, width=WIDTH)
    filled = render_slice_overlay(ct, mask=mask, outline=False, label_color=RED / 255.0, width=WIDTH)
    inside = _block(filled, 4, 12, 4, 16)
    assert np.abs(inside - RED).max() <= 2  # label opacity 1: the label colour itself
    # patient right, anterior = top left of a radiological view; everything else untouched
    changed = np.any(filled != bare, axis=2)
    rows, cols = np.nonzero(changed)
    s = WIDTH // SHAPE[2]
    assert rows.min() >= 4 * s - 1 and rows.max() <= 12 * s and cols.min() >= 4 * s - 1 and cols.max() <= 16 * s


def test_default_mask_colour_is_the_prompts_segment_colour():
    ct, mask, _ = _case()
    image = render_slice_overlay(ct, mask=mask, prompt="liver", outline=False, width=WIDTH)
    expected = np.array(lookup("liver").rgb_float) * 255.0
    assert np.abs(_block(image, 4, 12, 4, 16) - expected).max() <= 2


def test_mask_outline_leaves_the_inside_alone():
    ct, mask, _ = _case()
    bare = render_slice_overlay(ct, width=WIDTH)
    outlined = render_slice_overlay(ct, mask=mask, outline=True, label_color=RED / 255.0, width=WIDTH)
    # Slicer draws the outline a few pixels wide, up to half a voxel off the box (pixel centres vs voxel edges)
    assert np.array_equal(_block(outlined, 4, 12, 4, 16, margin=4), _block(bare, 4, 12, 4, 16, margin=4))
    s = WIDTH // SHAPE[2]
    ring = outlined[4 * s : 12 * s, 4 * s : 16 * s].reshape(-1, 3).astype(int)
    assert (np.abs(ring - RED).max(axis=1) <= 2).sum() >= 2 * (8 + 12) * s - 8  # the box's border, in red


def test_saliency_is_tinted_by_inferno_at_the_opacity_and_zero_is_transparent():
    ct, _, saliency = _case()
    bare = render_slice_overlay(ct, width=WIDTH)
    tinted = render_slice_overlay(ct, saliency=saliency, opacity=0.5, width=WIDTH)
    hot = _block(tinted, 16, 28, 28, 44)
    expected = 0.5 * _grey(BODY_HU) + 0.5 * inferno(256)[-1] * 255.0  # the top of the colour map, half over grey
    assert np.abs(hot - expected).max() <= 4
    assert hot[:, 0].mean() > hot[:, 2].mean() + 30  # yellow-white, not grey
    assert np.array_equal(_block(tinted, 0, 14, 0, 26), _block(bare, 0, 14, 0, 26))  # zero saliency shows the CT
    opaque = render_slice_overlay(ct, saliency=saliency, opacity=1.0, width=WIDTH)
    assert np.abs(_block(opaque, 16, 28, 28, 44) - inferno(256)[-1] * 255.0).max() <= 4


def test_saliency_threshold_hides_weak_values():
    ct, _, saliency = _case()
    weak = saliency.with_array(saliency.array * 0.2)
    bare = render_slice_overlay(ct, width=WIDTH)
    shown = render_slice_overlay(ct, saliency=weak, width=WIDTH)
    hidden = render_slice_overlay(ct, saliency=weak, saliency_threshold=0.3, width=WIDTH)
    assert not np.array_equal(shown, bare)
    assert np.array_equal(hidden, bare)


@pytest.mark.parametrize("flip_z", [False, True], ids=["superior-k", "inferior-k"])
def test_auto_and_explicit_slices_pick_the_masks_slice(flip_z):
    ct, mask, _ = _case(flip_z=flip_z, mask_slice=1)
    canonical = SHAPE[0] - 2 if flip_z else 1  # canonical slices run inferior → superior
    bare = render_slice_overlay(ct, width=WIDTH)
    auto = render_slice_overlay(ct, mask=mask, outline=False, width=WIDTH)
    at_mask = render_slice_overlay(ct, mask=mask, slice_index=canonical, outline=False, width=WIDTH)
    elsewhere = render_slice_overlay(ct, mask=mask, slice_index=SHAPE[0] - 1 - canonical, outline=False, width=WIDTH)
    assert np.array_equal(auto, at_mask) and not np.array_equal(auto, bare)
    assert np.array_equal(elsewhere, bare)


def test_renders_in_a_given_scene_and_shows_the_overlay_there(context):
    ct, mask, saliency = _case()
    image = render_slice_overlay(ct, mask=mask, saliency=saliency, context=context, width=WIDTH)
    assert image.shape == (64, WIDTH, 3)
    composite = context.slice_logics[0].GetSliceCompositeNode()
    background = context.scene.GetNodeByID(composite.GetBackgroundVolumeID())
    foreground = context.scene.GetNodeByID(composite.GetForegroundVolumeID())
    label = context.scene.GetNodeByID(composite.GetLabelVolumeID())
    assert background.GetName() == "CT" and foreground is not None and label.IsA("vtkMRMLLabelMapVolumeNode")
    # nodes given back are shown as they are, never changed
    again = render_slice_overlay(background, mask=label, saliency=foreground, context=context, width=WIDTH)
    assert np.array_equal(again, image)


def test_bad_input_is_refused():
    ct, mask, _ = _case()
    with pytest.raises(InputError, match="outside"):
        render_slice_overlay(ct, mask=mask, slice_index=SHAPE[0], width=WIDTH)
    with pytest.raises(InputError, match="grid"):
        render_slice_overlay(ct, mask=_volume(np.ones((2, 3, 4), np.uint8)), width=WIDTH)
    with pytest.raises(InputError, match="opacity"):
        render_slice_overlay(ct, opacity=1.5, width=WIDTH)


def test_save_png_frames_the_slice_and_refuses_to_overwrite(tmp_path):
    from PIL import Image

    image = np.zeros((60, slice_width_for(300), 3), dtype=np.uint8)
    image[10:30, 120:140] = RED  # clear of the legend (lower left)
    path = save_png(image, tmp_path / "shot.png", title="“liver”", footnote="note", legend={"liver": RED / 255.0})
    written = np.asarray(Image.open(path).convert("RGB"))
    assert written.shape[1] == 300
    assert (np.abs(written.reshape(-1, 3).astype(int) - RED).max(axis=1) <= 1).sum() >= 20 * 20  # drawn 1:1
    with pytest.raises(OutputExistsError):
        save_png(image, path)
    save_png(image, path, overwrite=True, colorbar=None)
    assert slice_width_for(np.asarray(Image.open(path)).shape[1], colorbar=False) == image.shape[1]
    with pytest.raises(InputError, match="RGB"):
        save_png(image[..., 0], tmp_path / "grey.png")


def test_a_scene_without_slice_views_gets_a_private_one_removed_afterwards():
    from TextSegmentLib.slicer_bridge import headless_context

    context = headless_context(slice_views=())  # like Slicer's own scene, whose views we must not resize
    try:
        ct, mask, saliency = _case()
        image = render_slice_overlay(ct, mask=mask, saliency=saliency, context=context, width=WIDTH)
        assert np.array_equal(image, render_slice_overlay(ct, mask=mask, saliency=saliency, width=WIDTH))
        assert context.scene.GetNumberOfNodesByClass("vtkMRMLSliceNode") == 0
        assert context.scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0
    finally:
        context.scene.Clear(True)


def test_a_ct_node_under_a_transform_shows_the_masks_slice(context):
    """The slice offset is a world coordinate: a CT node moved by a parent transform shows the same slice."""
    import vtk

    from TextSegmentLib.slicer_bridge import node_from_volume

    ct, mask, _ = _case(mask_slice=1)
    expected = render_slice_overlay(ct, mask=mask, outline=False, label_color=RED / 255.0, width=WIDTH)
    node = node_from_volume(ct, context=context, name="moved CT")
    node.GetDisplayNode().SetAutoWindowLevel(False)
    node.GetDisplayNode().SetWindowLevel(*CT_WINDOW)  # as a CT given as a Volume is shown
    transform = context.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "up 3 mm")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(2, 3, 3.0)  # 3 mm superior: three slices, within the volume's six
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = render_slice_overlay(node, mask=mask, outline=False, label_color=RED / 255.0, context=context, width=WIDTH)
    assert np.abs(_block(moved, 4, 12, 4, 16) - RED).max() <= 2  # the mask's slice, not three slices below it
    assert np.array_equal(moved, expected)
