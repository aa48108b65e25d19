"""A clinician's first `textsegment segment` and `textsegment demo` on their own CT: the mistakes they make."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from TextSegmentLib.cli import main
from TextSegmentLib.phantom import make_phantom, save_phantom

SERIES = "dicom/totalseg_example_ct_dicom/series"


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    save_phantom(make_phantom(seed=1, shape=(4, 48, 48)), folder)
    return folder / "ct.nii.gz"


def segment(ct, out, *extra):
    return main(["segment", str(ct), "-p", "liver", "-p", "spleen", "--out", str(out), "--weights", "random",
                 "--device", "cpu", "--quiet", *extra])


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_overwrite_keeps_a_users_own_segmentation_file(ct, tmp_path, capsys):
    """TotalSegmentator also writes segmentation.nii.gz: --overwrite replaced it though no TextSegment run wrote it."""
    case = tmp_path / "case"
    case.mkdir()
    shutil.copy(ct, case / "ct.nii.gz")
    theirs = case / "segmentation.nii.gz"
    theirs.write_bytes(b"the user's own segmentation")
    assert segment(case / "ct.nii.gz", case, "--overwrite") != 0
    assert theirs.read_bytes() == b"the user's own segmentation"
    err = capsys.readouterr().err
    assert "no TextSegment run wrote" in err and len(err.strip().splitlines()) == 1
    assert files_under(case) == ["ct.nii.gz", "segmentation.nii.gz"]


def test_overwrite_still_replaces_an_earlier_run(ct, tmp_path):
    out = tmp_path / "seg"
    assert segment(ct, out) == 0
    assert segment(ct, out, "--overwrite", "--threshold", "0.3") == 0
    assert json.loads((out / "segmentation.json").read_text())["settings"]["threshold"] == 0.3


def test_ctrl_c_while_writing_leaves_no_partial_output(ct, tmp_path, monkeypatch, capsys):
    """Ctrl-C between two files left a label map without its legend, and the rerun was refused."""
    import TextSegmentLib.saliency as saliency

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saliency, "write_saliency", interrupted)  # after the label map, legend and maps
    out = tmp_path / "new" / "seg"
    assert segment(ct, out, "--saliency") == 130
    assert not (tmp_path / "new").exists()  # the folders this run made are gone too
    err = capsys.readouterr().err.strip()
    assert err == f"textsegment segment: interrupted; nothing of this run was written to {out}"
    monkeypatch.undo()
    assert segment(ct, out) == 0  # and the rerun is not refused


def test_ctrl_c_with_overwrite_keeps_the_earlier_run_whole(ct, tmp_path, monkeypatch):
    import TextSegmentLib.saliency as saliency

    out = tmp_path / "seg"
    assert segment(ct, out) == 0
    before = {name: (out / name).read_bytes() for name in files_under(out) if (out / name).is_file()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saliency, "write_saliency", interrupted)
    main(["segment", str(ct), "-p", "kidneys", "--out", str(out), "--weights", "random", "--device", "cpu",
          "--quiet", "--overwrite", "--saliency"])
    assert {name: (out / name).read_bytes() for name in files_under(out) if (out / name).is_file()} == before


def test_unwritable_out_is_refused_before_the_run(ct, tmp_path, monkeypatch, capsys):
    """A file in the way of --out, or a read-only folder, was found only after the whole CT was segmented."""
    import TextSegmentLib.engine as engine

    ran = []
    real_segment = engine.segment
    monkeypatch.setattr(engine, "segment", lambda *a, **k: ran.append(1) or real_segment(*a, **k))
    (tmp_path / "notes.txt").write_text("mine")
    assert segment(ct, tmp_path / "notes.txt" / "seg") == 2
    assert "is a file" in capsys.readouterr().err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **k: str(path) != str(tmp_path / "ro") and real_access(path, mode, **k))
    (tmp_path / "ro").mkdir()
    assert segment(ct, tmp_path / "ro") == 2
    assert "no write permission" in capsys.readouterr().err
    assert ran == []
    assert (tmp_path / "notes.txt").read_text() == "mine" and files_under(tmp_path / "ro") == []


def test_summary_says_which_label_value_is_which_prompt_and_names_the_files(ct, tmp_path, capsys):
    """The label map holds numbers only; the summary said "'spleen': N voxels" and "wrote 4 files to DIR"."""
    out = tmp_path / "seg"
    assert segment(ct, out) == 0
    text = capsys.readouterr().out
    assert "label 1 'liver'" in text and "label 2 'spleen'" in text
    assert str(out / "segmentation.nii.gz") in text and str(out / "segmentation.json") in text
    assert str(out / "probabilities") in text


def test_one_dicom_file_of_a_series_is_read_alone_with_a_warning(shared_data, tmp_path, caplog):
    """A user who points at one file of a 20-slice series got a one-slice result without a word."""
    from TextSegmentLib.io import read_volume

    series = shared_data / SERIES
    one = sorted(series.iterdir())[0]
    with caplog.at_level("WARNING"):
        volume = read_volume(one)
    assert volume.shape[0] == 1
    assert "19 more DICOM file(s)" in caplog.text and str(series) in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_volume(shared_data / "dicom" / "pydicom_CT_small" / "CT_small.dcm")  # alone in its folder
    assert "more DICOM file" not in caplog.text


def test_demo_overwrite_keeps_a_case_folder_that_holds_no_demo(ct, tmp_path, capsys, monkeypatch):
    """`demo --input CT --out CASE_FOLDER --overwrite` would write over the user's index.html or montage_01.png."""
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    case = tmp_path / "case"
    case.mkdir()
    shutil.copy(ct, case / "ct.nii.gz")
    (case / "index.html").write_text("the user's page")
    code = main(["demo", "--input", str(case / "ct.nii.gz"), "--out", str(case), "--overwrite", "--quiet",
                 "--weights", "random", "--device", "cpu", "-p", "liver"])
    assert code == 2
    assert "holds no earlier demo" in capsys.readouterr().err
    assert (case / "index.html").read_text() == "the user's page"
    assert files_under(case) == ["ct.nii.gz", "index.html"]


