"""Canonical slices must not depend on how a volume is stored.

The phantoms are built from physical (LPS) coordinates through ``Volume.physical_points``, so
the expected images come from the geometry convention, not from the code under test.
"""

import itertools
import json

import numpy as np
import pytest
import torch

from TextSegmentLib.errors import InputError
from TextSegmentLib.preprocess import slice_plan
from TextSegmentLib.volume import Volume

REF_SIZE = (20, 24, 9)  # voxels along L, P, S
REF_SPACING = (0.8, 0.6, 2.0)
REF_ORIGIN = np.array([-8.0, -7.0, -8.0])

# Axis, sign of each canonical (slice, row, column) direction in LPS.
CANONICAL = {
    "axial": ((2, 1), (1, 1), (0, 1)),
    "coronal": ((1, 1), (2, -1), (0, 1)),
    "sagittal": ((0, 1), (2, -1), (1, 1)),
}

SIGNED_PERMUTATIONS = [
    np.array(perm, dtype=float).T * np.array(signs, dtype=float)
    for perm in itertools.permutations(np.eye(3))
    for signs in itertools.product((1, -1), repeat=3)
]


def phantom(points):
    """Body ellipse, a bright blob on the patient's left, a mid one anteriorly, rising with S."""
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    body = ((x / 7) ** 2 + (y / 6) ** 2 <= 1).astype(float)
    left = 5.0 * (((x - 5) ** 2 + y**2) <= 2.5**2)
    anterior = 3.0 * ((x**2 + (y + 4.5) ** 2) <= 2.0**2)
    return body + left + anterior + (z + 8) / 20


def volume_with_direction(direction):
    """The reference grid's voxels stored along the axes of ``direction`` (columns = LPS i, j, k)."""
    direction = np.asarray(direction, dtype=float)
    lps_of = [int(np.argmax(np.abs(direction[:, a]))) for a in range(3)]
    size = [REF_SIZE[lps] for lps in lps_of]
    spacing = [REF_SPACING[lps] for lps in lps_of]
    origin = REF_ORIGIN.copy()
    for a, lps in enumerate(lps_of):
        if direction[lps, a] < 0:
            origin[lps] += (REF_SIZE[lps] - 1) * REF_SPACING[lps]
    return sampled_volume(size, spacing, origin, direction)


def sampled_volume(size, spacing, origin, direction):
    shell = Volume(np.zeros(size[::-1]), spacing=spacing, origin=origin, direction=direction)
    k, j, i = np.indices(shell.shape)
    points = shell.physical_points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1))
    return shell.with_array(phantom(points).reshape(shell.shape)), points.reshape(shell.shape + (3,))


def expected_slices(view):
    """The phantom sampled on the canonical grid of ``view``, straight from its definition."""
    counts, steps, starts = [], [], []
    for lps, sign in CANONICAL[view]:
        n, d = REF_SIZE[lps], REF_SPACING[lps]
        counts.append(n)
        step = np.zeros(3)
        step[lps] = sign * d
        steps.append(step)
        starts.append(0.0 if sign > 0 else (n - 1) * d)
    n, r, c = np.indices(counts)
    base = REF_ORIGIN + sum(np.eye(3)[lps] * start for (lps, _), start in zip(CANONICAL[view], starts))
    points = base + n[..., None] * steps[0] + r[..., None] * steps[1] + c[..., None] * steps[2]
    return phantom(points.reshape(-1, 3)).reshape(counts)


@pytest.mark.parametrize("view", sorted(CANONICAL))
def test_every_storage_order_gives_the_same_canonical_slices(view):
    expected = expected_slices(view)
    for direction in SIGNED_PERMUTATIONS:
        volume, _ = volume_with_direction(direction)
        plan = slice_plan(volume, axis=view)
        np.testing.assert_array_equal(plan.extract(volume.array), expected, err_msg=f"direction\n{direction}")
        view_of = plan.extract_view(volume.array)  # the same slices, no copy
        np.testing.assert_array_equal(view_of, expected, err_msg=f"view, direction\n{direction}")
        assert np.shares_memory(view_of, volume.array)
        assert plan.obliquity_deg == 0.0


