"""DICOM SEG on real series: written with highdicom, read back with pydicom, rebuilt in physical space.

The rebuild never trusts our own frame order: each SEG frame is placed by its own
ImagePositionPatient and checked against the source file its references name.
Also here: the segment meanings (colors.lookup), whose SNOMED codes end up in the SEG.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from enhanced_ct import enhanced_ct

from TextSegmentLib.colors import ANATOMY, FINDINGS, LEFT, RIGHT, TISSUE, lookup
from TextSegmentLib.dicom_seg import write_dicom_seg
from TextSegmentLib.engine import SegmentationResult
from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.io import read_volume
from TextSegmentLib.volume import Volume

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
TOTALSEG_LABELS = {"liver": 5, "spleen": 1, "stomach": 6}  # TotalSegmentator "total" class map


@pytest.fixture(scope="module")
def totalseg_series(shared_data) -> Volume:
    return read_volume(shared_data / "dicom" / "totalseg_example_ct_dicom" / "series")


@pytest.fixture(scope="module")
def dcmqi_series(shared_data) -> Volume:
    return read_volume(shared_data / "dicom" / "dcmqi_ct3slice" / "series")


def _result(volume: Volume, prompt: str, mask: np.ndarray) -> SegmentationResult:
    mask = mask.astype(np.uint8)
    return SegmentationResult(prompt, volume.with_array(mask.astype(np.float32)), volume.with_array(mask))


def _resample_labels(path: Path, onto: Volume) -> np.ndarray:
    """A label file resampled (nearest neighbour, physical space) onto the series' grid."""
    labels = sitk.ReadImage(str(path))
    reference = sitk.Image(list(onto.size_ijk), sitk.sitkUInt8)
    reference.SetSpacing(onto.spacing)
    reference.SetOrigin(onto.origin)
    reference.SetDirection(onto.direction.ravel().tolist())
    resampled = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def _file_positions(source: Volume) -> dict[str, np.ndarray]:
    """SOP instance UID (from the file meta header, as the anonymised files keep it) → position."""
    positions = {}
    for file in source.dicom.files:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
        uid = str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)
        positions[uid] = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    return positions


def _rebuild(path: Path, source: Volume) -> dict[str, np.ndarray]:
    """Segment label → (z, y, x) mask on the source grid, placed by each frame's own position."""
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.Modality == "SEG"
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=np.float64)
    assert np.allclose(orientation, np.concatenate([source.direction[:, 0], source.direction[:, 1]]), atol=1e-4)
    assert np.allclose(shared.PixelMeasuresSequence[0].PixelSpacing, [source.spacing[1], source.spacing[0]], atol=1e-4)
    labels = {item.SegmentNumber: item.SegmentLabel for item in seg.SegmentSequence}
    masks = {label: np.zeros(source.shape, dtype=np.uint8) for label in labels.values()}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    positions = _file_positions(source)
    lps_to_ijk = np.linalg.inv(source.ijk_to_lps())
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(position, positions[referenced], atol=1e-3), "frame references the wrong image"
        i, j, k = (lps_to_ijk @ np.append(position, 1.0))[:3]
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3
        identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = identification[0].ReferencedSegmentNumber
        masks[labels[number]][int(round(k))] = frame
    return masks


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(a, b).sum()) / float(total)


def _digest(files) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()