def test_demo_ctrl_c_leaves_no_partial_demo(ct, tmp_path, monkeypatch, capsys):
    import TextSegmentLib.saliency as saliency

    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(saliency, "save_montage", interrupted)  # after the segmentation and saliency files
    out = tmp_path / "demo"
    code = main(["demo", "--input", str(ct), "--out", str(out), "--quiet", "--weights", "random",
                 "--device", "cpu", "-p", "liver"])
    assert code == 130
    assert not out.exists()
    assert capsys.readouterr().err.strip() == f"textsegment demo: interrupted; nothing of this run was written to {out}"


def test_demo_rerun_with_fewer_prompts_names_the_earlier_files_left(ct, tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    out = tmp_path / "demo"
    common = ["--input", str(ct), "--out", str(out), "--quiet", "--weights", "random", "--device", "cpu"]
    assert main(["demo", *common, "-p", "liver", "-p", "spleen"]) == 0
    with caplog.at_level("WARNING"):
        assert main(["demo", *common, "-p", "liver", "--overwrite"]) == 0
    assert "not replaced" in caplog.text and "montage_02.png" in caplog.text
    assert (out / "montage_01.png").is_file()
    assert str(out / "segmentation") in capsys.readouterr().out


def test_legend_names_the_ct_by_its_absolute_path(ct, tmp_path, monkeypatch):
    """Run from the CT's folder, the legend said "source": "ct.nii.gz": nothing to find the CT by later."""
    monkeypatch.chdir(ct.parent)
    out = tmp_path / "seg"
    assert main(["segment", "ct.nii.gz", "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu",
                 "--quiet"]) == 0
    assert json.loads((out / "segmentation.json").read_text())["source"] == str(ct.resolve())


def test_ctrl_c_while_the_finished_files_move_in_waits_for_all_of_them(tmp_path, monkeypatch, caplog):
    import signal

    import TextSegmentLib.io.writers as writers

    real_replace, calls = os.replace, []

    def replace_then_ctrl_c(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # handled at once, in the middle of the moves
        real_replace(src, dst)

    monkeypatch.setattr(writers.os, "replace", replace_then_ctrl_c)
    out = tmp_path / "seg"
    try:
        with caplog.at_level("WARNING"), writers.staged_folder(out) as staging:
            (staging / "maps").mkdir()
            (staging / "maps" / "a.nii.gz").write_bytes(b"a")
            (staging / "legend.json").write_text("{}")
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C broke off the moves: a map without its legend was left")
    assert files_under(out) == ["legend.json", "maps", "maps/a.nii.gz"]  # no staging folder left either
    assert [Path(c).name for c in calls] == ["a.nii.gz", "legend.json"]  # the legend last
    assert "Ctrl-C" in caplog.text


def test_overwrite_with_fewer_prompts_names_the_earlier_maps_left_behind(ct, tmp_path, capsys):
    """probabilities/02_spleen.nii.gz of the first run stayed, unnamed, beside a legend that has no spleen."""
    out = tmp_path / "seg"
    assert segment(ct, out) == 0
    capsys.readouterr()
    code = main(["segment", str(ct), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu",
                 "--quiet", "--overwrite"])
    assert code == 0
    text = capsys.readouterr().out
    assert "warning: 1 file(s) of an earlier run" in text and "02_spleen.nii.gz" in text
    assert "01_liver" not in text.split("warning:")[1].splitlines()[0]


def test_threshold_option_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--threshold THRESHOLD probability at or above which a voxel is in a prompt's mask" in help_text


def test_summary_says_when_the_label_map_holds_less_of_a_prompt_than_its_mask(ct, tmp_path, capsys):
    """"liver tumor" inside "liver": the viewer shows fewer voxels than the summary's volume, without a word why."""
    out = tmp_path / "seg"
    assert segment(ct, out) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("label ")]
    entries = json.loads((out / "segmentation.json").read_text())["labels"]
    shared = [e for e in entries if e["label_map_voxels"] < e["voxels"]]
    assert shared, "the random model's two masks should overlap"
    for entry, line in zip(entries, lines):
        said = f"({entry['label_map_voxels']} in the label map" in line
        assert said == (entry in shared), line


def test_a_few_voxels_are_not_printed_as_zero_ml(ct, tmp_path, capsys, monkeypatch):
    """"'brain': 9 voxels, 0.0 ml" on an abdominal CT: found or not? The volume must not read as nothing."""
    from TextSegmentLib.cli import segment as cli_segment

    result = type("R", (), {"prompt": "brain", "voxels": 9, "volume_ml": 0.0172})()
    run_ = type("Run", (), {"results": [result], "seconds": 1.0, "device": "cpu"})()
    (tmp_path / "segmentation.json").write_text(json.dumps({"labels": [{"label": 1, "label_map_voxels": 9}]}))
    cli_segment.print_summary(run_, out_dir=tmp_path, files=3, saliency=False)
    assert "label 1 'brain': 9 voxels, 0.017 ml" in capsys.readouterr().out


@pytest.mark.parametrize("name, says", [("ct.nii", "ct.nii.gz"), ("ct_export", "ct_export.nii.gz")])
def test_a_compressed_nifti_under_the_wrong_name_is_named_as_nifti(ct, tmp_path, capsys, name, says):
    """A .nii.gz saved as .nii (or with no extension) got "cannot read this image ...; use NIfTI": it is NIfTI."""
    shutil.copy(ct, tmp_path / name)
    assert segment(tmp_path / name, tmp_path / "seg") == 2
    err = capsys.readouterr().err.strip()
    assert "holds gzip-compressed NIfTI data" in err and f"rename it (e.g. {says})" in err
    assert len(err.splitlines()) == 1 and not (tmp_path / "seg").exists()


def test_an_uncompressed_nifti_without_extension_and_a_text_file(ct, tmp_path):
    import gzip

    from TextSegmentLib.errors import InputError
    from TextSegmentLib.io import read_volume

    (tmp_path / "plain").write_bytes(gzip.decompress(ct.read_bytes()))
    with pytest.raises(InputError, match=r"holds NIfTI data, but its name does not end in \.nii,"):
        read_volume(tmp_path / "plain")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="cannot read this image"):
        read_volume(tmp_path / "notes.txt")


