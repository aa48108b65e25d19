import dataclasses
import json

import numpy as np
import pytest
import torch

from TextSegmentLib.errors import InputError
from TextSegmentLib.prompts import ground_truth
from TextSegmentLib.training.data import (
    Batch, align_labels, augment, check_sources, labels_per_slice, load_dicom_seg_case, load_msd_task, load_source,
    load_totalsegmentator_case, mirror_prompt, parse_seeds,
)


def test_mirror_prompt_swaps_sides_and_keeps_case():
    assert mirror_prompt("left kidney") == "right kidney"
    assert mirror_prompt("Right lung excluding the left lung") == "Left lung excluding the right lung"
    assert mirror_prompt("leftover liver") == "leftover liver"  # whole words only
    assert mirror_prompt("LEFT KIDNEY, not the Left adrenal") == "RIGHT KIDNEY, not the Right adrenal"  # capitals stay capitals


def test_mirror_augmentation_moves_mask_and_swaps_prompt():
    image = torch.zeros(1, 3, 16, 16)
    image[..., :4] = 1.0  # something on the image's left edge
    batch = Batch(image, image[:, :1].clone(), ["left kidney"], ["L1"])
    out = augment(batch, np.random.default_rng(0), flip_prob=1.0, scale=0, rotate_deg=0, shift=0, intensity=0)
    assert out.prompts == ["right kidney"]
    torch.testing.assert_close(out.images, torch.flip(image, dims=[-1]))
    torch.testing.assert_close(out.masks, torch.flip(image[:, :1], dims=[-1]))


def test_default_augmentation_never_mirrors():
    batch = Batch(torch.rand(8, 3, 16, 16), torch.zeros(8, 1, 16, 16), ["left kidney"] * 8, ["L1"] * 8)
    out = augment(batch, np.random.default_rng(1))
    assert out.prompts == batch.prompts
    assert out.images.min() >= 0 and out.images.max() <= 1


def test_pool_samples_balanced_levels_with_true_masks(tiny_pool):
    rng = np.random.default_rng(0)
    picks = tiny_pool.sample(rng, 400)
    levels = [p.level for _, p in picks]
    share = {lv: levels.count(lv) / len(levels) for lv in ("L1", "L2", "L3", "negative")}
    assert 0.2 < share["L1"] < 0.4 and 0.1 < share["negative"] < 0.3
    batch = tiny_pool.batch(picks[:40])
    assert batch.images.shape == (40, 3, 128, 128) and batch.masks.shape == (40, 1, 128, 128)
    for (index, prompt), mask in zip(picks[:40], batch.masks[:, 0].numpy()):
        expected = ground_truth(prompt, tiny_pool.labels[index].numpy(), tiny_pool.label_names[tiny_pool.case_of[index]])
        assert np.array_equal(mask > 0.5, expected)
        if prompt.level == "negative":
            assert not expected.any()
    shown = [tiny_pool.mask(i, p).any() for i, p in picks if p.level != "negative"]
    assert np.mean(shown) > 0.6  # most positives show their target; some are deliberately empty


def test_hard_mining_draws_the_hard_prompts_more_often(tiny_pool):
    saved = dict(tiny_pool.difficulty)
    try:
        tiny_pool.difficulty = {}
        plain = tiny_pool.sample(np.random.default_rng(5), 60)
        tiny_pool.difficulty = {p.text: 0.9 for ps in tiny_pool.prompts for p in ps}
        assert tiny_pool.sample(np.random.default_rng(5), 60) == plain  # off: difficulties are not looked at
        texts = sorted({p.text for ps in tiny_pool.prompts for p in ps if p.level == "L1"})
        hard = texts[0]
        tiny_pool.difficulty = {t: (1.0 if t == hard else 0.01) for t in texts}
        share = {}
        for mining in (0.0, 0.8):
            picks = tiny_pool.sample(np.random.default_rng(7), 2000, level_weights={"L1": 1.0}, hard_mining=mining)
            share[mining] = np.mean([p.text == hard for _, p in picks])
        assert share[0.8] > 4 * share[0.0] > 0
        # the mixture keeps every prompt in play
        options = [p for p in tiny_pool.prompts[0] if p.level == "L1"]
        weights = tiny_pool.prompt_weights(options, 0.8)
        assert weights.sum() == pytest.approx(1.0) and weights.min() >= 0.2 / len(options) - 1e-12
    finally:
        tiny_pool.difficulty = saved


