"""DICOM SEG export of a volume loaded "through Slicer's DICOM module", on real MRML and real series.

The test plays Slicer's DICOM module: a real series is read with SimpleITK/GDCM (ITK, as Slicer's
loader does), put into the scene with ``node_from_volume`` and tagged with ``DICOM.instanceUIDs``;
the DICOM database is a dict lookup. The node is also stored the way other readers store the same
image: y-flipped (the real storage of TotalSegmentator's reference labels for this series) and
transposed with its slices reversed. A per-pixel HU model makes the engine masks, and the SEG read
back with pydicom must reference every source image and put each frame's pixels, placed by the
frame's own position, orientation and spacing, exactly where the engine mask has them in
physical space, each frame pointing at the file that lies at its position.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import slicer  # noqa: F401 - before TextSegmentLib: slicer-core's meta package imports this folder's modules too
import SimpleITK as sitk
from mrml_models import BoneModel as _BoneModel

from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.slicer_bridge import DICOM_UIDS_ATTRIBUTE, dicom_source_files, node_from_volume
from TextSegmentLib.slicer_logic import SegmentationLogic
from TextSegmentLib.volume import Volume, reorient_to

ABDOMEN = ("totalseg_example_ct_dicom", "series")
THREE_SLICES = ("dcmqi_ct3slice", "series")


def BoneModel() -> _BoneModel:
    """test_logic's per-pixel model at the series' 512 px: fitting a slice to the model grid is the identity."""
    return _BoneModel(image_size=512)


# Slicer's DICOM module, played by the test ------------------------------------------------------
def _series_files(folder: Path) -> list[Path]:
    return [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))]


def _uid(file: Path) -> str:
    """Anonymised files keep the instance UID only in the file meta header (as the DICOM database indexes it)."""
    ds = pydicom.dcmread(file, stop_before_pixels=True)
    return str(ds.get("SOPInstanceUID") or ds.file_meta.MediaStorageSOPInstanceUID)


def _volume(image: sitk.Image) -> Volume:
    return Volume(sitk.GetArrayFromImage(image), spacing=image.GetSpacing(), origin=image.GetOrigin(),
                  direction=np.asarray(image.GetDirection()).reshape(3, 3))


def _stored(ct: sitk.Image, storage: str, shared_data: Path) -> sitk.Image:
    """The same voxels (same physical points) in another axis order or direction."""
    if storage == "as read":
        return ct
    if storage == "y flipped":  # onto the grid TotalSegmentator's reference for this series is stored on
        grid = sitk.ReadImage(str(shared_data / "dicom" / "totalseg_example_ct_dicom" / "example_seg_dicom.nii.gz"))
        assert np.allclose(np.asarray(grid.GetDirection()).reshape(3, 3), np.diag([1, -1, 1]))
        return sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkNearestNeighbor, -1024, ct.GetPixelID())
    if storage == "transposed, slices reversed":
        return sitk.PermuteAxes(sitk.Flip(ct, [False, False, True]), [1, 0, 2])
    raise AssertionError(storage)


def _load(context, shared_data: Path, series: tuple[str, str], storage: str = "as read"):
    """(node, files, {uid: file}) as after a load with Slicer's DICOM module."""
    folder = shared_data / "dicom" / Path(*series)
    files = _series_files(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    node = node_from_volume(_volume(_stored(reader.Execute(), storage, shared_data)), context=context, name="CT")
    database = {_uid(f): str(f) for f in files}
    node.SetAttribute(DICOM_UIDS_ATTRIBUTE, " ".join(database))
    return node, files, database


@pytest.fixture
def logic(context):
    logic = SegmentationLogic(context=context)
    yield logic
    logic.shutdown()


# reading the SEG back ----------------------------------------------------------------------------
def _seg_in_physical_space(path: Path, masks: dict[str, Volume], files: list[Path]) -> dict[str, int]:
    """Check every frame against the engine mask at its physical points; voxels per segment label.

    Each frame pixel (r, c) lies at IPP + X·Δc·c + Y·Δr·r (DICOM PS3.3 C.7.6.2.1.1), with the frame's
    own position and the SEG's orientation and spacing; that point is looked up in the engine mask.
    """
    seg = pydicom.dcmread(path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = (float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing)
    labels = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    assert sorted(labels.values()) == sorted(masks)
    positions = {_uid(f): np.asarray(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient, dtype=float)
                 for f in files}
    rows, columns = int(seg.Rows), int(seg.Columns)
    r, c = np.mgrid[0:rows, 0:columns]
    offsets = (c[..., None] * column_spacing * orientation[:3] + r[..., None] * row_spacing * orientation[3:]).reshape(-1, 3)
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), rows, columns)
    voxels = {label: 0 for label in labels.values()}
    seen = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        label = labels[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)]
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose(positions[source], position, atol=1e-3), "the frame references a file at another position"
        mask = masks[label]
        to_index = np.linalg.inv(mask.ijk_to_lps())
        ijk = (position + offsets) @ to_index[:3, :3].T + to_index[:3, 3]
        index = np.round(ijk).astype(int)
        assert np.abs(ijk - index).max() < 1e-3, "the frame's pixels are not the engine grid's voxel centres"
        assert ((index >= 0) & (index < mask.size_ijk)).all(), "the frame lies outside the engine volume"
        engine = mask.array[index[:, 2], index[:, 1], index[:, 0]].reshape(rows, columns) > 0
        assert np.array_equal(frame > 0, engine), f"{label}: frame at {position.tolist()} differs from the engine mask"
        key = (label, tuple(np.round(position, 3)))
        assert key not in seen
        seen.add(key)
        voxels[label] += int((frame > 0).sum())
    return voxels


