"""What saliency leaves on disk: maps + legend (NIfTI/JSON), the PNG montage, and `textsegment explain`."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from planted_model import PlantedModel, sphere_phantom

from TextSegmentLib.errors import InputError, OutputExistsError
from TextSegmentLib.io import read_image_file, read_volume, write_volume
from TextSegmentLib.preprocess import inverse_fit, plan_fit
from TextSegmentLib.saliency import COMBINED, explain, save_montage, write_saliency
from TextSegmentLib.saliency.export import LEGEND
from TextSegmentLib.saliency.sink import source_weights, to_source


@pytest.fixture
def explained(model, phantom):
    volume, ball, _ = phantom
    return volume, ball, explain(volume, ["bright", "dark"], model=model, device="cpu", stage=2)


def test_source_weights_land_maps_where_inverse_fit_does():
    fit = plan_fit((20, 40), size=32, pixel_spacing=(3.0, 1.0))  # anisotropic and padded
    assert fit.padding != (0, 0, 0, 0)
    y, x = torch.meshgrid(torch.linspace(0, 1, 8), torch.linspace(0, 1, 6), indexing="ij")
    coarse = (torch.sin(3 * x) + y**2)[None, None]  # a smooth 8×6 map over the model square
    direct = to_source(coarse, source_weights(fit, (8, 6)))[0, 0]
    via_square = inverse_fit(F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False), fit)[0, 0]
    assert direct.shape == (20, 40)
    assert torch.allclose(direct, via_square, atol=0.03)


@pytest.mark.parametrize("source", [(20, 40), (37, 11), (32, 32)])
def test_source_weights_equal_bilinear_grid_sampling_with_border_padding(source):
    """The separable matrices are grid_sample's bilinear lookup (border padding, align_corners=False)."""
    fit = plan_fit(source, size=32, pixel_spacing=(1.3, 0.7))
    coarse = torch.rand(2, 3, 8, 5, generator=torch.Generator().manual_seed(1))
    height, width = fit.source_shape
    top, _, left, _ = fit.padding
    rows = (top + (torch.arange(height) + 0.5) * fit.resized_shape[0] / height) / fit.size
    cols = (left + (torch.arange(width) + 0.5) * fit.resized_shape[1] / width) / fit.size
    y, x = torch.meshgrid(rows * 2 - 1, cols * 2 - 1, indexing="ij")
    grid = torch.stack([x, y], dim=-1)[None].expand(2, -1, -1, -1)
    expected = F.grid_sample(coarse, grid, mode="bilinear", padding_mode="border", align_corners=False)
    weights = source_weights(fit, (8, 5))
    assert all(torch.allclose(w.sum(dim=1), torch.ones(len(w))) for w in weights)
    torch.testing.assert_close(to_source(coarse, weights), expected, rtol=0, atol=1e-5)


def test_maps_and_legend_round_trip_through_files(explained, tmp_path):
    volume, _, run = explained
    written = write_saliency(run.features, out_dir=tmp_path, extra_legend={"model": "planted"})
    legend = json.loads((tmp_path / LEGEND).read_text())
    assert legend["stage"] == 2 and legend["model"] == "planted"
    assert [p["prompt"] for p in legend["prompts"]] == ["bright", "dark"]
    files = [layer["file"] for p in legend["prompts"] for layer in p["layers"]]
    assert len(files) == 2 * 4 and len(written) == len(files) + 1
    first = legend["prompts"][0]["layers"]
    assert [layer["layer"] for layer in first] == ["shallow", "deep", "joint", COMBINED]
    assert first[2]["stage"] == 2 and first[1]["stage"] == 1 and "encoding" in first[0]
    image = sitk.ReadImage(str(tmp_path / first[1]["file"]))
    assert sitk.GetArrayFromImage(image).dtype == np.uint8
    assert np.array_equal(sitk.GetArrayFromImage(image), run.features[0].maps["deep"].array)
    assert np.allclose(image.GetDirection(), volume.direction.ravel()) and np.allclose(
        image.GetSpacing(), volume.spacing
    )
    with pytest.raises(OutputExistsError):
        write_saliency(run.features, out_dir=tmp_path)