def test_record_follows_each_prompt_and_skips_unscored_samples(tiny_pool):
    from TextSegmentLib.training.data import DIFFICULTY_PRIOR, DIFFICULTY_RATE

    saved = dict(tiny_pool.difficulty)
    try:
        tiny_pool.difficulty = {}
        a, b = tiny_pool.prompts[0][0], tiny_pool.prompts[0][1]
        tiny_pool.record([(0, a), (0, b)], [1.0, float("nan")])
        assert tiny_pool.difficulty == {a.text: pytest.approx(DIFFICULTY_PRIOR + DIFFICULTY_RATE * (1.0 - DIFFICULTY_PRIOR))}
        for _ in range(400):
            tiny_pool.record([(0, a)], [0.1])
        assert tiny_pool.difficulty[a.text] == pytest.approx(0.1, abs=1e-6)
    finally:
        tiny_pool.difficulty = saved


def test_parse_seeds_and_bad_source():
    assert parse_seeds("0-3,7") == [0, 1, 2, 3, 7]
    with pytest.raises(InputError):
        load_source("mystery:thing")


def test_bad_seed_and_grid_strings_are_named():
    for text, part in (("2000-", "'2000-'"), ("abc", "'abc'"), ("0-3,x", "'x'")):
        with pytest.raises(InputError, match=f"bad phantom seeds {part}"):
            load_source(f"phantoms:{text}")
    with pytest.raises(InputError, match="backwards seed range '9-5' in '0-3,9-5'; write 5-9"):
        parse_seeds("0-3,9-5")  # was silently dropped
    for grid in ("abc", "32x128", "0x64x64"):
        with pytest.raises(InputError, match=f"bad phantom grid '{grid}'"):
            load_source(f"phantoms:0-3@{grid}")
    assert parse_seeds("5-5,7") == [5, 7]


def test_overlapping_training_and_validation_sources_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"overlap: phantom seed 5 at 32x128x128, phantom seed 6 at 32x128x128;"):
        check_sources(["phantoms:0-6"], ["phantoms:5-9@32x128x128"])
    check_sources(["phantoms:0-6@6x64x64"], ["phantoms:5-9"])  # another grid: other phantoms
    ts = "totalseg:{0}/ct.nii.gz,{0}/seg.nii.gz,maps.json"
    check_sources([ts.format("a")], [ts.format("b")])  # one class map for many cases is fine
    with pytest.raises(InputError, match="overlap: a/ct.nii.gz / .*/a/ct.nii.gz"):
        check_sources([ts.format("a")], [ts.format(tmp_path / "a")])
    with pytest.raises(InputError, match="overlap: msd/imagesTr/x.nii.gz / msd"):
        check_sources(["dicomseg:msd/imagesTr/x.nii.gz,seg.dcm"], ["msd:msd"])


def test_the_held_out_bench_seeds_are_warned_about(caplog):
    with caplog.at_level("WARNING", logger="TextSegmentLib.training.data"):
        check_sources(["phantoms:0-79"], ["phantoms:1000-1003"])
        assert not caplog.records
        check_sources(["phantoms:0-3,2001"], ["phantoms:1000-1003", "phantoms:2000-2003@6x64x64"])
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("held-out seeds (2000 on) that textsegment bench tests on (--seed 2000)" in s for s in said)
    assert said[0].startswith("training uses phantom seeds 2001,") and said[1].startswith("validation uses phantom seeds 2000-2003,")


def test_degenerate_sampling_weights_are_refused_or_skip_what_weighs_nothing(tiny_pool):
    rng = np.random.default_rng(0)
    with pytest.raises(InputError, match="all zero"):
        tiny_pool.sample(rng, 4, level_weights={"L1": 0.0, "L2": 0.0, "L3": 0.0, "negative": 0.0})
    with pytest.raises(InputError, match="finite and non-negative"):
        tiny_pool.sample(rng, 4, level_weights={"L1": 1.0, "L2": -0.5})
    # real_fraction 1 with a synthetic case: that case weighs nothing. A level only it has is not drawn
    # (it was: NaN case probabilities), and weights on such levels alone leave nothing to draw
    only_second = [[p for p in ps if c == 1 or p.level != "L3"] for c, ps in enumerate(tiny_pool.prompts)]
    pool = dataclasses.replace(
        tiny_pool, prompts=only_second, case_weight=np.array([1.0, 0.0]), difficulty={},
        present=[[shown for shown, p in zip(tiny_pool.present[c], tiny_pool.prompts[c]) if p in only_second[c]]
                 for c in range(2)])
    picks = pool.sample(rng, 200)
    assert {p.level for _, p in picks} == {"L1", "L2", "negative"}
    assert all(pool.case_of[i] == 0 for i, _ in picks)
    with pytest.raises(InputError, match=r"no level of these cases a positive weight; they have \['L1', 'L2', 'negative'\]"):
        pool.sample(rng, 4, level_weights={"L3": 1.0})


