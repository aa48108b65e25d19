"""Saliency from the segmenting forward pass: placement, geometry, determinism, no autograd, legends."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from planted_model import PlantedModel, sphere_phantom

import TextSegmentLib.saliency.layer_maps as layer_maps_module
from TextSegmentLib.errors import InputError, ModelError
from TextSegmentLib.saliency import COMBINED, SaliencyConfig, Stage3Weights, build_saliency_sink, explain
from TextSegmentLib.grid import same_extent
from TextSegmentLib.saliency.metrics import energy_inside
from TextSegmentLib.volume import Volume, direction_from_axes

SALIENCY_DIR = Path(layer_maps_module.__file__).resolve().parent


def run_explain(model, volume, prompts=("bright",), **options):
    return explain(volume, list(prompts), model=model, device="cpu", **options)


def central_slices(ball, minimum=100):
    return [k for k in range(ball.shape[0]) if ball[k].sum() >= minimum]


def test_maps_concentrate_on_a_planted_target_and_deeper_is_sharper(model, phantom):
    volume, ball, _ = phantom
    result = run_explain(model, volume).features[0]
    assert result.layers == ["shallow", "deep", "joint", COMBINED]
    for name in result.layers:
        assert result.maps[name].same_geometry(volume)
        assert result.maps[name].array.dtype == np.uint8
    slices = central_slices(ball)
    assert slices, "the phantom must have slices through the ball"
    energy = {name: np.mean([energy_inside(result.values(name)[k], ball[k]) for k in slices]) for name in result.layers}
    assert energy["deep"] > 0.6
    assert energy["deep"] > energy["shallow"] + 0.3
    assert result.target_slices == int((ball.reshape(ball.shape[0], -1).any(axis=1)).sum())


def test_slices_without_a_target_get_zero_maps(model, phantom):
    volume, ball, _ = phantom
    result = run_explain(model, volume).features[0]
    empty = [k for k in range(ball.shape[0]) if not ball[k].any()]
    assert empty
    for name in result.layers:
        assert not result.maps[name].array[empty].any()
        assert result.maps[name].array[~np.isin(np.arange(ball.shape[0]), empty)].any()



def test_explain_with_a_config_still_takes_the_stage_and_threshold_given(model, phantom):
    """Beside a ``config``, ``stage=2`` and ``threshold=0.3`` were dropped in silence: stage 1 maps of the 0.5 mask."""
    volume, _, _ = phantom
    run = run_explain(model, volume, stage=2, threshold=0.3, config=SaliencyConfig(encoding="float16"))
    assert run.features.stage == 2 and run.features.config.threshold == 0.3
    assert run.features.config.encoding == "float16"  # the rest of the config is kept
    assert run_explain(model, volume, config=SaliencyConfig(stage=3)).features.stage == 3

@pytest.mark.parametrize("axis", [0, 1, 2])
def test_a_flipped_volume_gives_the_flipped_maps_exactly(model, axis):
    flip = np.eye(3)
    flip[2 - axis, 2 - axis] = -1.0  # array axis 0, 1, 2 = k, j, i
    volume, _, _ = sphere_phantom()
    flipped, _, _ = sphere_phantom(flip)
    assert np.array_equal(flipped.array, np.flip(volume.array, axis))
    straight = run_explain(model, volume, stage=3).features[0]
    mirrored = run_explain(model, flipped, stage=3).features[0]
    for name in straight.layers:
        assert mirrored.maps[name].same_geometry(flipped)
        assert np.array_equal(mirrored.maps[name].array, np.flip(straight.maps[name].array, axis))


@pytest.mark.parametrize("angle", [0.0, 0.25])
def test_maps_of_an_oblique_volume_sit_on_the_target_in_physical_space(model, angle):
    rotation = [[np.cos(angle), np.sin(angle), 0], [-np.sin(angle), np.cos(angle), 0], [0, 0, 1]]
    volume, ball, centre = sphere_phantom(direction_from_axes(rotation))
    result = run_explain(model, volume).features[0]
    heat = result.values("deep")
    assert result.maps["deep"].same_geometry(volume)
    k, j, i = np.nonzero(heat >= 0.5)
    weights = heat[k, j, i]
    points = volume.physical_points(np.stack([i, j, k], axis=1))
    centre_of_mass = (points * weights[:, None]).sum(axis=0) / weights.sum()
    assert np.linalg.norm(centre_of_mass - centre) < 1.0  # mm; voxels are 1 × 1 × 2 mm
    slices = central_slices(ball)
    assert energy_inside(heat[slices], ball[slices]) > 0.6


def test_the_compact_grid_covers_the_volume_and_agrees_with_the_source_grid(model):
    """Oblique and flipped: the compact maps keep the target's physical place and the flips exactly."""
    rotation = [[np.cos(0.25), np.sin(0.25), 0], [-np.sin(0.25), np.cos(0.25), 0], [0, 0, 1]]
    volume, ball, centre = sphere_phantom(direction_from_axes(rotation))
    compact = SaliencyConfig(stage=3, grid="compact", max_map_size=16)
    result = run_explain(model, volume, config=compact).features[0]
    source = run_explain(model, volume, config=SaliencyConfig(stage=3, grid="source", max_map_size=16)).features[0]
    for name in result.layers:
        stored = result.maps[name]
        assert stored.shape == (8, 16, 16) and stored.spacing == pytest.approx((2.0, 2.0, 2.0))
        assert same_extent(stored.ijk_to_lps(), stored.shape, volume.ijk_to_lps(), volume.shape, tolerance_mm=1e-6)
        assert "compact" in result.legend[name]["grid"]
        decoded = result.values(name)
        assert decoded.shape == volume.shape
        assert np.corrcoef(decoded.ravel(), source.values(name).ravel())[0, 1] > 0.97
    heat = result.maps["deep"].array.astype(np.float32) / 255.0
    k, j, i = np.nonzero(heat >= 0.5)
    points = result.maps["deep"].physical_points(np.stack([i, j, k], axis=1))
    centre_of_mass = (points * heat[k, j, i][:, None]).sum(axis=0) / heat[k, j, i].sum()
    assert np.linalg.norm(centre_of_mass - centre) < 1.5  # mm; compact voxels are 2 × 2 × 2 mm
    slices = central_slices(ball)
    energies = [energy_inside(r.values("deep")[slices], ball[slices]) for r in (result, source)]
    assert energies[0] == pytest.approx(energies[1], abs=0.01)
    flip = np.eye(3)
    flip[1, 1] = -1.0  # rows (array axis 1) run the other way
    flipped, _, _ = sphere_phantom(flip)
    straight = run_explain(model, sphere_phantom()[0], config=compact).features[0]
    mirrored = run_explain(model, flipped, config=compact).features[0]
    assert np.array_equal(mirrored.maps["deep"].array, np.flip(straight.maps["deep"].array, 1))
    with pytest.raises(InputError, match="grid"):
        SaliencyConfig(grid="coarse")