def test_identity_lps_is_already_canonical_axial():
    volume, _ = volume_with_direction(np.eye(3))
    plan = slice_plan(volume)
    assert plan.axes == (0, 1, 2) and plan.flips == (False, False, False)
    np.testing.assert_array_equal(plan.extract(volume.array), volume.array)


def test_axial_is_radiological_patient_left_on_image_right_anterior_on_top():
    volume, _ = volume_with_direction(np.diag([-1.0, -1.0, 1.0]))  # RAS storage, as NIfTI often is
    slices = slice_plan(volume).extract(volume.array)
    middle = slices[slices.shape[0] // 2]
    rows, cols = np.nonzero(middle - middle.min() > 4)  # the patient-left blob
    assert cols.mean() > middle.shape[1] * 0.6
    rows, cols = np.nonzero(np.abs(middle - middle.min() - 3 - 1) < 0.5)  # the anterior blob
    assert rows.mean() < middle.shape[0] * 0.4
    assert np.all(np.diff(slices.mean(axis=(1, 2))) > 0)  # inferior → superior


@pytest.mark.parametrize("view", sorted(CANONICAL))
def test_restore_is_the_exact_inverse_of_extract(view):
    rng = np.random.default_rng(0)
    for direction in SIGNED_PERMUTATIONS:
        volume, _ = volume_with_direction(direction)
        array = rng.integers(0, 1000, size=volume.shape)
        plan = slice_plan(volume, axis=view)
        slices = plan.extract(array)
        assert slices.shape == plan.shape and slices.flags.c_contiguous
        np.testing.assert_array_equal(plan.restore(slices), array)
        np.testing.assert_array_equal(plan.extract(plan.restore(slices)), slices)


def test_tensors_follow_the_same_plan():
    volume, _ = volume_with_direction(SIGNED_PERMUTATIONS[29])
    plan = slice_plan(volume, axis="coronal")
    tensor = torch.from_numpy(volume.array)
    slices = plan.extract(tensor)
    assert isinstance(slices, torch.Tensor)
    np.testing.assert_array_equal(slices.numpy(), plan.extract(volume.array))
    assert torch.equal(plan.restore(slices), tensor)


def test_spacing_and_counts_follow_the_chosen_axes():
    # Stored sagittally: i runs posterior, j inferior, k to the patient's left.
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], dtype=float)
    volume, _ = volume_with_direction(direction)
    axial = slice_plan(volume, axis="axial")
    assert axial.pixel_spacing == (REF_SPACING[1], REF_SPACING[0])
    assert axial.slice_spacing == REF_SPACING[2]
    assert axial.shape == (REF_SIZE[2], REF_SIZE[1], REF_SIZE[0]) and axial.num_slices == REF_SIZE[2]
    sagittal = slice_plan(volume, axis="Sagittal")
    assert sagittal.pixel_spacing == (REF_SPACING[2], REF_SPACING[1]) and sagittal.slice_spacing == REF_SPACING[0]