def test_totalsegmentator_dicom_case_labels_are_aligned(shared_data):
    folder = shared_data / "dicom" / "totalseg_example_ct_dicom"
    case = load_totalsegmentator_case(folder / "series", folder / "example_seg_dicom.nii.gz",
                                      shared_data / "ct" / "totalsegmentator_class_maps.json")
    assert case.ct.same_geometry(case.labels)
    liver = case.labels.array == 5
    assert abs(int(liver.sum()) - 366708) < 0.01 * 366708  # the stored y-flip is undone, not resampled away
    assert 30 < float(case.ct.array[liver].mean()) < 200  # contrast-enhanced liver HU: the map lies on the liver


def test_dicom_seg_case_matches_the_label_file(shared_data):
    from TextSegmentLib.io import read_label_map

    folder = shared_data / "dicom" / "dcmqi_ct3slice"
    case = load_dicom_seg_case(folder / "series", folder / "liver.dcm")
    assert case.label_names == {1: "liver"}
    reference = align_labels(read_label_map(folder / "liver_seg.nrrd"), case.ct).array > 0
    got = case.labels.array == 1
    assert got.sum() > 1000
    assert 2 * (got & reference).sum() / (got.sum() + reference.sum()) > 0.99


def test_msd_task_folder(tmp_path):
    import SimpleITK as sitk

    from TextSegmentLib.phantom import make_phantom

    ph = make_phantom(seed=5, shape=(4, 32, 32))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    liver = (ph.labels.array == 11).astype(np.uint8)
    for array, name in ((ph.ct.array, "imagesTr/case_001.nii.gz"), (liver, "labelsTr/case_001.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(ph.ct.spacing)
        sitk.WriteImage(image, str(tmp_path / name))
    spec = {"labels": {"0": "background", "1": "liver"},
            "training": [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    (case,) = load_msd_task(tmp_path)
    assert case.label_names == {1: "liver"}
    assert int(case.labels.array.sum()) == int(liver.sum()) > 0


def test_labels_per_slice_counts_each_value_on_its_own_slice():
    labels = np.zeros((3, 4, 4), dtype=np.int16)
    labels[0, 1, 1] = 2
    labels[2, :, 0] = 5
    shown = labels_per_slice(labels, max_label=7)
    assert shown.shape == (3, 8)
    assert np.flatnonzero(shown[0]).tolist() == [0, 2]
    assert np.flatnonzero(shown[1]).tolist() == [0]
    assert np.flatnonzero(shown[2]).tolist() == [0, 5]


def test_pool_presence_is_where_each_prompts_ground_truth_has_voxels(tiny_pool):
    """The per-slice presence from label counts equals the one from every prompt's full mask."""
    offsets = np.cumsum([0] + [int((tiny_pool.case_of == c).sum()) for c in range(len(tiny_pool.prompts))])
    checked = 0
    for c, prompts in enumerate(tiny_pool.prompts):
        labels = tiny_pool.labels[offsets[c] : offsets[c + 1]].numpy()
        for prompt, present in zip(prompts, tiny_pool.present[c]):
            mask = ground_truth(prompt, labels, tiny_pool.label_names[c])
            expected = offsets[c] + np.flatnonzero(mask.any(axis=(1, 2)))
            np.testing.assert_array_equal(present, expected)
            checked += int(len(expected) > 0)
    assert checked > 20  # most prompts are shown somewhere; absent ones must come out empty


def _write_msd(folder, labels, name=None, label_array=None):
    """A one-case MSD task folder on a small phantom CT; returns the label array written."""
    import SimpleITK as sitk

    from TextSegmentLib.phantom import make_phantom

    ph = make_phantom(seed=5, shape=(4, 32, 32))
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for array, file in ((ph.ct.array, "imagesTr/case_001.nii.gz"), (label_array, "labelsTr/case_001.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(ph.ct.spacing)
        sitk.WriteImage(image, str(folder / file))
    spec = {"labels": labels, "training": [{"image": "./imagesTr/case_001.nii.gz", "label": "./labelsTr/case_001.nii.gz"}]}
    if name is not None:
        spec["name"] = name
    (folder / "dataset.json").write_text(json.dumps(spec))


def test_msd_generic_lesion_labels_get_the_organ_of_the_task(tmp_path):
    """Task03_Liver's "cancer" is the liver's tumour, and "liver" includes it (it was a bare "tumor" cut out of the liver)."""
    from TextSegmentLib.prompts import Target

    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 8:24, 8:24] = 1
    labels[2, 12:16, 12:16] = 2
    _write_msd(tmp_path / "Task03_Liver", {"0": "background", "1": "liver", "2": "cancer"}, name="Liver", label_array=labels)
    (case,) = load_msd_task(tmp_path / "Task03_Liver")
    assert case.label_names == {1: "liver", 2: "liver_tumor"}
    assert np.array_equal(ground_truth(Target(("liver",)), case.labels.array, case.label_names), labels > 0)
    # the organ from the task's name field or, without one, from the folder name
    _write_msd(tmp_path / "Task08_HepaticVessel", {"0": "background", "1": "Vessel", "2": "Tumour"}, name="HepaticVessel",
               label_array=labels)
    assert load_msd_task(tmp_path / "Task08_HepaticVessel")[0].label_names == {1: "liver_vessel", 2: "liver_tumor"}
    _write_msd(tmp_path / "Task06_Lung", {"0": "background", "1": "cancer"}, label_array=(labels > 0).astype(np.uint8))
    assert load_msd_task(tmp_path / "Task06_Lung")[0].label_names == {1: "lung_nodule"}
    _write_msd(tmp_path / "Task10_Colon", {"0": "background", "1": "colon cancer primaries"}, name="Colon",
               label_array=(labels > 0).astype(np.uint8))
    assert load_msd_task(tmp_path / "Task10_Colon")[0].label_names == {1: "colon_tumor_primary"}  # already specific


def test_totalsegmentator_class_map_names_are_canonical(tmp_path):
    """A class map's own spelling ("Urinary Bladder") is the table's name: else it got no table prompts and,
    being undeclared as urinary_bladder, the bladder in view was drawn as an absent (empty) negative."""
    import SimpleITK as sitk

    from TextSegmentLib.phantom import make_phantom
    from TextSegmentLib.prompts import build_prompt_pyramid

    ph = make_phantom(seed=5, shape=(4, 32, 32))
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 4:14, 4:14] = 1
    labels[1:3, 18:28, 18:28] = 2
    for array, file in ((ph.ct.array, "ct.nii.gz"), (labels, "seg.nii.gz")):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(ph.ct.spacing)
        sitk.WriteImage(image, str(tmp_path / file))
    (tmp_path / "maps.json").write_text(json.dumps({"total": {"1": "Liver", "2": "Urinary Bladder"}}))
    case = load_totalsegmentator_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "maps.json")
    assert case.label_names == {1: "liver", 2: "urinary_bladder"}
    for seed in range(6):
        prompts = build_prompt_pyramid(case.labels, case.label_names, seed=seed, absent=8)
        negatives = [p for p in prompts if p.level == "negative"]
        assert all("urinary_bladder" not in p.target.include for p in negatives)
        assert any(p.level == "L2" and p.target.include == ("liver",) for p in prompts)  # the table's descriptions


def _seg_on_dcmqi_series(shared_data, tmp_path, masks, labels, fractional=False):
    """A highdicom SEG of (slices, rows, cols, segments) masks on the dcmqi 3-slice CT series."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    folder = shared_data / "dicom" / "dcmqi_ct3slice" / "series"
    sources = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    for ds in sources:
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # empty: the default repertoire, which highdicom rejects as ''
        ds.PatientName = f"{ds.PatientName}^"
    algorithm = hd.AlgorithmIdentificationSequence(name="test", family=codes.cid7162.ArtificialIntelligence, version="1")
    descriptions = [hd.seg.SegmentDescription(
        segment_number=n + 1, segment_label=label, segmented_property_category=codes.cid7150.Tissue,
        segmented_property_type=codes.cid7166.ConnectiveTissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for n, label in enumerate(labels)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="test", manufacturer_model_name="test", software_versions="1", device_serial_number="1")
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    return folder, path


def test_overlapping_seg_segments_keep_a_lesion_inside_its_organ(shared_data, tmp_path):
    """Segment 1 (tumour) lies inside segment 2 (liver): the later segment overwrote it and the tumour was lost."""
    masks = np.zeros((3, 512, 512, 2), dtype=bool)
    masks[:, 100:300, 100:300, 1] = True  # liver
    masks[1, 150:170, 150:170, 0] = True  # its tumour
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["liver tumor", "liver"])
    case = load_dicom_seg_case(series, seg)
    assert case.label_names == {1: "liver_tumor", 2: "liver"}
    tumour = case.labels.array == 1
    assert tumour.sum() == 400 and tumour[1, 150:170, 150:170].all()
    assert int((case.labels.array > 0).sum()) == 3 * 200 * 200
    from TextSegmentLib.prompts import Target
    assert ground_truth(Target(("liver",)), case.labels.array, case.label_names).sum() == 3 * 200 * 200


def test_fractional_seg_is_cut_at_one_half(shared_data, tmp_path):
    """A FRACTIONAL SEG's values are fractions of MaximumFractionalValue: a 0.2 fringe is not the segment."""
    masks = np.zeros((3, 512, 512, 1), dtype=np.float32)
    masks[:, 100:200, 100:200, 0] = 0.2
    masks[:, 120:180, 120:180, 0] = 0.9
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["liver"], fractional=True)
    case = load_dicom_seg_case(series, seg)
    got = case.labels.array == 1
    assert got.sum() == 3 * 60 * 60 and got[:, 120:180, 120:180].all()


def test_a_label_map_outside_the_ct_is_refused():
    """Resampled in physical space, a label map of another image came out all zero and every label an 'absent' negative."""
    from TextSegmentLib.phantom import make_phantom
    from TextSegmentLib.training.data import LabelledCase

    ph = make_phantom(seed=5, shape=(4, 32, 32))
    elsewhere = ph.labels.with_array(ph.labels.array)
    elsewhere = dataclasses.replace(elsewhere, origin=tuple(np.asarray(ph.ct.origin) + 500.0))
    with pytest.raises(InputError, match="outside the CT"):
        LabelledCase("x", ph.ct, elsewhere, dict(ph.label_names))
    moved = dataclasses.replace(ph.labels, origin=tuple(np.asarray(ph.ct.origin) + np.asarray(ph.ct.spacing)))
    assert LabelledCase("y", ph.ct, moved, dict(ph.label_names)).labels.array.any()  # a shift by one voxel is fine


def test_single_segment_seg_with_shared_functional_groups(shared_data, tmp_path):
    """highdicom (and so ``textsegment``'s own SEG export) puts a lone segment's identification in the
    shared functional groups; reading it raised AttributeError."""
    masks = np.zeros((3, 512, 512, 1), dtype=bool)
    masks[:2, 200:260, 210:250, 0] = True
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["spleen"])
    case = load_dicom_seg_case(series, seg)
    assert case.label_names == {1: "spleen"}
    assert np.array_equal(case.labels.array == 1, masks[..., 0])


def _renumber_seg(path, number):
    """The lone segment of a highdicom SEG renumbered (highdicom numbers segments from 1)."""
    import pydicom

    ds = pydicom.dcmread(path)
    ds.SegmentSequence[0].SegmentNumber = number
    for groups in [*ds.SharedFunctionalGroupsSequence, *ds.PerFrameFunctionalGroupsSequence]:
        for item in groups.get("SegmentIdentificationSequence", []):
            item.ReferencedSegmentNumber = number
    ds.save_as(path)


def test_seg_segment_numbers_above_255_do_not_wrap(shared_data, tmp_path):
    """The label array was uint8: segment 300 came out as label 44."""
    masks = np.zeros((3, 512, 512, 1), dtype=bool)
    masks[1, 200:260, 210:250, 0] = True
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["spleen"])
    _renumber_seg(seg, 300)
    case = load_dicom_seg_case(series, seg)
    assert case.label_names == {300: "spleen"}
    assert np.array_equal(case.labels.array == 300, masks[..., 0])


