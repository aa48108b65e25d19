import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from TextSegmentLib.errors import InputError
from TextSegmentLib.models.base import ModelOutput, TextFeatures, TextSegmentationModel
from TextSegmentLib.semantibench import (
    FINDING_ML, BenchReport, PromptResult, compare, dice, evaluate_case, pss, slice_dices, wilcoxon, write_report,
)


def test_dice_edge_cases():
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1:3, 1:3] = True
    assert dice(empty, empty) == 1.0  # nothing to find, nothing found
    assert dice(empty, some) == 0.0 and dice(some, empty) == 0.0
    half = some.copy()
    half[1] = False
    assert dice(half, some) == pytest.approx(2 * 2 / (2 + 4))
    with pytest.raises(InputError, match=r"one shape, got \(4, 4\) and \(3, 3\)"):
        dice(empty, np.zeros((3, 3), bool))


def test_slice_dice_skips_slices_without_truth():
    truth = np.zeros((3, 4, 4), bool)
    truth[1, :2] = True
    pred = np.zeros_like(truth)
    pred[0] = True  # a false positive on a slice without truth does not count here
    pred[1, :1] = True
    assert slice_dices(pred, truth) == [pytest.approx(2 * 4 / (4 + 8))]


def test_pss_definition_and_edges():
    assert pss(0.8, 0.6) == pytest.approx(1 - 0.6 / 0.8)
    assert pss(0.5, 0.6) < 0  # L3 beating L1 is allowed
    assert pss(0.0, 0.4) is None  # undefined without an L1 baseline
    assert pss(None, 0.4) is None and pss(0.7, None) is None


def test_wilcoxon_edges_and_a_clear_shift():
    assert wilcoxon([], []) is None
    same = wilcoxon([0.5, 0.7, 0.9], [0.5, 0.7, 0.9])
    assert same["p_value"] == 1.0 and same["n"] == 3
    a = np.linspace(0.6, 0.9, 10)
    result = wilcoxon(a, a - np.linspace(0.01, 0.1, 10))
    assert result["p_value"] == pytest.approx(2 / 2**10)  # exact two-sided p when every difference is positive
    assert result["mean_difference"] > 0
    with pytest.raises(ValueError):
        wilcoxon([1.0], [1.0, 2.0])


def _report(model="m", l3_scale=1.0):
    rows = []
    for case, base in (("c1", 0.9), ("c2", 0.7)):
        rows += [
            PromptResult(case, "liver", "L1", "liver", 100, 90, base, [base, base]),
            PromptResult(case, "the big organ", "L2", "liver", 100, 80, base - 0.1, [base - 0.1]),
            PromptResult(case, "liver excluding the tumour", "L3", "liver − liver_tumor", 80, 70, base * l3_scale, []),
            PromptResult(case, "brain", "negative", "brain", 0, 5 if case == "c1" else 0, None),
        ]
    return BenchReport(model=model, weights="w", dataset="toy", results=rows)


def test_report_aggregates(tmp_path):
    report = _report(l3_scale=0.5)
    table = report.level_table()
    assert table["L1"]["prompts"] == {"n": 2, "mean": pytest.approx(0.8), "median": pytest.approx(0.8)}
    assert table["L1"]["slices"]["n"] == 4
    assert report.pss() == pytest.approx(0.5)
    assert report.pss_per_case() == {"c1": pytest.approx(0.5), "c2": pytest.approx(0.5)}
    assert report.false_positive_rate() == 0.5
    targets = {(r["target"], r["level"]): r for r in report.target_table()}
    assert targets[("brain", "negative")]["false_positive_rate"] == 0.5
    assert targets[("liver", "L1")]["mean_dice"] == pytest.approx(0.8)
    paths = write_report(report, tmp_path, comparison=compare(report, _report(model="other")))
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["pss"] == pytest.approx(0.5)
    assert data["comparison"]["L3"]["n"] == 2 and data["comparison"]["L1"]["p_value"] == 1.0
    assert "PSS" in paths["markdown"].read_text() and paths["plot"].stat().st_size > 1000