def test_seg_on_the_anonymised_series_lands_in_physical_space(totalseg_series, shared_data, tmp_path):
    source = totalseg_series
    labels = _resample_labels(shared_data / "dicom" / "totalseg_example_ct_dicom" / "example_seg_dicom.nii.gz", source)
    expected = {prompt: (labels == value).astype(np.uint8) for prompt, value in TOTALSEG_LABELS.items()}
    assert all(m.sum() > 1000 for m in expected.values())
    digest = _digest(source.dicom.files)

    path = write_dicom_seg([_result(source, p, m) for p, m in expected.items()], source=source,
                           path=tmp_path / "seg.dcm", model_name="test-model")
    rebuilt = _rebuild(path, source)
    for prompt, mask in expected.items():
        assert _dice(rebuilt[prompt], mask) == 1.0, prompt
    # highdicom parses it too and finds every frame's source among the series' instances
    parsed = hd.seg.segread(path)
    assert [parsed.get_segment_description(n).SegmentLabel for n in parsed.get_segment_numbers()] == list(expected)
    assert {uid for _, _, uid in parsed.get_source_image_uids()} <= set(_file_positions(source))

    seg = pydicom.dcmread(path, stop_before_pixels=True)
    first = pydicom.dcmread(source.dicom.files[0], stop_before_pixels=True)
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.StudyInstanceUID  # generated: the anonymised files have none
    referenced = {item.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for item in s.ReferencedInstanceSequence}
    assert referenced <= set(_file_positions(source))
    stomach = next(item for item in seg.SegmentSequence if item.SegmentLabel == "stomach")
    assert stomach.SegmentedPropertyTypeCodeSequence[0].CodeValue == "69695003"
    assert stomach.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
    assert stomach.SegmentAlgorithmType == "AUTOMATIC"
    algorithm = stomach.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "TextSegment" and "test-model" in algorithm.AlgorithmParameters
    assert _digest(source.dicom.files) == digest  # the user's files are untouched

    # a second write of the same series lands in the same (generated) study
    again = write_dicom_seg([_result(source, "liver", expected["liver"])], source=source, path=tmp_path / "again.dcm")
    assert pydicom.dcmread(again, stop_before_pixels=True).StudyInstanceUID == seg.StudyInstanceUID


