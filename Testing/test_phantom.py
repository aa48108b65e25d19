"""The synthetic CT phantom: determinism, anatomy in physical space, HU, partition, lesions, saving."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from TextSegmentLib.cli import main
from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.phantom import (
    EXPECTED_MEDIAN_HU,
    LABEL_IDS,
    LABELS,
    Phantom,
    gaussian_blur,
    make_phantom,
    oblique_direction,
    save_phantom,
)

SMALL = (24, 72, 72)  # the whole trunk at 5.6 × 5.6 × 10 mm: enough anatomy, ~0.1 s
FLIP_X = np.diag([-1.0, 1.0, 1.0])
OBLIQUE = oblique_direction(20, axis="x") @ oblique_direction(15, axis="z")


@pytest.fixture(scope="module")
def default_phantom() -> tuple[Phantom, float]:
    start = time.perf_counter()
    phantom = make_phantom(seed=4, lesions="all")
    return phantom, time.perf_counter() - start


def centroid(phantom: Phantom, *names: str) -> np.ndarray:
    """Physical (LPS mm) centroid of the voxels carrying any of ``names``."""
    k, j, i = np.nonzero(np.isin(phantom.labels.array, [LABEL_IDS[n] for n in names]))
    assert k.size, f"{names} has no voxels"
    return phantom.labels.physical_points(np.stack([i, j, k], axis=1)).mean(axis=0)


# --- determinism and variety ---------------------------------------------------------------------


def test_same_seed_gives_identical_volumes():
    a, b = make_phantom(seed=7, shape=SMALL), make_phantom(seed=7, shape=SMALL)
    assert np.array_equal(a.ct.array, b.ct.array)
    assert np.array_equal(a.labels.array, b.labels.array)
    assert a.anatomy == b.anatomy and a.config == b.config
    rebuilt = make_phantom(**dataclasses.asdict(a.config))  # the recorded config is enough to rebuild it
    assert np.array_equal(rebuilt.ct.array, a.ct.array)


def test_different_seeds_give_different_anatomy():
    a, b = make_phantom(seed=0, shape=SMALL), make_phantom(seed=1, shape=SMALL)
    assert a.anatomy["liver"] != b.anatomy["liver"]
    assert a.voxel_counts()["liver"] != b.voxel_counts()["liver"]
    assert np.mean(a.labels.array != b.labels.array) > 0.02


def test_random_lesions_vary_with_the_seed():
    present = {make_phantom(seed=s, shape=(8, 24, 24), lesions="random").anatomy["lesions"]["liver_tumor"]["present"]
               for s in range(12)}
    assert present == {True, False}


def test_toggling_lesions_leaves_the_organs_untouched_and_lesions_lie_inside_their_organ():
    with_lesions = make_phantom(seed=5, shape=SMALL, lesions="all")
    without = make_phantom(seed=5, shape=SMALL, lesions="none")
    a, b = with_lesions.labels.array, without.labels.array
    side = with_lesions.anatomy["lesions"]["kidney_cyst"]["side"]
    organ_of = {
        "liver_tumor_necrotic_core": ["liver"],
        "liver_tumor_enhancing_rim": ["liver"],
        f"kidney_cyst_{side}": [f"kidney_{side}"],
        "lung_nodule": ["lung_left", "lung_right"],
    }
    lesion_voxels = np.zeros(a.shape, bool)
    for lesion, organs in organ_of.items():
        voxels = a == LABEL_IDS[lesion]
        assert voxels.any(), lesion
        assert np.isin(b[voxels], [LABEL_IDS[o] for o in organs]).all(), f"{lesion} leaks out of {organs}"
        lesion_voxels |= voxels
    assert np.array_equal(a[~lesion_voxels], b[~lesion_voxels])
    assert not np.isin(b, [LABEL_IDS[n] for n in organ_of]).any()


def test_lesion_selection_and_forced_side():
    phantom = make_phantom(seed=2, shape=SMALL, lesions={"kidney_cyst_right"})
    counts = phantom.voxel_counts()
    assert counts["kidney_cyst_right"] > 0 and counts["kidney_cyst_left"] == 0
    assert phantom.lesions == ("kidney_cyst",)
    assert make_phantom(seed=2, shape=SMALL, lesions="none").lesions == ()


def test_asking_for_both_kidney_cysts_is_refused_not_half_honoured():
    # one cyst is drawn: both sides used to give the right cyst alone, silently
    with pytest.raises(InputError, match="one kidney cyst"):
        make_phantom(seed=2, shape=(8, 24, 24), lesions=("kidney_cyst_left", "kidney_cyst_right"))
    assert make_phantom(seed=2, shape=(8, 24, 24), lesions=("kidney_cyst", "kidney_cyst_left")).anatomy["lesions"][
        "kidney_cyst"]["side"] == "left"


# --- image realism -----------------------------------------------------------------------------


def test_every_structure_is_present_with_plausible_hu(default_phantom):
    phantom, _ = default_phantom
    ct, labels = phantom.ct.array, phantom.labels.array
    assert ct.dtype == np.int16 and labels.dtype == np.uint8
    side = phantom.anatomy["lesions"]["kidney_cyst"]["side"]
    other_cyst = "kidney_cyst_right" if side == "left" else "kidney_cyst_left"
    medians = {}
    for value, name in LABELS.items():
        inside = labels == value
        if name == other_cyst:
            assert not inside.any()
            continue
        assert inside.sum() > 0, f"{name} missing"
        medians[name] = float(np.median(ct[inside]))
        lo, hi = EXPECTED_MEDIAN_HU[name]
        assert lo <= medians[name] <= hi, f"{name}: median {medians[name]} HU outside {lo}..{hi}"
    assert np.median(ct[labels == 0]) < -950  # air around the patient
    assert medians["liver_tumor_necrotic_core"] < medians["liver"] < medians["liver_tumor_enhancing_rim"]
    assert medians["fat"] < medians["muscle"] < medians["liver"] < medians["aorta"] < medians["vertebrae"]


def test_default_phantom_is_fast(default_phantom):
    _, seconds = default_phantom
    assert seconds < 6.0  # ~0.6 s on one free core; generous for a busy machine


def test_non_contrast_phase_lowers_enhancing_organs():
    pv = make_phantom(seed=1, shape=SMALL, noise_hu=0)
    nc = make_phantom(seed=1, shape=SMALL, noise_hu=0, phase="non_contrast")
    assert np.array_equal(pv.labels.array, nc.labels.array)
    for organ, (lo, hi) in {"liver": (45, 75), "spleen": (35, 65), "aorta": (30, 70)}.items():
        inside = nc.labels.array == LABEL_IDS[organ]
        assert lo <= np.median(nc.ct.array[inside]) <= hi
        assert np.median(nc.ct.array[inside]) < np.median(pv.ct.array[inside]) - 30


def test_edges_are_blurred_in_hu_but_crisp_in_labels():
    phantom = make_phantom(seed=3, shape=SMALL, noise_hu=0)
    ct, labels = phantom.ct.array, phantom.labels.array
    body = labels > 0
    rim = np.zeros_like(body)  # air voxels touching the body along x
    rim[:, :, 1:] |= body[:, :, :-1] & ~body[:, :, 1:]
    rim[:, :, :-1] |= body[:, :, 1:] & ~body[:, :, :-1]
    assert np.median(ct[rim]) > -990  # partial volume spills into the air ...
    assert np.median(ct[~body & ~np.roll(body, 3, axis=2) & ~np.roll(body, -3, axis=2)]) == -1000  # ... only near it
    assert set(np.unique(labels)) <= set(LABELS) | {0}


@pytest.mark.parametrize("sigmas", [(0.5, 0.5, 0.5), (0.0, 0.7, 0.7), (1.3, 0.0, 0.4)])
def test_gaussian_blur_matches_scipy(sigmas):
    from scipy import ndimage

    image = np.random.default_rng(0).normal(size=(9, 12, 15)).astype(np.float32)
    expected = ndimage.gaussian_filter(image, sigmas, truncate=3.0, mode="reflect")
    assert np.allclose(gaussian_blur(image, sigmas), expected, atol=1e-5)


def test_noise_level_follows_the_parameter():
    quiet = make_phantom(seed=3, shape=SMALL, noise_hu=0).ct.array.astype(float)
    noisy = make_phantom(seed=3, shape=SMALL, noise_hu=20).ct.array.astype(float)
    inside = quiet > -1000  # away from the clip at -1024
    assert 17 < np.std((noisy - quiet)[inside]) < 23


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 4, 4), (4, 1, 1), (1, 1, 4)])
def test_tiny_phantoms_get_tissue_hu_not_a_clipped_noise_spike(shape):
    # a one-voxel noise field has zero spread: scaling it to noise_hu must not divide by ~0
    noisy = make_phantom(seed=3, shape=shape, noise_hu=12).ct.array.astype(float)
    quiet = make_phantom(seed=3, shape=shape, noise_hu=0).ct.array.astype(float)
    assert noisy.shape == shape and np.isfinite(noisy).all()
    assert np.abs(noisy - quiet).max() <= 5 * 12


def test_label_map_is_a_partition_on_the_ct_grid(default_phantom):
    phantom, _ = default_phantom
    assert phantom.labels.same_geometry(phantom.ct)
    counts = phantom.voxel_counts()
    assert sum(counts.values()) + int((phantom.labels.array == 0).sum()) == phantom.labels.array.size
    assert phantom.label_names == LABELS


# --- geometry: anatomy lives in physical (LPS) space -------------------------------------------------


@pytest.mark.parametrize("direction", [np.eye(3), FLIP_X, OBLIQUE], ids=["identity", "flipped-x", "oblique"])
def test_patient_left_and_right_in_physical_space(direction):
    phantom = make_phantom(seed=6, shape=(32, 96, 96), direction=direction, lesions="all")
    liver, spleen = centroid(phantom, "liver"), centroid(phantom, "spleen")
    assert liver[0] < -20 and spleen[0] > 40  # LPS x grows toward the patient's left
    assert centroid(phantom, "kidney_left")[0] > 30 > -30 > centroid(phantom, "kidney_right")[0]
    aorta, spine = centroid(phantom, "aorta"), centroid(phantom, "vertebrae")
    assert aorta[1] < spine[1] and aorta[0] > spine[0]  # anterior and slightly left of the spine
    assert centroid(phantom, "lung_left", "lung_right")[2] > liver[2]  # lungs cranial


def test_flipped_and_oblique_grids_show_the_same_patient():
    shape = (32, 96, 96)
    reference = make_phantom(seed=6, shape=shape, lesions="all")
    voxel = max(reference.ct.spacing)
    for direction in (FLIP_X, OBLIQUE):
        other = make_phantom(seed=6, shape=shape, lesions="all", direction=direction)
        assert not np.allclose(other.ct.direction, reference.ct.direction)
        for organ in ("liver", "spleen", "kidney_left", "kidney_right", "liver_tumor_enhancing_rim"):
            shift = np.linalg.norm(centroid(other, organ) - centroid(reference, organ))
            assert shift < 1.5 * voxel, f"{organ} moved {shift:.1f} mm"
    flipped = make_phantom(seed=6, shape=shape, lesions="all", direction=FLIP_X)
    assert np.mean(flipped.labels.array == reference.labels.array[:, :, ::-1]) > 0.999


def test_default_grid_is_centred_on_the_body():
    phantom = make_phantom(seed=0, shape=(10, 20, 30), direction=OBLIQUE)
    corners = phantom.ct.physical_points(np.array([[0, 0, 0], [29, 19, 9]]))
    assert np.allclose(corners.mean(axis=0), 0.0, atol=1e-6)
    assert np.allclose(phantom.ct.spacing, (400 / 30, 400 / 20, 240 / 10))


@pytest.mark.parametrize(
    "options",
    [
        {"shape": (0, 10, 10)},
        {"spacing": (1.0, -1.0, 1.0)},
        {"direction": np.ones((3, 3))},
        {"lesions": {"brain_tumor"}},
        {"phase": "arterial"},
        {"noise_hu": -1},
        {"seed": -3},
    ],
)
def test_bad_options_raise_a_clear_input_error(options):
    with pytest.raises(InputError):
        make_phantom(**options)


# --- saving and the CLI ----------------------------------------------------------------------------


def read_back(path):
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    return image, sitk.GetArrayFromImage(image)


def test_save_phantom_writes_four_files_and_refuses_to_overwrite(tmp_path):
    phantom = make_phantom(seed=1, shape=(12, 32, 32), lesions="all")
    paths = save_phantom(phantom, tmp_path / "case")
    image, ct = read_back(paths["ct.nii.gz"])
    assert np.array_equal(ct, phantom.ct.array)
    _, labels = read_back(paths["labels.nii.gz"])
    assert np.array_equal(labels, phantom.labels.array)
    doc = json.loads(paths["labels.json"].read_text())
    assert doc["labels"]["11"] == "liver" and doc["config"]["seed"] == 1
    prompts = json.loads(paths["prompts.json"].read_text())
    liver = next(p for p in prompts if p["text"] == "liver")
    assert liver["voxels"] == int(np.isin(labels, [LABEL_IDS[n] for n in ("liver", "liver_tumor_necrotic_core",
                                                                         "liver_tumor_enhancing_rim")]).sum())
    before = paths["ct.nii.gz"].read_bytes()
    with pytest.raises(OutputExistsError):
        save_phantom(make_phantom(seed=2, shape=(12, 32, 32)), tmp_path / "case")
    assert paths["ct.nii.gz"].read_bytes() == before


def test_cli_writes_a_flipped_phantom_with_patient_left_kept(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["phantom", str(out), "--seed", "3", "--shape", "16", "48", "48", "--flip-x", "--lesions", "all"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ct.nii.gz", "labels.json", "labels.nii.gz", "prompts.json"]
    image, labels = read_back(out / "labels.nii.gz")
    assert image.GetDirection()[0] == pytest.approx(-1.0)
    k, j, i = np.nonzero(labels == LABEL_IDS["spleen"])
    x_mm = [image.TransformContinuousIndexToPhysicalPoint((float(a), float(b), float(c)))[0] for a, b, c in zip(i, j, k)]
    assert np.mean(x_mm) > 40  # the spleen is still on the patient's left after the file round trip
    prompts = json.loads((out / "prompts.json").read_text())
    assert {p["level"] for p in prompts} == {"L1", "L2", "L3", "negative"}
    assert all(p["voxels"] == 0 for p in prompts if p["level"] == "negative")

    capsys.readouterr()
    assert main(["phantom", str(out), "--seed", "4"]) != 0
    assert "already exist" in capsys.readouterr().err
    assert main(["phantom", str(out), "--seed", "4", "--shape", "8", "24", "24", "--overwrite"]) == 0
    assert read_back(out / "ct.nii.gz")[1].shape == (8, 24, 24)


def test_cli_oblique_option_tilts_the_grid(tmp_path):
    out = tmp_path / "tilted"
    assert main(["phantom", str(out), "--shape", "8", "24", "24", "--oblique", "12"]) == 0
    image, _ = read_back(out / "ct.nii.gz")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    assert np.allclose(direction, oblique_direction(12, axis="x"), atol=1e-6)
