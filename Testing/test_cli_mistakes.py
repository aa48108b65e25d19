"""A new user's obvious mistakes, command by command: one line on stderr, exit 2, before any long work,
and nothing the user had replaced (docs/usage.md, *Command line*)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from TextSegmentLib.cli import main
from TextSegmentLib.phantom import make_phantom, save_phantom

TINY = {"clip_source": "random:textsegment-vit-ti16-text32", "train_vision_tower": True, "train_text_tower": True}


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    save_phantom(make_phantom(seed=1, shape=(6, 64, 64)), folder)
    return folder / "ct.nii.gz"


@pytest.fixture()
def series(shared_data, tmp_path):
    """Three CT slices of one series, copied (a batch reads the whole folder)."""
    folder = tmp_path / "study"
    shutil.copytree(shared_data / "dicom" / "dcmqi_ct3slice" / "series", folder)
    return folder


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"textsegment {command}: error:") and len(err.splitlines()) == 1, err
    return err


def _recipe(folder, **fields):
    """A recipe small enough to train a step of in seconds."""
    path = folder / "tiny.json"
    base = {"model": "freqmedclip-tiny", "overrides": TINY, "sources": ["phantoms:3-4@6x64x64"],
            "val_sources": ["phantoms:5@6x64x64"], "steps": 1, "batch_size": 2, "warmup_steps": 1, "val_every": 1,
            "val_pairs_per_level": 2, "seed": 1, "out_dir": str(folder / "run")}
    path.write_text(json.dumps({**base, **fields}))
    return path


# batch -------------------------------------------------------------------------------------------
def test_batch_out_naming_a_file_is_refused_before_any_series(series, tmp_path, capsys):
    # every series used to run first, then the report's write crashed with a FileExistsError traceback
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    code = main(["batch", str(series), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu",
                 "--quiet"])
    assert code == 2 and "not a folder" in _one_line_error(capsys, "batch")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("option, message", [
    (["--threshold", "2"], "threshold must lie strictly between 0 and 1"),
    (["--batch-size", "0"], "batch size must be a positive integer"),
    (["--aux-prompt", "a", "--aux-prompt", "b"], "2 auxiliary prompt(s) for 1 prompt(s)"),
])
def test_batch_refuses_a_bad_option_once_before_any_series(option, message, series, tmp_path, capsys):
    # it used to fail every series with the same message, exit 1 and leave a batch_report.json
    out = tmp_path / "out"
    code = main(["batch", str(series), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu",
                 "--quiet", *option])
    assert code == 2 and message in _one_line_error(capsys, "batch")
    assert not out.exists()


# saliency options without --saliency ---------------------------------------------------------------
@pytest.mark.parametrize("command, option", [
    ("segment", ["--stage", "2"]),
    ("segment", ["--layers", "vit.3"]),
    ("segment", ["--saliency-grid", "source"]),
    ("batch", ["--stage", "2"]),
])
def test_saliency_options_without_saliency_are_refused_not_ignored(command, option, phantom_file, series, tmp_path,
                                                                   capsys):
    source = phantom_file if command == "segment" else series
    out = tmp_path / "out"
    code = main([command, str(source), "-p", "liver", "--out", str(out), "--weights", "random", "--device", "cpu",
                 "--quiet", *option])
    err = _one_line_error(capsys, command)
    assert code == 2 and option[0] in err and "--saliency" in err
    assert not out.exists()


def test_saliency_options_still_work_with_saliency(phantom_file, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet",
                 "--saliency", "--stage", "2", "--layers", "vit.11"]) == 0
    legend = json.loads((out / "saliency" / "saliency_legend.json").read_text())
    assert legend["stage"] == 2 and legend["layers"] == ["vit.11"]


@pytest.mark.parametrize("command", ["segment", "explain", "batch"])
def test_a_prompt_given_twice_is_refused_whatever_its_case_and_spacing(command, phantom_file, series, tmp_path,
                                                                        capsys):
    """Two labels of one prompt, the second map named 02_liver_: refused before any work, as Slicer drops repeats."""
    source = phantom_file if command != "batch" else series
    out = tmp_path / "out"
    code = main([command, str(source), "-p", "liver", "-p", "spleen", "-p", " Liver ", "--out", str(out),
                 "--weights", "random", "--device", "cpu", "--quiet"])
    err = _one_line_error(capsys, command)
    assert code == 2 and "given twice (prompts 1 and 3)" in err
    assert not out.exists()


# train and reproduce ----------------------------------------------------------------------------
def test_train_out_naming_a_file_is_refused_before_the_run(tmp_path, capsys):
    out = tmp_path / "run.txt"
    out.write_text("keep me")
    assert main(["train", "--config", str(_recipe(tmp_path)), "--out", str(out), "--threads", "1", "--quiet"]) == 2
    assert "not a folder" in _one_line_error(capsys, "train")
    assert out.read_text() == "keep me"


def test_train_into_an_earlier_run_without_resume_is_refused_and_its_state_kept(tmp_path, capsys):
    # it used to start again from step 0 and replace the earlier run's last.pt and best weights
    recipe = _recipe(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"hours of training")
    assert main(["train", "--config", str(recipe), "--threads", "1", "--quiet"]) == 2
    err = _one_line_error(capsys, "train")
    assert "--resume" in err and "--overwrite" in err
    assert (run / "last.pt").read_bytes() == b"hours of training"
    assert sorted(p.name for p in run.iterdir()) == ["last.pt"]


def test_train_export_that_exists_is_refused_before_the_run(tmp_path, capsys):
    # the run used to train first and refuse the export at the end, naming the API's overwrite=True
    export = tmp_path / "mine.safetensors"
    export.write_bytes(b"keep me")
    assert main(["train", "--config", str(_recipe(tmp_path)), "--threads", "1", "--quiet",
                 "--export", str(export)]) == 2
    assert "--overwrite" in _one_line_error(capsys, "train")
    assert export.read_bytes() == b"keep me" and not (tmp_path / "run").exists()


def test_train_export_naming_a_folder_is_refused_before_the_run(tmp_path, capsys):
    assert main(["train", "--config", str(_recipe(tmp_path)), "--threads", "1", "--quiet",
                 "--export", str(tmp_path)]) == 2
    assert "is a folder" in _one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_export_mix_without_weights_to_mix_with_names_the_option(tmp_path, capsys):
    # the message named only the recipe field init_weights, not the --init a CLI user would add
    assert main(["train", "--config", str(_recipe(tmp_path, export_mix=0.5)), "--threads", "1", "--quiet"]) == 2
    assert "--init" in _one_line_error(capsys, "train")
    assert not (tmp_path / "run").exists()


def test_train_export_without_validation_is_refused_before_the_run(tmp_path, capsys):
    # the run trained, then exported nothing without a word: the export is the best validated checkpoint
    export = tmp_path / "mine.safetensors"
    assert main(["train", "--config", str(_recipe(tmp_path, val_sources=[])), "--threads", "1", "--quiet",
                 "--export", str(export)]) == 2
    assert "needs validation data (--val" in _one_line_error(capsys, "train")
    assert not export.exists() and not (tmp_path / "run").exists()


def test_train_into_a_finished_run_whose_last_pt_was_deleted_is_refused(tmp_path, capsys):
    # with last.pt deleted to save space, the new run's first validation replaced the earlier run's best weights
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.safetensors").write_bytes(b"the weights of an earlier run")
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", str(_recipe(tmp_path)), "--threads", "1", "--quiet", *extra]) == 2
        assert "best.safetensors" in _one_line_error(capsys, "train")
    assert sorted(p.name for p in run.iterdir()) == ["best.safetensors"]
    assert (run / "best.safetensors").read_bytes() == b"the weights of an earlier run"


def test_train_config_that_is_not_text_is_one_line(phantom_file, capsys):
    # a gzip file used to raise a UnicodeDecodeError traceback
    assert main(["train", "--config", str(phantom_file)]) == 2
    assert "not valid JSON" in _one_line_error(capsys, "train")


def test_reproduce_out_naming_a_file_is_refused_before_the_first_phase(tmp_path, capsys):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    _recipe(recipes).rename(recipes / "freqmedclip-tiny-v1.json")
    out = tmp_path / "made.txt"
    out.write_text("keep me")
    code = main(["reproduce", "freqmedclip-tiny-v1", "--recipes", str(recipes), "--out", str(out), "--steps", "1",
                 "--threads", "1", "--quiet"])
    assert code == 2 and "not a folder" in _one_line_error(capsys, "reproduce")
    assert out.read_text() == "keep me"


# bench ------------------------------------------------------------------------------------------
BENCH = ["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--phantoms", "1", "--phantom-shape",
         "3x48x48", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("compare, message", [
    (["--compare-model", "tgcnet"], "unknown model 'tgcnet'"),
    (["--compare-model", "tgcnet-tiny", "--compare-weights", "tgcnet-tiny-v99"], "'tgcnet-tiny-v99'"),
])
def test_bench_compare_model_typo_is_refused_before_the_first_models_run(compare, message, tmp_path, capsys,
                                                                         monkeypatch):
    # the first model's whole benchmark used to run before the second model was even looked up
    from TextSegmentLib import semantibench

    runs = []
    monkeypatch.setattr(semantibench, "run_bench", lambda *a, **k: runs.append(a))
    assert main(BENCH + compare + ["--out", str(tmp_path / "bench")]) == 2
    assert message in _one_line_error(capsys, "bench")
    assert runs == [] and not (tmp_path / "bench").exists()


def test_bench_compare_weights_without_compare_model_is_refused(tmp_path, capsys):
    # they used to be ignored in silence: a one-model report where a comparison was asked for
    assert main(BENCH + ["--compare-weights", "tgcnet-tiny-v9", "--out", str(tmp_path / "bench")]) == 2
    assert "--compare-model" in _one_line_error(capsys, "bench")
    assert not (tmp_path / "bench").exists()


def test_bench_negative_phantom_count_is_refused_not_read_as_none(tmp_path, capsys):
    # it used to say "nothing to benchmark", as if no --phantoms had been given
    assert main(BENCH + ["--phantoms", "-1", "--out", str(tmp_path / "bench")]) == 2
    assert "--phantoms must be 0 or more" in _one_line_error(capsys, "bench")
    assert not (tmp_path / "bench").exists()


def test_bench_negative_min_component_ml_is_refused_before_the_phantoms_are_made(tmp_path, capsys, monkeypatch):
    # it was refused only by the first segmentation, after the models were loaded and the phantoms made
    from TextSegmentLib.training import data

    made = []
    monkeypatch.setattr(data, "load_source", lambda spec, **_: made.append(spec) or [])
    assert main(BENCH + ["--min-component-ml", "-1", "--out", str(tmp_path / "bench")]) == 2
    assert "--min-component-ml must be 0 or more" in _one_line_error(capsys, "bench")
    assert made == [] and not (tmp_path / "bench").exists()


# option names in library messages ------------------------------------------------------------------
@pytest.mark.parametrize("command", ["segment", "explain", "info"])
def test_series_for_an_image_file_names_the_option(command, phantom_file, tmp_path, capsys):
    # the message used to name the API's series_uid, which no CLI user typed
    out = ["-p", "liver", "--out", str(tmp_path / "out"), "--weights", "random", "--quiet"] * (command != "info")
    assert main([command, str(phantom_file), "--series", "1.2.3", *out]) == 2
    assert "--series" in _one_line_error(capsys, command)
    assert not (tmp_path / "out").exists()


def test_segment_negative_min_component_ml_names_the_option(phantom_file, tmp_path, capsys):
    assert main(["segment", str(phantom_file), "-p", "liver", "--out", str(tmp_path / "out"), "--weights", "random",
                 "--quiet", "--min-component-ml", "-1"]) == 2
    assert "--min-component-ml" in _one_line_error(capsys, "segment")
    assert not (tmp_path / "out").exists()


def test_phantom_negative_noise_names_the_option(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "out"), "--noise", "-1"]) == 2
    assert "--noise" in _one_line_error(capsys, "phantom")
    assert not (tmp_path / "out").exists()


# auxiliary prompts are TGC-Net's ----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["segment", "batch"])
def test_aux_prompt_for_freqmedclip_is_refused_not_ignored(command, phantom_file, series, tmp_path, capsys):
    # FreqMedCLIP ignored it, yet the legend recorded it as if it had shaped the masks
    source = phantom_file if command == "segment" else series
    out = tmp_path / "out"
    code = main([command, str(source), "-p", "liver", "--aux-prompt", "a large organ under the right ribs",
                 "--model", "freqmedclip-tiny", "--out", str(out), "--weights", "random", "--device", "cpu", "--quiet"])
    err = _one_line_error(capsys, command)
    assert code == 2 and "FreqMedCLIP" in err and "TGC-Net" in err and "--aux-prompt" in err
    assert not out.exists()


# explain --target-mask ------------------------------------------------------------------------------
def test_explain_target_mask_on_another_grid_names_the_option_the_file_and_both_shapes(phantom_file, tmp_path,
                                                                                     capsys):
    import SimpleITK as sitk

    mask = tmp_path / "mask.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((6, 32, 32), np.uint8)), str(mask))
    code = main(["explain", str(phantom_file), "-p", "liver", "--out", str(tmp_path / "out"), "--target-mask",
                 str(mask), "--weights", "random", "--device", "cpu", "--quiet"])
    err = _one_line_error(capsys, "explain")
    assert code == 2 and "--target-mask" in err and str(mask) in err
    assert "(6, 32, 32)" in err and "(6, 64, 64)" in err
    assert not (tmp_path / "out").exists()


# info: counts as a user reads them --------------------------------------------------------------------
def test_info_counts_one_file_in_the_singular(shared_data, tmp_path, capsys):
    # a one-slice series read "1 files"
    shutil.copy(shared_data / "dicom" / "pydicom_CT_small" / "CT_small.dcm", tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 file " in out and "DICOM        1 file," in out and "1 files" not in out


def test_output_piped_into_a_reader_that_stops_early_ends_quietly():
    """`textsegment weights list | head -0` ended in a BrokenPipeError traceback."""
    import os
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-m", "TextSegmentLib", "weights", "list"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "TEXTSEGMENT_OFFLINE": "1"})
    child.stdout.close()  # the reader leaves before the first line is written (the import alone takes a second)
    error = child.stderr.read().decode()
    assert child.wait(timeout=120) == 1
    assert "Traceback" not in error and "BrokenPipeError" not in error, error


@pytest.mark.parametrize(("words", "hint"), [(["liver", "spleen"], "-p liver -p spleen"),
                                             (["left", "kidney"], '-p "left kidney"')])
def test_words_left_after_a_prompt_say_how_to_give_prompts(words, hint, phantom_file, tmp_path, capsys):
    # `-p left kidney` ended in argparse's bare "unrecognized arguments: kidney"
    with pytest.raises(SystemExit) as exit_:
        main(["segment", str(phantom_file), "-p", *words, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {words[1]}" in err and hint in err
    with pytest.raises(SystemExit):  # an unknown option is a typo, not a prompt: no hint
        main(["segment", str(phantom_file), "-p", "liver", "--bogus", "--out", str(tmp_path / "out")])
    assert "--prompt" not in capsys.readouterr().err


def test_progress_line_shows_the_message_of_its_own_step(capsys):
    # the bar drew each line before taking its message: "100% ... step 1/2"
    import time

    from TextSegmentLib.cli.progressbar import progress_bar

    with progress_bar() as update:
        update(0.5, "step 1/2")
        time.sleep(0.15)  # past tqdm's minimum interval, so the next update draws a line
        update(1.0, "step 2/2")
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any("100%" in line for line in lines)
    assert not any("100%" in line and "step 1/2" in line for line in lines)


def test_progress_bar_times_a_resumed_run_from_where_it_starts(capsys, monkeypatch):
    # a run resumed at 90 % jumped there in its first second, and the bar promised the rest in no time
    import tqdm.std

    from TextSegmentLib.cli.progressbar import progress_bar

    clock = [1000.0]
    monkeypatch.setattr(tqdm.std, "time", lambda: clock[0])  # each bar takes its clock from here
    with progress_bar() as update:
        update(0.90, "step 900/1000")  # where the resumed run starts
        clock[0] += 60.0
        update(0.91, "step 910/1000")  # 1 % a minute from here on: 9 minutes left
        clock[0] += 0.2
        update(0.91, "step 911/1000")
    last = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "91%" in line][-1]
    assert "<08:5" in last or "<09:0" in last, last


def test_a_command_refused_before_any_progress_draws_no_bar(tmp_path, capsys):
    """`batch` on a pattern that matched nothing drew an empty bar ("0%| 00:00<?") above its error line."""
    from TextSegmentLib.cli.progressbar import progress_bar

    with progress_bar():
        pass
    assert capsys.readouterr().err == ""
    code = main(["batch", str(tmp_path / "missing" / "ct.nii.gz"), str(tmp_path / "also-missing.nii.gz"),
                 "-p", "liver", "--out", str(tmp_path / "out"), "--weights", "random"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("textsegment batch: error:") and "%|" not in err, err