def test_seg_reads_the_series_it_references(shared_data, tmp_path):
    """With another series on the same grid in the folder, the labels were put on whichever series was picked."""
    import shutil

    import pydicom
    from pydicom.uid import generate_uid

    from TextSegmentLib.io import read_volume

    masks = np.zeros((3, 512, 512, 1), dtype=bool)
    masks[:2, 200:260, 210:250, 0] = True
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["spleen"])
    folder, decoy = tmp_path / "study", tmp_path / "decoy"
    shutil.copytree(series, folder / "ct")
    decoy.mkdir()
    uid = generate_uid()
    for file in sorted(series.iterdir()):  # the same grid, 100 HU brighter, numbered first: chosen without the reference
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SeriesNumber = uid, generate_uid(), 1
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.RescaleIntercept = float(ds.RescaleIntercept) + 100
        ds.save_as(decoy / file.name)
    shutil.copytree(decoy, folder / "decoy")
    case = load_dicom_seg_case(folder, seg)
    assert np.array_equal(case.ct.array, read_volume(series).array)
    assert np.array_equal(case.labels.array == 1, masks[..., 0])
    with pytest.raises(InputError, match=r"seg\.dcm segments series .*, which .*decoy does not hold; it holds: " + uid):
        load_dicom_seg_case(decoy, seg)