def test_matched_pss_compares_each_l3_prompt_with_the_l1_prompts_of_the_targets_it_builds_on(tmp_path):
    """Easy L3 organs against hard L1 ribs gave the real CT a PSS of −2.10: target mix, not prompts."""
    rows = [
        PromptResult("c1", "liver", "L1", "liver", 300, 90, 0.9),
        PromptResult("c1", "the liver", "L1", "liver", 300, 90, 0.8),  # two L1 prompts of one target: their mean
        PromptResult("c1", "spleen", "L1", "spleen", 100, 90, 0.7),
        PromptResult("c1", "rib 3", "L1", "rib_left_3", 10, 1, 0.1),  # no L3 prompt builds on it: left out
        PromptResult("c1", "liver without the tumour", "L3", "liver − liver_tumor", 80, 70, 0.6),
        PromptResult("c1", "liver or spleen", "L3", "liver ∪ spleen", 200, 180, 0.8),
        PromptResult("c1", "aorta", "L3", "aorta − aortic_wall", 50, 50, 0.5),  # no L1 aorta: left out
        PromptResult("c2", "liver", "L1", "liver", 100, 90, 0.5),
        PromptResult("c2", "liver", "L3", "liver − liver_tumor", 80, 70, 0.25),
    ]
    report = BenchReport("m", "w", "toy", rows)
    matched, n = report.pss_matched()
    assert n == 3
    liver = (0.9 + 0.8) / 2
    union = (300 * liver + 100 * 0.7) / 400  # a union's Dice weighs its parts by their volumes
    assert matched == pytest.approx(1 - (0.6 + 0.8 + 0.25) / (liver + union + 0.5))
    assert report.pss() == pytest.approx(1 - np.mean([0.6, 0.8, 0.5, 0.25]) / np.mean([0.9, 0.8, 0.7, 0.1, 0.5]))
    summary = json.loads(write_report(report, tmp_path)["json"].read_text())["summary"]
    assert summary["pss_matched"] == pytest.approx(matched) and summary["pss_matched_prompts"] == 3
    assert BenchReport("m", "w", "toy", rows[6:7]).pss_matched() == (None, 0)


def test_a_written_report_reads_back_with_every_number_recomputed(tmp_path):
    from TextSegmentLib.semantibench import read_report

    report = _report(l3_scale=0.5)
    report.sources = {"c1": "/d/c1.nii.gz"}
    back = read_report(write_report(report, tmp_path)["json"])
    assert back.results == report.results and back.sources == report.sources
    assert back.summary() == report.summary()
    (tmp_path / "other.json").write_text('{"summary": {}}')
    with pytest.raises(InputError, match="not a bench.json"):
        read_report(tmp_path / "other.json")


def test_report_without_l1_has_undefined_pss():
    report = BenchReport("m", "w", "toy", [PromptResult("c", "x", "L3", "x", 5, 5, 1.0)])
    assert report.pss() is None and report.false_positive_rate() is None


@dataclass
class _Config:
    image_size: int = 32


class _ConstantModel(TextSegmentationModel):
    """Predicts the same logit everywhere, whatever the prompt: the engine path with known answers."""

    def __init__(self, logit):
        super().__init__()
        self.config = _Config()
        self.logit = logit
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, prompts, aux_prompts=None):
        return TextFeatures(pooled=torch.zeros(len(prompts), 4))

    def forward(self, images, text, *, taps=None):
        return ModelOutput(logits=torch.full((images.shape[0], 1, 32, 32), self.logit) + 0 * self.dummy)


def test_evaluate_case_through_the_engine():
    from TextSegmentLib.training import phantom_cases

    (case,) = phantom_cases([7], shape=(4, 32, 32))
    empty = BenchReport("none", "w", "toy", evaluate_case(_ConstantModel(-10.0), case, device="cpu"))
    assert {r.level for r in empty.results} == {"L1", "L2", "L3", "negative"}
    assert all(r.dice == 0.0 for r in empty.results if r.level != "negative")
    assert empty.false_positive_rate() == 0.0 and empty.pss() is None  # L1 = 0: PSS undefined
    full = BenchReport("all", "w", "toy", evaluate_case(_ConstantModel(10.0), case, device="cpu"))
    assert full.false_positive_rate() == 1.0
    volume_ml = case.ct.array.size * float(np.prod(case.ct.spacing)) / 1000.0
    assert all(r.largest_component_ml == pytest.approx(volume_ml) for r in full.results)
    assert full.false_finding_rate() == (1.0 if volume_ml >= FINDING_ML else 0.0)
    assert empty.false_finding_rate() == 0.0
    body = next(r for r in full.results if r.prompt == "body")
    assert 0 < body.dice <= 1 and body.predicted_voxels == case.ct.array.size


