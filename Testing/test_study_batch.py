"""Whole-study DICOM batch on real series: one folder per CT series, DICOM SEG checked in physical space.

The model is constructed so its right answer is known from the HU values alone ("bone": HU ≥ 400,
"enhancing tissue": HU ≥ 40, at 512 px so the fit to the model grid is the identity). Expectations
come from an independent reader (SimpleITK/GDCM); the DICOM SEG is read back with pydicom and each
frame placed by its own ImagePositionPatient. The TotalSegmentator reference of the real series is
stored with its y axis flipped, which pins the orientation down in physical space.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from torch import nn

from enhanced_ct import enhanced_ct

from TextSegmentLib.cli import main
from TextSegmentLib.errors import Cancelled, InputError, NotCTError, OutputExistsError
from TextSegmentLib.models.base import ModelOutput, TextFeatures, TextSegmentationModel
from TextSegmentLib.progress import CancelToken
from TextSegmentLib.study_batch import REPORT, SEG_FILE, segment_study

CHANNEL = {"enhancing tissue": 0, "bone": 2}  # abdomen window 400/40 and bone window 1800/400: mid-grey at 40 and 400 HU
THRESHOLD_HU = {"enhancing tissue": 40, "bone": 400}
BONE_CLASSES = ("vertebrae", "rib_", "humerus")  # TotalSegmentator classes that are bone


@dataclass
class Config:
    image_size: int = 512


class HUThresholdModel(TextSegmentationModel):
    """Segments what a prompt's window shows above mid-grey: a per-pixel rule, so its answer is known."""

    tap_names = ("pixels",)

    def __init__(self) -> None:
        super().__init__()
        self.config = Config()
        self.scale = nn.Parameter(torch.tensor(40.0))

    def encode_text(self, prompts, aux_prompts=None):
        return TextFeatures(pooled=nn.functional.one_hot(torch.tensor([CHANNEL[p] for p in prompts]), 3).float())

    def forward(self, images, text, *, taps=None):
        shown = (images * text.pooled[:, :, None, None]).sum(1, keepdim=True)
        return ModelOutput(logits=self.scale * (shown - 0.5), taps={"pixels": images} if taps else {})


