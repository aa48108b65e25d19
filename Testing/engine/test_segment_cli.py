"""`textsegment segment` end to end with a real (random-weight) model, and the engine on real presets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from TextSegmentLib.cli import main
from TextSegmentLib.engine import segment
from TextSegmentLib.io import read_volume
from TextSegmentLib.phantom import make_phantom, save_phantom
from TextSegmentLib.weights import load_model


@pytest.fixture(scope="module")
def phantom_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("phantom")
    save_phantom(make_phantom(seed=1, shape=(6, 64, 64)), folder)
    return folder / "ct.nii.gz"


@pytest.fixture(scope="module")
def tiny():
    return load_model("freqmedclip-tiny", weights="random", device="cpu")


def test_segment_writes_label_map_legend_and_probabilities(phantom_file, tmp_path, capsys):
    out = tmp_path / "seg"
    code = main(["segment", str(phantom_file), "-p", "liver", "-p", "spleen", "--out", str(out),
                 "--weights", "random", "--quiet"])
    assert code == 0
    legend = json.loads((out / "segmentation.json").read_text())
    assert [e["prompt"] for e in legend["labels"]] == ["liver", "spleen"]
    assert legend["weights"] == "random"
    labels = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    source = sitk.ReadImage(str(phantom_file))
    assert labels.GetSize() == source.GetSize()
    assert np.allclose(labels.GetDirection(), source.GetDirection())
    assert np.allclose(labels.GetOrigin(), source.GetOrigin())
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= {0, 1, 2}
    for entry in legend["labels"]:
        prob = sitk.GetArrayFromImage(sitk.ReadImage(str(out / entry["probability_map"])))
        assert prob.shape == sitk.GetArrayFromImage(source).shape
        assert 0.0 <= prob.min() and prob.max() <= 1.0
        assert entry["voxels"] == int((prob >= 0.5).sum())
    assert "voxels" in capsys.readouterr().out


def test_compact_probability_maps_cover_the_ct_with_fewer_voxels(tmp_path):
    from TextSegmentLib.grid import same_extent

    save_phantom(make_phantom(seed=2, shape=(3, 256, 256)), tmp_path / "ct")
    ct, out = tmp_path / "ct" / "ct.nii.gz", tmp_path / "seg"
    code = main(["segment", str(ct), "-p", "liver", "-p", "spleen", "--out", str(out), "--weights", "random",
                 "--quiet", "--probability-grid", "compact"])
    assert code == 0
    legend = json.loads((out / "segmentation.json").read_text())
    assert legend["probability_grid"] == "compact"
    source = read_volume(ct)
    assert read_volume(out / "segmentation.nii.gz", allow_non_ct=True).shape == source.shape
    for entry in legend["labels"]:
        prob = read_volume(out / entry["probability_map"], allow_non_ct=True)
        assert prob.shape == (3, 128, 128)  # freqmedclip-tiny sees 128 px
        assert same_extent(prob.ijk_to_lps(), prob.shape, source.ijk_to_lps(), source.shape, tolerance_mm=1e-2)


@pytest.mark.parametrize("grid", ["source", "compact"])
def test_segment_with_saliency_writes_one_map_per_layer(phantom_file, tmp_path, grid):
    out = tmp_path / "seg"
    code = main(["segment", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet",
                 "--saliency", "--layers", "vit.3,vit.11", "--stage", "2", "--saliency-grid", grid])
    assert code == 0
    legend = json.loads((out / "saliency" / "saliency_legend.json").read_text())
    assert legend["stage"] == 2
    files = [layer["file"] for layer in legend["prompts"][0]["layers"]]
    assert len(files) == 3  # two layers and the combined map
    assert all(("compact" in layer["grid"]) == (grid == "compact") for layer in legend["prompts"][0]["layers"])
    for relative in files:
        image = sitk.ReadImage(str(out / "saliency" / relative))
        assert image.GetSize() == sitk.ReadImage(str(phantom_file)).GetSize()  # 64² slices: no grid is coarser


def test_segment_refuses_to_replace_results_and_writes_nothing_new(phantom_file, tmp_path, capsys):
    out = tmp_path / "seg"
    out.mkdir()
    (out / "segmentation.json").write_text("keep me")
    code = main(["segment", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet"])
    assert code != 0
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "segmentation.json").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["segmentation.json"]


@pytest.mark.parametrize("argv, message", [
    (["segment", "/no/such/ct.nii.gz", "-p", "liver"], "no such file"),
    (["segment", "{ct}", "-p", "  "], "empty prompt"),
    (["segment", "{ct}", "-p", "liver", "--model", "no-such-model"], "unknown model"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(argv, message, phantom_file, tmp_path, capsys):
    argv = [a.replace("{ct}", str(phantom_file)) for a in argv] + ["--out", str(tmp_path / "o"), "--weights", "random"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert message in err.lower()
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_missing_default_weights_is_a_clear_error_not_a_random_model(phantom_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TEXTSEGMENT_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TEXTSEGMENT_OFFLINE", "1")
    code = main(["segment", str(phantom_file), "-p", "liver", "--out", str(tmp_path / "o"), "--model", "tgcnet-base"])
    assert code != 0
    assert "weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name", ["freqmedclip-tiny", "tgcnet-tiny"])
def test_real_models_are_batch_invariant_and_deterministic(phantom_file, name, tiny):
    tiny = tiny if name == "freqmedclip-tiny" else load_model(name, weights="random", device="cpu")
    volume = read_volume(phantom_file)
    # float32 maps: batching moves a probability by ~1e-6, which can tip a float16 rounding by one step
    exact = dict(model=tiny, device="cpu", probability_dtype="float32")
    one = segment(volume, ["liver", "left kidney"], batch_size=1, **exact)
    many = segment(volume, ["liver", "left kidney"], batch_size=6, **exact)
    again = segment(volume, ["liver", "left kidney"], batch_size=6, **exact)
    for a, b, c in zip(one.results, many.results, again.results):
        np.testing.assert_allclose(a.probability.array, b.probability.array, atol=1e-5)
        np.testing.assert_array_equal(b.probability.array, c.probability.array)
    assert not np.array_equal(many.results[0].probability.array, many.results[1].probability.array)


@pytest.mark.parametrize("command", ["segment", "explain"])
@pytest.mark.parametrize("target", ["other file", "the input CT"])
def test_out_naming_a_file_is_refused_before_the_run_and_the_file_kept(command, target, phantom_file, tmp_path, capsys):
    if target == "the input CT":
        out = tmp_path / "ct.nii.gz"
        out.write_bytes(phantom_file.read_bytes())
        ct = out
    else:
        out = tmp_path / "notes.txt"
        out.write_text("keep me")
        ct = phantom_file
    before = out.read_bytes()
    code = main([command, str(ct), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"textsegment {command}: error:") and "not a folder" in err
    assert len(err.splitlines()) == 1
    assert out.read_bytes() == before


def test_explain_checks_the_montage_slice_before_writing_anything(phantom_file, tmp_path, capsys):
    out = tmp_path / "ex"
    argv = ["explain", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet"]
    assert main(argv + ["--slice", "99"]) == 2
    err = capsys.readouterr().err
    assert "--slice 99" in err and "6 axial slices" in err
    assert not out.exists()  # no saliency maps left behind to block the corrected run
    assert main(argv + ["--slice", "5"]) == 0
    assert (out / "saliency_legend.json").is_file()


def test_interrupt_while_writing_leaves_nothing_and_says_so(phantom_file, tmp_path, capsys, monkeypatch):
    # files are written into a hidden folder and moved into --out only once all are complete, so a
    # Ctrl-C after the first one leaves --out as it was, and the message says nothing was written there
    from TextSegmentLib import export

    out = tmp_path / "seg"

    def write_then_interrupt(run, *, out_dir, **kwargs):
        out_dir.mkdir(parents=True, exist_ok=True)  # the staging folder, made already
        (out_dir / export.LABEL_MAP).write_bytes(b"finished before Ctrl-C")
        raise KeyboardInterrupt

    monkeypatch.setattr(export, "write_segmentation", write_then_interrupt)
    code = main(["segment", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet"])
    assert code == 130
    err = capsys.readouterr().err.strip()
    assert err == f"textsegment segment: interrupted; nothing of this run was written to {out}"
    assert not out.exists()


BENCH = ["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--phantoms", "1", "--device", "cpu", "--quiet"]


@pytest.mark.parametrize("shape", ["abc", "32x128", "0x48x48", "3x48x48x2"])
def test_bench_rejects_a_malformed_phantom_shape_in_one_line(shape, tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(BENCH + [f"--phantom-shape={shape}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textsegment bench: error: --phantom-shape") and len(err.splitlines()) == 1
    assert not out.exists()


def test_bench_never_replaces_earlier_results_without_overwrite(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = BENCH + ["--phantom-shape", "3X48X48", "--out", str(out)]  # upper-case X is accepted too
    assert main(argv) == 0
    earlier = {name: (out / name).read_bytes() for name in ("bench.json", "bench.md", "bench.png")}
    capsys.readouterr()
    assert main(argv + ["--seed", "2001"]) == 2
    err = capsys.readouterr().err
    assert "holds bench results already" in err and "--overwrite" in err
    assert {name: (out / name).read_bytes() for name in earlier} == earlier
    assert main(argv + ["--seed", "2001", "--overwrite"]) == 0
    assert (out / "bench.json").read_bytes() != earlier["bench.json"]


def test_bench_out_naming_a_file_is_refused_before_the_run(tmp_path, capsys):
    out = tmp_path / "bench.txt"
    out.write_text("keep me")
    assert main(BENCH + ["--phantom-shape", "3x48x48", "--out", str(out)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("roi, message", [
    ("70,80,0,5,0,1", "lies entirely outside the image"),  # the phantom is 64x64x6 (I x J x K)
    ("-9,-1,0,5,0,1", "lies entirely outside the image"),
    ("0,5,0,5,9,12", "lies entirely outside the image"),
    ("10,4,0,5,0,1", "I0 10 is above I1 4"),
])
def test_explain_refuses_a_roi_outside_the_volume_naming_its_shape(roi, message, phantom_file, tmp_path, capsys):
    out = tmp_path / "ex"
    code = main(["explain", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet",
                 f"--roi={roi}"])  # "=": a value starting with "-" would be taken for an option
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "64x64x6 voxels" in err
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_explain_clips_a_roi_partly_outside_with_a_warning(phantom_file, tmp_path, capsys):
    out = tmp_path / "ex"
    code = main(["explain", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet",
                 "--roi=-5,20,10,99,0,2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "warning: --roi -5,20,10,99,0,2 reaches outside the image; clipped to 0,20,10,63,0,2" in printed
    legend = json.loads((out / "saliency_legend.json").read_text())
    assert "[[0, 20], [10, 63], [0, 2]]" in json.dumps(legend)


def test_every_output_records_the_weights_that_ran_not_the_option(phantom_file, tmp_path):
    # a default run used to record "weights": null, where demo and bench record the resolved id
    from TextSegmentLib.weights import bundled_path, load_manifest

    default = load_manifest().default_for("freqmedclip-tiny")
    common = [str(phantom_file), "-p", "liver", "--device", "cpu", "--quiet"]
    assert main(["segment", *common, "--out", str(tmp_path / "seg"), "--saliency", "--layers", "vit.11"]) == 0
    assert main(["explain", *common, "--out", str(tmp_path / "ex"), "--layers", "vit.11"]) == 0
    legends = [tmp_path / "seg" / "segmentation.json", tmp_path / "seg" / "saliency" / "saliency_legend.json",
               tmp_path / "ex" / "saliency_legend.json"]
    for path in legends:
        legend = json.loads(path.read_text())
        assert legend["weights"] == default.id and legend["weights_sha256"] == default.sha256, path
        assert legend["weights_file"] == str(bundled_path(default)) and len(legend["weights_data_sha256"]) == 64

    file = bundled_path(default)  # the same file given by path: recorded as that file, with its data checksum
    assert main(["segment", *common, "--out", str(tmp_path / "by_path"), "--weights", str(file)]) == 0
    legend = json.loads((tmp_path / "by_path" / "segmentation.json").read_text())
    assert legend["weights"] == file.name and legend["weights_file"] == str(file)
    assert legend["weights_sha256"] is None and len(legend["weights_data_sha256"]) == 64


def test_explain_roi_montage_shows_the_box_on_a_slice_inside_it(phantom_file, tmp_path, monkeypatch):
    # the montage used to outline the predicted mask and pick its slice, so a --roi box at K 3..4
    # could be shown on slice 0 with every map blank (no target there)
    from TextSegmentLib.saliency import montage

    shown = []
    choose = montage.choose_slice

    def record(saliency, *, plan, mask=None):
        shown.append((choose(saliency, plan=plan, mask=mask), mask))
        return shown[-1][0]

    monkeypatch.setattr(montage, "choose_slice", record)
    out = tmp_path / "ex"
    assert main(["explain", str(phantom_file), "-p", "liver", "--out", str(out), "--weights", "random", "--quiet",
                 "--layers", "vit.11", "--roi", "10,30,20,40,3,4"]) == 0
    (index, mask), = shown
    assert index in (3, 4)
    box = np.zeros(mask.shape, dtype=bool)
    box[3:5, 20:41, 10:31] = True
    assert np.array_equal(np.asarray(mask.array) > 0, box)
    assert (out / "01_liver_montage.png").is_file()


@pytest.mark.parametrize("source", ["--real", "--data"])
def test_bench_missing_data_files_are_one_line_not_a_traceback(source, tmp_path, capsys):
    # `--shared-data` defaults to ../shared/data, relative to the current folder: run from elsewhere,
    # --real used to end in a FileNotFoundError traceback
    missing = tmp_path / "nowhere"
    extra = (["--real", "--shared-data", str(missing)] if source == "--real"
             else ["--data", f"totalseg:{missing}/ct.nii.gz,{missing}/seg.nii.gz,{missing}/classes.json"])
    out = tmp_path / "bench"
    argv = ["bench", "--model", "freqmedclip-tiny", "--weights", "random", "--device", "cpu", "--quiet"]
    assert main(argv + extra + ["--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("textsegment bench: error:") and len(err.splitlines()) == 1
    assert str(missing) in err and ("--shared-data" in err) == (source == "--real")
    assert not out.exists()


def test_legend_counts_what_the_label_map_holds_and_records_the_settings(phantom_file, tmp_path, monkeypatch):
    # "voxels" is each prompt's own mask; with overlapping prompts the label map holds fewer of a
    # label than that, and the legend used to give no way to tell (nor the threshold/axis/cleanup used).
    # The same prompt twice overlaps wholly whatever the (random) weights; the CLI and the engine refuse
    # a repeated prompt, so that check is lifted here to reach the writer with two identical masks.
    import TextSegmentLib.cli.segment as segment_cli
    from TextSegmentLib import engine

    for module in (segment_cli, engine):
        monkeypatch.setattr(module, "check_distinct_prompts", lambda prompts: None)
    out = tmp_path / "seg"
    assert main(["segment", str(phantom_file), "-p", "liver", "-p", "liver", "--out", str(out), "--weights", "random",
                 "--quiet", "--threshold", "0.3", "--min-component-ml", "0.01"]) == 0
    legend = json.loads((out / "segmentation.json").read_text())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "segmentation.nii.gz")))
    counts = np.bincount(labels.ravel(), minlength=3)
    assert [e["label_map_voxels"] for e in legend["labels"]] == [int(counts[1]), int(counts[2])]
    first, second = legend["labels"]
    assert first["voxels"] == second["voxels"] > 0 and counts[2] == 0  # the same prompt twice: ties go to the first
    assert legend["settings"] == {"axis": "axial", "threshold": 0.3, "cleanup": False, "min_component_ml": 0.01,
                                  "keep_empty_slices": False}


@pytest.mark.parametrize("command", ["segment", "explain"])
def test_a_folder_of_several_studies_is_segmented_by_the_series_named(command, shared_data, tmp_path, capsys):
    dicomdir = shared_data / "dicom/pydicom_dicomdirtests/DICOMDIR"  # two CT series of two patients
    chosen = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"  # 16 x 16 x 5 voxels
    base = [command, str(dicomdir), "-p", "liver", "--weights", "random", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "guess")]) == 2
    assert "--series UID" in capsys.readouterr().err and not (tmp_path / "guess").exists()
    assert main([*base, "--series", chosen, "--out", str(tmp_path / "chosen")]) == 0
    written = next(p for p in (tmp_path / "chosen").rglob("*.nii.gz"))
    assert sitk.ReadImage(str(written)).GetSize() == (16, 16, 5)