def test_montage_is_a_non_empty_png(explained, tmp_path):
    volume, ball, run = explained
    from matplotlib.image import imread

    path = save_montage(
        run.features[0], volume=volume, mask=volume.with_array(ball.astype(np.uint8)), path=tmp_path / "m.png"
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(path)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    with pytest.raises(OutputExistsError):
        save_montage(run.features[0], volume=volume, path=path)
    with pytest.raises(InputError, match="outside"):
        save_montage(run.features[0], volume=volume, path=tmp_path / "x.png", slice_index=99)


def test_montage_picks_the_slice_with_the_largest_target(explained):
    volume, ball, run = explained
    import TextSegmentLib.saliency.montage as montage

    chosen = montage.choose_slice(run.features[0], plan=_plan(volume), mask=volume.with_array(ball.astype(np.uint8)))
    assert chosen == int(np.argmax(ball.reshape(ball.shape[0], -1).sum(axis=1)))


def test_montage_with_an_empty_mask_picks_the_most_salient_slice_not_slice_0(explained):
    volume, _, run = explained
    import TextSegmentLib.saliency.montage as montage

    plan = _plan(volume)
    most_salient = montage.choose_slice(run.features[0], plan=plan)
    assert most_salient != 0
    empty = volume.with_array(np.zeros(volume.shape, np.uint8))
    assert montage.choose_slice(run.features[0], plan=plan, mask=empty) == most_salient


def test_explain_command_writes_maps_legend_and_montages(tmp_path, monkeypatch, capsys):
    from TextSegmentLib import weights
    from TextSegmentLib.cli import explain as command

    volume, _, _ = sphere_phantom()
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    monkeypatch.setattr(weights, "load_model", lambda name, weights=None, device="auto": PlantedModel())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    out = tmp_path / "out"
    argv = [
        "explain",
        str(ct),
        "--prompt",
        "bright",
        "--prompt",
        "dark",
        "--layers",
        "deep,joint",
        "--stage",
        "3",
        "--out",
        str(out),
        "--weights",
        "random",
        "--device",
        "cpu",
        "--quiet",
    ]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    legend = json.loads((out / LEGEND).read_text())
    assert legend["weights"] == "random" and legend["stage"] == 3
    assert [layer["layer"] for layer in legend["prompts"][0]["layers"]] == ["deep", "joint", COMBINED]
    for p in legend["prompts"]:
        for layer in p["layers"]:
            assert read_image_file(out / layer["file"]).same_geometry(read_volume(ct))
    assert (out / "01_bright_montage.png").stat().st_size > 1000
    assert (out / "02_dark_montage.png").stat().st_size > 1000
    assert "bright" in capsys.readouterr().out
    with pytest.raises(OutputExistsError):
        args.func(parser.parse_args(argv))


def test_explain_command_stores_compact_maps_over_the_ct_on_request(tmp_path, monkeypatch):
    from TextSegmentLib import weights
    from TextSegmentLib.cli import explain as command
    from TextSegmentLib.grid import same_extent

    volume, _, _ = sphere_phantom(shape=(3, 160, 160))
    ct = write_volume(volume, tmp_path / "ct.nii.gz")
    monkeypatch.setattr(weights, "load_model", lambda name, weights=None, device="auto": PlantedModel())
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["explain", str(ct), "--prompt", "bright", "--layers", "deep", "--grid", "compact",
                              "--out", str(out), "--weights", "random", "--device", "cpu", "--quiet"])
    assert args.func(args) == 0
    legend = json.loads((out / LEGEND).read_text())
    source = read_volume(ct)
    for layer in legend["prompts"][0]["layers"]:
        stored = read_image_file(out / layer["file"])
        assert stored.shape == (3, 128, 128) and "compact" in layer["grid"]
        assert same_extent(stored.ijk_to_lps(), stored.shape, source.ijk_to_lps(), source.shape, tolerance_mm=1e-3)
    assert (out / "01_bright_montage.png").stat().st_size > 1000


