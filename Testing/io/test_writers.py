"""Writers: geometry round trips, atomic writes, refusal to overwrite, and inputs that can never be clobbered."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.io import (
    atomic_write,
    read_image_file,
    read_volume,
    write_float_map,
    write_json,
    write_label_map,
    write_volume,
)
from TextSegmentLib.io import writers
from TextSegmentLib.volume import Volume

FLIPPED = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()


def _ct(direction=np.eye(3), source=None):
    rng = np.random.default_rng(0)
    array = rng.integers(-1000, 1500, size=(4, 5, 6), dtype=np.int16)
    return Volume(array=array, spacing=(0.7, 0.8, 2.5), origin=(-12.5, 30.0, 101.25), direction=direction, source=source)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii", "ct.nrrd", "ct.mha"])
@pytest.mark.parametrize("direction", [np.eye(3), FLIPPED, OBLIQUE], ids=["identity", "flipped", "oblique"])
def test_geometry_round_trip(tmp_path, name, direction):
    volume = _ct(direction)
    written = write_volume(volume, tmp_path / name)

    back = read_image_file(written)
    assert back.shape == volume.shape and back.array.dtype == np.int16
    np.testing.assert_array_equal(back.array, volume.array)
    np.testing.assert_allclose(back.spacing, volume.spacing, atol=1e-5)
    np.testing.assert_allclose(back.origin, volume.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, volume.direction, atol=1e-5)
    np.testing.assert_allclose(back.physical_points([[5, 4, 3]]), volume.physical_points([[5, 4, 3]]), atol=1e-3)


def test_bare_array_takes_the_reference_grid(tmp_path):
    reference = _ct(OBLIQUE)
    mask = reference.array > 0
    back = read_image_file(write_volume(mask, tmp_path / "mask.nrrd", reference=reference))
    assert back.same_geometry(reference, atol=1e-5) and back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, mask)


def test_bare_array_needs_a_matching_reference(tmp_path):
    with pytest.raises(ValueError, match="reference"):
        write_volume(np.zeros((2, 2, 2)), tmp_path / "x.nii.gz")
    with pytest.raises(ValueError, match="does not match"):
        write_volume(np.zeros((2, 2, 2)), tmp_path / "x.nii.gz", reference=_ct())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("top, dtype", [(7, np.uint8), (255, np.uint8), (256, np.uint16), (65535, np.uint16)])
def test_label_map_picks_the_smallest_type(tmp_path, top, dtype):
    reference = _ct(FLIPPED)
    labels = np.zeros(reference.shape, dtype=np.int64)
    labels[1, 2, 3] = top
    back = read_image_file(write_label_map(labels, tmp_path / "labels.nii.gz", reference=reference))
    assert back.array.dtype == dtype and back.array.max() == top
    assert back.same_geometry(reference, atol=1e-5)


@pytest.mark.parametrize("bad", [-1, 65536, 1.5, np.nan])
def test_label_map_refuses_values_out_of_range(tmp_path, bad):
    reference = _ct()
    labels = np.zeros(reference.shape, dtype=np.float64)
    labels[0, 0, 0] = bad
    with pytest.raises(InputError, match="label values"):
        write_label_map(labels, tmp_path / "labels.nii.gz", reference=reference)
    assert list(tmp_path.iterdir()) == []


def test_float_map_stores_float32_even_from_float16(tmp_path):
    reference = _ct(OBLIQUE)
    values = np.linspace(0, 1, reference.array.size, dtype=np.float16).reshape(reference.shape)
    back = read_image_file(write_float_map(values, tmp_path / "prob.nii.gz", reference=reference))
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, values.astype(np.float32))


def test_float_map_refuses_nan(tmp_path):
    reference = _ct()
    values = np.zeros(reference.shape, np.float32)
    values[0, 1, 2] = np.nan
    with pytest.raises(InputError, match="NaN"):
        write_float_map(values, tmp_path / "prob.nii.gz", reference=reference)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    target = write_volume(_ct(), tmp_path / "ct.nii.gz")
    before = _digest(target)

    with pytest.raises(OutputExistsError, match="overwrite=True"):
        write_volume(_ct(FLIPPED), target)
    assert _digest(target) == before

    write_volume(_ct(FLIPPED), target, overwrite=True)
    np.testing.assert_allclose(read_image_file(target).direction, FLIPPED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]  # no temporary files left


def test_failed_write_leaves_the_old_file_and_no_debris(tmp_path, monkeypatch):
    target = write_volume(_ct(), tmp_path / "ct.nrrd")
    before = _digest(target)

    def broken_writer(image, path, *args):
        with open(path, "wb") as handle:
            handle.write(b"half a file")
        raise RuntimeError("disk full")

    monkeypatch.setattr(writers.sitk, "WriteImage", broken_writer)
    with pytest.raises(InputError, match="disk full") as info:
        write_volume(_ct(FLIPPED), target, overwrite=True)
    assert str(target) in str(info.value)
    assert _digest(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_the_source_file_is_never_overwritten(tmp_path):
    source = write_volume(_ct(), tmp_path / "ct.nii.gz")
    volume = read_volume(source)
    before = _digest(source)

    with pytest.raises(OutputExistsError, match="input"):
        write_volume(volume, source, overwrite=True)
    with pytest.raises(OutputExistsError, match="input"):
        write_label_map(volume.array > 0, source, reference=volume, overwrite=True)
    link = tmp_path / "alias.nii.gz"
    os.symlink(source, link)
    with pytest.raises(OutputExistsError, match="input"):
        write_float_map(np.zeros(volume.shape), link, reference=volume, overwrite=True)
    assert _digest(source) == before


def test_explicit_protected_paths(tmp_path):
    other = tmp_path / "keep.nii.gz"
    other.write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="input"):
        write_volume(_ct(), other, overwrite=True, protected=[other])
    with pytest.raises(OutputExistsError, match="input"):
        write_json({"a": 1}, other, overwrite=True, protected=[str(other)])
    assert other.read_bytes() == b"precious"


def test_dicom_files_of_the_reference_are_protected(shared_data, tmp_path):
    for file in (shared_data / "dicom/rtutils_mock_ct_rtstruct").glob("ct_*.dcm"):
        shutil.copy(file, tmp_path / file.name)
    volume = read_volume(tmp_path)
    victim = tmp_path / "ct_1.dcm"
    before = _digest(victim)
    with pytest.raises(OutputExistsError, match="input"):
        write_label_map(np.zeros(volume.shape, np.uint8), victim, reference=volume, overwrite=True)
    assert _digest(victim) == before
    written = write_label_map(np.zeros(volume.shape, np.uint8), tmp_path / "seg.nii.gz", reference=volume)
    assert written.is_file()  # writing beside the series is fine


@pytest.mark.parametrize("name", ["ct.nhdr", "ct.mhd", "ct.png", "ct"])
def test_unsupported_output_type(tmp_path, name):
    with pytest.raises(InputError, match="unsupported output type"):
        write_volume(_ct(), tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_output_folder_is_created(tmp_path):
    target = write_volume(_ct(), tmp_path / "a" / "b" / "ct.nii.gz")
    assert target.is_file()


def test_json_round_trip_with_numpy_values(tmp_path):
    legend = {"labels": {np.int64(1).item(): "liver"}, "threshold": np.float32(0.5), "shape": np.array([1, 2]), "name": "é"}
    path = write_json(legend, tmp_path / "legend.json")
    expected = {"labels": {"1": "liver"}, "threshold": 0.5, "shape": [1, 2], "name": "é"}
    assert json.loads(path.read_text(encoding="utf-8")) == expected

    with pytest.raises(OutputExistsError):
        write_json({}, path)
    write_json({"v": 2}, path, overwrite=True)
    assert json.loads(path.read_text()) == {"v": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legend.json"]


def test_json_refuses_what_it_cannot_encode(tmp_path):
    with pytest.raises(TypeError):
        write_json({"x": object()}, tmp_path / "bad.json")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_serves_other_writers(tmp_path):
    seen = []

    def write(tmp):
        seen.append(tmp)
        tmp.write_text("complete")

    target = atomic_write(tmp_path / "seg.seg.nrrd", write)
    assert target.read_text() == "complete"
    assert seen[0].parent == tmp_path and seen[0].name.endswith(".nrrd") and not seen[0].exists()

    def failing(tmp):
        tmp.write_text("half")
        raise OSError("device gone")

    with pytest.raises(InputError, match="device gone"):
        atomic_write(target, failing, overwrite=True)
    assert target.read_text() == "complete"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.seg.nrrd"]


def test_an_output_whose_folder_is_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(InputError, match="cannot create its folder"):
        write_json({"a": 1}, blocker / "legend.json")
    assert blocker.read_text() == "a file where the output folder should be"


def test_replace_whole_leaves_the_old_file_or_the_new_one_never_half(tmp_path):
    """The one temporary-file-and-rename the trainer, montages and bench files share."""
    from TextSegmentLib.io.writers import replace_whole

    path = tmp_path / "config.json"
    path.write_text("old")

    def half_then_full_disk(tmp):
        tmp.write_text("ha")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        replace_whole(path, half_then_full_disk)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["config.json"]
    seen = []
    replace_whole(path, lambda tmp: seen.append(tmp.name) or tmp.write_text("new"), suffix=".png")
    assert path.read_text() == "new" and seen[0].startswith(".config.json.") and seen[0].endswith(".png")
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
