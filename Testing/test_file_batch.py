"""Batch over CT volume files: a TotalSegmentator-style folder (``s0011/ct.nii.gz``, ...) with a bad file and a
label map among the CTs, one folder per file, the model loaded once.

The files are small phantoms written here; the model is the HU-threshold model of the DICOM batch tests
(its answer follows from the HU values, no training), or freqmedclip-tiny with random weights for the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_study_batch import HUThresholdModel

from TextSegmentLib.cli import main
from TextSegmentLib.errors import Cancelled, InputError, OutputExistsError
from TextSegmentLib.file_batch import case_names, exit_code, segment_files
from TextSegmentLib.phantom import make_phantom, save_phantom
from TextSegmentLib.progress import CancelToken
from TextSegmentLib.study_batch import REPORT

PROMPTS = ["bone", "enhancing tissue"]
CASE_FILES = ["segmentation.nii.gz", "segmentation.json", "segmentation.seg.nrrd", "probabilities/01_bone.nii.gz"]


def _dataset(root: Path, *, cases: int = 2) -> dict[str, Path]:
    """``root/s0011/ct.nii.gz``, ``root/s0012/ct.nii.gz``, ... as TotalSegmentator lays them out, each beside
    its label map; plus ``s0099/ct.nii.gz``, a copy of the first cut in half (an interrupted download)."""
    files = {}
    for n in range(cases):
        folder = root / f"s00{11 + n}"
        save_phantom(make_phantom(seed=n + 1, shape=(6, 64, 64)), folder, prompts=[])
        files[folder.name] = folder / "ct.nii.gz"
    files["labels"] = root / "s0011" / "labels.nii.gz"
    cut = root / "s0099" / "ct.nii.gz"
    cut.parent.mkdir()
    whole = files["s0011"].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    files["cut"] = cut
    return files


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("dataset") / "data"
    files = _dataset(root)
    out = tmp_path_factory.mktemp("batch") / "out"
    seen = []
    paths = [files["s0011"], files["s0012"], files["cut"], files["labels"]]
    report = segment_files(paths, PROMPTS, output_dir=out, model=HUThresholdModel(), model_name="hu-threshold",
                           device="cpu", saliency=True, progress=lambda f, m: seen.append((f, m)))
    return report, out, files, seen


def test_good_files_are_done_and_the_corrupt_file_and_the_label_map_reported(batch):
    report, out, files, seen = batch
    by = {case.source: case for case in report.cases}
    assert [by[str(files[k])].status for k in ("s0011", "s0012", "cut", "labels")] == ["ok", "ok", "failed", "skipped"]
    cut, labels = by[str(files["cut"])], by[str(files["labels"])]
    assert "truncated or corrupt" in cut.error and str(files["cut"]) in cut.error
    assert "not CT" in labels.error and "Hounsfield" in labels.error
    assert cut.folder is None and labels.folder is None
    assert exit_code(report) == 1  # a failed file: a script must not go on as if all were done

    # only the finished cases have folders: nothing of the failed ones, no hidden staging folder
    assert sorted(p.name for p in out.iterdir()) == [REPORT, "s0011_ct", "s0012_ct"]
    for key, name in (("s0011", "s0011_ct"), ("s0012", "s0012_ct")):
        case = by[str(files[key])]
        assert case.folder == name and [p["prompt"] for p in case.prompts] == PROMPTS
        folder = out / name
        for file in [*CASE_FILES, "saliency/saliency_legend.json", "saliency/01_bone/combined.nii.gz"]:
            assert (folder / file).is_file(), f"{name}/{file}"
        assert sorted(case.outputs) == sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        legend = json.loads((folder / "segmentation.json").read_text())
        assert legend["source"] == str(files[key].resolve()) and legend["model"] == "hu-threshold"
    # each folder holds its own file's result, not a neighbour's
    assert by[str(files["s0011"])].prompts != by[str(files["s0012"])].prompts

    saved = json.loads((out / REPORT).read_text())
    assert saved["summary"] == {"ok": 2, "failed": 1, "skipped": 1, "cancelled": 0}
    assert [(c["name"], c["status"], c["folder"]) for c in saved["cases"]] == [
        ("s0011_ct", "ok", "s0011_ct"), ("s0012_ct", "ok", "s0012_ct"),
        ("s0099_ct", "failed", None), ("s0011_labels", "skipped", None)]
    assert saved["model"] == "hu-threshold" and saved["prompts"] == PROMPTS and saved["cancelled"] is False
    assert saved["common_folder"] == str(files["s0011"].parent.parent)

    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("case 2/4 (s0012_ct)") for _, m in seen)


def test_case_names_are_the_paths_below_the_common_folder_and_never_clash():
    assert case_names(["data/s0011/ct.nii.gz", "data/s0012/ct.nii.gz"]) == ["s0011_ct", "s0012_ct"]
    assert case_names(["data/a.nii.gz", "data/b.nrrd", "data/c.mha", "data/d.nii"]) == ["a", "b", "c", "d"]
    assert case_names(["/scans/one.nii.gz"]) == ["one"]
    # slugs alike ("a-b", "a_b"), one suffix dropped beside another, the same name in another case
    assert case_names(["x/a-b.nii.gz", "x/a_b.nrrd", "x/A_B.mha", "x/a_b_2.nii"]) == ["a_b", "a_b_2", "a_b_3", "a_b_2_2"]
    assert case_names(["x/ct.nii", "x/ct.nii.gz"]) == ["ct", "ct_2"]
    assert case_names(["data/胸部.nii.gz"]) == ["case"]


def test_the_model_is_loaded_once_for_all_files(tmp_path, monkeypatch):
    import TextSegmentLib.weights as weights

    loads = []

    def load_model(name, **options):
        loads.append(name)
        return HUThresholdModel()

    monkeypatch.setattr(weights, "load_model", load_model)
    files = _dataset(tmp_path / "data", cases=3)
    good = [files["s0011"], files["s0012"], files["s0013"]]
    report = segment_files([*good, files["cut"]], ["bone"], output_dir=tmp_path / "out", model="hu-threshold",
                           device="cpu")
    assert loads == ["hu-threshold"]
    assert [c.status for c in report.cases] == ["ok", "ok", "ok", "failed"]

    again = segment_files(good, ["bone"], output_dir=tmp_path / "out2", model="hu-threshold", device="cpu")
    assert len(loads) == 2 and exit_code(again) == 0


def test_overwrite_replaces_an_earlier_case_folder_but_never_a_folder_of_the_user(tmp_path):
    files = _dataset(tmp_path / "data")
    paths = [files["s0011"], files["s0012"]]
    out = tmp_path / "out"
    (out / "s0011_ct").mkdir(parents=True)
    (out / "s0011_ct" / "my_notes.txt").write_text("reading notes")
    (out / "s0012_ct").mkdir()  # another tool's results, with a legend of the same name but not ours
    (out / "s0012_ct" / "segmentation.json").write_text('{"labels": {"1": "liver"}}')

    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="s0011_ct: is in the way .* no earlier TextSegment run"):
            segment_files(paths, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=overwrite)
    (out / "s0011_ct" / "my_notes.txt").unlink()
    (out / "s0011_ct").rmdir()
    with pytest.raises(OutputExistsError, match="s0012_ct: is in the way"):
        segment_files(paths, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=True)
    assert (out / "s0012_ct" / "segmentation.json").read_text() == '{"labels": {"1": "liver"}}'
    assert sorted(p.name for p in out.iterdir()) == ["s0012_ct"]  # no report: refused before any work

    (out / "s0012_ct" / "segmentation.json").unlink()
    (out / "s0012_ct").rmdir()
    segment_files(paths, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    with pytest.raises(OutputExistsError, match="holds batch results already .*--overwrite"):
        segment_files(paths, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    (out / "s0011_ct" / "stale.txt").write_text("left by the earlier run")
    again = segment_files(paths, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu", overwrite=True)
    assert [c.status for c in again.cases] == ["ok", "ok"]
    assert not (out / "s0011_ct" / "stale.txt").exists()  # the earlier case folder was replaced whole


def test_overwrite_never_replaces_a_folder_holding_an_input(tmp_path):
    # with --out at the dataset, the case "x_ct" of data/x/ct.nii.gz is data/x_ct: where another input lies
    files = _dataset(tmp_path / "data")
    data = tmp_path / "data"
    (data / "x").mkdir()
    (data / "x_ct").mkdir()
    first = (data / "x" / "ct.nii.gz")
    first.write_bytes(files["s0011"].read_bytes())
    inside = data / "x_ct" / "ct.nii.gz"
    inside.write_bytes(files["s0012"].read_bytes())
    earlier = tmp_path / "earlier"  # and a TextSegment legend beside it, as if an earlier run had written there
    segment_files([files["s0011"]], ["bone"], output_dir=earlier, model=HUThresholdModel(), device="cpu")
    legend = earlier / "ct" / "segmentation.json"  # a lone file's case is named after it alone
    (data / "x_ct" / "segmentation.json").write_bytes(legend.read_bytes())
    before = _tree(data)

    assert case_names([first, inside]) == ["x_ct", "x_ct_ct"]
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match=r"x_ct: holds .*ct\.nii\.gz, an input of this batch"):
            segment_files([first, inside], ["bone"], output_dir=data, model=HUThresholdModel(), device="cpu",
                          overwrite=overwrite)
    assert _tree(data) == before


def test_cancel_keeps_finished_cases_and_leaves_no_partial_folder(tmp_path):
    files = _dataset(tmp_path / "data", cases=3)
    out = tmp_path / "out"
    token = CancelToken()
    seen = []

    def progress(fraction, message):
        seen.append(message)
        if message.startswith("case 2/3") and not message.endswith("reading"):  # half-way through its slices
            token.cancel()

    with pytest.raises(Cancelled) as raised:
        segment_files([files["s0011"], files["s0012"], files["s0013"]], ["bone"], output_dir=out,
                      model=HUThresholdModel(), device="cpu", batch_size=1, progress=progress, cancel=token)
    # it said "no output was written" (the engine's word for one case): a notebook took the finished case for lost
    kept = f"cancelled by the user; the 1 case(s) finished before were kept; report: {out / REPORT}"
    assert str(raised.value) == kept

    assert any(m.startswith("case 2/3") and not m.endswith("reading") for m in seen)
    saved = json.loads((out / REPORT).read_text())
    assert saved["cancelled"] is True
    assert [(c["status"], c["folder"]) for c in saved["cases"]] == [
        ("ok", "s0011_ct"), ("cancelled", None), ("cancelled", None)]
    assert "cancelled by the user" in saved["cases"][1]["error"]
    assert sorted(p.name for p in out.iterdir()) == [REPORT, "s0011_ct"]  # no partial or hidden folder


def test_ctrl_c_is_reported_as_a_cancel(tmp_path):
    from TextSegmentLib.io import read_volume

    files = _dataset(tmp_path / "data")
    out = tmp_path / "out"

    def reader(path):
        if path == files["s0012"]:
            raise KeyboardInterrupt
        return read_volume(path)

    with pytest.raises(KeyboardInterrupt):
        segment_files([files["s0011"], files["s0012"]], ["bone"], output_dir=out, model=HUThresholdModel(),
                      device="cpu", reader=reader)
    saved = json.loads((out / REPORT).read_text())
    assert saved["cancelled"] is True and [c["status"] for c in saved["cases"]] == ["ok", "cancelled"]
    assert "Ctrl-C" in saved["cases"][1]["error"]
    assert sorted(p.name for p in out.iterdir()) == [REPORT, "s0011_ct"]


def test_paths_that_are_no_volume_file_are_refused_before_any_work_or_reported(shared_data, tmp_path):
    files = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    for paths, message in (([files["s0011"], tmp_path / "data" / "s0077" / "ct.nii.gz"], "no such file"),
                           ([files["s0011"], tmp_path / "data" / "s0012"], "is a folder"),
                           ([files["s0011"], tmp_path / "data" / "s0012" / ".." / "s0011" / "ct.nii.gz"], "given twice"),
                           ([], "no volume files")):
        with pytest.raises(InputError, match=message):
            segment_files(paths, ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    assert not out.exists()

    # a DICOM file among them is one slice of a series: reported, not segmented as a volume
    dicom = shared_data / "dicom" / "dcmqi_ct3slice" / "series" / "01.dcm"
    report = segment_files([files["s0011"], dicom], ["bone"], output_dir=out, model=HUThresholdModel(), device="cpu")
    assert [c.status for c in report.cases] == ["ok", "failed"]
    assert "a DICOM file, not a volume file" in report.cases[1].error


# command line ------------------------------------------------------------------------------------
def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("textsegment batch: error:") and len(err.splitlines()) == 1, err
    return err


def test_cli_batches_files_and_exits_1_when_one_failed(tmp_path, capsys):
    files = _dataset(tmp_path / "data")
    out = tmp_path / "out"
    code = main(["batch", str(files["s0011"]), str(files["s0012"]), str(files["cut"]), str(files["labels"]),
                 "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu", "-q"])
    assert code == 1
    saved = json.loads((out / REPORT).read_text())
    assert saved["summary"] == {"ok": 2, "failed": 1, "skipped": 1, "cancelled": 0}
    assert saved["model"] == "freqmedclip-tiny" and saved["weights"] == "random"
    for name in ("s0011_ct", "s0012_ct"):
        assert all((out / name / f).is_file() for f in CASE_FILES[:3])
        assert not (out / name / "seg.dcm").exists()  # no DICOM images to reference
    printed = capsys.readouterr().out.splitlines()
    assert f"ok      s0011_ct ({files['s0011']}): 'liver'" in printed[0]
    assert printed[2].startswith(f"failed  s0099_ct ({files['cut']}): truncated or corrupt")
    assert printed[3].startswith(f"skipped s0011_labels ({files['labels']}): not CT")
    assert printed[-1] == f"2 file(s) done, 1 failed, 1 skipped; report: {out / REPORT}"
    assert main(["info", str(out)]) == 0  # it listed no case: info read the DICOM batch's keys only
    told = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(told) if line.startswith("TextSegment batch of"))
    assert told[head].startswith(f"TextSegment batch of the files in {tmp_path / 'data'} (freqmedclip-tiny, weights random)")
    assert told[head + 2].split() == ["ok", "s0011_ct", str(files["s0011"])]
    assert told[head + 4].split()[:3] == ["failed", "-", str(files["cut"]) + ":"]  # no folder: nothing written
    assert told[head + 4].count(str(files["cut"])) == 1  # the error's own copy of the path is not repeated


def test_cli_on_a_folder_of_nifti_files_says_to_pass_the_files(tmp_path, capsys):
    data = tmp_path / "data"
    for n in (11, 12):
        save_phantom(make_phantom(seed=n, shape=(4, 32, 32)), data / f"s00{n}", prompts=[])
        (data / f"s00{n}" / "labels.nii.gz").unlink()
    out = tmp_path / "out"
    code = main(["batch", str(data), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu", "-q"])
    err = _error_line(capsys)
    assert code == 2 and "holds no DICOM files but 2 volume file(s)" in err
    assert f"textsegment batch {data}/*/ct.nii.gz -p" in err
    assert not out.exists()


def test_cli_refuses_a_folder_among_files_and_two_studies(shared_data, tmp_path, capsys):
    files = _dataset(tmp_path / "data")
    study = shared_data / "dicom" / "dcmqi_ct3slice" / "series"
    out = tmp_path / "out"
    code = main(["batch", str(study), str(files["s0011"]), "-p", "liver", "--out", str(out), "-q"])
    err = _error_line(capsys)
    assert code == 2 and f"{study}: a folder among 1 file(s)" in err and "not both" in err
    code = main(["batch", str(study), str(study.parent), "-p", "liver", "--out", str(out), "-q"])
    assert code == 2 and "one study at a time" in _error_line(capsys)
    assert not out.exists()


def test_cli_names_a_pattern_that_matched_no_file(tmp_path, capsys):
    """The shell passes an unmatched `data/*/ct.nii.gz` on as it is: it was called "no such file or folder"."""
    code = main(["batch", str(tmp_path / "data" / "*" / "ct.nii.gz"), "-p", "liver", "--out", str(tmp_path / "out"),
                 "--weights", "random", "-q"])
    assert code == 2
    assert f"{tmp_path / 'data' / '*' / 'ct.nii.gz'}: no file matches this pattern" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_label_map_is_skipped_without_naming_an_option_batch_has_not(tmp_path, capsys):
    """The skip said "To read it anyway pass ... (CLI: --allow-non-ct)": batch has no --allow-non-ct."""
    files = _dataset(tmp_path / "data", cases=1)
    code = main(["batch", str(files["s0011"]), str(files["labels"]), "-p", "liver", "--out", str(tmp_path / "out"),
                 "--weights", "random", "--device", "cpu", "-q"])
    assert code == 0
    skipped = json.loads((tmp_path / "out" / REPORT).read_text())["cases"][1]
    assert skipped["status"] == "skipped" and "Hounsfield" in skipped["error"]
    assert "allow" not in skipped["error"] and "allow" not in capsys.readouterr().out


def test_a_cancelled_dicom_batch_says_its_finished_series_were_kept(shared_data, tmp_path):
    """As for files: the DICOM batch's cancel said "no output was written" after a series was written."""
    import shutil

    from TextSegmentLib.study_batch import segment_study

    root = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", root / "a")
    shutil.copytree(shared_data / "dicom" / "monai_CT_DICOM_tiny", root / "b")
    token = CancelToken()
    with pytest.raises(Cancelled, match=r"the 1 series finished before were kept; report: .*batch_report\.json"):
        segment_study(root, ["bone"], output_dir=tmp_path / "out", model=HUThresholdModel(), device="cpu",
                      progress=lambda f, message: message.startswith("series 2/") and token.cancel(), cancel=token)