def test_seg_on_the_dcmqi_series_matches_its_liver(dcmqi_series, shared_data, tmp_path):
    source = dcmqi_series
    liver = _resample_labels(shared_data / "dicom" / "dcmqi_ct3slice" / "liver_seg.nrrd", source)
    assert liver.sum() > 10000
    cyst = np.zeros(source.shape, dtype=np.uint8)
    cyst[1, 200:220, 300:330] = 1  # inside one slice only: the other frames are omitted
    kidney = np.zeros(source.shape, dtype=np.uint8)
    kidney[:2, 300:340, 380:420] = 1  # synthetic, overlapping nothing
    nothing = np.zeros(source.shape, dtype=np.uint8)
    results = [_result(source, "liver", liver), _result(source, "cyst in the left liver", cyst),
               _result(source, "right kidney", kidney), _result(source, "gallstones", nothing)]
    path = write_dicom_seg(results, source=source, path=tmp_path / "liver.dcm")

    rebuilt = _rebuild(path, source)
    assert _dice(rebuilt["liver"], liver) == 1.0
    assert np.array_equal(rebuilt["cyst in the left liver"], cyst)
    assert np.array_equal(rebuilt["right kidney"], kidney)
    assert rebuilt["gallstones"].sum() == 0
    seg = pydicom.dcmread(path, stop_before_pixels=True)
    first = pydicom.dcmread(source.dicom.files[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.PatientID == first.PatientID
    cyst_item = next(item for item in seg.SegmentSequence if item.SegmentLabel == "cyst in the left liver")
    assert cyst_item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert cyst_item.AnatomicRegionSequence[0].CodeValue == "10200004"
    assert cyst_item.AnatomicRegionSequence[0].AnatomicRegionModifierSequence[0].CodeValue == LEFT.value
    kidney_item = next(item for item in seg.SegmentSequence if item.SegmentLabel == "right kidney")
    kidney_type = kidney_item.SegmentedPropertyTypeCodeSequence[0]
    assert kidney_type.CodeValue == "64033007" and kidney_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == RIGHT.value


def test_refuses_to_overwrite_and_never_writes_over_a_source_file(dcmqi_series, tmp_path):
    source = dcmqi_series
    mask = np.zeros(source.shape, dtype=np.uint8)
    mask[:, 10:20, 10:20] = 1
    results = [_result(source, "liver", mask)]
    path = tmp_path / "seg.dcm"
    path.write_bytes(b"precious")
    with pytest.raises(OutputExistsError):
        write_dicom_seg(results, source=source, path=path)
    assert path.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["seg.dcm"]
    write_dicom_seg(results, source=source, path=path, overwrite=True)
    assert pydicom.dcmread(path).Modality == "SEG"
    with pytest.raises(OutputExistsError, match="input"):
        write_dicom_seg(results, source=source, path=source.dicom.files[0], overwrite=True)


def test_an_all_empty_run_still_gives_a_valid_seg(dcmqi_series, tmp_path):
    source = dcmqi_series
    empty = np.zeros(source.shape, dtype=np.uint8)
    long_prompt = "the small hypodense lesion in segment four of the liver next to the middle hepatic vein"
    path = write_dicom_seg([_result(source, long_prompt, empty)], source=source, path=tmp_path / "empty.dcm")
    rebuilt = _rebuild(path, source)
    label = long_prompt[:64].rstrip()  # DICOM LO holds 64 characters
    assert list(rebuilt) == [label] and rebuilt[label].sum() == 0


def test_refuses_volumes_that_do_not_follow_their_files(dcmqi_series, tmp_path):
    source = dcmqi_series
    mask = np.zeros(source.shape, dtype=np.uint8)
    mask[:, 10:20, 10:20] = 1
    with pytest.raises(InputError, match="not read from a DICOM series"):
        plain = Volume(source.array, spacing=source.spacing, origin=source.origin, direction=source.direction)
        write_dicom_seg([_result(plain, "liver", mask)], source=plain, path=tmp_path / "a.dcm")
    moved = Volume(source.array, spacing=source.spacing, origin=(0.0, 0.0, 0.0), direction=source.direction)
    with pytest.raises(InputError, match="voxel grid"):
        write_dicom_seg([_result(moved, "liver", mask)], source=source, path=tmp_path / "b.dcm")
    # the same voxels in physical space, but rows stored upside down: no longer the files' pixel order
    direction = source.direction.copy()
    direction[:, 1] *= -1
    origin = source.physical_points([[0, source.shape[1] - 1, 0]])[0]
    flipped = Volume(source.array[:, ::-1], spacing=source.spacing, origin=origin, direction=direction, dicom=source.dicom)
    with pytest.raises(InputError, match="reoriented"):
        write_dicom_seg([_result(flipped, "liver", mask)], source=flipped, path=tmp_path / "c.dcm")
    assert not list(tmp_path.iterdir())



# enhanced (multi-frame) CT source ------------------------------------------------------------




def test_seg_on_an_enhanced_ct_references_its_frames_and_lands_like_on_the_classic_series(dcmqi_series, shared_data, tmp_path):
    enhanced_file = enhanced_ct(shared_data / "dicom" / "dcmqi_ct3slice" / "series", tmp_path / "enhanced.dcm", order=[1, 2, 0])
    source = read_volume(enhanced_file)
    assert source.metadata["frame_numbers"] == [2, 1, 3]  # slice 0 (lowest) is stored as frame 2
    liver = _resample_labels(shared_data / "dicom" / "dcmqi_ct3slice" / "liver_seg.nrrd", source)
    cyst = np.zeros(source.shape, dtype=np.uint8)
    cyst[0, 200:220, 300:330] = 1  # one slice only: frame 2 of the source
    digest = _digest([enhanced_file])
    path = write_dicom_seg([_result(source, "liver", liver), _result(source, "cyst", cyst)], source=source,
                           path=tmp_path / "seg.dcm")

    enhanced = pydicom.dcmread(enhanced_file, stop_before_pixels=True)
    frame_positions = {n + 1: np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
                       for n, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence)}
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == SEG_STORAGE and seg.FrameOfReferenceUID == enhanced.FrameOfReferenceUID
    labels = {item.SegmentNumber: item.SegmentLabel for item in seg.SegmentSequence}
    rebuilt = {label: np.zeros(source.shape, dtype=np.uint8) for label in labels.values()}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    lps_to_ijk = np.linalg.inv(dcmqi_series.ijk_to_lps())  # placed on the classic series' grid
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert referenced.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert np.allclose(position, frame_positions[int(referenced.ReferencedFrameNumber)], atol=1e-3), "wrong frame"
        i, j, k = (lps_to_ijk @ np.append(position, 1.0))[:3]
        assert abs(i) < 1e-3 and abs(j) < 1e-3 and abs(k - round(k)) < 1e-3
        rebuilt[labels[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber]][int(round(k))] = frame
    assert np.array_equal(rebuilt["liver"], liver) and liver.sum() > 10000
    assert np.array_equal(rebuilt["cyst"], cyst)
    cyst_number = next(n for n, label in labels.items() if label == "cyst")
    cyst_frames = [item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber
                   for item in seg.PerFrameFunctionalGroupsSequence
                   if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == cyst_number]
    assert cyst_frames == [2]
    parsed = hd.seg.segread(path)
    assert {uid for _, _, uid in parsed.get_source_image_uids()} == {enhanced.SOPInstanceUID}
    assert _digest([enhanced_file]) == digest


def test_seg_on_an_enhanced_ct_refuses_volumes_that_do_not_follow_its_frames(shared_data, tmp_path):
    enhanced_file = enhanced_ct(shared_data / "dicom" / "dcmqi_ct3slice" / "series", tmp_path / "enhanced.dcm", order=[2, 0, 1])
    source = read_volume(enhanced_file)
    mask = np.zeros(source.shape, dtype=np.uint8)
    mask[:, 10:20, 10:20] = 1
    # the same voxels stacked top-down: slice k is no longer the frame metadata names
    direction = source.direction.copy()
    direction[:, 2] *= -1
    origin = source.physical_points([[0, 0, source.shape[0] - 1]])[0]
    reversed_ = replace(source, array=source.array[::-1], origin=tuple(origin), direction=direction)
    with pytest.raises(InputError, match=r"enhanced\.dcm \(frame \d\): lies at .* but slice 0"):
        write_dicom_seg([_result(reversed_, "liver", mask)], source=reversed_, path=tmp_path / "a.dcm")
    # two of the three frames: the SEG could not reference the source frame by frame
    part = replace(source, array=source.array[:2], dicom=replace(source.dicom, files=source.dicom.files[:2]),
                   metadata={**source.metadata, "frame_numbers": source.metadata["frame_numbers"][:2]})
    with pytest.raises(InputError, match="not each of its frames once"):
        write_dicom_seg([_result(part, "liver", mask[:2])], source=part, path=tmp_path / "b.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enhanced.dcm"]


# segment meanings ---------------------------------------------------------------------------
def test_every_code_in_the_tables_is_dicoms():
    from pydicom.sr._concepts_dict import concepts

    meanings: dict[str, set[str]] = {}
    for entry in concepts["SCT"].values():
        for code, (meaning, _cids) in entry.items():
            meanings.setdefault(code, set()).add(meaning)
    for entry in ANATOMY + FINDINGS:
        for code in (entry.code, entry.category):
            assert code.scheme == "SCT" and code.meaning in meanings.get(code.value, ()), (code, meanings.get(code.value))
    for code in (TISSUE, LEFT, RIGHT):
        assert code.meaning in meanings[code.value]


@pytest.mark.parametrize(
    "prompt, type_value, modifier, region",
    [
        ("liver", "10200004", None, None),
        ("The LEFT kidney", "64033007", LEFT, None),
        ("right lung, lower lobe", "39607008", RIGHT, None),
        ("left and right kidneys", "64033007", None, None),
        ("left kidney excluding the cyst", "64033007", LEFT, None),
        ("hepatic tumour", "108369006", None, "10200004"),  # the adjective names the finding's organ
        ("cyst in the liver", "367643001", None, "10200004"),
        ("portal vein", "32764006", None, None),
        ("oesophagus", "32849002", None, None),
    ],
)
def test_lookup_finds_what_the_prompt_names(prompt, type_value, modifier, region):
    style = lookup(prompt)
    assert style.known and style.label == prompt
    assert style.type.value == type_value
    assert style.modifier == modifier
    assert (style.region.value if style.region else None) == region


def test_unknown_prompts_get_slicers_default_meaning_and_a_stable_colour():
    style = lookup("the thing that glows")
    assert not style.known and style.category == TISSUE and style.type == TISSUE
    assert lookup("the thing that glows").rgb == style.rgb
    assert len({lookup(f"unknown structure {i}").rgb for i in range(20)}) > 3
    assert all(0 <= c <= 255 for c in style.rgb)


def test_gantry_tilted_series_gets_a_seg_with_each_frame_on_its_own_image(shared_data, tmp_path):
    # slices that drift sideways as they go (gantry tilt): read as a sheared stack, and the SEG must still
    # be written, each frame at (and referencing) the image whose pixels it was segmented on
    template = pydicom.dcmread(next((shared_data / "dicom" / "monai_CT_DICOM_tiny").iterdir()))
    folder = tmp_path / "tilted"
    folder.mkdir()
    for k in range(4):
        ds = template.copy()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.5 * k, 2.5 * k]  # 0.5 mm further along y on every slice
        ds.save_as(folder / f"slice{k}")
    source = read_volume(folder)
    assert source.metadata["slice_shear_mm"] == pytest.approx(1.5)
    mask = np.zeros(source.shape, dtype=np.uint8)
    for k in range(4):
        mask[k, k : k + 3, 2:5] = 1  # a different patch per slice, so a frame on the wrong image shows

    path = write_dicom_seg([_result(source, "liver", mask)], source=source, path=tmp_path / "seg.dcm")

    seg = pydicom.dcmread(path)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    positions = _file_positions(source)
    uid_to_slice = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: k for k, f in enumerate(source.dicom.files)}
    assert len(frames) == 4
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        referenced = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64)
        np.testing.assert_allclose(position, positions[referenced], atol=1e-3)
        np.testing.assert_array_equal(frame, mask[uid_to_slice[referenced]])