def test_seg_frame_without_segment_or_position_is_named(shared_data, tmp_path):
    """A frame with no segment number or position in either functional group raised TypeError."""
    import pydicom

    masks = np.zeros((3, 512, 512, 1), dtype=bool)
    masks[:, 200:260, 210:250, 0] = True
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["spleen"])
    ds = pydicom.dcmread(seg)
    del ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence
    ds.save_as(tmp_path / "no_position.dcm")
    with pytest.raises(InputError, match=r"no_position\.dcm: frame 2 has no ImagePositionPatient"):
        load_dicom_seg_case(series, tmp_path / "no_position.dcm")
    ds = pydicom.dcmread(seg)
    for groups in [*ds.SharedFunctionalGroupsSequence, *ds.PerFrameFunctionalGroupsSequence]:
        if "SegmentIdentificationSequence" in groups:
            del groups.SegmentIdentificationSequence
    ds.save_as(tmp_path / "no_segment.dcm")
    with pytest.raises(InputError, match=r"no_segment\.dcm: frame 1 has no ReferencedSegmentNumber"):
        load_dicom_seg_case(series, tmp_path / "no_segment.dcm")


def test_msd_task_that_is_not_ct_is_refused_up_front(tmp_path):
    """An MR or multi-channel (4D) task failed part-way through loading, with messages that did not say why."""
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 8:24, 8:24] = 1
    for task, modality, said in (("Task01_BrainTumour", {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
                                  "FLAIR, T1w, t1gd, T2w \\(4 channel"),
                                 ("Task02_Heart", {"0": "MRI"}, "MRI \\(1 channel"),
                                 ("Task05_Prostate", {"0": "T2", "1": "ADC"}, "T2, ADC \\(2 channel")):
        _write_msd(tmp_path / task, {"0": "background", "1": "tumour"}, name=task.split("_")[1], label_array=labels)
        spec = json.loads((tmp_path / task / "dataset.json").read_text())
        (tmp_path / task / "dataset.json").write_text(json.dumps({**spec, "modality": modality}))
        with pytest.raises(InputError, match=f"{task}/dataset.json: task {task.split('_')[1]} is not single-channel CT: "
                                             f"its modality is {said}"):
            load_msd_task(tmp_path / task)
    _write_msd(tmp_path / "Task03_Liver", {"0": "background", "1": "liver"}, name="Liver", label_array=labels)
    spec = json.loads((tmp_path / "Task03_Liver" / "dataset.json").read_text())
    (tmp_path / "Task03_Liver" / "dataset.json").write_text(json.dumps({**spec, "modality": {"0": "CT"}}))
    assert load_msd_task(tmp_path / "Task03_Liver")[0].label_names == {1: "liver"}


def test_class_map_without_the_task_is_named(tmp_path):
    """A class-map file without the task fell back to the whole file and raised a bare ValueError."""
    import SimpleITK as sitk

    from TextSegmentLib.phantom import make_phantom

    ph = make_phantom(seed=5, shape=(4, 32, 32))
    for array, file in ((ph.ct.array, "ct.nii.gz"), (ph.labels.array, "seg.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / file))
    (tmp_path / "maps.json").write_text(json.dumps({"total_mr": {"1": "spleen"}, "body": {"1": "body"}}))
    with pytest.raises(InputError, match=r"maps\.json has no class map for task 'total'; its tasks: total_mr, body"):
        load_totalsegmentator_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "maps.json")


def test_seg_on_a_study_folder_reads_its_headers_once(shared_data, tmp_path, monkeypatch):
    """Finding the referenced series listed the folder, then read_volume listed it again: every header of a
    big study was read twice."""
    import shutil

    from TextSegmentLib.io import dicom_series

    masks = np.zeros((3, 512, 512, 1), dtype=bool)
    masks[:2, 200:260, 210:250, 0] = True
    series, seg = _seg_on_dcmqi_series(shared_data, tmp_path, masks, ["spleen"])
    shutil.copytree(series, tmp_path / "study" / "ct")
    calls = []
    listed = dicom_series.list_series
    monkeypatch.setattr(dicom_series, "list_series", lambda *a, **k: calls.append(a) or listed(*a, **k))
    case = load_dicom_seg_case(tmp_path / "study", seg)
    assert np.array_equal(case.labels.array == 1, masks[..., 0])
    assert case.ct.modality == "CT"
    assert len(calls) == 1


def _write_case(folder, labels, ct=None, **geometry):
    """A phantom CT (4x32x32) and a label map, as ct.nii.gz and seg.nii.gz; ``geometry`` sets the label map's."""
    import SimpleITK as sitk

    from TextSegmentLib.phantom import make_phantom

    ph = make_phantom(seed=5, shape=(4, 32, 32))
    for array, file, where in ((ph.ct.array, "ct.nii.gz", {}), (labels, "seg.nii.gz", geometry)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(where.get("spacing", ph.ct.spacing))
        image.SetOrigin(where.get("origin", (0.0, 0.0, 0.0)))
        sitk.WriteImage(image, str(folder / file))
    return ph


def test_a_label_map_covering_part_of_the_ct_is_refused(tmp_path):
    """A cropped (or transposed) label map was resampled in silence: the CT beyond it trained as unlabelled background."""
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 8:24, 8:24] = 1
    (tmp_path / "map.json").write_text(json.dumps({"1": "liver"}))
    files = (tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "map.json")
    ph = _write_case(tmp_path, labels[:, :20, :])  # rows 20-31 of the CT have no labels (21 of 32 count: one voxel of slack)
    with pytest.raises(InputError, match=r"seg\.nii\.gz: covers only 66% of the CT .*crop the CT"):
        load_totalsegmentator_case(*files)
    _write_case(tmp_path, np.ascontiguousarray(labels[:, :, :16]).transpose(0, 2, 1))  # 32 rows x 16 columns
    with pytest.raises(InputError, match="covers only 53%"):
        load_totalsegmentator_case(*files)
    # the same extent at half the in-plane resolution covers it: resampled, not refused
    _write_case(tmp_path, labels[:, ::2, ::2], spacing=(2 * ph.ct.spacing[0], 2 * ph.ct.spacing[1], ph.ct.spacing[2]),
                origin=(ph.ct.spacing[0] / 2, ph.ct.spacing[1] / 2, 0.0))
    case = load_totalsegmentator_case(*files)
    assert case.ct.same_geometry(case.labels) and np.array_equal(case.labels.array, labels)


def test_labels_their_class_map_does_not_name_are_refused(tmp_path):
    """An unnamed label (a class map of another version, an MSD labels list that misses one) became background
    in silence, so prompts for it, or for a group holding it, were trained and scored without it."""
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 4:14, 4:14] = 1
    labels[1:3, 18:28, 18:28] = 5
    _write_case(tmp_path, labels)
    (tmp_path / "map.json").write_text(json.dumps({"total": {"1": "spleen", "2": "kidney_right"}}))
    with pytest.raises(InputError, match=r"seg\.nii\.gz: label value\(s\) 5 \(200 voxels\) have no name in class map .*map\.json"):
        load_totalsegmentator_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "map.json")
    # names of labels absent from the map are fine: they are the absent-structure negatives
    (tmp_path / "map.json").write_text(json.dumps({"total": {"1": "spleen", "2": "kidney_right", "5": "liver"}}))
    case = load_totalsegmentator_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "map.json")
    assert case.label_names == {1: "spleen", 2: "kidney_right", 5: "liver"}
    _write_msd(tmp_path / "Task09_Spleen", {"0": "background", "1": "spleen"}, label_array=labels)
    with pytest.raises(InputError, match=r"case_001\.nii\.gz: label value\(s\) 5 .* the labels of .*dataset\.json"):
        load_msd_task(tmp_path / "Task09_Spleen")


