"""SemantiBench as a researcher meets it on their own labelled data: bad cases, case lists, comparisons."""

import json

import pytest

from TextSegmentLib import semantibench
from TextSegmentLib.semantibench import BenchReport, PromptResult, compare, run_bench, write_report

from test_semantibench import _ConstantModel


def _failing_on(monkeypatch, name):
    """``evaluate_case`` raising for the case called ``name``, as a corrupt or out-of-memory case does."""
    real = semantibench.evaluate_case

    def evaluate(model, case, **options):
        if case.name == name:
            raise RuntimeError("CUDA out of memory")
        return real(model, case, **options)

    monkeypatch.setattr(semantibench, "evaluate_case", evaluate)


def test_a_case_that_fails_is_listed_and_the_other_cases_are_still_scored(tmp_path, monkeypatch):
    """One bad case raised out of ``run_bench`` and every case scored before it was lost."""
    from TextSegmentLib.training import phantom_cases

    cases = phantom_cases([7, 8, 9], shape=(4, 32, 32))
    _failing_on(monkeypatch, "phantom-8")
    report = run_bench(_ConstantModel(10.0), cases, device="cpu")
    assert report.cases == ["phantom-7", "phantom-9"]
    assert report.failed == [{"case": "phantom-8", "source": "", "error": "RuntimeError: CUDA out of memory"}]
    paths = write_report(report, tmp_path)
    assert json.loads(paths["json"].read_text())["summary"]["failed_cases"] == 1
    assert ("**1 case(s) failed and are not in any number below:**\n\n- phantom-8: RuntimeError: CUDA out of memory"
            in paths["markdown"].read_text())


def test_when_every_case_fails_the_error_itself_is_raised(monkeypatch):
    from TextSegmentLib.training import phantom_cases

    _failing_on(monkeypatch, "phantom-7")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run_bench(_ConstantModel(10.0), phantom_cases([7], shape=(4, 32, 32)), device="cpu")