def test_evaluate_case_scores_the_masks_after_the_users_clean_up():
    from TextSegmentLib.training import phantom_cases

    (case,) = phantom_cases([7], shape=(4, 32, 32))
    volume_ml = case.ct.array.size * float(np.prod(case.ct.spacing)) / 1000.0
    everything = _ConstantModel(10.0)
    kept = evaluate_case(everything, case, device="cpu", min_component_ml=volume_ml / 2, fill_holes=True)
    assert all(r.predicted_voxels == case.ct.array.size for r in kept)  # one region, larger than the cut
    dropped = BenchReport("all", "w", "toy", evaluate_case(everything, case, device="cpu", min_component_ml=volume_ml * 2))
    assert all(r.predicted_voxels == 0 for r in dropped.results) and dropped.false_positive_rate() == 0.0


def test_cases_sharing_a_file_name_stay_apart_in_the_report_and_the_pairs():
    """TotalSegmentator's layout names every case ct.nii.gz: two of them are still two cases."""
    import dataclasses

    from TextSegmentLib.semantibench import run_bench
    from TextSegmentLib.training import phantom_cases

    cases = [dataclasses.replace(c, name="ct.nii.gz") for c in phantom_cases([7, 8], shape=(4, 32, 32))]
    everything = run_bench(_ConstantModel(10.0), cases, model_name="all", weights="w", dataset="toy", device="cpu")
    nothing = run_bench(_ConstantModel(-10.0), cases, model_name="none", weights="w", dataset="toy", device="cpu")
    assert everything.summary()["cases"] == 2 and len(everything.pss_per_case()) == 2
    assert everything.cases == ["ct.nii.gz #1", "ct.nii.gz #2"]
    comparison = compare(everything, nothing)
    for level in ("L1", "L2", "L3"):
        assert comparison[level]["n"] == len(everything.scores(level)) == len(nothing.scores(level))  # no pair lost


def test_a_speck_on_a_negative_is_a_false_positive_but_not_a_false_finding():
    speck = PromptResult("c", "brain", "negative", "brain", 0, 3, None, largest_component_ml=0.01)
    blob = PromptResult("c", "heart", "negative", "heart", 0, 900, None, largest_component_ml=FINDING_ML)
    report = BenchReport("m", "w", "toy", [speck, blob])
    assert report.false_positive_rate() == 1.0 and report.false_finding_rate() == 0.5
    assert "1.000 (any voxel: 2 of 2); 0.500 (a region of 1 mL or more: 1 of 2)" in report.to_markdown()


def test_bench_command_writes_json_markdown_and_plot(tmp_path, capsys):
    from TextSegmentLib.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--phantoms", "1", "--seed", "2000",
                 "--phantom-shape", "3x48x48", "--device", "cpu", "--out", str(out), "--quiet"])
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    assert data["summary"]["cases"] == 1 and data["summary"]["levels"]["L1"]["prompts"]["n"] > 0
    assert (out / "bench.md").read_text().startswith("# SemantiBench") and (out / "bench.png").is_file()
    assert "PSS" in capsys.readouterr().out


def test_bench_command_notes_the_clean_up_it_scored(tmp_path):
    from TextSegmentLib.cli import main

    out = tmp_path / "bench"
    code = main(["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--phantoms", "1", "--seed", "2000",
                 "--phantom-shape", "3x48x48", "--device", "cpu", "--out", str(out), "--quiet", "--cleanup",
                 "--min-component-ml", "0.5"])
    assert code == 0
    note = "masks cleaned up as by `segment --cleanup --min-component-ml 0.5`"
    assert note in (out / "bench.md").read_text()
    assert json.loads((out / "bench.json").read_text())["summary"]["notes"] == [note]