@pytest.mark.parametrize("content, message", [
    ('{"1": "spleen",}', r"class map .*map\.json is not valid JSON"),
    ('{"spleen": 1, "liver": 5}', r"label key 'spleen' \(name → value, inverted\) is not a label value"),
    ('[["1", "spleen"]]', r"must hold a JSON object of label value → name"),
    ('{"1": null}', r"label '1' has no name"),
    (None, r"class map .*map\.json: no such file"),
])
def test_a_broken_class_map_is_named(tmp_path, content, message):
    """Each raised a traceback (JSONDecodeError, ValueError from int('spleen'), AttributeError, FileNotFoundError)."""
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 4:14, 4:14] = 1
    _write_case(tmp_path, labels)
    if content is not None:
        (tmp_path / "map.json").write_text(content)
    with pytest.raises(InputError, match=message):
        load_totalsegmentator_case(tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", tmp_path / "map.json")


def test_a_broken_msd_dataset_json_is_named(tmp_path):
    """A training entry without "label", a list of file names, inverted labels or bad JSON raised tracebacks."""
    labels = np.zeros((4, 32, 32), dtype=np.uint8)
    labels[1:3, 8:24, 8:24] = 1
    task = tmp_path / "Task09_Spleen"
    _write_msd(task, {"0": "background", "1": "spleen"}, label_array=labels)
    spec = json.loads((task / "dataset.json").read_text())
    for training, message in (
        ([{"image": "./imagesTr/case_001.nii.gz"}], r"dataset\.json: training entry 1 is .*, not \{\"image\""),
        (["./imagesTr/case_001.nii.gz"], r"training entry 1 is \"./imagesTr/case_001.nii.gz\", not"),
        (spec["training"] + [{"image": "./imagesTr/case_002.nii.gz", "label": "./labelsTr/case_002.nii.gz"}],
         r"dataset\.json: training entry 2 lists ./imagesTr/case_002.nii.gz, which is missing"),
    ):
        (task / "dataset.json").write_text(json.dumps({**spec, "training": training}))
        with pytest.raises(InputError, match=message):
            load_msd_task(task)
    (task / "dataset.json").write_text(json.dumps({**spec, "labels": {"background": 0, "spleen": 1}}))  # nnU-Net v2's
    with pytest.raises(InputError, match=r"label key 'background' \(name → value, inverted\)"):
        load_msd_task(task)
    (task / "dataset.json").write_text('{"labels": {"0": "background",}}')
    with pytest.raises(InputError, match=r"dataset\.json is not valid JSON"):
        load_msd_task(task)


def test_a_seg_file_that_is_missing_or_not_dicom_is_named(shared_data, tmp_path):
    """pydicom's FileNotFoundError, IsADirectoryError and InvalidDicomError came out as tracebacks."""
    series = shared_data / "dicom" / "dcmqi_ct3slice" / "series"
    with pytest.raises(InputError, match=r"nothere\.dcm: no such file"):
        load_dicom_seg_case(series, tmp_path / "nothere.dcm")
    with pytest.raises(InputError, match="is a folder; give the DICOM SEG file"):
        load_dicom_seg_case(series, tmp_path)
    with pytest.raises(InputError, match=r"liver_seg\.nrrd is not a DICOM file"):
        load_dicom_seg_case(series, shared_data / "dicom" / "dcmqi_ct3slice" / "liver_seg.nrrd")


def test_a_seg_made_on_an_anonymised_series_is_read(shared_data, tmp_path):
    """A series without SeriesInstanceUID gets a generated one in the SEG textsegment writes; training on that
    SEG was refused as "segments series 2.25..., which the folder does not hold; it holds: " (nothing)."""
    import shutil

    import pydicom

    from TextSegmentLib.dicom_seg import write_dicom_seg
    from TextSegmentLib.engine import SegmentationResult
    from TextSegmentLib.io import read_volume

    folder = tmp_path / "series"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", folder)
    for file in folder.iterdir():
        ds = pydicom.dcmread(file)
        del ds.SeriesInstanceUID
        ds.save_as(file)
    ct = read_volume(folder)
    mask = np.zeros(ct.shape, dtype=np.uint8)
    mask[:2, 200:260, 210:250] = 1
    seg = write_dicom_seg([SegmentationResult("spleen", ct.with_array(mask.astype(np.float32)), ct.with_array(mask))],
                          source=ct, path=tmp_path / "seg.dcm")
    case = load_dicom_seg_case(folder, seg)
    assert case.label_names == {1: "spleen"} and np.array_equal(case.labels.array, mask)
    other = shared_data / "dicom" / "monai_CT_DICOM_tiny"  # a series the SEG does not reference still is refused
    with pytest.raises(InputError, match=r"segments series 2\.25\.\d+, which .* does not hold; it holds: \S"):
        load_dicom_seg_case(other, seg)