# the export --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("series", "storage"), [
    pytest.param(ABDOMEN, "as read", id="abdomen"),
    pytest.param(ABDOMEN, "y flipped", id="abdomen-y-flipped"),
    pytest.param(ABDOMEN, "transposed, slices reversed", id="abdomen-transposed-reversed"),
    pytest.param(THREE_SLICES, "as read", id="dcmqi-3-slices"),
])
def test_seg_references_the_source_images_and_lands_on_the_engine_mask(context, logic, shared_data, tmp_path,
                                                                        series, storage):
    node, files, database = _load(context, shared_data, series, storage)
    outcome = logic.segment(volume=node, prompts=["bone", "soft tissue"], model=BoneModel(), device="cpu", wait=True)
    masks = {r.prompt: r.mask for r in outcome.run.results}
    bone = masks["bone"].array > 0
    assert 1_000 < bone.sum() < bone.size // 2
    assert np.count_nonzero(bone != bone[:, ::-1]) > 1_000 and np.count_nonzero(bone != bone[:, :, ::-1]) > 1_000  # a flip shows

    written = logic.export_dicom_seg(outcome, path=tmp_path / "ct_seg.dcm", file_for_instance=database)

    assert written == tmp_path / "ct_seg.dcm"
    parsed = hd.seg.segread(written)
    assert {uid for _, _, uid in parsed.get_source_image_uids()} == set(database)  # every source image, nothing else
    assert parsed.SeriesDescription == "TextSegment BoneModel"
    (algorithm,) = parsed.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert "threshold=0.5" in algorithm.AlgorithmParameters.split(",")  # what made the masks travels with them
    voxels = _seg_in_physical_space(written, masks, files)
    assert voxels == {prompt: int((mask.array > 0).sum()) for prompt, mask in masks.items()}  # no slice left out


def test_default_database_outside_slicer_and_a_mapping_or_callable_lookup(context, shared_data):
    node, files, database = _load(context, shared_data, THREE_SLICES)
    with pytest.raises(InputError, match="DICOM database is not available"):
        dicom_source_files(node)
    assert sorted(dicom_source_files(node, file_for_instance=database)) == sorted(files)
    assert sorted(dicom_source_files(node, file_for_instance=database.__getitem__)) == sorted(files)