def test_compare_pairs_only_common_cases_and_says_how_many_it_dropped(tmp_path):
    a = BenchReport("a", "w", "toy", [PromptResult("c1", "liver", "L1", "liver", 1, 1, 0.8),
                                      PromptResult("c2", "liver", "L1", "liver", 1, 1, 0.7)])
    b = BenchReport("b", "w", "toy", [PromptResult("c1", "liver", "L1", "liver", 1, 1, 0.6),
                                      PromptResult("c3", "liver", "L1", "liver", 1, 1, 0.7),
                                      PromptResult("c3", "x", "L3", "x", 1, 1, 0.5)])
    comparison = compare(a, b)
    assert comparison["L1"]["n"] == 1 and comparison["L1"]["mean_difference"] == pytest.approx(0.2)
    assert comparison["L3"] is None
    assert comparison["dropped"]["L1"] == {"only_a": 1, "only_b": 1}
    assert comparison["dropped"]["L3"] == {"only_a": 0, "only_b": 1}
    assert comparison["dropped"]["L2"] == {"only_a": 0, "only_b": 0}
    markdown = write_report(a, tmp_path, comparison=comparison)["markdown"].read_text()
    assert "L1: 1 only in a, 1 only in b; L3: 0 only in a, 1 only in b" in markdown
    complete = compare(_report(), _report(model="other"))
    assert all(d == {"only_a": 0, "only_b": 0} for d in complete["dropped"].values())
    assert "Left out" not in write_report(_report(), tmp_path / "full", comparison=complete)["markdown"].read_text()


def test_target_cells_with_pipes_or_line_breaks_keep_the_markdown_table_whole():
    report = BenchReport("m", "w", "toy", [PromptResult("c", "p", "L1", "a|b\nc", 1, 1, 0.5),
                                           PromptResult("c", "q", "L3", "肝臓", 1, 1, 0.25)])
    lines = report.to_markdown().splitlines()
    header = lines.index("| target | level | n | mean Dice | FP rate |")
    rows = lines[header + 2:header + 4]
    assert rows == ["| a\\|b c | L1 | 1 | 0.500 | – |", "| 肝臓 | L3 | 1 | 0.250 | – |"]