def test_compact_maps_of_coronal_slices_through_thick_slices_keep_every_slice_row(model):
    """16 slices of 4 mm by 128 columns of 0.5 mm: a 64 × 64 mm coronal slice. At most 16 cells a side
    over it, the rows keep all 16 slices; shrunk by voxel counts they were 2, 32 mm apart, and a
    12 mm target three slices thick fell between them: its deep map was zero everywhere."""
    hu = np.full((16, 8, 128), 40, np.int16)
    hu[6:9, :, 30:90] = 1200
    volume = Volume(hu, spacing=(0.5, 1.0, 4.0))
    options = dict(axis="coronal", stage=1)
    compact = run_explain(model, volume, config=SaliencyConfig(grid="compact", max_map_size=16), **options)
    source = run_explain(model, volume, config=SaliencyConfig(grid="source", max_map_size=16), **options)
    a, b = compact.features[0], source.features[0]
    for name in a.layers:
        assert a.maps[name].shape == (16, 8, 16)
        assert same_extent(a.maps[name].ijk_to_lps(), a.maps[name].shape, volume.ijk_to_lps(), volume.shape,
                           tolerance_mm=1e-6)
        assert np.corrcoef(a.values(name).ravel(), b.values(name).ravel())[0, 1] > 0.97
        assert np.abs(a.values(name) - b.values(name)).max() < 0.15
    assert a.values("deep")[6:9].max() > 0.9  # the target's slices stand out (on 2 rows they were all zero)


def test_results_are_bitwise_deterministic(phantom):
    volume, _, _ = phantom
    first = run_explain(PlantedModel(), volume, ["bright", "dark"], stage=3).features
    second = run_explain(PlantedModel(), volume, ["bright", "dark"], stage=3).features
    for a, b in zip(first.prompts, second.prompts):
        assert a.legend == b.legend
        for name in a.layers:
            assert a.maps[name].array.tobytes() == b.maps[name].array.tobytes()


