"""The README's main job: the offline demo with the shipped weights, end to end."""

from __future__ import annotations

import pytest

from TextSegmentLib.cli import main
from TextSegmentLib.demo import dice, run_demo
from TextSegmentLib.errors import OutputExistsError

# The default freqmedclip-tiny-v9 scores Dice 0.89 (L1) and 0.89 (L3) on this phantom (v8 the same), tgcnet-tiny-v9
# 0.93 and 0.92 (docs/results.md); random weights score below 0.07. The floor sits between with
# margin: a broken pipeline (flipped masks, wrong windowing, lost weights) falls under it.
DICE_FLOOR = 0.5


@pytest.fixture(scope="module")
def demo(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("TEXTSEGMENT_OFFLINE", "1")
    monkeypatch_module.setenv("TEXTSEGMENT_HOME", str(tmp_path_factory.mktemp("home")))
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out_dir=out, device="cpu")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_demo_uses_the_shipped_weights_offline_and_clears_the_dice_floor(demo):
    assert demo.weights == "freqmedclip-tiny-v9"
    levels = {case.level: case for case in demo.cases}
    assert set(levels) == {"L1", "L2", "L3"}
    assert levels["L1"].dice >= DICE_FLOOR
    assert levels["L3"].dice >= DICE_FLOOR


def test_tgcnet_demo_uses_its_shipped_weights_and_clears_the_dice_floor(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    monkeypatch.setenv("TEXTSEGMENT_HOME", str(tmp_path / "home"))
    report = run_demo(out_dir=tmp_path / "out", model_name="tgcnet-tiny", device="cpu")
    assert report.weights == "tgcnet-tiny-v9"
    levels = {case.level: case.dice for case in report.cases}
    assert levels["L1"] >= DICE_FLOOR and levels["L3"] >= DICE_FLOOR


def test_demo_writes_masks_saliency_montages_and_report(demo):
    out = demo.out_dir
    assert (out / "segmentation" / "segmentation.nii.gz").is_file()
    assert (out / "saliency" / "saliency_legend.json").is_file()
    for case in demo.cases:
        assert case.montage.is_file() and case.montage.stat().st_size > 10_000
    page = demo.report.read_text()
    assert "Research use only" in page and page.count("data:image/png;base64,") == len(demo.cases)


def test_demo_refuses_a_folder_with_results_in_it(demo):
    with pytest.raises(OutputExistsError):
        run_demo(out_dir=demo.out_dir, device="cpu")


def test_demo_cli_prints_dice(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    code = main(["demo", "--out", str(tmp_path / "d"), "--weights", "random", "--prompt", "spleen", "-q"])
    assert code == 0
    out = capsys.readouterr().out
    assert "Dice" not in out  # user prompts have no ground truth
    assert "'spleen'" in out and "index.html" in out


def test_one_prompt_given_as_a_string_is_one_prompt(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    report = run_demo(out_dir=tmp_path / "d", weights="random", prompts="left kidney", device="cpu")
    assert [(case.level, case.prompt) for case in report.cases] == [("user", "left kidney")]


def test_dice_edge_cases():
    import numpy as np

    empty = np.zeros((2, 2), bool)
    full = np.ones((2, 2), bool)
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    assert dice(full, full) == 1.0


def test_demo_out_naming_a_file_is_a_clear_error_and_the_file_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    assert main(["demo", "--out", str(out), "--weights", "random", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textsegment demo: error:") and "not a folder" in err
    assert len(err.splitlines()) == 1
    assert out.read_text() == "keep me"