def test_bench_command_goes_on_past_a_bad_case_and_exits_1(tmp_path, monkeypatch, capsys):
    from TextSegmentLib.cli import main

    _failing_on(monkeypatch, "phantom-2000")
    out = tmp_path / "bench"
    code = main(["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--phantoms", "2", "--seed", "2000",
                 "--phantom-shape", "3x48x48", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 1
    assert "case phantom-2000 failed (no file): RuntimeError: CUDA out of memory" in capsys.readouterr().err
    data = json.loads((out / "bench.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["phantom-2001"] and data["failed"][0]["case"] == "phantom-2000"


def _rows(case, dices, level="L1"):
    return [PromptResult(case, f"prompt {i}", level, f"t{i}", 10, 10, d) for i, d in enumerate(dices)]


def test_compare_matches_cases_by_their_file_not_by_their_position_in_the_list():
    """Runs over other case lists: "ct.nii.gz #1" was s0001 in one and s0002 in the other, and got paired."""
    a = BenchReport("a", "w", "toy", _rows("ct.nii.gz #1", [0.1]) + _rows("ct.nii.gz #2", [0.9]),
                    sources={"ct.nii.gz #1": "/d/s0001/ct.nii.gz", "ct.nii.gz #2": "/d/s0002/ct.nii.gz"})
    b = BenchReport("b", "w", "toy", _rows("ct.nii.gz #1", [0.5]) + _rows("ct.nii.gz #2", [0.7]),
                    sources={"ct.nii.gz #1": "/d/s0002/ct.nii.gz", "ct.nii.gz #2": "/d/s0003/ct.nii.gz"})
    comparison = compare(a, b)
    assert comparison["L1"]["n"] == 1 and comparison["L1"]["mean_difference"] == pytest.approx(0.9 - 0.5)
    assert comparison["dropped"]["L1"] == {"only_a": 1, "only_b": 1}


def test_cases_sharing_one_ct_with_other_label_files_still_pair_by_name():
    """Two DICOM SEGs on one series: one source, two cases, each paired with itself."""
    sources = {"series #1": "/d/series", "series #2": "/d/series"}
    a = BenchReport("a", "w", "toy", _rows("series #1", [0.8]) + _rows("series #2", [0.2]), sources=sources)
    b = BenchReport("b", "w", "toy", _rows("series #1", [0.6]) + _rows("series #2", [0.2]), sources=dict(sources))
    comparison = compare(a, b)
    assert comparison["L1"]["n"] == 2 and comparison["L1"]["mean_difference"] == pytest.approx(0.1)


def test_compare_also_tests_per_case_means_since_prompts_of_one_case_are_not_independent(tmp_path):
    """Twelve prompts on two CTs gave p = 0.0005, as if they were twelve patients."""
    a = BenchReport("a", "w", "toy", _rows("c1", [0.9] * 6) + _rows("c2", [0.8] * 6))
    b = BenchReport("b", "w", "toy", _rows("c1", [0.8 - 0.01 * i for i in range(6)])
                    + _rows("c2", [0.7 - 0.01 * i for i in range(6)]))
    comparison = compare(a, b)
    assert comparison["L1"]["n"] == 12 and comparison["L1"]["p_value"] == pytest.approx(2 / 2**12)
    assert comparison["per_case"]["L1"]["n"] == 2 and comparison["per_case"]["L1"]["p_value"] == pytest.approx(0.5)
    assert comparison["per_case"]["L2"] is None
    markdown = write_report(a, tmp_path, comparison=comparison)["markdown"].read_text()
    assert "| L1 | 12 | +0.125 | 0.000488 | 2 | 0.5 |" in markdown
    assert "| L2 | 0 | n/a | n/a | 0 | n/a |" in markdown


def test_the_markdown_says_what_each_mean_is_taken_over():
    markdown = BenchReport("m", "w", "toy", _rows("c1", [0.5])).to_markdown()
    assert semantibench.LEVEL_TABLE_LEGEND in markdown
    assert "| L1 | 1 | 0.500 | 0.500 | 0.500 | 0 | n/a | n/a |" in markdown  # no slice Dice: 0 slices


def _bench_args(out):
    return ["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--phantoms", "1", "--seed", "2000",
            "--phantom-shape", "3x48x48", "--device", "cpu", "--out", str(out), "--quiet"]


COMPARE = ["--compare-model", "tgcnet-tiny", "--compare-weights", "random"]


def test_bench_command_prints_the_compared_model_and_the_wilcoxon_test(tmp_path, capsys):
    """Only the first model's scores and files were printed: the comparison had to be dug out of bench.md."""
    from TextSegmentLib.cli import main

    out = tmp_path / "bench"
    assert main(_bench_args(out) + COMPARE) == 0
    printed = capsys.readouterr().out
    assert "tgcnet-tiny (random) on 1 phantoms" in printed
    assert "Wilcoxon, a = freqmedclip-tiny (random) − b = tgcnet-tiny (random): L1 " in printed
    assert str(out / "compare" / "bench.json") in printed


def test_overwrite_without_compare_removes_the_earlier_runs_compare_files(tmp_path):
    """compare/ of the earlier run stayed beside the new report, read as this run's second model."""
    from TextSegmentLib.cli import main

    out = tmp_path / "bench"
    assert main(_bench_args(out) + COMPARE) == 0
    (out / "compare" / "notes.txt").write_text("mine")
    assert main(_bench_args(out) + ["--overwrite"]) == 0
    assert not any((out / "compare" / name).exists() for name in ("bench.json", "bench.md", "bench.png"))
    assert (out / "compare" / "notes.txt").read_text() == "mine"  # only the bench's own files go
    assert "comparison" not in json.loads((out / "bench.json").read_text())


def _msd_task(folder, *, cases=2):
    """An MSD task folder of ``cases`` small phantoms (liver labelled), as a user's download is laid out."""
    import numpy as np
    import SimpleITK as sitk

    from TextSegmentLib.phantom import make_phantom

    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    entries = []
    for n in range(1, cases + 1):
        ph = make_phantom(seed=2100 + n, shape=(3, 48, 48))
        name = f"case_{n:03d}.nii.gz"
        for array, kind in ((ph.ct.array, "imagesTr"), ((ph.labels.array == 11).astype(np.uint8), "labelsTr")):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(ph.ct.spacing)
            sitk.WriteImage(image, str(folder / kind / name))
        entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (folder / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver"}, "training": entries}))
    return folder


def test_an_msd_entry_that_cannot_be_read_is_recorded_when_asked_and_raised_otherwise(tmp_path):
    """One cut-off image of a forty-case task refused the whole task, in bench as in training."""
    from TextSegmentLib.errors import InputError
    from TextSegmentLib.training.data import load_msd_task

    task = _msd_task(tmp_path / "Task03_Liver")
    (task / "imagesTr" / "case_001.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(InputError, match="case_001"):
        load_msd_task(task)  # training: refused, naming the file
    failed = []
    (case,) = load_msd_task(task, failed=failed)
    assert case.name == "case_002.nii.gz"
    assert [f["case"] for f in failed] == ["case_001.nii.gz"] and failed[0]["source"].endswith("case_001.nii.gz")
    (task / "imagesTr" / "case_002.nii.gz").unlink()
    with pytest.raises(InputError, match="no training entry could be read"):
        load_msd_task(task, failed=[])


def test_bench_command_scores_the_cases_it_can_read_and_lists_those_it_cannot(tmp_path, capsys):
    from TextSegmentLib.cli import main

    task = _msd_task(tmp_path / "Task03_Liver")
    (task / "labelsTr" / "case_002.nii.gz").unlink()
    out = tmp_path / "bench"
    code = main(_bench_args(out) + ["--data", f"msd:{task}", "--data", f"msd:{tmp_path / 'no-such-task'}"])
    assert code == 1
    err = capsys.readouterr().err
    assert "case case_002.nii.gz could not be read and is left out" in err and "no-such-task" in err
    data = json.loads((out / "bench.json").read_text())
    assert [c["case"] for c in data["cases"]] == ["phantom-2000", "case_001.nii.gz"]
    assert [f["case"] for f in data["failed"]] == ["case_002.nii.gz", f"msd:{tmp_path / 'no-such-task'}"]