def test_explain_command_rejects_a_malformed_roi():
    from TextSegmentLib.cli.explain import parse_roi

    assert parse_roi("1,2,3,4,5,6") == ((1, 2), (3, 4), (5, 6))
    with pytest.raises(InputError, match="six whole numbers"):
        parse_roi("1,2,3")


def _plan(volume):
    from TextSegmentLib.preprocess import slice_plan

    return slice_plan(volume, axis="axial")


def _hand_made_result(names, shape=(2, 4, 4)):
    from TextSegmentLib.saliency.sink import PromptSaliency, SaliencyResult
    from TextSegmentLib.volume import Volume

    maps = {name: Volume(np.full(shape, 10 * (n + 1), np.uint8)) for n, name in enumerate(names)}
    legend = {name: {"layer": name, "encoding": "uint8: value = stored / 255, in [0, 1]"} for name in names}
    item = PromptSaliency(prompt="bright", maps=maps, legend=legend, target_slices=1)
    return SaliencyResult(prompts=[item], stage=1, layers=tuple(names), seconds=0.0, slices=shape[0])


def test_layers_whose_file_names_collide_get_files_of_their_own(tmp_path):
    result = _hand_made_result(["vit.3", "vit_3", "vit 3"])
    write_saliency(result, out_dir=tmp_path)
    layers = json.loads((tmp_path / LEGEND).read_text())["prompts"][0]["layers"]
    assert len({layer["file"] for layer in layers}) == 3
    for layer in layers:
        stored = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / layer["file"])))
        assert np.array_equal(stored, result[0].maps[layer["layer"]].array), layer


def test_float16_maps_are_described_as_the_float32_files_they_become(model, phantom, tmp_path):
    from TextSegmentLib.saliency import SaliencyConfig

    volume, _, _ = phantom
    run = explain(volume, ["bright"], model=model, device="cpu", config=SaliencyConfig(stage=2, encoding="float16"))
    write_saliency(run.features, out_dir=tmp_path)
    for layer in json.loads((tmp_path / LEGEND).read_text())["prompts"][0]["layers"]:
        assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / layer["file"]))).dtype == np.float32
        assert layer["encoding"].startswith("float32"), layer["encoding"]


