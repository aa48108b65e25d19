"""What a user meets explaining a segmentation from the command line and the API (docs/usage.md, explain)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
from planted_model import PlantedModel, sphere_phantom

from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.io import write_volume
from TextSegmentLib.saliency import build_saliency_sink, explain, write_saliency
from TextSegmentLib.saliency.export import LEGEND


def _command(tmp_path, monkeypatch):
    """The explain command on the planted model, and the CT it explains."""
    from TextSegmentLib import weights
    from TextSegmentLib.cli import explain as command

    volume, ball, _ = sphere_phantom()
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    monkeypatch.setattr(weights, "load_model", lambda name, weights=None, device="auto": PlantedModel())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())

    def run(*options):
        args = parser.parse_args(["explain", str(ct), "--weights", "random", "--device", "cpu", "--quiet", *options])
        return args.func(args)

    return run, volume, ball


def test_an_existing_montage_is_refused_before_any_map_or_legend_is_written(tmp_path, monkeypatch):
    """The montage used to be checked last: the run stopped with this run's maps and legend beside an old PNG."""
    run, _, _ = _command(tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    (out / "01_bright_montage.png").write_bytes(b"an earlier picture")
    with pytest.raises(OutputExistsError, match="01_bright_montage.png: exists already.*nothing was written"):
        run("--prompt", "bright", "--layers", "deep", "--out", str(out))
    assert sorted(p.name for p in out.iterdir()) == ["01_bright_montage.png"]
    assert (out / "01_bright_montage.png").read_bytes() == b"an earlier picture"


def test_an_empty_target_mask_is_refused_naming_the_option_and_the_file(tmp_path, monkeypatch):
    run, volume, _ = _command(tmp_path, monkeypatch)
    empty = write_volume(volume.with_array(np.zeros(volume.shape, np.uint8)), tmp_path / "empty_mask.nii.gz")
    with pytest.raises(InputError, match=r"--target-mask .*empty_mask\.nii\.gz marks no voxel"):
        run("--prompt", "bright", "--target-mask", str(empty), "--out", str(tmp_path / "out"))


def test_a_multi_label_target_mask_is_explained_as_the_union_with_a_warning(tmp_path, monkeypatch, capsys):
    """A label map of several structures was silently explained as all of them at once."""
    run, volume, ball = _command(tmp_path, monkeypatch)
    labels = np.where(ball, 1, 0).astype(np.uint8)
    labels[0, :4, :4] = 2
    mask = write_volume(volume.with_array(labels), tmp_path / "labels.nii.gz")
    out = tmp_path / "out"
    assert run("--prompt", "bright", "--layers", "deep", "--target-mask", str(mask), "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "warning: --target-mask" in printed and "holds 2 labels (1, 2)" in printed and "union" in printed
    legend = json.loads((out / LEGEND).read_text())
    target = legend["prompts"][0]["layers"][0]["target"]
    assert "labels.nii.gz" in target and "every voxel above 0" in target


def test_the_montage_of_a_box_is_titled_as_the_box_not_as_the_mask(tmp_path, monkeypatch):
    run, _, _ = _command(tmp_path, monkeypatch)
    import TextSegmentLib.saliency as saliency

    seen = []
    real = saliency.save_montage
    monkeypatch.setattr(saliency, "save_montage", lambda *a, **k: seen.append(k["outline_label"]) or real(*a, **k))
    run("--prompt", "bright", "--layers", "deep", "--roi", "10,20,10,20,2,5", "--out", str(tmp_path / "box"))
    run("--prompt", "bright", "--layers", "deep", "--out", str(tmp_path / "mask"))
    assert seen == ["ROI box outline", "mask outline"]


def test_overwrite_warns_about_files_an_earlier_run_left(tmp_path, monkeypatch, capsys):
    """--overwrite replaces files by name: an earlier run's extra layer looked like part of this run."""
    run, _, _ = _command(tmp_path, monkeypatch)
    out = tmp_path / "out"
    run("--prompt", "bright", "--layers", "deep,joint", "--out", str(out))
    capsys.readouterr()
    run("--prompt", "bright", "--layers", "deep", "--out", str(out), "--overwrite")
    printed = capsys.readouterr().out
    assert "warning: 1 file(s)" in printed and "01_bright/joint.nii.gz" in printed
    run("--prompt", "bright", "--layers", "deep", "--out", str(tmp_path / "fresh"))
    assert "earlier run" not in capsys.readouterr().out


def test_the_legend_names_the_box_as_clipped_and_the_slice_axis(model, phantom, tmp_path):
    """The API legend recorded the box asked for (-5..), not the one explained (0..); and no axis for its counts."""
    volume, _, _ = phantom
    run = explain(volume, ["bright"], model=model, device="cpu", roi=((-5, 20), (4, 20), (1, 6)), axis="coronal")
    write_saliency(run.features, out_dir=tmp_path)
    legend = json.loads((tmp_path / LEGEND).read_text())
    assert legend["axis"] == "coronal" and legend["slices"] == volume.shape[1]
    assert legend["prompts"][0]["layers"][0]["target"].endswith("[[0, 20], [4, 20], [1, 6]]")
    assert "not low saliency" in legend["on_slices_without_target"]


def test_empty_layers_are_refused_listing_the_taps_and_the_default(model):
    model.saliency_layers = ("deep",)
    with pytest.raises(InputError, match=r"name some among shallow, deep, joint, .*default \(deep\)"):
        build_saliency_sink(model=model, layers=" , ")


def _heat_panels(figure, layer_names):
    """The layers' panels: after the CT and the target panel, before the colour bar."""
    panels = figure.axes[2 : 2 + len(layer_names)]
    assert len(panels) == len(layer_names) and all(ax.get_title() for ax in panels)  # the colour bar has none
    return panels


def test_the_montage_of_a_prompt_found_nowhere_says_so_on_the_middle_slice(model):
    """All-zero maps were drawn as a dark overlay (read as "low saliency") on slice 0."""
    from TextSegmentLib.preprocess import slice_plan
    from TextSegmentLib.saliency.montage import choose_slice, render_montage

    volume, _, _ = sphere_phantom()
    volume = volume.with_array(np.minimum(volume.array, 40))  # no bone: "bright" finds nothing
    item = explain(volume, ["bright"], model=model, device="cpu", layers="deep").features[0]
    assert item.target_slices == 0
    assert choose_slice(item, plan=slice_plan(volume, axis="axial")) == volume.shape[0] // 2
    figure = render_montage(item, volume=volume)
    assert any("nothing found for this prompt" in t.get_text() for t in figure.texts)
    for ax in _heat_panels(figure, item.layers):
        assert len(ax.images) == 1  # the CT only, no overlay
        assert any("nothing to explain" in t.get_text() for t in ax.texts)


def test_the_montage_of_a_slice_without_target_says_so_and_one_with_a_target_does_not(explained_bright):
    from TextSegmentLib.saliency.montage import render_montage

    volume, ball, item = explained_bright
    area = ball.reshape(ball.shape[0], -1).sum(axis=1)
    empty, full = int(np.flatnonzero(area == 0)[0]), int(np.argmax(area))
    mask = volume.with_array(ball.astype(np.uint8))
    figure = render_montage(item, volume=volume, mask=mask, slice_index=empty)
    assert any("this slice has no target" in t.get_text() for t in figure.texts)
    assert all(len(ax.images) == 1 for ax in _heat_panels(figure, item.layers))
    assert any(ax.get_title() == "mask outline (none on this slice)" for ax in figure.axes)
    figure = render_montage(item, volume=volume, mask=mask, slice_index=full)
    assert not any("no target" in t.get_text() for t in figure.texts)
    assert all(len(ax.images) == 2 for ax in _heat_panels(figure, item.layers))


@pytest.fixture
def explained_bright(model, phantom):
    volume, ball, _ = phantom
    return volume, ball, explain(volume, ["bright"], model=model, device="cpu", stage=3).features[0]


def test_panel_titles_say_when_a_layer_could_not_take_the_stage_asked_for():
    from TextSegmentLib.saliency.montage import _panel_title
    from TextSegmentLib.saliency.sink import PromptSaliency

    legend = {
        "a": {"stage": 1, "stage_requested": 2, "note": "no text space: stage 1 used"},
        "b": {"stage": 3, "stage_requested": 3, "note": "stage 3 without its prompt term"},
        "c": {"stage": 3, "stage_requested": 3},
    }
    item = PromptSaliency(prompt="x", maps={}, legend=legend, target_slices=1)
    assert [_panel_title(item, n) for n in "abc"] == [
        "a · stage 1 (fallback)", "b · stage 3, no prompt", "c · stage 3"]


def _stored_y_flipped(volume, array):
    """``array`` (on ``volume``'s grid) stored with its y axis reversed: the same voxels, another geometry."""
    from TextSegmentLib.volume import Volume

    direction = np.asarray(volume.direction, dtype=float)
    last_row = np.asarray(volume.origin) + (volume.shape[1] - 1) * volume.spacing[1] * direction[:, 1]
    return Volume(np.ascontiguousarray(array[:, ::-1, :]), spacing=volume.spacing, origin=tuple(last_row),
                  direction=direction @ np.diag([1.0, -1.0, 1.0]))


def test_a_target_mask_stored_y_flipped_is_explained_on_the_same_voxels(tmp_path, monkeypatch):
    """TotalSegmentator's mask beside the DICOM series is y-flipped (shared/data MANIFEST): it was refused."""
    from TextSegmentLib.saliency.sink import roi_mask

    run, volume, ball = _command(tmp_path, monkeypatch)
    flipped = _stored_y_flipped(volume, ball.astype(np.uint8))
    assert not flipped.same_geometry(volume)
    assert np.array_equal(roi_mask(flipped, volume), ball.astype(np.uint8))
    mask = write_volume(flipped, tmp_path / "flipped.nii.gz")
    out = tmp_path / "out"
    assert run("--prompt", "bright", "--layers", "deep", "--target-mask", str(mask), "--out", str(out)) == 0
    legend = json.loads((out / LEGEND).read_text())
    assert legend["prompts"][0]["slices_with_target"] == int(ball.any(axis=(1, 2)).sum())


def test_the_montage_outlines_a_flipped_mask_where_it_lies_and_refuses_one_on_another_grid(explained_bright):
    from TextSegmentLib.saliency.montage import render_montage
    from TextSegmentLib.volume import Volume

    volume, ball, item = explained_bright
    slice_index = int(np.argmax(ball.reshape(ball.shape[0], -1).sum(axis=1)))
    same = render_montage(item, volume=volume, mask=volume.with_array(ball.astype(np.uint8)), slice_index=slice_index)
    flipped = render_montage(item, volume=volume, mask=_stored_y_flipped(volume, ball.astype(np.uint8)),
                             slice_index=slice_index)

    def outline(figure):
        return [path.vertices.round(3).tolist() for c in figure.axes[1].collections for path in c.get_paths()]

    assert outline(same) and outline(flipped) == outline(same)
    with pytest.raises(InputError, match="montage mask .* is not on the same voxel grid"):
        render_montage(item, volume=volume, mask=Volume(np.ones((2, 8, 8), np.uint8)))


def test_a_prompt_in_a_script_the_font_lacks_is_titled_with_escapes_not_empty_boxes(explained_bright):
    """"肝臓" was drawn as two empty boxes, with a "Glyph missing" warning on stderr."""
    import dataclasses
    import warnings

    from TextSegmentLib.saliency.montage import render_montage

    volume, _, item = explained_bright
    figure = render_montage(dataclasses.replace(item, prompt="肝臓 liver, lésion"), volume=volume)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph is a UserWarning at draw time
        figure.canvas.draw()
    assert figure._suptitle.get_text() == "“\\u809d\\u81d3 liver, lésion”: layer-wise saliency"


def test_the_legend_says_the_bounds_come_from_the_slices_with_a_target(model, phantom, tmp_path):
    """It said "percentile over the volume", but the maps exist, and their percentiles are taken, on target slices."""
    volume, ball, _ = phantom
    run = explain(volume, ["bright"], model=model, device="cpu", layers="deep")
    entry = run.features[0].legend["deep"]
    assert "over the slices with a target" in entry["rescale"] and "volume" not in entry["rescale"]
    assert "percentiles 1 and 99" in entry["rescale"] and 0 < run.features[0].target_slices < volume.shape[0]


def test_the_legend_names_the_ct_explained_and_the_montages(tmp_path, monkeypatch):
    """The legend named neither the CT it explains nor the PNGs written beside it."""
    run, _, _ = _command(tmp_path, monkeypatch)
    out = tmp_path / "out"
    run("--prompt", "bright", "--prompt", "dark", "--layers", "deep", "--out", str(out))
    legend = json.loads((out / LEGEND).read_text())
    assert legend["input"] == str(tmp_path / "ct.nii.gz")
    assert legend["montages"] == ["01_bright_montage.png", "02_dark_montage.png"]
    assert all((out / name).is_file() for name in legend["montages"])


@pytest.mark.parametrize("z_sign, stored", [(1.0, 0), (-1.0, 7)])
def test_the_ct_panel_gives_the_files_slice_index_beside_the_montages(model, z_sign, stored):
    """A file stored superior first: montage slice 0 is the file's k = 7, which a --roi K range or a viewer uses."""
    from TextSegmentLib.saliency.montage import render_montage

    volume, _, _ = sphere_phantom(np.diag([1.0, 1.0, z_sign]))
    item = explain(volume, ["bright"], model=model, device="cpu", layers="deep").features[0]
    figure = render_montage(item, volume=volume, slice_index=0)
    assert figure.axes[0].get_title() == f"CT: axial slice 0/8 (voxel k = {stored})"


def test_the_help_says_what_threshold_roi_axes_and_no_contrast_mean():
    """--threshold had no help, --roi named no axes, and --no-contrast read as "no stretch" though it keeps one."""
    from TextSegmentLib.cli import explain as command

    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers(dest="command"))
    sub = parser._subparsers._group_actions[0].choices["explain"]
    helps = {action.dest: action.help or "" for action in sub._actions}
    assert "predicted mask" in helps["threshold"]
    assert "x (I), y (J) and z (K)" in helps["roi"]
    assert "without CLAHE" in helps["no_contrast"] and "percentile stretch" in helps["no_contrast"]


def test_a_montage_over_another_volume_is_refused_clearly(explained_bright):
    from TextSegmentLib.saliency.montage import render_montage

    _, _, item = explained_bright
    other, _, _ = sphere_phantom(shape=(8, 40, 40))
    shapes = r"explain a volume of shape \(8, 32, 32\), not this one of shape \(8, 40, 40\)"
    with pytest.raises(InputError, match=shapes):
        render_montage(item, volume=other)


def test_a_mask_moved_off_the_ct_grid_is_refused_saying_what_differs(phantom):
    import dataclasses

    from TextSegmentLib.saliency.sink import roi_mask

    volume, ball, _ = phantom
    moved = dataclasses.replace(volume.with_array(ball.astype(np.uint8)), origin=(50.0, 0.0, 0.0))
    with pytest.raises(InputError, match=r"--target-mask .*\(shape \(8, 32, 32\) vs \(8, 32, 32\); origin differs\)"):
        roi_mask(moved, volume, what="--target-mask")


def test_an_out_folder_under_a_file_is_refused_before_the_run_not_with_a_traceback_after_it(tmp_path, monkeypatch,
                                                                                           explained_bright):
    run, _, _ = _command(tmp_path, monkeypatch)
    from TextSegmentLib import weights

    monkeypatch.setattr(weights, "load_model", lambda *a, **k: pytest.fail("the model ran before the refusal"))
    below_a_file = tmp_path / "ct.nii.gz" / "out"
    with pytest.raises(InputError, match=r"ct\.nii\.gz/out: cannot be a folder: .*ct\.nii\.gz is a file"):
        run("--prompt", "bright", "--out", str(below_a_file))
    from TextSegmentLib.saliency.sink import SaliencyResult

    _, _, item = explained_bright
    result = SaliencyResult(prompts=[item], stage=3, layers=tuple(item.layers[:-1]), seconds=0.0, slices=8)
    with pytest.raises(InputError, match="cannot be a folder"):
        write_saliency(result, out_dir=below_a_file)


def test_the_colour_bar_says_each_layer_has_its_own_scale(explained_bright):
    """"saliency (0–1)" read as one scale for every panel, but each layer maps its own bounds to 0 and 1."""
    from TextSegmentLib.saliency.montage import render_montage

    volume, _, item = explained_bright
    figure = render_montage(item, volume=volume)
    assert figure.axes[-1].get_ylabel() == "saliency (0–1, each layer rescaled on its own)"
