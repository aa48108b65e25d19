"""DICOM: discovery, series choice, geometry against SimpleITK, and the awkward real-world cases."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from enhanced_ct import ENHANCED_CT, LEGACY_ENHANCED_CT, enhanced_ct

from TextSegmentLib.errors import InputError, NotCTError
from TextSegmentLib.io import dicom_series, dicom_volume, list_series, read_label_map, read_volume

TOTALSEG = "dicom/totalseg_example_ct_dicom"
DIRTESTS = "dicom/pydicom_dicomdirtests"
CT5N_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"
SCOUT_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.2"
MR_SINGLE_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1196533885.18148.0.15"


@pytest.fixture(scope="module")
def totalseg_ct(shared_data):
    return read_volume(shared_data / TOTALSEG / "series")  # 20 × 512², JPEG 2000: read once


def _sitk_series(files):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader.Execute()


def _assert_same_as_sitk(volume, image):
    assert volume.size_ijk == image.GetSize()
    np.testing.assert_allclose(volume.spacing, image.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(volume.direction.ravel(), image.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))


def test_totalseg_series_matches_simpleitk(shared_data, totalseg_ct):
    folder = shared_data / TOTALSEG / "series"
    gdcm_order = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))

    _assert_same_as_sitk(totalseg_ct, _sitk_series(gdcm_order))
    assert totalseg_ct.shape == (20, 512, 512) and totalseg_ct.array.dtype == np.int16
    assert totalseg_ct.modality == "CT"
    assert totalseg_ct.array.min() == -1024  # rescale intercept applied


def test_totalseg_identity_comes_from_file_meta(shared_data, totalseg_ct):
    info = totalseg_ct.dicom
    assert len(info.files) == len(info.sop_instance_uids) == 20
    for file, uid in zip(info.files, info.sop_instance_uids):
        assert uid and uid == pydicom.dcmread(file, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in info.files]
    assert z == sorted(z)  # files listed in array order
    assert info.series_instance_uid == "" and totalseg_ct.metadata["series_key"].startswith("nouid-")
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"


def test_reference_segmentation_lands_on_the_same_anatomy(shared_data, totalseg_ct):
    labels = read_label_map(shared_data / TOTALSEG / "example_seg_dicom.nii.gz")
    assert not labels.same_geometry(totalseg_ct)  # stored y-flipped

    # physical space: map each labelled voxel's LPS point into the CT grid
    to_ct = np.linalg.inv(totalseg_ct.ijk_to_lps())
    hu = {}
    for label in (1, 32):  # spleen, vertebra T12
        points = labels.physical_points(np.argwhere(labels.array == label)[:, ::-1])
        i, j, k = np.rint(points @ to_ct[:3, :3].T + to_ct[:3, 3]).astype(int).T
        hu[label] = np.median(totalseg_ct.array[k, j, i])
    assert 50 < hu[1] < 120  # contrast-enhanced spleen
    assert hu[32] > 150  # bone

    # and the same with SimpleITK resampling onto the CT grid
    reference = sitk.GetImageFromArray(totalseg_ct.array)
    reference.SetSpacing(totalseg_ct.spacing)
    reference.SetOrigin(totalseg_ct.origin)
    reference.SetDirection(totalseg_ct.direction.ravel())
    moving = sitk.ReadImage(str(shared_data / TOTALSEG / "example_seg_dicom.nii.gz"))
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor))
    np.testing.assert_array_equal(resampled, np.flip(labels.array, axis=1))


def test_dicomdir_lists_every_series(shared_data):
    series = list_series(shared_data / DIRTESTS / "DICOMDIR")

    assert len(series) == 13 and sum(s.n_files for s in series) == 31
    assert sorted(s.modality for s in series).count("MR") == 7
    assert {s.modality for s in series} == {"CT", "MR", "CR"}
    scout = next(s for s in series if s.key == SCOUT_UID)
    assert scout.is_localizer and scout.orientations == 2


def test_dicomdir_tree_with_several_studies_asks_which_series(shared_data):
    with pytest.raises(InputError, match="series_uid") as info:
        read_volume(shared_data / DIRTESTS / "DICOMDIR")
    assert CT5N_UID in str(info.value)


def test_dicomdir_series_by_uid_matches_simpleitk(shared_data):
    volume = read_volume(shared_data / DIRTESTS / "DICOMDIR", series_uid=CT5N_UID)

    assert volume.shape == (5, 16, 16)
    _assert_same_as_sitk(volume, _sitk_series(volume.dicom.files))
    assert volume.dicom.series_instance_uid == CT5N_UID
    assert volume.metadata["non_uniform_spacing"] is False


def test_ct_chosen_over_localizer_and_other_modalities(shared_data):
    assert read_volume(shared_data / DIRTESTS / "98892001").dicom.series_instance_uid == CT5N_UID  # not the scout
    crs_and_ct = read_volume(shared_data / DIRTESTS / "77654033")  # three CR radiographs + a CT
    assert crs_and_ct.modality == "CT" and crs_and_ct.shape == (4, 16, 16)


def test_localizer_with_mixed_orientations_is_not_a_volume(shared_data):
    with pytest.raises(InputError, match="orientations"):
        read_volume(shared_data / DIRTESTS / "98892001", series_uid=SCOUT_UID)


def test_unknown_series_uid(shared_data):
    with pytest.raises(InputError, match="no series '1.2.3'"):
        read_volume(shared_data / DIRTESTS / "98892001", series_uid="1.2.3")


def test_mr_only_study_is_not_ct(shared_data, tmp_path):
    for file in (shared_data / DIRTESTS / "98892003").rglob("*"):  # an MR-only study, flattened
        if file.is_file():
            shutil.copy(file, tmp_path / f"{file.parent.name}_{file.name}")

    with pytest.raises(NotCTError, match="not CT") as info:
        read_volume(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "MR" in message and "allow_non_ct=True" in message and "--allow-non-ct" in message

    mr = read_volume(tmp_path, allow_non_ct=True, series_uid=MR_SINGLE_UID)
    assert mr.modality == "MR" and mr.shape == (1, 16, 16)
    with pytest.raises(NotCTError):
        read_volume(tmp_path, series_uid=MR_SINGLE_UID)  # naming the series is no override


def test_uneven_spacing_is_reported_and_not_resampled(shared_data, caplog):
    folder = shared_data / "dicom/monai_CT_DICOM_tiny"
    with caplog.at_level(logging.WARNING):
        volume = read_volume(folder)

    positions = sorted(float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in folder.iterdir())
    assert volume.shape == (4, 16, 16)  # nothing inserted or interpolated
    assert volume.metadata["non_uniform_spacing"] is True
    np.testing.assert_allclose(volume.metadata["slice_positions_mm"], positions)
    assert volume.spacing[2] == pytest.approx((positions[-1] - positions[0]) / 3)  # SimpleITK's rule
    assert volume.metadata["max_spacing_deviation_mm"] > 100
    assert any("uneven" in r.getMessage() and "NOT resampled" in r.getMessage() for r in caplog.records)


def test_missing_modality_is_ct_when_hu_like(shared_data, caplog):
    with caplog.at_level(logging.WARNING):
        volume = read_volume(shared_data / "dicom/lungmask_minimal_header")
    assert volume.modality == "CT" and volume.shape == (2, 512, 512)
    assert "no Modality tag" in volume.metadata["modality_assumed"]
    assert any("no Modality tag" in r.getMessage() for r in caplog.records)


def test_missing_modality_without_hu_is_refused(shared_data, tmp_path):
    for file in (shared_data / "dicom/lungmask_minimal_header").iterdir():
        ds = pydicom.dcmread(file)
        ds.RescaleIntercept = 3000  # every value now far above air
        ds.save_as(tmp_path / file.name)
    with pytest.raises(NotCTError, match="do not look like Hounsfield"):
        read_volume(tmp_path)


@pytest.mark.parametrize("target", ["pydicom_CT_small", "pydicom_CT_small/CT_small.dcm"])
def test_one_slice_series_is_a_volume(shared_data, target):
    volume = read_volume(shared_data / "dicom" / target)
    assert volume.shape == (1, 128, 128)
    assert volume.spacing[2] == 5.0  # SpacingBetweenSlices
    assert volume.metadata["single_slice"] is True


def test_rtstruct_beside_the_ct_is_ignored(shared_data):
    folder = shared_data / "dicom/rtutils_mock_ct_rtstruct"
    series = list_series(folder)
    assert sorted((s.modality, s.is_image) for s in series) == [("CT", True), ("RTSTRUCT", False)]

    volume = read_volume(folder)
    assert volume.shape == (2, 512, 512) and volume.spacing[2] == pytest.approx(5.0)
    assert all("rt.dcm" not in f for f in volume.dicom.files)


def test_a_folder_of_one_rtstruct_counts_it_in_the_singular(shared_data, tmp_path):
    # it read "RTSTRUCT (1 images)": an object that holds no images, counted as images, in the plural
    shutil.copy(shared_data / "dicom/rtutils_mock_ct_rtstruct/rt.dcm", tmp_path)
    with pytest.raises(InputError, match=r"hold no images: RTSTRUCT \(1 file\)$"):
        read_volume(tmp_path)


def test_one_image_series_of_two_patients_are_counted_in_the_singular(shared_data, tmp_path):
    for patient in ("A", "B"):
        ds = pydicom.dcmread(shared_data / "dicom/pydicom_CT_small/CT_small.dcm")
        ds.PatientID, ds.StudyInstanceUID = patient, pydicom.uid.generate_uid(entropy_srcs=[patient, "study"])
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[patient, "series"])
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[patient, "image"])
        ds.save_as(tmp_path / f"{patient}.dcm")
    with pytest.raises(InputError, match="2 different patients") as refused:
        read_volume(tmp_path)
    assert str(refused.value).count("(CT, 1 image, ") == 2 and "1 images" not in str(refused.value)


def test_seg_objects_beside_the_ct_are_ignored(shared_data):
    volume = read_volume(shared_data / "dicom/dcmqi_ct3slice")
    assert volume.shape == (3, 512, 512)
    _assert_same_as_sitk(volume, _sitk_series(volume.dicom.files))


def test_series_keys_without_uid_are_stable(shared_data):
    first = list_series(shared_data / TOTALSEG / "series")
    again = list_series(shared_data / TOTALSEG)
    assert len(first) == 1 and first[0].n_files == 20 and first[0].series_instance_uid == ""
    assert first[0].key == again[0].key and first[0].key.startswith("nouid-")


def test_compressed_pixels_fall_back_to_simpleitk(shared_data, monkeypatch):
    folder = shared_data / "dicom/totalseg_example_ct_dicom/series"  # JPEG 2000
    expected = read_volume(folder).array

    def no_decoder(*args, **kwargs):
        raise NotImplementedError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(dicom_volume, "apply_modality_lut", no_decoder)
    fallback = read_volume(folder)
    np.testing.assert_array_equal(fallback.array, expected)
    assert fallback.array.dtype == np.int16


def test_truncated_pixel_data_names_the_file(shared_data, tmp_path):
    for file in (shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"):
        shutil.copy(file, tmp_path / file.name)
    broken = tmp_path / "ct_2.dcm"
    broken.write_bytes(broken.read_bytes()[:200_000])
    with pytest.raises(InputError, match="corrupt pixel data") as info:
        read_volume(tmp_path)
    assert str(broken) in str(info.value)


def test_a_file_cut_just_before_its_pixels_says_what_to_do(shared_data, tmp_path):
    # it said only "holds no pixel data"
    for file in (shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"):
        shutil.copy(file, tmp_path / file.name)
    broken = tmp_path / "ct_2.dcm"
    data = broken.read_bytes()
    broken.write_bytes(data[: data.rindex(b"\xe0\x7f\x10\x00")])  # up to the (7FE0,0010) Pixel Data tag
    with pytest.raises(InputError, match="holds no pixel data .*cut short.*copy the file again") as info:
        read_volume(tmp_path)
    assert str(broken) in str(info.value)


def test_uncompressed_pixels_pydicom_cannot_read_are_not_handed_to_simpleitk(shared_data, monkeypatch):
    def unreadable(*args, **kwargs):
        raise ValueError("pixel data too short")

    monkeypatch.setattr(dicom_volume, "apply_modality_lut", unreadable)
    with pytest.raises(InputError, match="corrupt pixel data"):
        read_volume(shared_data / "dicom/rtutils_mock_ct_rtstruct")


def test_garbage_behind_a_dicom_signature(tmp_path):
    garbage = tmp_path / "image.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)
    with pytest.raises(InputError, match="corrupt DICOM") as info:
        read_volume(garbage)
    assert str(garbage) in str(info.value)
    with pytest.raises(InputError, match="1 corrupt DICOM file"):
        read_volume(tmp_path)


def test_two_slices_at_one_position_are_refused(shared_data, tmp_path):
    source = shared_data / "dicom/rtutils_mock_ct_rtstruct/ct_1.dcm"
    shutil.copy(source, tmp_path / "a.dcm")
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "b.dcm")
    with pytest.raises(InputError, match="same position"):
        read_volume(tmp_path)


def test_broken_dicomdir(shared_data):
    with pytest.raises(InputError, match="cannot parse this DICOMDIR"):
        list_series(shared_data / DIRTESTS / "DICOMDIR-nopatient")


def test_dicom_objects_without_images(shared_data):
    with pytest.raises(InputError, match="hold no images"):
        read_volume(shared_data / DIRTESTS / "TINY_ALPHA" / "DICOMDIR")


def test_oblique_series_with_rectangular_pixels_matches_simpleitk(shared_data, tmp_path):
    template = pydicom.dcmread(next((shared_data / "dicom/monai_CT_DICOM_tiny").iterdir()))
    rotation = np.array([[0.8, -0.6, 0.0], [0.36, 0.48, -0.8], [0.48, 0.64, 0.6]])  # orthonormal, oblique
    row, col = rotation[0], rotation[1]
    normal = np.cross(row, col)
    for k in (2, 0, 3, 1):  # written out of order
        ds = template.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = 10 - k
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in np.array([10.0, -20.0, 30.0]) + 2.5 * k * normal]
        ds.PixelSpacing = ["0.5", "0.8"]  # rows 0.5 mm apart, columns 0.8 mm apart
        ds.save_as(tmp_path / f"slice{k}")

    volume = read_volume(tmp_path)

    assert volume.spacing == pytest.approx((0.8, 0.5, 2.5))
    np.testing.assert_allclose(volume.direction, np.column_stack([row, col, normal]), atol=1e-6)
    _assert_same_as_sitk(volume, _sitk_series(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path))))
    assert [f.split("slice")[-1] for f in volume.dicom.files] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("length", [141, 990])  # cut inside the file meta / inside the dataset's header
def test_a_truncated_header_is_skipped_not_a_crash(shared_data, tmp_path, length, caplog):
    for file in (shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"):
        shutil.copy(file, tmp_path / file.name)
    partial = tmp_path / "partial.dcm"  # an interrupted copy: pydicom raises struct.error / BytesLengthException
    partial.write_bytes((shared_data / "dicom/pydicom_CT_small/CT_small.dcm").read_bytes()[:length])

    with caplog.at_level(logging.WARNING):
        volume = read_volume(tmp_path)
    assert volume.shape == (2, 512, 512)
    assert any(str(partial) in r.getMessage() and "corrupt DICOM" in r.getMessage() for r in caplog.records)
    with pytest.raises(InputError, match="corrupt DICOM file") as info:
        read_volume(partial)
    assert str(partial) in str(info.value)


def test_a_lone_file_cut_inside_its_header_says_cut_short_not_no_images(shared_data, tmp_path):
    # pydicom reads the part before the cut without error: the file then has an image's SOP class but no
    # Rows/Columns, and the message was "no image series to read ...: no modality (1 file)"
    cut = tmp_path / "cut.dcm"
    cut.write_bytes((shared_data / "dicom/dcmqi_ct3slice/series/01.dcm").read_bytes()[:300])
    for source in (cut, tmp_path):
        with pytest.raises(InputError, match=r"hold no images: 1 file of an image type without an image size .*cut short\? If so, copy again") as info:
            read_volume(source)
        assert str(cut) in str(info.value)


@pytest.mark.parametrize("keyword", ["ImagePositionPatient", "ImageOrientationPatient"])
@pytest.mark.parametrize("value", ["", "1.0"])
def test_empty_or_short_position_tags_name_the_problem(shared_data, tmp_path, keyword, value):
    for file in (shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"):
        ds = pydicom.dcmread(file)
        setattr(ds, keyword, value)  # present but empty (type 2 in some IODs, or blanked) or a single number
        ds.save_as(tmp_path / file.name)
    with pytest.raises(InputError, match="ImagePositionPatient/ImageOrientationPatient") as info:
        read_volume(tmp_path)
    assert str(tmp_path / "ct_") in str(info.value)


def test_a_series_copied_twice_is_named_as_duplicates_not_as_several_stacks(shared_data, tmp_path):
    source = shared_data / "dicom/rtutils_mock_ct_rtstruct"
    for copy in ("export", "export_backup"):
        (tmp_path / copy).mkdir()
        for file in source.glob("ct_*.dcm"):
            shutil.copy(file, tmp_path / copy / file.name)
    with pytest.raises(InputError, match="copies of one image") as info:
        read_volume(tmp_path)
    assert "several stacks" not in str(info.value) and "export_backup" in str(info.value)
    assert read_volume(tmp_path / "export").shape == (2, 512, 512)


def _copy_with_scout(shared_data, folder, *, image_type, orientation):
    """The dcmqi CT slices plus a scout filed under their SeriesInstanceUID, named to sort first."""
    folder.mkdir()
    series = sorted((shared_data / "dicom/dcmqi_ct3slice/series").iterdir())
    for file in series:
        shutil.copy(file, folder / file.name)
    scout = pydicom.dcmread(series[0])
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", image_type]
    scout.ImageOrientationPatient = orientation
    scout.save_as(folder / "00_scout")
    return folder / "00_scout"


AXIAL, CORONAL = [1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, -1]


@pytest.mark.parametrize(("image_type", "orientation"), [("LOCALIZER", CORONAL), ("AXIAL", CORONAL), ("LOCALIZER", AXIAL)],
                         ids=["localizer-coronal", "coronal", "localizer-axial"])
def test_a_scout_filed_with_the_axial_series_is_left_out(shared_data, tmp_path, caplog, image_type, orientation):
    scout = _copy_with_scout(shared_data, tmp_path / "study", image_type=image_type, orientation=orientation)

    (series,) = list_series(tmp_path / "study")
    assert series.localizer_files == (str(scout),) and series.n_files == 3
    assert not series.is_localizer and series.orientations == 1
    with caplog.at_level(logging.WARNING):
        volume = read_volume(tmp_path / "study")
    assert volume.shape == (3, 512, 512) and str(scout) not in volume.dicom.files
    assert volume.metadata["localizer_files_left_out"] == [str(scout)]
    assert any("localizer" in r.getMessage() and str(scout) in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(volume.array, read_volume(shared_data / "dicom/dcmqi_ct3slice/series").array)


def test_two_orientations_without_a_majority_are_still_not_a_volume(shared_data, tmp_path):
    for k, file in enumerate(sorted((shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"))):
        ds = pydicom.dcmread(file)
        ds.ImageOrientationPatient = AXIAL if k == 0 else CORONAL  # one axial slice, one coronal: no stack to keep
        ds.save_as(tmp_path / file.name)
    (series,) = [s for s in list_series(tmp_path) if s.is_image]
    assert series.orientations == 2 and series.localizer_files == ()
    with pytest.raises(InputError, match="mixes slice orientations"):
        read_volume(tmp_path, series_uid=series.key)


@pytest.mark.parametrize(("keyword", "value", "problem"), [
    ("PixelSpacing", "0.5", "1 value"),
    ("PixelSpacing", "0.5\\q", "not numeric"),
    ("ImagePositionPatient", "a\\b\\c", "not numeric"),
    ("ImageOrientationPatient", "1\\0\\0\\0\\x\\0", "not numeric"),
])
def test_malformed_geometry_tags_name_the_file_and_the_tag(shared_data, tmp_path, keyword, value, problem):
    tag, raw = pydicom.tag.Tag(keyword), value.encode().ljust(len(value) + len(value) % 2)
    for file in (shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"):
        ds = pydicom.dcmread(file)
        ds[tag] = pydicom.dataelem.RawDataElement(tag, "DS", len(raw), raw, 0, False, True)  # pydicom would not write it
        ds.save_as(tmp_path / file.name)
    with pytest.raises(InputError, match=problem) as info:
        read_volume(tmp_path)
    assert str(tmp_path / "ct_") in str(info.value) and keyword in str(info.value)


def test_a_study_assembled_from_linked_folders_is_searched_and_a_link_loop_ends(shared_data, tmp_path):
    study = tmp_path / "study"
    study.mkdir()
    (study / "ct").symlink_to(shared_data / "dicom/rtutils_mock_ct_rtstruct", target_is_directory=True)
    (study / "loop").symlink_to(study, target_is_directory=True)  # a link back up must not recurse forever
    assert read_volume(study).shape == (2, 512, 512)


# Enhanced (multi-frame) CT ---------------------------------------------------------------------
DCMQI = "dicom/dcmqi_ct3slice/series"


def _own_rescale_on_first_slice(datasets):
    """Slice 0 stores its values 24 higher with a matching intercept: same HU, but its own rescale per frame."""
    ds = datasets[0]
    ds.PixelData = (ds.pixel_array + 24).astype(ds.pixel_array.dtype).tobytes()
    ds.RescaleIntercept = float(ds.RescaleIntercept) - 24


@pytest.mark.parametrize("sop_class", [ENHANCED_CT, LEGACY_ENHANCED_CT])
def test_enhanced_ct_reads_like_the_classic_series_it_came_from(shared_data, tmp_path, sop_class):
    classic = read_volume(shared_data / DCMQI)
    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm", order=[1, 2, 0], sop_class=sop_class,
                        edit=_own_rescale_on_first_slice)
    enhanced_ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert int(enhanced_ds.NumberOfFrames) == 3 and "ImagePositionPatient" not in enhanced_ds
    assert "PixelValueTransformationSequence" in enhanced_ds.PerFrameFunctionalGroupsSequence[0]  # rescale per frame

    (series,) = list_series(path)
    assert series.sop_class_uid == sop_class and series.n_files == 1 and series.orientations == 1

    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, classic.array)
    assert volume.array.dtype == np.int16
    np.testing.assert_allclose(volume.spacing, classic.spacing, atol=1e-6)
    np.testing.assert_allclose(volume.origin, classic.origin, atol=1e-6)
    np.testing.assert_allclose(volume.direction, classic.direction, atol=1e-6)
    assert volume.metadata["frame_numbers"] == [2, 1, 3]  # slice 0 (lowest) is stored as frame 2
    assert volume.metadata["non_uniform_spacing"] is False
    assert volume.dicom.files == (str(path),) * 3
    assert volume.dicom.sop_instance_uids == (enhanced_ds.SOPInstanceUID,) * 3
    assert volume.dicom.sop_class_uid == sop_class and volume.modality == "CT"
    _assert_same_as_sitk(volume, _sitk_series(classic.dicom.files))


def test_enhanced_ct_in_a_folder_and_through_textsegment_info(shared_data, tmp_path, capsys):
    import json

    from TextSegmentLib import cli

    (tmp_path / "study").mkdir()
    enhanced_ct(shared_data / DCMQI, tmp_path / "study" / "IM0001", order=[2, 0, 1])
    code = cli.main(["info", str(tmp_path / "study"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["volume"]["shape_zyx"] == [3, 512, 512]
    classic = read_volume(shared_data / DCMQI)
    np.testing.assert_allclose(report["volume"]["origin_lps_mm"], classic.origin, atol=1e-5)
    np.testing.assert_allclose(report["volume"]["spacing_xyz_mm"], classic.spacing, atol=1e-5)
    assert report["volume"]["dicom"]["files"] == 1  # one file holds the three slices
    assert cli.main(["info", str(tmp_path / "study")]) == 0
    assert "1 file, 3 images" in capsys.readouterr().out


def test_an_enhanced_ct_is_chosen_by_its_slices_not_its_one_file(shared_data, tmp_path, caplog):
    # a study holding the 3-slice CT as one enhanced file and a 2-slice classic CT series: read the 3 slices
    study = tmp_path / "study"
    (study / "short").mkdir(parents=True)
    enhanced_ct(shared_data / DCMQI, study / "enhanced.dcm")
    uid = pydicom.uid.generate_uid()
    for file in sorted((shared_data / DCMQI).iterdir())[:2]:
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, pydicom.uid.generate_uid()
        ds.save_as(study / "short" / file.name)
    with caplog.at_level(logging.WARNING):
        volume = read_volume(study)
    assert volume.shape[0] == 3 and volume.dicom.files == (str(study / "enhanced.dcm"),) * 3
    assert any("3 images, the most" in r.getMessage() for r in caplog.records)
    (enhanced,) = [s for s in list_series(study) if s.n_files == 1]
    assert enhanced.n_images == 3 and enhanced.to_dict()["n_images"] == 3


def test_enhanced_ct_with_uneven_frames_is_reported_and_not_resampled(shared_data, tmp_path, caplog):
    folder = shared_data / "dicom/monai_CT_DICOM_tiny"
    classic = read_volume(folder)
    path = enhanced_ct(folder, tmp_path / "enhanced.dcm", order=[3, 1, 0, 2])
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    assert volume.metadata["non_uniform_spacing"] is True
    np.testing.assert_allclose(volume.metadata["slice_positions_mm"], classic.metadata["slice_positions_mm"])
    np.testing.assert_array_equal(volume.array, classic.array)
    assert volume.spacing == pytest.approx(classic.spacing) and volume.origin == pytest.approx(classic.origin)
    assert any("uneven" in r.getMessage() and "NOT resampled" in r.getMessage() for r in caplog.records)


def test_enhanced_ct_with_two_frames_at_one_position_names_the_frames(shared_data, tmp_path):
    def same_place(datasets):
        datasets[2].ImagePositionPatient = list(datasets[0].ImagePositionPatient)  # a second stack / phase

    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm", edit=same_place)
    with pytest.raises(InputError, match=r"\(frame 1\) and .*\(frame 3\) lie at the same position"):
        read_volume(path)


def test_enhanced_ct_frame_without_a_position_names_the_frame(shared_data, tmp_path):
    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm")
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.save_as(path)
    with pytest.raises(InputError, match=r"enhanced\.dcm \(frame 2\): no complete ImagePositionPatient"):
        read_volume(path)


def test_multi_frame_image_without_functional_groups_is_refused_clearly(shared_data, tmp_path):
    # an old-style multi-frame object: frames but no per-frame geometry, so they cannot be placed
    datasets = [pydicom.dcmread(f) for f in sorted((shared_data / DCMQI).iterdir())]
    ds = datasets[0]
    ds.NumberOfFrames = 3
    ds.PixelData = b"".join(d.PixelData for d in datasets)
    ds.save_as(tmp_path / "multi.dcm")
    with pytest.raises(InputError, match=r"multi\.dcm: a multi-frame image without per-frame geometry"):
        read_volume(tmp_path / "multi.dcm")


def test_a_multi_frame_file_without_functional_groups_does_not_outrank_a_real_ct(shared_data, tmp_path):
    # a multi-frame Secondary Capture (4 frames, no per-frame geometry) beside the 3-slice CT: its frames
    # cannot be read, so it counts as one image and the CT is chosen
    study = tmp_path / "study"
    study.mkdir()
    files = sorted((shared_data / DCMQI).iterdir())
    for file in files:
        shutil.copy(file, study / file.name)
    datasets = [pydicom.dcmread(f) for f in files]
    ds = datasets[0]
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word Secondary Capture
    ds.SeriesInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.NumberOfFrames = 4
    ds.PixelData = b"".join(d.PixelData for d in [*datasets, datasets[0]])
    ds.save_as(study / "multi.dcm")
    (multi,) = [s for s in list_series(study) if s.files == (str(study / "multi.dcm"),)]
    assert multi.n_images == 1
    volume = read_volume(study)
    assert volume.shape[0] == len(files) and str(study / "multi.dcm") not in volume.dicom.files


def test_a_classic_slice_with_a_stray_functional_groups_sequence_is_read_as_classic(shared_data, tmp_path):
    # single-frame CT with its own position/orientation: the stray shared group holds no geometry, and needs none
    for file in sorted((shared_data / DCMQI).iterdir()):
        ds = pydicom.dcmread(file)
        measures = pydicom.Dataset()
        measures.PixelSpacing = list(ds.PixelSpacing)
        group = pydicom.Dataset()
        group.PixelMeasuresSequence = [measures]
        ds.SharedFunctionalGroupsSequence = [group]
        ds.save_as(tmp_path / file.name)
    classic = read_volume(shared_data / DCMQI)
    volume = read_volume(tmp_path)
    np.testing.assert_array_equal(volume.array, classic.array)
    assert volume.origin == pytest.approx(classic.origin) and volume.spacing == pytest.approx(classic.spacing)
    assert "frame_numbers" not in volume.metadata


def test_a_one_frame_enhanced_ct_is_placed_by_its_functional_groups(shared_data, tmp_path):
    def only_the_second_slice(datasets):
        del datasets[0], datasets[1:]

    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm", edit=only_the_second_slice)
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 1
    plane = dicom_series.functional_group(ds, 0, "PlanePositionSequence")  # per-frame or shared: highdicom's choice
    ds.ImagePositionPatient = [float(v) + 100 for v in plane.ImagePositionPatient]  # stray, and wrong
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.save_as(path)
    second = sorted((shared_data / DCMQI).iterdir())[1]
    classic = read_volume(second)
    volume = read_volume(path)
    assert volume.metadata["frame_numbers"] == [1]
    assert volume.origin == pytest.approx(classic.origin)
    np.testing.assert_array_equal(volume.array, classic.array)


def _without_frame_rescale(path):
    ds = pydicom.dcmread(path)
    for group in [*ds.PerFrameFunctionalGroupsSequence, *ds.SharedFunctionalGroupsSequence]:
        if "PixelValueTransformationSequence" in group:
            del group.PixelValueTransformationSequence
    return ds


def test_enhanced_frames_without_a_rescale_take_the_files_own(shared_data, tmp_path, caplog):
    classic = read_volume(shared_data / DCMQI)
    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm")
    ds = _without_frame_rescale(path)
    intercept = float(pydicom.dcmread(classic.dicom.files[0], stop_before_pixels=True).RescaleIntercept)
    ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
    ds.save_as(path)
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, classic.array)
    assert not any("stored values" in r.getMessage() for r in caplog.records)


def test_enhanced_frames_without_any_rescale_keep_their_stored_values_and_warn(shared_data, tmp_path, caplog):
    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm")
    ds = _without_frame_rescale(path)
    ds.save_as(path)
    with caplog.at_level(logging.WARNING):
        volume = read_volume(path)
    stored = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(volume.array, stored[[f - 1 for f in volume.metadata["frame_numbers"]]])
    assert any(str(path) in r.getMessage() and "stored values are taken as they are" in r.getMessage()
               for r in caplog.records)


@pytest.mark.parametrize("where", ["top level", "shared group"])
def test_an_enhanced_modality_lut_is_applied_per_frame(shared_data, tmp_path, where):
    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm")
    ds = _without_frame_rescale(path)
    lut_values = (np.arange(4096) // 2 + 7).astype(np.uint16)
    lut = pydicom.Dataset()
    lut.add_new("LUTDescriptor", "US", [4096, 0, 16])
    lut.add_new("LUTData", "US", [int(v) for v in lut_values])
    lut.ModalityLUTType = "HU"
    if where == "top level":
        ds.ModalityLUTSequence = [lut]
    else:
        transform = pydicom.Dataset()
        transform.ModalityLUTSequence = [lut]
        ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = [transform]
    ds.save_as(path)
    volume = read_volume(path)
    stored = pydicom.dcmread(path).pixel_array[[f - 1 for f in volume.metadata["frame_numbers"]]]
    np.testing.assert_array_equal(volume.array, lut_values[np.clip(stored, 0, 4095)])


def test_compressed_enhanced_ct_falls_back_to_simpleitk_for_its_pixels(shared_data, tmp_path, monkeypatch):
    # RLE, frames out of order, one frame with its own rescale: GDCM alone would rescale every frame alike
    path = enhanced_ct(shared_data / DCMQI, tmp_path / "enhanced.dcm", order=[1, 2, 0], edit=_own_rescale_on_first_slice,
                        transfer_syntax=pydicom.uid.RLELossless)
    expected = read_volume(path)
    np.testing.assert_array_equal(expected.array, read_volume(shared_data / DCMQI).array)

    def no_decoder(self):
        raise NotImplementedError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    fallback = read_volume(path)
    np.testing.assert_array_equal(fallback.array, expected.array)
    assert fallback.array.dtype == np.int16
    assert fallback.origin == pytest.approx(expected.origin) and fallback.metadata["frame_numbers"] == [2, 1, 3]

    plain = enhanced_ct(shared_data / DCMQI, tmp_path / "plain.dcm")  # uncompressed: corrupt, not GDCM's
    with pytest.raises(InputError, match=r"plain\.dcm: cannot decode the pixel data of this multi-frame image"):
        read_volume(plain)