def test_a_node_not_loaded_from_dicom_is_refused(context, logic, shared_data, tmp_path):
    node, _, database = _load(context, shared_data, THREE_SLICES)
    node.RemoveAttribute(DICOM_UIDS_ATTRIBUTE)
    outcome = logic.segment(volume=node, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    with pytest.raises(InputError, match=r"'CT' was not loaded from DICOM .*DICOM\.instanceUIDs"):
        logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm", file_for_instance=database)
    assert not (tmp_path / "seg.dcm").exists()


@pytest.mark.parametrize("gone", ["not in the database", "file deleted"])
def test_a_source_image_missing_from_the_database_is_named(context, logic, shared_data, tmp_path, gone):
    node, _, database = _load(context, shared_data, THREE_SLICES)
    outcome = logic.segment(volume=node, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    uid = sorted(database)[1]
    if gone == "not in the database":
        del database[uid]
        reason = "it is not in the DICOM database"
    else:
        database[uid] = str(tmp_path / "moved-away.dcm")
        reason = "no longer exists"
    with pytest.raises(InputError, match=rf"1 of its 3 source image\(s\) cannot be found, e\.g\. SOP Instance UID {uid} \(.*{reason}"):
        logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm", file_for_instance=database)
    assert not (tmp_path / "seg.dcm").exists()


def test_an_existing_file_is_kept_unless_overwrite(context, logic, shared_data, tmp_path):
    node, _, database = _load(context, shared_data, THREE_SLICES)
    outcome = logic.segment(volume=node, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    target = tmp_path / "seg.dcm"
    target.write_bytes(b"the user's file")
    with pytest.raises(OutputExistsError, match="exists already"):
        logic.export_dicom_seg(outcome, path=target, file_for_instance=database)
    assert target.read_bytes() == b"the user's file"
    assert logic.export_dicom_seg(outcome, path=target, overwrite=True, file_for_instance=database) == target
    assert hd.seg.segread(target).SegmentSequence[0].SegmentLabel == "bone"


def test_a_source_image_is_never_overwritten(context, logic, shared_data, tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    for file in _series_files(shared_data / "dicom" / Path(*THREE_SLICES)):
        (series / file.name).write_bytes(file.read_bytes())
    files = _series_files(series)
    node, _, _ = _load(context, shared_data, THREE_SLICES)
    database = {_uid(f): str(f) for f in files}
    outcome = logic.segment(volume=node, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    before = files[0].read_bytes()
    with pytest.raises(OutputExistsError, match="input"):
        logic.export_dicom_seg(outcome, path=files[0], overwrite=True, file_for_instance=database)
    assert files[0].read_bytes() == before


def test_a_node_whose_voxels_are_not_the_series_is_refused(context, logic, shared_data, tmp_path):
    """Moved by half a voxel (as if resampled): no frame could reference a source image truthfully."""
    node, _, database = _load(context, shared_data, THREE_SLICES)
    moved = node_from_volume(_shifted(node, 0.5), context=context, name="CT resampled")
    moved.SetAttribute(DICOM_UIDS_ATTRIBUTE, node.GetAttribute(DICOM_UIDS_ATTRIBUTE))
    outcome = logic.segment(volume=moved, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    with pytest.raises(InputError, match="does not lie on the voxel grid"):
        logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm", file_for_instance=database)
    assert not (tmp_path / "seg.dcm").exists()


def _shifted(node, voxels: float) -> Volume:
    from TextSegmentLib.slicer_bridge import volume_from_node

    volume = volume_from_node(node)
    origin = np.asarray(volume.origin) + voxels * volume.spacing[0] * volume.direction[:, 0]
    return Volume(volume.array, spacing=volume.spacing, origin=origin, direction=volume.direction)


# the grid move on its own ------------------------------------------------------------------------
def test_reorient_to_moves_voxels_exactly_and_refuses_other_grids():
    rng = np.random.default_rng(0)
    reference = Volume(rng.integers(0, 1000, (4, 5, 6)).astype(np.int16), spacing=(0.7, 0.9, 2.5), origin=(3.0, -4.0, 5.0),
                       direction=np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    image = sitk.GetImageFromArray(reference.array)
    image.SetSpacing(reference.spacing)
    image.SetOrigin(reference.origin)
    image.SetDirection(tuple(reference.direction.ravel()))
    stored = _volume(sitk.PermuteAxes(sitk.Flip(image, [True, False, True]), [2, 0, 1]))
    assert not stored.same_geometry(reference) and stored.shape != reference.shape
    back = reorient_to(stored, reference)
    assert back.same_geometry(reference) and np.array_equal(back.array, reference.array)
    assert np.array_equal(reorient_to(reference, reference).array, reference.array)
    for other in (Volume(reference.array, spacing=reference.spacing, origin=(3.3, -4.0, 5.0), direction=reference.direction),
                  Volume(reference.array[:, :, :5], spacing=reference.spacing, origin=reference.origin, direction=reference.direction),
                  Volume(reference.array, spacing=(0.7, 0.9, 2.0), origin=reference.origin, direction=reference.direction)):
        with pytest.raises(InputError, match="does not lie on the voxel grid"):
            reorient_to(other, reference)



@pytest.mark.parametrize("change", ["cropped", "resampled", "rotated"])
def test_a_cropped_resampled_or_moved_node_is_refused_naming_its_series(context, logic, shared_data, tmp_path, change):
    """The refusal names the DICOM series, not the node twice ("'CT' does not lie on the voxel grid of 'CT'")."""
    from TextSegmentLib.slicer_bridge import volume_from_node

    node, _, database = _load(context, shared_data, THREE_SLICES)
    v = volume_from_node(node)
    if change == "cropped":  # Crop Volume keeps the attributes of its input
        changed = Volume(v.array[:, 10:400, 20:300], spacing=v.spacing, origin=v.physical_points([[20, 10, 0]])[0],
                         direction=v.direction)
    elif change == "resampled":
        changed = Volume(v.array[:, ::2, ::2], spacing=(2 * v.spacing[0], 2 * v.spacing[1], v.spacing[2]),
                         origin=v.origin, direction=v.direction)
    else:  # a hardened rotation: the same voxels, moved
        changed = Volume(v.array, spacing=v.spacing, origin=v.origin,
                         direction=v.direction @ np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
    moved = node_from_volume(changed, context=context, name="CT changed")
    moved.SetAttribute(DICOM_UIDS_ATTRIBUTE, node.GetAttribute(DICOM_UIDS_ATTRIBUTE))
    outcome = logic.segment(volume=moved, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    with pytest.raises(InputError, match=r"^volume 'CT changed' as segmented \(shape \(3, \d+, \d+\)\) does not lie on the voxel grid "
                                         r"of the DICOM series it was loaded from \(shape \(3, 512, 512\), 3 file\(s\)\); "
                                         r"it was cropped, resampled or moved") as caught:
        logic.export_dicom_seg(outcome, path=tmp_path / "seg.dcm", file_for_instance=database)
    assert str(caught.value).count("CT changed") == 1
    assert not (tmp_path / "seg.dcm").exists()


def test_a_folder_or_a_source_image_as_output_is_refused_as_such(context, logic, shared_data, tmp_path):
    """Neither refusal suggests overwrite=True: it would not help."""
    node, files, database = _load(context, shared_data, THREE_SLICES)
    outcome = logic.segment(volume=node, prompts=["bone"], model=BoneModel(), device="cpu", wait=True)
    folder = tmp_path / "exports"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder; give a file name") as caught:
        logic.export_dicom_seg(outcome, path=folder, file_for_instance=database)
    assert "overwrite" not in str(caught.value)
    assert list(folder.iterdir()) == []
    with pytest.raises(OutputExistsError, match="is a source image of volume 'CT'.*never overwrites its inputs") as caught:
        logic.export_dicom_seg(outcome, path=files[0], file_for_instance=database)
    assert "overwrite=True" not in str(caught.value)