def test_cli_on_totalsegmentators_layout_names_the_pattern_of_its_cts(tmp_path, capsys):
    """With each case's segmentations/*.nii.gz below its ct.nii.gz, the error said to pass data/*.nii.gz:
    a pattern that matches nothing there."""
    data = tmp_path / "data"
    for n in (11, 12):
        save_phantom(make_phantom(seed=n, shape=(4, 32, 32)), data / f"s00{n}", prompts=[])
        (data / f"s00{n}" / "segmentations").mkdir()
        (data / f"s00{n}" / "labels.nii.gz").rename(data / f"s00{n}" / "segmentations" / "liver.nii.gz")
    code = main(["batch", str(data), "-p", "liver", "--out", str(tmp_path / "out"), "--weights", "random", "-q"])
    err = _error_line(capsys)
    assert code == 2 and f"textsegment batch {data}/*/ct.nii.gz -p" in err


def test_cli_on_a_folder_with_a_space_names_a_pattern_the_shell_can_take(tmp_path, capsys):
    """`textsegment batch my data/*/ct.nii.gz` as suggested is two arguments: the folder's name must be quoted."""
    import shlex

    data = tmp_path / "my data"
    for n in (11, 12):
        save_phantom(make_phantom(seed=n, shape=(4, 32, 32)), data / f"s00{n}", prompts=[])
        (data / f"s00{n}" / "labels.nii.gz").unlink()
    code = main(["batch", str(data), "-p", "liver", "--out", str(tmp_path / "out"), "--weights", "random", "-q"])
    err = _error_line(capsys)
    assert code == 2 and f"textsegment batch {shlex.quote(str(data))}/*/ct.nii.gz -p" in err


def test_info_lists_cancelled_cases_apart_and_the_earlier_folders():
    """"cancelled" ran into the folder column ("cancelled-") and the earlier run's folders were not named."""
    from TextSegmentLib.cli.info import _format_batch

    lines = _format_batch({"common_folder": "/data", "cases": [
        {"status": "cancelled", "folder": None, "source": "/data/s2/ct.nii.gz", "error": "interrupted (Ctrl-C)"}],
        "earlier_folders": ["s0099_ct"]})
    assert lines[2].split()[:2] == ["cancelled", "-"]
    assert lines[3].split()[:2] == ["earlier", "s0099_ct:"]