def _corrupt_copy(series: Path, target: Path) -> Path:
    """The dcmqi slices as a series of their own whose second file is cut in half (an interrupted copy)."""
    target.mkdir(parents=True)
    uid = pydicom.uid.generate_uid(entropy_srcs=["TextSegment corrupt test series"])
    for file in sorted(series.iterdir()):
        ds = pydicom.dcmread(file)
        ds.SeriesInstanceUID, ds.SeriesDescription = uid, "corrupt copy"
        ds.save_as(target / file.name)
    bad = target / sorted(p.name for p in series.iterdir())[1]
    with open(bad, "r+b") as handle:
        handle.truncate(bad.stat().st_size // 2)
    return bad


def _not_hu_copy(series: Path, target: Path) -> None:
    """The dcmqi slices without a Modality tag and shifted far above HU: an image series that is not CT."""
    target.mkdir(parents=True)
    uid = pydicom.uid.generate_uid(entropy_srcs=["TextSegment not-HU test series"])
    for file in sorted(series.iterdir()):
        ds = pydicom.dcmread(file)
        del ds.Modality
        ds.SeriesInstanceUID, ds.SeriesDescription = uid, "no modality, not HU"
        ds.RescaleIntercept = float(ds.get("RescaleIntercept", 0)) + 5000
        ds.save_as(target / file.name)


@pytest.fixture(scope="module")
def study(shared_data, tmp_path_factory) -> dict:
    """A study folder: the real abdominal series, the dcmqi slices with a SEG object, a corrupt and a non-HU series."""
    root = tmp_path_factory.mktemp("study")
    dicom = shared_data / "dicom"
    shutil.copytree(dicom / "totalseg_example_ct_dicom" / "series", root / "abdomen")
    shutil.copytree(dicom / "dcmqi_ct3slice" / "series", root / "dcmqi")
    shutil.copy(dicom / "dcmqi_ct3slice" / "liver.dcm", root / "dcmqi_seg.dcm")
    bad_file = _corrupt_copy(dicom / "dcmqi_ct3slice" / "series", root / "corrupt")
    _not_hu_copy(dicom / "dcmqi_ct3slice" / "series", root / "not_hu")
    return {"root": root, "bad_file": bad_file}


@pytest.fixture(scope="module")
def batch(study, tmp_path_factory):
    out = tmp_path_factory.mktemp("batch") / "out"
    seen = []
    report = segment_study(study["root"], ["bone", "enhancing tissue"], output_dir=out, model=HUThresholdModel(),
                           model_name="hu-threshold", device="cpu", saliency=True,
                           progress=lambda f, m: seen.append(f))
    return report, out, seen


def _by_description(report) -> dict:
    return {s.description or s.modality: s for s in report.series}


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _seg_masks(path: Path, grid: sitk.Image) -> dict[str, np.ndarray]:
    """Segment label → (z, y, x) mask on ``grid``, each frame placed by its own ImagePositionPatient."""
    seg = pydicom.dcmread(path)
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.asarray(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    direction = np.asarray(grid.GetDirection()).reshape(3, 3)
    assert np.allclose(orientation, np.concatenate([direction[:, 0], direction[:, 1]]), atol=1e-4)
    labels = {item.SegmentNumber: item.SegmentLabel for item in seg.SegmentSequence}
    masks = {label: np.zeros(grid.GetSize()[::-1], dtype=bool) for label in labels.values()}
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        index = grid.TransformPhysicalPointToContinuousIndex(position)
        assert abs(index[0]) < 1e-3 and abs(index[1]) < 1e-3 and abs(index[2] - round(index[2])) < 1e-3
        number = (item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence)[0].ReferencedSegmentNumber
        masks[labels[number]][int(round(index[2]))] = frame > 0
    return masks


def test_every_ct_series_is_done_and_the_bad_one_reported(batch, study):
    report, out, seen = batch
    by = _by_description(report)
    assert by["CT Body 3.0"].status == "ok" and by["CT"].status == "ok"
    bad = by["corrupt copy"]
    assert bad.status == "failed" and study["bad_file"].name in bad.error and "pixel data" in bad.error
    assert by["Liver Segmentation"].status == "skipped" and "SEG" in by["Liver Segmentation"].error
    not_hu = by["no modality, not HU"]
    assert not_hu.status == "skipped" and "Hounsfield" in not_hu.error
    assert seen == sorted(seen) and seen[-1] == 1.0

    saved = json.loads((out / REPORT).read_text())
    assert saved["summary"] == {"ok": 2, "failed": 1, "skipped": 2, "cancelled": 0}
    assert {s["folder"]: s["status"] for s in saved["series"] if s["folder"]} == {
        by["CT Body 3.0"].folder: "ok", by["CT"].folder: "ok"}  # only this run's outputs are named
    assert bad.folder is None and not_hu.folder is None
    # the failed series left nothing behind, not even a hidden staging folder
    assert sorted(p.name for p in out.iterdir()) == sorted([REPORT, by["CT Body 3.0"].folder, by["CT"].folder])
    for series in (by["CT Body 3.0"], by["CT"]):
        folder = out / series.folder
        for name in (SEG_FILE, "segmentation.nii.gz", "segmentation.json", "probabilities/01_bone.nii.gz",
                     "saliency/saliency_legend.json", "saliency/01_bone/combined.nii.gz"):
            assert (folder / name).is_file(), f"{series.folder}/{name}"
        assert sorted(series.outputs) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert json.loads((folder / "segmentation.json").read_text())["model"] == "hu-threshold"


def test_dicom_seg_lands_on_the_source_images_in_physical_space(batch, study):
    report, out, _ = batch
    series = _by_description(report)["CT Body 3.0"]
    ct = _sitk_series(study["root"] / "abdomen")
    hu = sitk.GetArrayFromImage(ct)
    masks = _seg_masks(out / series.folder / SEG_FILE, ct)
    assert set(masks) == set(THRESHOLD_HU)
    for prompt, threshold in THRESHOLD_HU.items():
        expected = hu >= threshold
        assert expected.sum() > 10_000
        assert np.count_nonzero(masks[prompt] != expected) <= 1e-3 * expected.sum(), prompt

    # every frame references a source image of this series (anonymised: UIDs live in the file meta)
    parsed = hd.seg.segread(out / series.folder / SEG_FILE)
    sources = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
               for f in (study["root"] / "abdomen").iterdir()}
    assert {uid for _, _, uid in parsed.get_source_image_uids()} <= sources


def test_orientation_agrees_with_the_y_flipped_reference(batch, study, shared_data):
    """TotalSegmentator's labels (stored with y flipped) put bone where our SEG's bone is, not in its mirror image."""
    report, out, _ = batch
    ct = _sitk_series(study["root"] / "abdomen")
    bone = _seg_masks(out / _by_description(report)["CT Body 3.0"].folder / SEG_FILE, ct)["bone"]
    reference = sitk.ReadImage(str(shared_data / "dicom" / "totalseg_example_ct_dicom" / "example_seg_dicom.nii.gz"))
    assert np.allclose(np.asarray(reference.GetDirection()).reshape(3, 3), np.diag([1, -1, 1]))  # the flipped storage
    classes = json.loads((shared_data / "ct" / "totalsegmentator_class_maps.json").read_text())["total"]
    bone_labels = [int(k) for k, name in classes.items() if name.startswith(BONE_CLASSES)]
    labels = sitk.GetArrayFromImage(sitk.Resample(reference, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    reference_bone = np.isin(labels, bone_labels)
    assert reference_bone.sum() > 10_000
    covered = (bone & reference_bone).sum() / reference_bone.sum()
    mirrored = (bone & reference_bone[:, ::-1]).sum() / reference_bone.sum()
    assert covered > 0.2 and covered > 20 * mirrored


def test_label_map_matches_the_hu_rule_in_physical_space(batch, study):
    report, out, _ = batch
    ct = _sitk_series(study["root"] / "abdomen")
    labels = sitk.ReadImage(str(out / _by_description(report)["CT Body 3.0"].folder / "segmentation.nii.gz"))
    on_ct = sitk.GetArrayFromImage(sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    expected = sitk.GetArrayFromImage(ct) >= THRESHOLD_HU["enhancing tissue"]  # the union of both prompts
    assert np.count_nonzero((on_ct > 0) != expected) <= 1e-3 * expected.sum()


def test_existing_results_are_refused_before_any_work(batch, study):
    _, out, _ = batch
    before = (out / REPORT).read_bytes()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        segment_study(study["root"], ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    assert (out / REPORT).read_bytes() == before


def test_a_folder_without_ct_is_an_error(shared_data, tmp_path):
    folder = tmp_path / "segs"
    folder.mkdir()
    shutil.copy(shared_data / "dicom" / "dcmqi_ct3slice" / "liver.dcm", folder)
    with pytest.raises(NotCTError, match="no CT series"):
        segment_study(folder, ["bone"], output_dir=tmp_path / "out", model=HUThresholdModel(), device="cpu")
    assert not (tmp_path / "out").exists()


def test_aux_prompts_for_a_model_that_ignores_them_are_refused_before_any_series(shared_data, tmp_path):
    # each series used to fail on them alike (or, before, run with them ignored)
    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "a")
    with pytest.raises(InputError, match="HUThresholdModel does not use auxiliary prompts .*TGC-Net"):
        segment_study(root, ["bone"], output_dir=tmp_path / "out", model=HUThresholdModel(), device="cpu",
                      aux_prompts=["cortical bone"])
    assert not (tmp_path / "out").exists()


def test_cancel_keeps_finished_series_and_reports(shared_data, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "a")
    shutil.copytree(shared_data / "dicom" / "monai_CT_DICOM_tiny", root / "b")
    token = CancelToken()

    def progress(fraction, message):
        if message.startswith("series 2/"):
            token.cancel()

    with pytest.raises(Cancelled):
        segment_study(root, ["bone"], output_dir=tmp_path / "out", model=HUThresholdModel(), device="cpu",
                      progress=progress, cancel=token)
    saved = json.loads((tmp_path / "out" / REPORT).read_text())
    assert saved["cancelled"] is True
    statuses = [s["status"] for s in saved["series"]]
    assert statuses == ["ok", "cancelled"]
    finished = saved["series"][0]["folder"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([REPORT, finished])


def test_cli_batch_runs_a_real_model_and_exits_non_zero_on_a_failed_series(shared_data, tmp_path, capsys):
    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "dcmqi")
    _corrupt_copy(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "corrupt")
    partial = root / "partial.dcm"  # a copy cut inside its header: skipped, and named in the summary
    partial.write_bytes((shared_data / "dicom" / "pydicom_CT_small" / "CT_small.dcm").read_bytes()[:990])
    out = tmp_path / "out"
    code = main(["batch", str(root), "-p", "liver", "--out", str(out), "--model", "freqmedclip-tiny",
                 "--weights", "random", "--device", "cpu", "--no-dicom-seg", "--probability-grid", "compact", "-q"])
    assert code == 1
    saved = json.loads((out / REPORT).read_text())
    statuses = {s["description"] or s["modality"]: s["status"] for s in saved["series"]}
    assert statuses == {"CT": "ok", "corrupt copy": "failed"}
    assert saved["model"] == "freqmedclip-tiny"
    done = next(s for s in saved["series"] if s["status"] == "ok")
    assert "segmentation.nii.gz" in done["outputs"] and SEG_FILE not in done["outputs"]
    assert not (out / done["folder"] / SEG_FILE).exists()
    legend = json.loads((out / done["folder"] / "segmentation.json").read_text())
    assert legend["probability_grid"] == "compact"
    ct = sitk.ReadImage(str(out / done["folder"] / "segmentation.nii.gz"))
    prob = sitk.ReadImage(str(out / done["folder"] / legend["labels"][0]["probability_map"]))
    assert prob.GetSize()[:2] == (128, 128) and prob.GetSize()[2] == ct.GetSize()[2] < ct.GetSize()[0]
    printed = capsys.readouterr().out
    assert "failed" in printed and "1 series done, 1 failed, 1 unreadable file(s) skipped" in printed
    assert f"corrupt {partial}: corrupt DICOM file" in printed


def test_the_batch_script_runs_without_slicer(tmp_path):
    """scripted_tests/batch_study.py is what Slicer users run; outside Slicer it falls back to the headless logic."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripted_tests" / "batch_study.py"
    shown = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "--prompt" in shown.stdout
    missing = subprocess.run([sys.executable, str(script), "--", str(tmp_path / "nothing"), str(tmp_path / "out"),
                              "-p", "liver"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and "no such folder" in missing.stderr
    assert not (tmp_path / "out").exists()


def test_tilted_series_and_a_truncated_header_do_not_stop_the_batch(shared_data, tmp_path):
    # a gantry-tilted series (slices drift sideways) must be segmented and get its DICOM SEG; a file cut
    # inside its header (an interrupted copy) must be skipped and named in the report, not crash discovery
    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "dcmqi")
    (root / "tilted").mkdir()
    template = pydicom.dcmread(next((shared_data / "dicom" / "monai_CT_DICOM_tiny").iterdir()))
    uid = pydicom.uid.generate_uid(entropy_srcs=["TextSegment tilted test series"])
    for k in range(4):
        ds = template.copy()
        ds.SeriesInstanceUID, ds.SeriesDescription = uid, "tilted"
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.5 * k, 2.5 * k]
        ds.save_as(root / "tilted" / f"slice{k}")
    partial = root / "partial.dcm"
    partial.write_bytes((shared_data / "dicom" / "pydicom_CT_small" / "CT_small.dcm").read_bytes()[:990])

    out = tmp_path / "out"
    report = segment_study(root, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")

    by = _by_description(report)
    assert by["tilted"].status == "ok", by["tilted"].error
    assert (out / by["tilted"].folder / SEG_FILE).is_file()
    assert any("drift 1.5 mm sideways" in w for w in by["tilted"].warnings)  # the reader's warning, in the report
    assert by["CT"].status == "ok"
    saved = json.loads((out / REPORT).read_text())
    assert [c["file"] for c in saved["corrupt_files"]] == [str(partial)]
    assert "corrupt DICOM" in saved["corrupt_files"][0]["error"]


def test_a_scout_filed_with_a_ct_series_is_left_out_and_the_series_segmented(shared_data, tmp_path):
    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "ct")
    scout = pydicom.dcmread(root / "ct" / "01.dcm")  # a lateral scout the scanner filed under the axial series' UID
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    scout.save_as(root / "ct" / "00_scout")

    out = tmp_path / "out"
    report = segment_study(root, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")

    (series,) = report.series
    assert series.status == "ok", series.error
    assert series.files == 3 and (out / series.folder / SEG_FILE).is_file()
    assert any("localizer" in w and str(root / "ct" / "00_scout") in w for w in series.warnings)


def test_overwrite_keeps_an_earlier_folder_of_a_failed_series_but_does_not_report_it(shared_data, tmp_path):
    from TextSegmentLib.errors import InputError

    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "monai_CT_DICOM_tiny", root / "ct")
    out = tmp_path / "out"
    first = segment_study(root, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    folder = first.series[0].folder
    assert any("slice gaps are uneven" in w for w in first.series[0].warnings)  # the reader's warning, in the report
    earlier = {p: p.read_bytes() for p in (out / folder).rglob("*") if p.is_file()}

    def broken(series):
        raise InputError(f"{series.key}: unreadable this time")

    again = segment_study(root, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=True,
                          reader=broken)

    assert {p: p.read_bytes() for p in (out / folder).rglob("*") if p.is_file()} == earlier  # never deleted
    (saved,) = json.loads((out / REPORT).read_text())["series"]
    assert saved["status"] == "failed" and saved["folder"] is None and saved["outputs"] == []
    assert any(folder in w and "earlier run" in w for w in saved["warnings"])
    assert again.series[0].folder is None


def test_batch_records_the_weights_that_ran_not_the_option(shared_data, tmp_path):
    from TextSegmentLib.weights import load_manifest

    default = load_manifest().default_for("freqmedclip-tiny")
    out = tmp_path / "out"
    code = main(["batch", str(shared_data / "dicom" / "dcmqi_ct3slice" / "series"), "-p", "liver", "--out", str(out),
                 "--device", "cpu", "--no-dicom-seg", "--probability-grid", "compact", "--saliency", "-q"])
    assert code == 0
    saved = json.loads((out / REPORT).read_text())
    folder = out / saved["series"][0]["folder"]
    legends = [json.loads((folder / name).read_text()) for name in ("segmentation.json", "saliency/saliency_legend.json")]
    for record in [saved, *legends]:
        assert record["weights"] == default.id and record["weights_sha256"] == default.sha256
        assert record["weights_file"].endswith(default.file) and len(record["weights_data_sha256"]) == 64




def test_an_enhanced_ct_file_is_segmented_like_the_classic_series_it_came_from(shared_data, tmp_path):
    classic = shared_data / "dicom" / "dcmqi_ct3slice" / "series"
    root = tmp_path / "study"
    shutil.copytree(classic, root / "classic")
    enhanced_file = enhanced_ct(classic, root / "enhanced.dcm", order=[2, 0, 1], description="enhanced")
    out = tmp_path / "out"
    report = segment_study(root, ["bone", "enhancing tissue"], output_dir=out, model=HUThresholdModel(), device="cpu")

    by = _by_description(report)
    assert by["enhanced"].status == "ok", by["enhanced"].error
    assert by["enhanced"].files == 1 and by["CT"].status == "ok"  # the classic series has no description
    grid = _sitk_series(classic)
    hu = sitk.GetArrayFromImage(grid)
    masks = _seg_masks(out / by["enhanced"].folder / SEG_FILE, grid)
    for prompt, threshold in THRESHOLD_HU.items():
        expected = hu >= threshold
        assert expected.sum() > 1000
        assert np.count_nonzero(masks[prompt] != expected) <= 1e-3 * expected.sum(), prompt
    parsed = hd.seg.segread(out / by["enhanced"].folder / SEG_FILE)
    assert {uid for _, _, uid in parsed.get_source_image_uids()} == {pydicom.dcmread(enhanced_file).SOPInstanceUID}
    # the label map lies on the same grid, voxel for voxel, as the classic series' one
    labels = {name: sitk.ReadImage(str(out / by[name].folder / "segmentation.nii.gz")) for name in by}
    first, second = labels.values()
    assert first.GetSize() == second.GetSize() and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=1e-5)
    assert np.allclose(first.GetSpacing(), second.GetSpacing()) and np.allclose(first.GetDirection(), second.GetDirection())
    assert np.array_equal(sitk.GetArrayFromImage(first), sitk.GetArrayFromImage(second))


def test_batch_options_from_python_are_checked_once_and_saliency_follows_the_threshold(shared_data, tmp_path):
    """A bad saliency layer or stage failed every series alike; the maps explained the 0.5 mask at any threshold;
    a repeated prompt made two identical labels; a model object was named by its class, not its preset."""
    from TextSegmentLib.errors import ModelError

    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "a")
    with pytest.raises(ModelError, match="unknown feature tap"):
        segment_study(root, ["bone"], output_dir=tmp_path / "bad", model=HUThresholdModel(), device="cpu",
                      saliency=True, saliency_layers="pixels,bogus")
    with pytest.raises(InputError, match="saliency stage must be 1, 2 or 3"):
        segment_study(root, ["bone"], output_dir=tmp_path / "bad", model=HUThresholdModel(), device="cpu",
                      saliency=True, saliency_stage=5)
    with pytest.raises(InputError, match="given twice"):
        segment_study(root, ["bone", "Bone "], output_dir=tmp_path / "bad", model=HUThresholdModel(), device="cpu")
    assert not (tmp_path / "bad").exists()
    model = HUThresholdModel()
    model.config.name = "hu-threshold-v1"  # a preset's config names it, as freqmedclip-tiny's does
    out = tmp_path / "out"
    report = segment_study(root, ["bone"], output_dir=out, model=model, device="cpu", threshold=0.3, saliency=True,
                           dicom_seg=False)
    (series,) = report.ok
    assert report.model == "hu-threshold-v1"
    assert json.loads((out / series.folder / "segmentation.json").read_text())["model"] == "hu-threshold-v1"
    legend = json.loads((out / series.folder / "saliency" / "saliency_legend.json").read_text())
    assert legend["config"]["threshold"] == 0.3


def test_info_on_the_batch_folder_lists_each_series_and_its_outcome(batch):
    # `info OUT` said "no readable DICOM files in this folder" on a batch's own output
    import contextlib
    import io

    from TextSegmentLib.cli import main

    report, out, _ = batch
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["info", str(out)]) == 0
    text = printed.getvalue()
    assert "TextSegment batch of" in text and "hu-threshold" in text and "'bone', 'enhancing tissue'" in text
    ok = next(s for s in report.series if s.status == "ok")
    assert any(line.split()[:2] == ["ok", ok.folder] for line in text.splitlines())
    assert "failed" in text and "pixel data" in text