def test_staged_outputs_still_never_replace_the_input(ct, tmp_path, capsys):
    """Files are now written in a hidden folder first: moving them in must still refuse to land on the CT."""
    out = tmp_path / "seg"
    assert segment(ct, out) == 0
    (out / "segmentation.nii.gz").unlink()
    shutil.copy(ct, out / "segmentation.nii.gz")  # the user's CT, under the label map's name, beside our legend
    before = (out / "segmentation.nii.gz").read_bytes()
    legend = (out / "segmentation.json").read_bytes()
    assert segment(out / "segmentation.nii.gz", out, "--overwrite") != 0
    assert "is an input of this run" in capsys.readouterr().err
    assert (out / "segmentation.nii.gz").read_bytes() == before and (out / "segmentation.json").read_bytes() == legend
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_demo_into_a_folder_holding_only_a_killed_runs_staging_folder_runs(ct, tmp_path, monkeypatch):
    """A demo killed outright (no Ctrl-C to clean up) leaves its hidden staging folder: the folder is not the
    user's, so the next demo there was refused as 'not empty' and, with --overwrite, as 'holds no earlier demo'."""
    from TextSegmentLib.io.writers import STAGING_PREFIX

    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    out = tmp_path / "demo"
    (out / f"{STAGING_PREFIX}dead").mkdir(parents=True)
    code = main(["demo", "--input", str(ct), "--out", str(out), "--quiet", "--weights", "random", "--device", "cpu",
                 "-p", "liver"])
    assert code == 0 and (out / "index.html").is_file()