def rotation(axis, degrees):
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.mark.parametrize("view", sorted(CANONICAL))
@pytest.mark.parametrize("storage", [0, 7, 21, 42])
def test_oblique_volumes_use_the_nearest_axes(view, storage):
    direction = rotation((0.3, -1.0, 0.5), 12) @ SIGNED_PERMUTATIONS[storage]
    size = [REF_SIZE[int(np.argmax(np.abs(direction[:, a])))] for a in range(3)]
    volume, points = sampled_volume(size, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    plan = slice_plan(volume, axis=view)
    assert 0 < plan.obliquity_deg <= 12 + 1e-6
    # Physical coordinates, laid out canonically, must run the canonical way along every axis.
    for out_axis, (lps, sign) in enumerate(CANONICAL[view]):
        coordinate = plan.extract(points[..., lps])
        assert np.all(sign * np.diff(coordinate, axis=out_axis) > 0)


def test_oblique_phantom_keeps_its_left_marker_on_the_image_right():
    direction = rotation((0, 0, 1), 10) @ np.diag([-1.0, 1.0, 1.0])
    volume, _ = sampled_volume((24, 24, 9), (0.7, 0.7, 2.0), (8.0, -8.0, -8.0), direction)
    plan = slice_plan(volume)
    assert plan.obliquity_deg == pytest.approx(10.0)
    middle = plan.extract(volume.array)[4]
    rows, cols = np.nonzero(middle - middle.min() > 4)
    assert cols.mean() > middle.shape[1] * 0.6


def test_bad_requests_raise_input_errors():
    volume, _ = volume_with_direction(np.eye(3))
    with pytest.raises(InputError):
        slice_plan(volume, axis="transverse-ish")
    with pytest.raises(InputError):
        slice_plan(Volume(np.zeros((2, 2, 2)), direction=np.diag([1.0, 1.0, 0.0])))
    with pytest.raises(ValueError):
        slice_plan(volume).extract(np.zeros((2, 2, 2)))


# Real CT -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def totalseg(shared_data):
    import SimpleITK as sitk

    def read(name):
        image = sitk.ReadImage(str(shared_data / "ct/totalseg_example_ct_sm" / name))
        return Volume(
            sitk.GetArrayFromImage(image),
            spacing=image.GetSpacing(),
            origin=image.GetOrigin(),
            direction=np.array(image.GetDirection()).reshape(3, 3),
        )

    classes = json.loads((shared_data / "ct/totalsegmentator_class_maps.json").read_text())["total"]
    labels = {name: int(value) for value, name in classes.items()}
    return read("example_ct_sm.nii.gz"), read("example_seg.nii.gz"), labels


def centroid(slices, label):
    return np.argwhere(slices == label).mean(axis=0)  # (slice, row, column)


def test_real_ct_axial_liver_on_image_left_spleen_on_image_right(totalseg):
    _, seg, labels = totalseg
    assert not np.allclose(seg.direction, np.eye(3))  # stored RAS: a naive array view would mirror it
    slices = slice_plan(seg).extract(seg.array)
    width = slices.shape[2]
    assert centroid(slices, labels["liver"])[2] < width / 2 < centroid(slices, labels["spleen"])[2]
    assert centroid(slices, labels["kidney_right"])[2] < width / 2 < centroid(slices, labels["kidney_left"])[2]
    assert centroid(slices, labels["aorta"])[1] < centroid(slices, labels["spinal_cord"])[1]  # anterior on top
    assert centroid(slices, labels["lung_lower_lobe_right"])[0] > centroid(slices, labels["kidney_right"])[0]


def test_real_ct_coronal_and_sagittal_orientation(totalseg):
    _, seg, labels = totalseg
    coronal = slice_plan(seg, axis="coronal").extract(seg.array)
    assert centroid(coronal, labels["liver"])[2] < coronal.shape[2] / 2 < centroid(coronal, labels["spleen"])[2]
    assert centroid(coronal, labels["lung_lower_lobe_right"])[1] < centroid(coronal, labels["kidney_right"])[1]
    sagittal = slice_plan(seg, axis="sagittal").extract(seg.array)
    assert centroid(sagittal, labels["aorta"])[2] < centroid(sagittal, labels["spinal_cord"])[2]
    assert centroid(sagittal, labels["liver"])[0] < centroid(sagittal, labels["spleen"])[0]  # right → left


def test_real_ct_restored_as_lps_gives_the_same_axial_image(totalseg):
    ct, _, _ = totalseg
    lps = Volume(
        ct.array[:, ::-1, ::-1],
        spacing=ct.spacing,
        origin=ct.physical_points([[ct.shape[2] - 1, ct.shape[1] - 1, 0]])[0],
        direction=np.eye(3),
    )
    assert np.allclose(lps.physical_points([[0, 0, 0]]), ct.physical_points([[ct.shape[2] - 1, ct.shape[1] - 1, 0]]))
    np.testing.assert_array_equal(slice_plan(lps).extract(lps.array), slice_plan(ct).extract(ct.array))