def test_no_autograd_anywhere_in_the_saliency_path(model, phantom, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("autograd was used on the saliency path")

    monkeypatch.setattr(torch.Tensor, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "backward", forbidden)
    monkeypatch.setattr(torch.autograd, "grad", forbidden)
    grad_modes = []
    original = layer_maps_module.region_mean

    def spy(features, weights):
        grad_modes.append(torch.is_grad_enabled())
        return original(features, weights)

    monkeypatch.setattr(layer_maps_module, "region_mean", spy)
    volume, _, _ = phantom
    sink = build_saliency_sink(model=model, stage=3)
    # feed taps that *could* carry gradients: the sink must still build no graph
    sink.begin(volume=volume, plan=_plan(volume), prompts=["bright"], model=model)
    images = torch.rand(2, 3, 32, 32)
    with torch.enable_grad():
        output = model(images, model.encode_text(["bright", "bright"]), taps=True)
        leaves = {name: tap.detach().requires_grad_(True) for name, tap in output.taps.items()}
        output.taps = leaves
        sink.consume(indices=np.array([3, 4]), prompt_rows=torch.zeros(2, dtype=torch.long), output=output, fit=_fit())
    assert grad_modes and not any(grad_modes)
    stored = [m for kept in sink._kept.values() for maps in kept.maps.values() for m in maps]
    assert stored and not any(m.requires_grad or m.grad_fn is not None for m in stored)
    assert all(leaf.grad is None for leaf in leaves.values())
    result = run_explain(model, volume, stage=2)
    assert result.features.prompts[0].maps


def test_saliency_modules_contain_no_gradient_calls():
    """Only gradcam.py (the baseline) may touch autograd; names in code count, docstrings don't."""
    forbidden = {"backward", "autograd", "grad", "enable_grad", "set_grad_enabled", "requires_grad", "requires_grad_"}
    modules = sorted(path for path in SALIENCY_DIR.glob("*.py") if path.name != "gradcam.py")
    assert {"maths.py", "layer_maps.py", "sink.py"} <= {path.name for path in modules}
    for path in modules:
        name, tree = path.name, ast.parse(path.read_text())
        used = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
        used |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
        used |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
        assert not used & forbidden, f"{name} uses {sorted(used & forbidden)}"
    gradcam = ast.parse((SALIENCY_DIR / "gradcam.py").read_text())
    assert "autograd" in {node.attr for node in ast.walk(gradcam) if isinstance(node, ast.Attribute)}


def test_stage_2_uses_the_projection_where_it_exists_and_says_where_it_falls_back(model, phantom):
    volume, _, _ = phantom
    legend = run_explain(model, volume, stage=2).features[0].legend
    assert legend["joint"]["stage"] == 2 and legend["joint"]["space"].startswith("joint")
    assert legend["deep"]["stage"] == 1 and "cannot be mapped" in legend["deep"]["note"]
    assert legend[COMBINED]["layers"] == ["shallow", "deep", "joint"]
    no_text = run_explain(PlantedModel(with_text_embedding=False), volume, stage=2).features[0].legend
    assert all(
        no_text[name]["stage"] == 1 and "no prompt embedding" in no_text[name]["note"] for name in ("deep", "joint")
    )


def test_stage_3_outside_the_text_space_drops_only_its_prompt_term(model, phantom):
    """The image components and the prior stay (the default), or stage 1 when asked for."""
    volume, _, _ = phantom
    legend = run_explain(model, volume, stage=3).features[0].legend
    assert legend["joint"]["stage"] == 3 and "note" not in legend["joint"]
    assert legend["deep"]["stage"] == 3 and "without its prompt term" in legend["deep"]["note"]
    assert legend["deep"]["space"] == "layer features"
    no_text = run_explain(PlantedModel(with_text_embedding=False), volume, stage=3).features[0].legend
    assert all(
        no_text[name]["stage"] == 3 and "no prompt embedding" in no_text[name]["note"] for name in ("deep", "joint")
    )
    as_stage_1 = SaliencyConfig(stage=3, stage3_without_text="stage-1")
    fallback = run_explain(model, volume, stage=3, config=as_stage_1).features[0]
    assert fallback.legend["deep"]["stage"] == 1 and "stage 1 used" in fallback.legend["deep"]["note"]
    stage_1 = run_explain(model, volume, stage=1).features[0]
    assert np.array_equal(fallback.maps["deep"].array, stage_1.maps["deep"].array)
    with pytest.raises(InputError, match="stage3_without_text"):
        SaliencyConfig(stage=3, stage3_without_text="drop")


def test_with_a_fixed_target_only_the_prompt_aware_stages_change_with_the_prompt(model, phantom):
    volume, ball, _ = phantom
    mask = volume.with_array(ball.astype(np.uint8))
    by_stage = {}
    for stage in (1, 2):
        result = run_explain(model, volume, ["bright", "dark"], stage=stage, roi=mask).features
        by_stage[stage] = [result[p].values("joint") for p in ("bright", "dark")]
    assert np.array_equal(*by_stage[1])  # stage 1 sees the target only
    bright, dark = by_stage[2]
    assert not np.array_equal(bright, dark)
    slices = central_slices(ball)
    assert energy_inside(bright[slices], ball[slices]) > energy_inside(dark[slices], ball[slices])


def test_roi_box_sets_the_target(model, phantom):
    volume, _, _ = phantom
    result = run_explain(model, volume, roi=((4, 27), (4, 27), (2, 4))).features[0]
    assert result.target_slices == 3
    assert "voxel box" in result.legend["deep"]["target"]
    heat = result.values("deep")
    assert heat[2:5].any() and not heat[:2].any() and not heat[5:].any()


@pytest.mark.parametrize("box, message", [
    (((40, 50), (0, 5), (0, 1)), "lies entirely outside the image"),  # the phantom is 32x32x8 (I x J x K)
    (((0, 5), (0, 5), (-3, -1)), "lies entirely outside the image"),
    (((10, 4), (0, 5), (0, 1)), "I0 10 is above I1 4"),
])
def test_roi_box_outside_the_volume_or_reversed_is_refused_naming_its_shape(model, phantom, box, message):
    volume, _, _ = phantom
    with pytest.raises(InputError, match=message) as refused:
        run_explain(model, volume, roi=box)
    assert "32x32x8 voxels" in str(refused.value)


def test_roi_box_partly_outside_is_clipped_with_a_warning(model, phantom, caplog):
    volume, _, _ = phantom
    with caplog.at_level("WARNING", logger="TextSegmentLib.saliency.sink"):
        clipped = run_explain(model, volume, roi=((4, 27), (4, 27), (-5, 4))).features[0]
    warned = [r.getMessage() for r in caplog.records if "reaches outside the image" in r.getMessage()]
    assert len(warned) == 1 and "clipped to 4,27,4,27,0,4" in warned[0] and "32x32x8 voxels" in warned[0]
    inside = run_explain(model, volume, roi=((4, 27), (4, 27), (0, 4))).features[0]
    assert clipped.target_slices == inside.target_slices == 5
    assert np.array_equal(clipped.values("deep"), inside.values("deep"))


def test_bad_rois_layers_and_stages_are_clear_errors(model, phantom):
    volume, _, _ = phantom
    with pytest.raises(InputError, match="outside"):
        run_explain(model, volume, roi=((100, 120), (0, 5), (0, 1)))
    wrong_grid = Volume(np.ones((8, 32, 32), np.uint8), spacing=(2.0, 1.0, 2.0))
    with pytest.raises(InputError, match="same voxel grid"):
        run_explain(model, volume, roi=wrong_grid)
    with pytest.raises(ModelError, match="unknown feature tap"):
        build_saliency_sink(model=model, layers="deep,vit.3")
    with pytest.raises(InputError, match="stage"):
        build_saliency_sink(model=model, stage=4)


@pytest.mark.parametrize("shape, spacing, differs", [
    ((8, 32, 32), (2.0, 1.0, 2.0), "; spacing differs"),
    ((6, 16, 16), None, ""),
])
def test_a_target_mask_on_another_grid_names_both_files_and_shapes(shape, spacing, differs):
    # the message used to name neither the mask's file nor either grid
    from TextSegmentLib.saliency.sink import roi_mask

    ct = Volume(np.zeros((8, 32, 32), np.int16), source="ct.nii.gz")
    mask = Volume(np.ones(shape, np.uint8), spacing=spacing or ct.spacing, source="masks/liver.nii.gz")
    with pytest.raises(InputError) as refused:
        roi_mask(mask, ct, what="--target-mask")
    message = str(refused.value)
    assert message.startswith("--target-mask masks/liver.nii.gz is not on the same voxel grid as the CT ct.nii.gz")
    assert f"(shape {shape} vs (8, 32, 32){differs})" in message


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(max_map_size=0), "max_map_size .* got 0"),
        (dict(max_map_size=-4), "max_map_size .* got -4"),
        (dict(max_map_size=64.5), "max_map_size .* got 64.5"),
        (dict(alpha=1.5), "alpha .* got 1.5"),
        (dict(alpha=-0.1), "alpha .* got -0.1"),
        (dict(prior_floor=2.0), "prior_floor .* got 2.0"),
        (dict(prior_floor=float("nan")), "prior_floor .* got nan"),
        (dict(sigma_scale=0.0), "sigma_scale .* got 0.0"),
        (dict(ring_margin=-0.5), "ring_margin .* got -0.5"),
        (dict(weights=Stage3Weights(context=-0.5)), "weight context .* got -0.5"),
    ],
)
def test_config_values_out_of_range_are_refused_at_construction(options, match):
    """Out of range these never failed: max_map_size 0 gave 1×1 maps, alpha 1.5 a blend past the prompt."""
    with pytest.raises(InputError, match=match):
        SaliencyConfig(**options)