def test_generated_uid_warning_only_when_a_uid_really_was_generated(dcmqi_series, tmp_path, caplog):
    import dataclasses

    mask = np.zeros(dcmqi_series.shape, dtype=np.uint8)
    mask[:, 10:20, 10:20] = 1
    # the reader kept no UIDs, but every file has them: they are used, and nothing is generated
    blank = dataclasses.replace(dcmqi_series.dicom, study_instance_uid="", series_instance_uid="",
                                frame_of_reference_uid="")
    source = dataclasses.replace(dcmqi_series, dicom=blank)
    with caplog.at_level("WARNING", logger="TextSegmentLib.dicom_seg"):
        path = write_dicom_seg([_result(source, "liver", mask)], source=source, path=tmp_path / "a.dcm")
    assert not [r for r in caplog.records if "generated" in r.getMessage()]
    first = pydicom.dcmread(source.dicom.files[0], stop_before_pixels=True)
    assert pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID == first.StudyInstanceUID
    # files without a StudyInstanceUID: one is generated, and said so
    copies = tmp_path / "series"
    copies.mkdir()
    for file in dcmqi_series.dicom.files:
        ds = pydicom.dcmread(file)
        del ds.StudyInstanceUID
        ds.save_as(copies / Path(file).name)
    stripped = read_volume(copies)
    caplog.clear()
    with caplog.at_level("WARNING", logger="TextSegmentLib.dicom_seg"):
        write_dicom_seg([_result(stripped, "liver", mask)], source=stripped, path=tmp_path / "b.dcm")
    generated = [r.getMessage() for r in caplog.records if "generated" in r.getMessage()]
    assert len(generated) == 1 and "StudyInstanceUID" in generated[0]
