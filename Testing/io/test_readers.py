"""Image-file reading: geometry exactly as SimpleITK gives it, the HU rule, and one clear error per bad input."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from TextSegmentLib.errors import InputError, NotCTError
from TextSegmentLib.io import looks_like_hu, read_image_file, read_label_map, read_volume

TOTALSEG = "ct/totalseg_example_ct_sm"


def _write(array, path, *, spacing=(1.0, 1.0, 1.0), is_vector=False):
    image = sitk.GetImageFromArray(array, isVector=is_vector)
    if image.GetDimension() == 3 and not is_vector:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


def _hu_like(shape=(3, 4, 5)):
    array = np.full(shape, 40, dtype=np.int16)
    array[0, 0, 0] = -1000
    return array


def test_totalseg_ct_geometry_is_exactly_simpleitks(shared_data):
    path = shared_data / TOTALSEG / "example_ct_sm.nii.gz"
    image = sitk.ReadImage(str(path))

    volume = read_volume(path)

    assert volume.shape == (30, 101, 122)
    assert volume.spacing == image.GetSpacing()
    assert volume.origin == image.GetOrigin()
    assert volume.direction.ravel().tolist() == list(image.GetDirection())
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.modality == "CT" and "modality_assumed" in volume.metadata
    assert volume.source == str(path) and volume.metadata["format"] == "NIfTI"


def test_nrrd_reads_with_its_geometry(shared_data):
    volume = read_volume(shared_data / "ct/pyradiomics_lung1/lung1_image_zcrop.nrrd")

    assert volume.shape == (14, 512, 512)
    np.testing.assert_allclose(volume.spacing, (0.5703125, 0.5703125, 5.0))
    np.testing.assert_allclose(volume.origin, (-146.0, -325.0, -642.5))
    assert volume.metadata["format"] == "NRRD"


def test_totalseg_label_map_lies_on_the_ct_grid_and_on_the_organs(shared_data):
    ct = read_volume(shared_data / TOTALSEG / "example_ct_sm.nii.gz")
    labels = read_label_map(shared_data / TOTALSEG / "example_seg.nii.gz")

    assert labels.same_geometry(ct)
    assert labels.metadata["kind"] == "label map"
    liver, lung = ct.array[labels.array == 5], ct.array[labels.array == 14]
    assert 20 < np.median(liver) < 80  # soft tissue
    assert np.median(lung) < -600  # air-filled


def test_label_map_refuses_fractions_and_negatives(tmp_path):
    with pytest.raises(InputError, match="non-integer"):
        read_label_map(_write(np.full((2, 3, 4), 0.5, np.float32), tmp_path / "half.nii.gz"))
    with pytest.raises(InputError, match="negative"):
        read_label_map(_write(np.full((2, 3, 4), -1, np.int16), tmp_path / "neg.nii.gz"))


def test_one_slice_file_is_a_volume(tmp_path):
    volume = read_volume(_write(_hu_like((1, 6, 7)), tmp_path / "one.nii.gz"))
    assert volume.shape == (1, 6, 7)


def test_mha_reads(tmp_path):
    volume = read_volume(_write(_hu_like(), tmp_path / "ct.mha", spacing=(0.5, 0.7, 2.0)))
    assert volume.spacing == (0.5, 0.7, 2.0) and volume.metadata["format"] == "MetaImage"


@pytest.mark.parametrize(
    "values, expected",
    [
        ([-1024, 0, 1500], True),
        ([-3024, 40, 3071], True),
        ([-500, 0], True),
        ([0, 400, 4000], False),  # MR-like
        ([0, 1, 117], False),  # a label map
        ([-3.1, 0.0, 2.5], False),  # normalised
        ([-1000, 40000], False),  # beyond int16
    ],
)
def test_hu_rule(values, expected):
    assert looks_like_hu(np.array(values, dtype=np.float32)) is expected


def test_values_that_are_not_hu_are_not_ct_unless_allowed(tmp_path):
    path = _write(np.arange(60, dtype=np.int16).reshape(3, 4, 5) * 50, tmp_path / "mr.nii.gz")

    with pytest.raises(NotCTError, match="not CT") as info:
        read_volume(path)
    assert str(path) in str(info.value) and "allow_non_ct=True" in str(info.value) and "--allow-non-ct" in str(info.value)

    volume = read_volume(path, allow_non_ct=True)
    assert volume.modality is None and volume.shape == (3, 4, 5)


@pytest.mark.parametrize("name", ["nan.nii.gz", "nan.nii", "nan.nrrd", "nan.mha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nan_volume_is_refused(tmp_path, name, dtype):
    # SimpleITK silently reads NaN in NIfTI as 0, so this also guards the raw-byte scan
    array = _hu_like().astype(dtype)
    array[1, 2, 3] = np.nan
    array[2, 0, 1] = np.inf
    path = _write(array, tmp_path / name)
    with pytest.raises(InputError, match="2 voxel\\(s\\) are NaN or infinite") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_finite_float_nifti_reads(tmp_path):
    volume = read_volume(_write(_hu_like().astype(np.float32), tmp_path / "ok.nii.gz"))
    assert volume.array.dtype == np.float32 and volume.modality == "CT"


@pytest.mark.parametrize("name", ["slice.png", "slice.nii.gz"])
def test_2d_image_is_refused(tmp_path, name):
    path = _write(np.zeros((8, 9), np.uint8), tmp_path / name)
    with pytest.raises(InputError, match="2D image") as info:
        read_volume(path, allow_non_ct=True)
    assert str(path) in str(info.value)


def test_colour_volume_is_refused(tmp_path):
    path = _write(np.zeros((2, 3, 4, 3), np.uint8), tmp_path / "rgb.nrrd", is_vector=True)
    with pytest.raises(InputError, match="values per voxel"):
        read_volume(path, allow_non_ct=True)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file") as info:
        read_volume(tmp_path / "nowhere.nii.gz")
    assert "nowhere.nii.gz" in str(info.value)


@pytest.mark.parametrize("name", ["broken.nii.gz", "broken.nrrd", "noextension"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(InputError, match="cannot read") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no readable DICOM files") as info:
        read_volume(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_folder_without_dicom(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    _write(_hu_like(), tmp_path / "ct.nii.gz")
    with pytest.raises(InputError, match="no readable DICOM files"):
        read_volume(tmp_path)


def test_series_uid_is_for_dicom_only(tmp_path):
    # named in both forms: the CLI passes this message on to users who typed --series
    with pytest.raises(InputError, match=r"series_uid \(CLI: --series\) applies to DICOM input only"):
        read_volume(_write(_hu_like(), tmp_path / "ct.nii.gz"), series_uid="1.2.3")


def test_read_image_file_has_no_ct_check(tmp_path):
    volume = read_image_file(_write(np.ones((2, 3, 4), np.uint8), tmp_path / "mask.nrrd"))
    assert volume.modality is None and volume.array.dtype == np.uint8


def test_label_map_with_nan_is_refused(tmp_path):
    labels = np.zeros((2, 3, 4), np.float32)
    labels[0, 0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        read_label_map(_write(labels, tmp_path / "labels.nrrd"))


@pytest.mark.parametrize(
    "name, compress", [("ct.nii.gz", True), ("ct.nii", False), ("ct.nrrd", False), ("ct.nrrd", True),
                       ("ct.mha", False), ("ct.mha", True)],
)
@pytest.mark.parametrize("keep", ["300 bytes", "half", "all but 1 byte"])
def test_truncated_file_is_refused(tmp_path, name, compress, keep):
    # ITK reads a NIfTI cut short (e.g. its first 300 bytes) as a whole volume, zero-filling the rest
    array = np.linspace(-1024, 0, 8 * 32 * 32).reshape(8, 32, 32).astype(np.int16)
    whole = tmp_path / f"whole_{name}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(whole), compress)
    np.testing.assert_array_equal(read_volume(whole).array, array)
    data = whole.read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: {"300 bytes": 300, "half": len(data) // 2, "all but 1 byte": len(data) - 1}[keep]])
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        read_volume(path)
    assert str(path) in str(info.value)


def test_damaged_gzip_float_nifti_is_refused(tmp_path):
    # the trailer's size still matches, so only the NaN scan's full read sees the damage
    path = _write(np.random.default_rng(0).normal(0, 300, (16, 64, 64)).astype(np.float32) - 1000, tmp_path / "f.nii.gz")
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0x5A for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="truncated or corrupt") as info:
        read_volume(path)
    assert str(path) in str(info.value)