def test_config_edges_of_the_ranges_are_accepted():
    SaliencyConfig(max_map_size=1, alpha=0.0, prior_floor=1.0, ring_margin=0.0, weights=Stage3Weights(prompt=0.0))
    SaliencyConfig(max_map_size=np.int64(64), alpha=1.0, prior_floor=0.0)


def test_layers_can_be_chosen_and_float16_matches_uint8(model, phantom):
    volume, _, _ = phantom
    as_uint8 = run_explain(model, volume, layers="deep,joint", stage=3).features[0]
    as_half = run_explain(
        model, volume, layers=["deep", "joint"], config=SaliencyConfig(stage=3, encoding="float16")
    ).features[0]
    assert as_uint8.layers == as_half.layers == ["deep", "joint", COMBINED]
    for name in as_half.layers:
        assert as_half.maps[name].array.dtype == np.float16
        assert np.abs(as_half.values(name) - as_uint8.values(name)).max() <= 1.0 / 255 + 1e-3


@pytest.mark.parametrize("encoding", ["uint8", "float16"])
def test_the_combined_map_is_the_mean_of_the_layer_maps(model, phantom, encoding):
    """Layers of different resolutions: the combined map is resampled in one product, not summed."""
    volume, _, _ = phantom
    result = run_explain(model, volume, config=SaliencyConfig(stage=2, encoding=encoding)).features[0]
    layers = [name for name in result.layers if name != COMBINED]
    mean = np.mean([result.values(name) for name in layers], axis=0)
    assert mean.max() > 0.5
    assert np.abs(result.values(COMBINED) - mean).max() <= 1.0 / 255 + 1e-3  # each layer rounded on its own


