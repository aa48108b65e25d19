"""``textsegment info``: a readable report for good input, one error line and a non-zero exit for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from TextSegmentLib import cli

CT5N_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"


@pytest.fixture
def textsegment(monkeypatch, capsys):
    """Run ``textsegment info …`` through the real ``main`` (only the info command registered)."""
    monkeypatch.setattr(cli, "COMMANDS", ("info",))

    def run(*argv):
        code = cli.main(["info", *map(str, argv)])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_text_report_for_a_nifti_ct(shared_data, textsegment):
    code, out, err = textsegment(shared_data / "ct/totalseg_example_ct_sm/example_ct_sm.nii.gz")
    assert code == 0 and err == ""
    assert "122 x 101 x 30 voxels" in out
    assert "3 x 3 x 3 mm" in out
    assert "RAS" in out  # orientation code of the stored axes
    assert "-1100 .. 1207 (int16)" in out
    assert "modality     CT" in out


def test_json_report_for_a_dicom_folder(shared_data, textsegment):
    code, out, _ = textsegment(shared_data / "dicom/totalseg_example_ct_dicom/series", "--json")
    report = json.loads(out)
    assert code == 0
    assert len(report["series"]) == 1 and report["series"][0]["n_files"] == 20
    assert report["series"][0]["modality"] == "CT" and report["series"][0]["key"].startswith("nouid-")
    volume = report["volume"]
    assert volume["shape_zyx"] == [20, 512, 512] and volume["orientation"] == "LPS"
    assert volume["dicom"]["files"] == 20 and volume["modality"] == "CT"


def test_folder_with_several_studies_lists_them_and_explains(shared_data, textsegment):
    code, out, _ = textsegment(shared_data / "dicom/pydicom_dicomdirtests/DICOMDIR", "--json")
    report = json.loads(out)
    assert code == 0
    assert len(report["series"]) == 13 and "volume" not in report
    assert "series_uid" in report["volume_error"]

    code, out, _ = textsegment(shared_data / "dicom/pydicom_dicomdirtests/DICOMDIR", "--series", CT5N_UID)
    assert code == 0 and "16 x 16 x 5 voxels" in out and "SmartScore" in out


def test_a_series_without_pixels_is_listed_as_no_image(shared_data, textsegment):
    """50 CT objects without Rows/Columns are listed, as nothing to read: 'no image', not a blank size."""
    code, out, _ = textsegment(shared_data / "dicom/pydicom_dicomdirtests")
    assert code == 0
    pixel_less = [line for line in out.splitlines() if "50 files" in line]
    assert len(pixel_less) == 1 and "no image" in pixel_less[0]
    assert all("no image" not in line for line in out.splitlines() if "16x16" in line)


def test_uneven_spacing_is_shown(shared_data, textsegment):
    code, out, _ = textsegment(shared_data / "dicom/monai_CT_DICOM_tiny")
    assert code == 0 and "uneven slice gaps" in out


def test_non_ct_is_described_not_refused(shared_data, textsegment):
    code, out, _ = textsegment(shared_data / "ct/totalseg_example_ct_sm/example_seg.nii.gz")
    assert code == 0 and "unknown (values do not look like HU)" in out and "(uint8)" in out


def _missing(folder):
    return folder / "missing.nii.gz"


def _empty_folder(folder):
    (folder / "empty").mkdir()
    return folder / "empty"


def _corrupt(folder):
    (folder / "garbage.nii.gz").write_bytes(b"\x00\xff" * 300)
    return folder / "garbage.nii.gz"


def _flat_png(folder):
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkUInt8), str(folder / "flat.png"))
    return folder / "flat.png"


def _nan_volume(folder):
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 1, 1] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / "nan.nii.gz"))
    return folder / "nan.nii.gz"


@pytest.mark.parametrize(
    "make, expected",
    [
        (_missing, "no such file"),
        (_empty_folder, "no readable DICOM files"),
        (_corrupt, "cannot read"),
        (_flat_png, "2D image"),
        (_nan_volume, "NaN"),
    ],
)
def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, monkeypatch, textsegment, make, expected):
    target = make(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.rglob("*"))

    code, out, err = textsegment(target)

    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("textsegment info: error: ")
    assert expected in err and str(target) in err
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unknown_series_is_an_error_not_a_note(shared_data, textsegment):
    code, out, err = textsegment(shared_data / "dicom/pydicom_CT_small", "--series", "1.2.3")
    assert code == 2 and out == "" and "no series '1.2.3'" in err


def test_a_results_folder_says_which_label_is_which_prompt(tmp_path, textsegment):
    # `info OUT` said "no readable DICOM files in this folder": the prompts were in a JSON file only
    from TextSegmentLib.engine import SegmentationResult, SegmentationRun
    from TextSegmentLib.export import write_segmentation
    from TextSegmentLib.volume import Volume

    ct = Volume(np.zeros((2, 8, 8), np.int16), spacing=(1.0, 1.0, 2.0), source=str(tmp_path / "ct.nii.gz"))
    masks = [np.zeros((2, 8, 8), np.uint8) for _ in range(2)]
    masks[0][:, :4] = 1
    masks[1][1, 6:, 6:] = 1
    results = [SegmentationResult(prompt, ct.with_array(m.astype(np.float32)), ct.with_array(m))
               for prompt, m in zip(["liver", "left kidney"], masks)]
    write_segmentation(SegmentationRun(results, "cpu", 1, 0.0, 2, 0), out_dir=tmp_path / "out", model_name="wee")
    code, out, err = textsegment(tmp_path / "out")
    assert code == 0 and err == ""
    assert "TextSegment results (wee" in out and str(tmp_path / "ct.nii.gz") in out
    assert "label 1      'liver': 64 voxels" in out and "label 2      'left kidney': 4 voxels" in out
    assert "segmentation.seg.nrrd" in out
    code, out, _ = textsegment(tmp_path / "out", "--json")
    assert [e["prompt"] for e in json.loads(out)["results"]["labels"]] == ["liver", "left kidney"]