def test_plot_without_negatives_or_l3_draws_no_false_positive_bar(tmp_path, monkeypatch):
    import matplotlib.figure

    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *args, **kwargs: figures.append(fig))
    report = BenchReport("m", "w", "toy", [PromptResult("c", "liver", "L1", "liver", 1, 1, 0.8, [0.8])])
    paths = write_report(report, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["summary"]["pss"] is None and data["summary"]["false_positive_rate"] is None
    assert "= n/a (per-case median n/a)" in paths["markdown"].read_text()
    (fig,) = figures
    fp_axes = fig.axes[1]
    assert not fp_axes.patches  # no bar at 0: no negatives is not a false-positive rate of 0
    assert fp_axes.get_title().endswith("n/a")
    figures.clear()
    write_report(_report(), tmp_path / "full")
    assert [bar.get_height() for bar in figures[0].axes[1].patches] == [pytest.approx(0.5)]


def test_the_comparison_names_its_sides_and_its_json_holds_no_nan(tmp_path):
    """Two runs of one model with other weights: the table must say which is a; NaN is not valid JSON."""
    a = BenchReport("freqmedclip-tiny", "mine", "toy", [PromptResult("c1", "liver", "L1", "liver", 1, 1, 0.8)])
    b = BenchReport("freqmedclip-tiny", "shipped", "toy", [PromptResult("c1", "liver", "L1", "liver", 1, 1, 0.6)])
    comparison = compare(a, b)
    comparison["L1"]["statistic"] = float("nan")  # as a test statistic can be
    paths = write_report(a, tmp_path, comparison=comparison)
    assert "a = freqmedclip-tiny (mine) and b = freqmedclip-tiny (shipped)" in paths["markdown"].read_text()
    saved = json.loads(paths["json"].read_text(), parse_constant=lambda name: pytest.fail(f"{name} in bench.json"))
    assert saved["comparison"]["L1"]["statistic"] is None and saved["comparison"]["a_weights"] == "mine"


def test_dice_of_volumes_scores_their_voxels():
    """``dice(run[0].mask, truth_volume)`` was 1.0 whatever the masks: ``np.asarray`` of a Volume is a 0-d object."""
    from TextSegmentLib.volume import Volume

    top = np.zeros((2, 4, 4), np.uint8)
    top[0] = 1
    bottom = 1 - top
    assert dice(Volume(top), Volume(bottom)) == 0.0
    assert dice(Volume(top), top) == 1.0
    assert slice_dices(Volume(top), Volume(bottom)) == [0.0]


def test_dice_of_volumes_on_different_grids_is_refused():
    """Voxel by voxel, a mask in another orientation scored a meaningless Dice (here 0 for the same region)."""
    from TextSegmentLib.volume import Volume

    top = np.zeros((2, 4, 4), np.uint8)
    top[0] = 1
    flipped = Volume(top[::-1].copy(), origin=(0.0, 0.0, 1.0), direction=np.diag([1.0, 1.0, -1.0]))
    with pytest.raises(InputError, match=r"masks on one grid.*direction \[\[1.0, 0.0, 0.0\], \[0.0, 1.0, 0.0\], \[0.0, 0.0, -1.0\]\]"):
        dice(Volume(top), flipped)


def test_run_bench_takes_phantoms_and_names_what_ran():
    """A ``Phantom`` failed with AttributeError ('name'); the model, weights and dataset had to be spelt out."""
    from TextSegmentLib.phantom import make_phantom
    from TextSegmentLib.semantibench import run_bench

    report = run_bench(_ConstantModel(10.0), [make_phantom(seed=7, shape=(4, 32, 32))], device="cpu")
    assert report.cases == ["phantom-7"] and report.dataset == "phantom-7"
    assert report.model == "_ConstantModel" and report.weights == "default"
    assert report.false_positive_rate() == 1.0


def test_a_report_says_which_file_each_case_was_read_from(tmp_path):
    """Cases of one name ("ct.nii.gz #1", "#2") could only be matched to their files by their order."""
    from TextSegmentLib.io import read_volume, write_volume
    from TextSegmentLib.phantom import make_phantom
    from TextSegmentLib.semantibench import run_bench
    from TextSegmentLib.training import LabelledCase

    cases = []
    for patient, seed in (("s0001", 3), ("s0002", 4)):
        phantom = make_phantom(seed=seed, shape=(4, 32, 32))
        (tmp_path / patient).mkdir()
        write_volume(phantom.ct, tmp_path / patient / "ct.nii.gz")
        cases.append(LabelledCase("ct.nii.gz", read_volume(tmp_path / patient / "ct.nii.gz"), phantom.labels,
                                  phantom.label_names))
    report = run_bench(_ConstantModel(10.0), cases + [make_phantom(seed=5, shape=(4, 32, 32))], device="cpu")
    listed = {c["case"]: c["source"] for c in report.to_json()["cases"]}
    assert listed == {"ct.nii.gz #1": str(tmp_path / "s0001" / "ct.nii.gz"),
                      "ct.nii.gz #2": str(tmp_path / "s0002" / "ct.nii.gz"), "phantom-5": None}
    assert f"ct.nii.gz #2: `{tmp_path / 's0002' / 'ct.nii.gz'}`" in report.to_markdown()


def test_write_report_refuses_an_earlier_report_unless_overwrite(tmp_path):
    """A second ``write_report`` into one folder replaced the first report in silence."""
    from TextSegmentLib.errors import OutputExistsError

    write_report(_report(model="first"), tmp_path)
    with pytest.raises(OutputExistsError, match="holds bench results already"):
        write_report(_report(model="second"), tmp_path)
    assert json.loads((tmp_path / "bench.json").read_text())["summary"]["model"] == "first"
    write_report(_report(model="second"), tmp_path, overwrite=True)
    assert json.loads((tmp_path / "bench.json").read_text())["summary"]["model"] == "second"