def test_a_refused_write_leaves_nothing_and_a_failed_one_leaves_no_finished_looking_folder(tmp_path, monkeypatch):
    import TextSegmentLib.io.writers as writers

    result = _hand_made_result(["shallow", "deep", "joint"])
    (tmp_path / LEGEND).write_text("{}")  # an earlier run's legend: refused before any map is written
    with pytest.raises(OutputExistsError):
        write_saliency(result, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [LEGEND]

    (tmp_path / LEGEND).unlink()
    write_saliency(result, out_dir=tmp_path)
    real, calls = writers.write_volume, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(writers, "write_volume", failing)
    with pytest.raises(OSError):
        write_saliency(result, out_dir=tmp_path, overwrite=True)
    assert not (tmp_path / LEGEND).exists()  # no legend: the folder does not look finished
    calls.clear()
    with pytest.raises(OSError):
        write_saliency(result, out_dir=tmp_path / "fresh")
    assert not [p for p in (tmp_path / "fresh").rglob("*") if p.is_file()]


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_montage_of_a_one_slice_volume_across_its_thin_axis(model, tmp_path, axis):
    volume, ball, _ = sphere_phantom(shape=(1, 32, 32), centre_offset=(0.0, 0.0, 0.0))
    run = explain(volume, ["bright"], model=model, device="cpu", stage=2)
    mask = volume.with_array(ball.astype(np.uint8))
    assert save_montage(run.features[0], volume=volume, mask=mask, path=tmp_path / "m.png", axis=axis).exists()
    assert save_montage(run.features[0], volume=volume, path=tmp_path / "n.png", axis=axis).exists()


def test_zoom_window_centres_a_small_target_with_context_and_stays_on_the_slice():
    from TextSegmentLib.saliency.montage import zoom_window

    region = np.zeros((512, 512), bool)
    region[100:110, 200:210] = True
    rows, cols = zoom_window(region, spacing=(1.0, 1.0))
    assert (rows.stop - rows.start, cols.stop - cols.start) == (128, 128)  # magnified 4 times at most
    assert rows.start <= 100 and rows.stop >= 110 and cols.start <= 200 and cols.stop >= 210
    assert abs((rows.start + rows.stop) / 2 - 105) <= 1 and abs((cols.start + cols.stop) / 2 - 205) <= 1
    region[:] = False
    region[0:60, 500:512] = True  # at a corner: shifted onto the slice, not shrunk
    rows, cols = zoom_window(region, spacing=(1.0, 1.0))
    assert rows.start == 0 and cols.stop == 512 and rows.stop - rows.start == cols.stop - cols.start == 180
    rows, cols = zoom_window(region, spacing=(2.0, 1.0), zoom="on")  # square in millimetres, not in pixels
    assert 2 * (rows.stop - rows.start) == cols.stop - cols.start


def test_zoom_window_auto_leaves_large_or_absent_targets_whole():
    from TextSegmentLib.saliency.montage import zoom_window

    region = np.zeros((100, 100), bool)
    assert zoom_window(region, spacing=(1.0, 1.0), zoom="on") is None  # nothing to zoom on
    region[10:40, 40:45] = True  # its window (30 mm each side of it) would magnify less than 2 times
    assert zoom_window(region, spacing=(1.0, 1.0)) is None
    assert zoom_window(region, spacing=(1.0, 1.0), zoom="on") is not None
    region[:] = False
    region[50:52, 50:52] = True
    assert zoom_window(region, spacing=(1.0, 1.0), zoom="off") is None


def test_montage_zooms_the_overlays_on_a_small_target_and_frames_it_on_the_ct(explained):
    from TextSegmentLib.saliency.montage import render_montage

    volume, ball, run = explained
    small = np.zeros(ball.shape, np.uint8)
    k, j, i = (int(round(c.mean())) for c in np.nonzero(ball))
    small[k, j - 1:j + 2, i - 1:i + 2] = 1  # 3 of 32 pixels across: a lesion-sized target
    mask = volume.with_array(small)
    figure = render_montage(run.features[0], volume=volume, mask=mask)
    ct_axes, target_axes, layer_axes = figure.axes[0], figure.axes[1], figure.axes[2]
    whole = ct_axes.images[0].get_array().shape
    zoomed = layer_axes.images[1].get_array().shape  # [0] is the CT under the heat map
    assert zoomed[0] < whole[0] and zoomed[1] < whole[1]
    assert "zoom ×" in target_axes.get_title() and len(ct_axes.patches) == 1
    flat = render_montage(run.features[0], volume=volume, mask=mask, zoom="off")
    assert flat.axes[2].images[1].get_array().shape == whole and not flat.axes[0].patches
    with pytest.raises(InputError, match="zoom"):
        render_montage(run.features[0], volume=volume, mask=mask, zoom="yes")


def test_explain_zoom_option_reaches_every_montage(tmp_path, monkeypatch):
    from TextSegmentLib import saliency, weights
    from TextSegmentLib.cli import explain as command

    ct = write_volume(sphere_phantom()[0], tmp_path / "ct.nii.gz")
    monkeypatch.setattr(weights, "load_model", lambda name, weights=None, device="auto": PlantedModel())
    asked = []
    monkeypatch.setattr(saliency, "save_montage", lambda item, **options: asked.append(options["zoom"]) or options["path"])
    parser = argparse.ArgumentParser()
    command.register(parser.add_subparsers())
    base = ["explain", str(ct), "--prompt", "bright", "--prompt", "dark", "--weights", "random", "--device", "cpu", "--quiet"]
    for zoom, out in (([], "a"), (["--zoom", "off"], "b")):
        args = parser.parse_args(base + zoom + ["--out", str(tmp_path / out)])
        assert args.func(args) == 0
    assert asked == ["auto", "auto", "off", "off"]