def test_saliency_costs_no_extra_forward_pass(phantom):
    volume, _, _ = phantom
    plain, explained = PlantedModel(), PlantedModel()
    from TextSegmentLib.engine import segment

    segment(volume, ["bright", "dark"], model=plain, device="cpu")
    run = run_explain(explained, volume, ["bright", "dark"])
    assert explained.forward_calls == plain.forward_calls
    assert run.features.seconds > 0


def _plan(volume):
    from TextSegmentLib.preprocess import slice_plan

    return slice_plan(volume, axis="axial")


def _fit():
    from TextSegmentLib.preprocess import plan_fit

    return plan_fit((32, 32), size=32)


@pytest.mark.parametrize(
    "layers",
    ["deep,deep,joint", "deep,,joint", " deep , joint ", "deep, ,joint,deep,", [" deep", "", "joint ", "deep"]],
)
def test_layers_are_stripped_blanks_dropped_and_repeats_kept_once(model, layers):
    """A repeated layer was tapped twice and counted twice in the combined map's mean."""
    assert build_saliency_sink(model=model, layers=layers).taps == ("deep", "joint")


def test_unknown_layers_are_refused_at_build_time_listing_the_taps(model):
    with pytest.raises(ModelError, match=r"unknown feature tap\(s\) \['vit.3'\]; this model has \['shallow', 'deep', 'joint'\]"):
        build_saliency_sink(model=model, layers="deep, vit.3 ,deep")
    with pytest.raises(InputError, match="no saliency layers"):
        build_saliency_sink(model=model, layers=" , ")


class CombinedTapModel(PlantedModel):
    tap_names = ("shallow", COMBINED, "deep")


@pytest.mark.parametrize("layers", [None, "deep,combined", [COMBINED]])
def test_a_tap_named_combined_is_refused_as_reserved_at_build_time(layers):
    """Its map and the combined map shared one key in the result's dicts: one of them was lost."""
    model = CombinedTapModel()
    with pytest.raises(InputError, match=r"'combined' .* reserved for the combined map; choose layers among \['shallow', 'deep'\]"):
        build_saliency_sink(model=model, layers=layers)
    assert build_saliency_sink(model=model, layers="shallow,deep").taps == ("shallow", "deep")
