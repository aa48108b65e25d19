"""`textsegment batch` as a user meets it from a shell: real series copied into study folders of the kinds
people have (a file cut short by a copy, --out inside the study, a rerun with --overwrite)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from test_study_batch import HUThresholdModel

from TextSegmentLib.errors import OutputExistsError
from TextSegmentLib.study_batch import REPORT, SEG_FILE, segment_study


def _study_with_cut_file(shared_data: Path, root: Path, *, keep: int) -> Path:
    """The dcmqi CT slices beside a copy of one real slice cut after ``keep`` bytes (an interrupted copy)."""
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "ct")
    source = shared_data / "dicom" / "totalseg_example_ct_dicom" / "series"
    cut = root / "copied" / sorted(p.name for p in source.iterdir())[0]  # no extension, as the scanner wrote it
    cut.parent.mkdir()
    cut.write_bytes((source / cut.name).read_bytes()[:keep])
    return cut


@pytest.mark.parametrize("keep", [300, 1000])  # cut in the file meta / in the dataset: pydicom reads both without error
def test_a_file_cut_inside_its_header_is_reported_as_corrupt_not_as_a_non_image_object(shared_data, tmp_path, keep):
    cut = _study_with_cut_file(shared_data, tmp_path / "study", keep=keep)
    out = tmp_path / "out"

    report = segment_study(tmp_path / "study", ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")

    saved = json.loads((out / REPORT).read_text())
    assert [c["file"] for c in saved["corrupt_files"]] == [str(cut)]
    assert "cut short" in saved["corrupt_files"][0]["error"]
    (skipped,) = [s for s in saved["series"] if s["status"] == "skipped"]
    assert str(cut) in skipped["error"] and "not an image series" not in skipped["error"]
    assert [s.status for s in report.series if s.files == 3] == ["ok"]  # the good series still ran


def test_overwrite_never_deletes_the_study_when_out_is_the_study_folder(shared_data, tmp_path):
    # the study's series folder has the very name batch gives the series' results ("01_ct")
    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "01_ct")
    before = {p.name: p.read_bytes() for p in (study / "01_ct").iterdir()}

    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="holds DICOM files of the study"):
            segment_study(study, ["bone"], output_dir=study, model=HUThresholdModel(), device="cpu", overwrite=overwrite)

    assert {p.name: p.read_bytes() for p in (study / "01_ct").iterdir()} == before
    assert not (study / REPORT).exists()


def test_overwrite_replaces_an_earlier_series_folder_but_not_a_folder_of_the_user(shared_data, tmp_path):
    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "ct")
    out = tmp_path / "out"
    (out / "01_ct").mkdir(parents=True)
    (out / "01_ct" / "my_notes.txt").write_text("reading notes")

    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not an earlier batch's series folder"):
            segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=overwrite)
    assert (out / "01_ct" / "my_notes.txt").read_text() == "reading notes"

    (out / "01_ct" / "my_notes.txt").unlink()
    (out / "01_ct").rmdir()
    segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    again = segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=True)
    assert again.series[0].status == "ok" and (out / "01_ct" / SEG_FILE).is_file()  # an earlier result is replaced


def test_the_dicom_seg_says_which_weights_and_threshold_made_it(shared_data, tmp_path):
    # a SEG sent to a PACS travels without segmentation.json: random weights must not pass for the shipped ones
    import pydicom

    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "ct")
    out = tmp_path / "out"

    report = segment_study(study, ["liver"], output_dir=out, model="freqmedclip-tiny", weights="random",
                           device="cpu", threshold=0.4)

    seg = pydicom.dcmread(out / report.series[0].folder / SEG_FILE)
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    parameters = dict(item.split("=", 1) for item in algorithm.AlgorithmParameters.split(","))
    assert parameters["model"] == "freqmedclip-tiny"
    assert parameters["weights"] == "random" and parameters["threshold"] == "0.4"


def test_ctrl_c_is_reported_as_a_cancel_not_as_skipped_series(shared_data, tmp_path):
    from TextSegmentLib.study_batch import _read

    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "a")
    shutil.copytree(shared_data / "dicom" / "monai_CT_DICOM_tiny", study / "b")
    out = tmp_path / "out"
    calls = []

    def reader(series):
        calls.append(series.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _read(series, source=study)

    with pytest.raises(KeyboardInterrupt):
        segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", reader=reader)

    saved = json.loads((out / REPORT).read_text())
    assert saved["cancelled"] is True
    assert [s["status"] for s in saved["series"]] == ["ok", "cancelled"]
    assert "Ctrl-C" in saved["series"][1]["error"] and saved["series"][1]["folder"] is None
    assert (out / saved["series"][0]["folder"] / SEG_FILE).is_file()  # the finished series stays


def test_report_and_summary_name_where_each_series_lies(shared_data, tmp_path, capsys):
    # anonymised series have "nouid-…" keys and no description: only the path tells the user which one it was
    from TextSegmentLib.cli import main

    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "rtutils_mock_ct_rtstruct", study / "rt")
    shutil.copytree(shared_data / "dicom" / "lungmask_minimal_header", study / "no_modality")
    out = tmp_path / "out"

    code = main(["batch", str(study), "-p", "liver", "--out", str(out), "--model", "freqmedclip-tiny",
                 "--weights", "random", "--device", "cpu", "--no-dicom-seg", "-q"])

    assert code == 0
    sources = {s["status"] + " " + s["source"] for s in json.loads((out / REPORT).read_text())["series"]}
    assert sources == {f"skipped {study / 'rt' / 'rt.dcm'}", f"ok {study / 'rt'}", f"ok {study / 'no_modality'}"}
    printed = capsys.readouterr().out
    assert f"({study / 'rt' / 'rt.dcm'}): a RTSTRUCT object" in printed
    assert f"({study / 'no_modality'}): 'liver'" in printed


def test_overwrite_reruns_into_an_out_folder_inside_the_study(shared_data, tmp_path):
    # the earlier run's seg.dcm is then found in the study (a SEG object, skipped) and its folder is still replaced
    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "ct")
    out = study / "results"
    segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")

    again = segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=True)

    assert sorted((s.modality, s.status) for s in again.series) == [("CT", "ok"), ("SEG", "skipped")]
    assert sorted(p.name for p in (study / "ct").iterdir()) == ["01.dcm", "02.dcm", "03.dcm"]


def test_a_cut_first_file_does_not_skip_the_rest_of_its_series(shared_data, tmp_path):
    # discovery judges a series by its first file: cut there (before Rows), it once skipped the whole series
    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "ct")
    first = study / "ct" / "01.dcm"
    data = first.read_bytes()
    first.chmod(0o644)
    first.write_bytes(data[:data.find(bytes.fromhex("28001000"))])  # (0028,0010) Rows
    out = tmp_path / "out"

    report = segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")

    (series,) = report.series
    assert series.status == "ok" and series.files == 2
    assert any(str(first) in w and "cut short" in w for w in series.warnings)
    assert [c["file"] for c in report.corrupt_files] == [str(first)]
    import pydicom

    seg = pydicom.dcmread(out / series.folder / SEG_FILE)
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {pydicom.dcmread(study / "ct" / n).SOPInstanceUID for n in ("02.dcm", "03.dcm")}


def test_a_rerun_names_the_earlier_series_folders_it_did_not_replace(shared_data, tmp_path, capsys):
    # the user drops a series from the study and runs again with --overwrite: its old folder must not pass for new
    from TextSegmentLib.cli import main

    study = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", study / "a")
    shutil.copytree(shared_data / "dicom" / "monai_CT_DICOM_tiny", study / "b")
    out = tmp_path / "out"
    first = segment_study(study, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    dropped = next(s.folder for s in first.series if s.source == str(study / "b"))
    shutil.rmtree(study / "b")

    code = main(["batch", str(study), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu",
                 "--no-dicom-seg", "--overwrite", "-q"])

    # the kept series is now number 01, so its old folder (02_ct) is stale too, beside the dropped one's
    earlier = sorted(s.folder for s in first.series)
    assert code == 0 and (out / dropped).is_dir() and dropped in earlier  # kept: it is not this run's to delete
    assert json.loads((out / REPORT).read_text())["earlier_folders"] == earlier
    assert f"warning: {', '.join(earlier)}: series folder(s) of an earlier run" in capsys.readouterr().out


def test_a_batch_that_segmented_nothing_does_not_exit_0(shared_data, tmp_path, capsys):
    # no Modality tag and values far from HU: found as a CT candidate, refused when read; nothing written
    import pydicom

    from TextSegmentLib.cli import main

    study = tmp_path / "study"
    study.mkdir()
    for file in sorted((shared_data / "dicom" / "dcmqi_ct3slice" / "series").iterdir()):
        ds = pydicom.dcmread(file)
        del ds.Modality
        ds.RescaleIntercept = float(ds.get("RescaleIntercept", 0)) + 5000
        ds.save_as(study / file.name)
    out = tmp_path / "out"

    code = main(["batch", str(study), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu", "-q"])

    (series,) = json.loads((out / REPORT).read_text())["series"]
    assert series["status"] == "skipped" and "Hounsfield" in series["error"]
    assert code == 1 and "0 series done, 0 failed" in capsys.readouterr().out


def test_a_series_described_without_latin_letters_gets_a_folder_named_by_its_modality(shared_data, tmp_path):
    import pydicom

    study = tmp_path / "study"
    study.mkdir()
    for file in sorted((shared_data / "dicom" / "dcmqi_ct3slice" / "series").iterdir()):
        ds = pydicom.dcmread(file)
        ds.SpecificCharacterSet, ds.SeriesDescription = "ISO_IR 192", "胸部"
        ds.save_as(study / file.name)

    report = segment_study(study, ["bone"], output_dir=tmp_path / "out", model=HUThresholdModel(), device="cpu")

    assert [s.folder for s in report.series] == ["01_ct"]  # was "01_prompt", the slug of a prompt
