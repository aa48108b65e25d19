"""The inference engine on a constructed model whose right answer is known exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

from TextSegmentLib.engine import _all_finite, _threshold, segment
from TextSegmentLib.errors import Cancelled, InputError
from TextSegmentLib.export import label_map
from TextSegmentLib.models.base import ModelOutput, TextFeatures, TextSegmentationModel
from TextSegmentLib.progress import CancelToken
from TextSegmentLib.volume import Volume, direction_from_axes

VOCAB = {"bright": 0, "dark": 1}


@dataclass
class Config:
    image_size: int = 32


class WindowModel(TextSegmentationModel):
    """'bright' segments what the bone window shows above mid-grey; 'dark' the complement inside the body.

    The answer depends only on each pixel, so the right mask is known exactly in physical space.
    """

    tap_names = ("pixels",)

    def __init__(self, image_size: int = 32, oom_above: int | None = None) -> None:
        super().__init__()
        self.config = Config(image_size)
        self.scale = nn.Parameter(torch.tensor(40.0))
        self.oom_above = oom_above
        self.batches: list[int] = []

    def encode_text(self, prompts, aux_prompts=None):
        ids = torch.tensor([VOCAB[p] for p in prompts])
        return TextFeatures(pooled=nn.functional.one_hot(ids, 2).float())

    def forward(self, images, text, *, taps=None):
        if self.oom_above is not None and images.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("injected")
        self.batches.append(images.shape[0])
        bone = images[:, 2:3]
        sign = text.pooled[:, :1, None, None] * 2 - 1  # +1 bright, -1 dark
        logits = self.scale * sign * (bone - 0.5)
        return ModelOutput(logits=logits, taps={"pixels": images} if taps else {})


def cube_volume(direction=np.eye(3), *, shape=(10, 32, 32)) -> Volume:
    """A soft-tissue body with a bright bone cube near patient left, placed in physical space."""
    vol = Volume(np.zeros(shape, np.int16), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=direction)
    z, y, x = np.indices(shape)
    pts = vol.physical_points(np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)).reshape(*shape, 3)
    centre = pts.reshape(-1, 3).mean(axis=0)
    rel = pts - centre
    hu = np.full(shape, 40, np.int16)
    cube = (np.abs(rel[..., 0] - 6) < 4) & (np.abs(rel[..., 1]) < 5) & (np.abs(rel[..., 2]) < 6)
    hu[cube] = 1200
    return vol.with_array(hu), cube


DIRECTIONS = {
    "identity": np.eye(3),
    "flip_x": np.diag([-1.0, 1.0, 1.0]),
    "flip_y": np.diag([1.0, -1.0, 1.0]),
    "oblique": direction_from_axes([[np.cos(0.2), np.sin(0.2), 0], [-np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]]),
}


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_masks_land_on_the_object_in_physical_space(name):
    volume, cube = cube_volume(DIRECTIONS[name])
    run = segment(volume, ["bright", "dark"], model=WindowModel(), device="cpu")
    assert run.results[0].mask.same_geometry(volume)
    np.testing.assert_array_equal(run.results[0].mask.array.astype(bool), cube)
    np.testing.assert_array_equal(run.results[1].mask.array.astype(bool), ~cube)
    assert run.results[0].probability.array.dtype == np.float16


def test_resize_path_round_trips_to_the_source_grid():
    volume, cube = cube_volume(shape=(6, 48, 40))
    run = segment(volume, "bright", model=WindowModel(image_size=32), device="cpu")
    mask = run.results[0].mask.array.astype(bool)
    assert mask.shape == volume.shape
    dice = 2 * (mask & cube).sum() / (mask.sum() + cube.sum())
    assert dice > 0.9


def test_batch_size_does_not_change_the_masks():
    volume, _ = cube_volume()
    one = segment(volume, ["bright", "dark"], model=WindowModel(), device="cpu", batch_size=1)
    many = segment(volume, ["bright", "dark"], model=WindowModel(), device="cpu", batch_size=7)
    for a, b in zip(one.results, many.results):
        np.testing.assert_array_equal(a.mask.array, b.mask.array)
        np.testing.assert_allclose(a.probability.array, b.probability.array, atol=1e-6)


def test_progress_is_monotonic_and_reaches_one():
    volume, _ = cube_volume()
    seen = []
    segment(volume, "bright", model=WindowModel(), device="cpu", batch_size=3, progress=lambda f, m: seen.append(f))
    assert seen == sorted(seen)
    assert seen[-1] == 1.0
    assert len(seen) >= 1 + 10 // 3


def test_cancel_between_batches_returns_nothing():
    volume, _ = cube_volume()
    token = CancelToken()
    model = WindowModel()

    def on_progress(fraction, message):
        if fraction > 0:
            token.cancel()

    with pytest.raises(Cancelled):
        segment(volume, "bright", model=model, device="cpu", batch_size=2, progress=on_progress, cancel=token)
    assert len(model.batches) == 1


def test_injected_out_of_memory_halves_the_batch_and_finishes():
    volume, cube = cube_volume()
    model = WindowModel(oom_above=3)  # rows = slices × prompts
    run = segment(volume, "bright", model=model, device="cpu", batch_size=8)
    assert run.batch_size == 2
    assert any("out of memory" in w for w in run.warnings)
    np.testing.assert_array_equal(run.results[0].mask.array.astype(bool), cube)


def test_out_of_memory_on_a_short_batch_halves_the_slices_that_ran():
    """3 slices under a batch size of 32: halving 32 to 16, 8, 4 re-ran the same 3 slices and failed each time."""
    volume, cube = cube_volume(shape=(3, 32, 32))
    model = WindowModel(oom_above=2)
    run = segment(volume, "bright", model=model, device="cpu", batch_size=32)
    assert run.warnings == ["out of memory on cpu: retrying with batch size 1"]
    assert run.batch_size == 1 and model.batches == [1, 1, 1]
    np.testing.assert_array_equal(run.results[0].mask.array.astype(bool), cube)


def test_empty_slices_are_skipped_and_stay_empty():
    volume, _ = cube_volume()
    hu = volume.array.copy()
    hu[:3] = -1000
    model = WindowModel()
    run = segment(volume.with_array(hu), "dark", model=model, device="cpu", batch_size=100)
    assert run.skipped_slices == 3
    assert sum(model.batches) == 7
    assert run.results[0].mask.array[:3].sum() == 0


def test_text_is_encoded_once_per_prompt_across_calls(monkeypatch):
    volume, _ = cube_volume()
    model = WindowModel()
    calls = []
    original = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda p, a=None: calls.append(list(p)) or original(p, a))
    segment(volume, ["bright"], model=model, device="cpu")
    segment(volume, ["bright", "dark"], model=model, device="cpu")
    assert calls == [["bright"], ["dark"]]


class TokenModel(WindowModel):
    """WindowModel reading its prompt word by word, its token rows padded to the batch's longest prompt.

    As a Hugging Face text tower pads (non-zero states at the padding, masked out when ``masked``),
    so the same prompt gets a different token length in different batches.
    """

    def __init__(self, *, masked: bool = True) -> None:
        super().__init__()
        self.masked = masked

    def encode_text(self, prompts, aux_prompts=None):
        words = [p.split() for p in prompts]
        length = max(len(w) for w in words)
        tokens = torch.full((len(prompts), length, 2), 0.5)  # padding states: neither word
        mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for row, sentence in enumerate(words):
            for col, word in enumerate(sentence):
                tokens[row, col] = nn.functional.one_hot(torch.tensor(VOCAB[word]), 2).float()
                mask[row, col] = True
        weights = mask.float()[..., None] if self.masked else torch.ones_like(tokens[..., :1])
        pooled = (tokens * weights).sum(1) / weights.sum(1)
        return TextFeatures(pooled=pooled, tokens=tokens, mask=mask if self.masked else None)


@pytest.mark.parametrize("masked", [True, False])
def test_cached_prompts_of_different_token_lengths_are_used_together(masked):
    """'bright' cached from a one-word batch beside a three-word prompt: the token rows differ in length."""
    volume, cube = cube_volume()
    model = TokenModel(masked=masked)
    segment(volume, ["bright"], model=model, device="cpu")
    run = segment(volume, ["bright", "dark dark dark"], model=model, device="cpu")
    fresh = segment(volume, ["bright", "dark dark dark"], model=TokenModel(masked=masked), device="cpu")
    np.testing.assert_array_equal(run[0].mask.array.astype(bool), cube)
    np.testing.assert_array_equal(run[1].mask.array.astype(bool), ~cube)
    for a, b in zip(run.results, fresh.results):
        np.testing.assert_array_equal(a.mask.array, b.mask.array)


class PolarityModel(WindowModel):
    """WindowModel whose prompt embedding goes through a weight: polarity -1 reads 'bright' as 'dark'."""

    def __init__(self) -> None:
        super().__init__()
        self.polarity = nn.Parameter(torch.tensor(1.0))

    def encode_text(self, prompts, aux_prompts=None):
        pooled = super().encode_text(prompts, aux_prompts).pooled
        return TextFeatures(pooled=pooled if self.polarity > 0 else 1 - pooled)


@pytest.mark.parametrize("change", ["in place", "load_state_dict"])
def test_prompts_are_encoded_again_once_the_weights_change(change):
    volume, _ = cube_volume()
    model = PolarityModel()
    bright, dark = (segment(volume, [p], model=model, device="cpu")[0].mask.array for p in ("bright", "dark"))
    assert (bright != dark).any()
    if change == "in place":  # what an optimiser step does
        with torch.no_grad():
            model.polarity.mul_(-1)
    else:  # other weights into the same model object
        flipped = PolarityModel()
        with torch.no_grad():
            flipped.polarity.fill_(-1)
        model.load_state_dict(flipped.state_dict())
    again = segment(volume, ["bright"], model=model, device="cpu")[0].mask.array
    np.testing.assert_array_equal(again, dark)


@pytest.mark.parametrize("prompts", [[], [""], ["   "]])
def test_empty_prompts_are_refused(prompts):
    volume, _ = cube_volume()
    with pytest.raises(InputError, match="prompt"):
        segment(volume, prompts, model=WindowModel(), device="cpu")


def test_a_prompt_given_twice_is_refused_whatever_its_case_and_spacing():
    # it used to make two identical labels, as the CLI and the study batch already refused
    volume, _ = cube_volume()
    with pytest.raises(InputError, match=r"'Bright' is given twice \(prompts 1 and 3\)"):
        segment(volume, ["bright", "dark", "Bright "], model=WindowModel(), device="cpu")


def test_a_negative_min_component_ml_is_named_as_the_cli_user_typed_it_too():
    volume, _ = cube_volume()
    with pytest.raises(InputError, match=r"min_component_ml \(CLI: --min-component-ml\) must be 0 or more"):
        segment(volume, ["bright"], model=WindowModel(), device="cpu", min_component_ml=-1)


class AuxModel(WindowModel):
    """Declares that it reads auxiliary prompts, as TGC-Net does."""

    uses_aux_prompts = True


@pytest.mark.parametrize("aux", ["a bright bone", ["a bright bone"]])
def test_aux_prompts_are_refused_for_a_model_that_ignores_them(aux):
    # they used to be ignored by the model yet recorded in the results (and so the legend)
    volume, _ = cube_volume()
    with pytest.raises(InputError, match="WindowModel does not use auxiliary prompts .*for TGC-Net"):
        segment(volume, ["bright"], model=WindowModel(), aux_prompts=aux, device="cpu")


def test_aux_prompts_reach_a_model_that_uses_them_and_blank_ones_pass_any_model():
    volume, _ = cube_volume()
    run = segment(volume, ["bright"], model=AuxModel(), aux_prompts=["a bright bone"], device="cpu")
    assert run.results[0].aux_prompt == "a bright bone"
    blank = segment(volume, ["bright"], model=WindowModel(), aux_prompts=["  "], device="cpu")  # an empty box
    assert blank.results[0].aux_prompt is None


def test_one_window_name_fills_all_three_channels():
    """A lone preset name is one window (not its letters), given to the model's three channels."""
    volume, cube = cube_volume()
    run = segment(volume, "bright", model=WindowModel(), device="cpu", windows="bone")
    np.testing.assert_array_equal(run[0].mask.array.astype(bool), cube)
    wide = segment(volume, "bright", model=WindowModel(), device="cpu", windows=["lung", "abdomen", "bone"])
    np.testing.assert_array_equal(run[0].mask.array, wide[0].mask.array)


@pytest.mark.parametrize("windows, match", [(("abdomen", "bone"), r"one HU window or three .*got 2"), ("brain", "'brain'")])
def test_windows_that_cannot_fill_three_channels_are_refused(windows, match):
    volume, _ = cube_volume()
    with pytest.raises(InputError, match=match):
        segment(volume, "bright", model=WindowModel(), device="cpu", windows=windows)


def test_nan_volume_is_refused():
    volume, _ = cube_volume()
    bad = volume.with_array(np.where(volume.array > 0, np.nan, 0.0))
    with pytest.raises(InputError, match="NaN"):
        segment(bad, "bright", model=WindowModel(), device="cpu")


@pytest.mark.parametrize("shape", [(0, 32, 32), (3, 0, 32), (3, 32, 0)])
@pytest.mark.parametrize("axis", ["axial", "sagittal"])
def test_a_volume_without_voxels_is_refused_clearly(shape, axis):
    empty = Volume(np.zeros(shape, np.int16), source="empty.nrrd")
    with pytest.raises(InputError, match="empty.nrrd: holds no voxels"):
        segment(empty, "bright", model=WindowModel(), device="cpu", axis=axis)


def test_nan_is_found_in_any_chunk_of_a_strided_volume():
    hu = np.zeros((12, 8, 8), np.float32)
    hu[11, 7, 7] = np.nan
    strided = np.swapaxes(hu, 0, 2)  # not contiguous: checked without a copy, slice block by slice block
    assert not _all_finite(strided, chunk=64)
    assert not _all_finite(hu, chunk=64)
    assert _all_finite(np.zeros((12, 8, 8), np.float32), chunk=64)
    assert _all_finite(np.zeros((3, 4, 4), np.int16))


def test_probabilities_kept_as_float16_while_masks_follow_float32():
    """A threshold between a float32 probability and its float16 rounding: the mask keeps float32's side."""
    volume, _ = cube_volume()
    hu = volume.array.astype(np.float32) + np.linspace(0, 1200, volume.array.size, dtype=np.float32).reshape(
        volume.array.shape)
    volume = volume.with_array(hu)
    exact = segment(volume, "bright", model=WindowModel(), device="cpu", probability_dtype="float32")
    p32 = exact.results[0].probability.array
    assert p32.dtype == np.float32
    rounded = p32.astype(np.float16).astype(np.float32)
    crossing = np.flatnonzero((rounded != p32) & (p32 > 0.05) & (p32 < 0.95))
    assert crossing.size, "the ramp should give probabilities that float16 cannot hold exactly"
    i = crossing[0]
    threshold = float((p32.flat[i] + rounded.flat[i]) / 2)  # float32 and float16 fall on either side of it
    assert (p32.flat[i] >= threshold) != (rounded.flat[i] >= threshold)

    half = segment(volume, "bright", model=WindowModel(), device="cpu", threshold=threshold)
    p16 = half.results[0].probability.array
    assert p16.dtype == np.float16
    np.testing.assert_allclose(p16.astype(np.float32), p32, atol=2.0**-11, rtol=0)
    assert np.mean(p16.astype(np.float32) == rounded) > 0.99  # plain rounding except at the threshold
    expected = (p32 >= np.float32(threshold)).astype(np.uint8)
    np.testing.assert_array_equal(half.results[0].mask.array, expected)
    # the stored map, read back as float32, thresholds to the very mask: no value crossed in the cast
    np.testing.assert_array_equal((p16.astype(np.float32) >= np.float32(threshold)).astype(np.uint8), expected)
    with pytest.raises(InputError, match="probability_dtype"):
        segment(volume, "bright", model=WindowModel(), device="cpu", probability_dtype="float64")


@pytest.mark.parametrize("cut", [0.5, 0.3, 0.50007, 0.4999, 0.9, 0.01, 0.99999])
def test_float16_maps_never_cross_the_threshold(cut):
    rng = np.random.default_rng(1)
    cut = np.float32(cut)
    values = rng.random((2, 64, 64), dtype=np.float32)
    values.flat[:4000] = np.clip(cut + (rng.random(4000).astype(np.float32) - 0.5) * np.float32(2e-3), 0, 1)
    plain = values.astype(np.float16)
    assert ((plain.astype(np.float32) >= cut) != (values >= cut)).any(), "plain rounding should cross here"
    mask, kept = _threshold(values, cut, dtype=np.float16)
    assert kept.dtype == np.float16
    np.testing.assert_array_equal(mask, values >= cut)
    np.testing.assert_array_equal(kept.astype(np.float32) >= cut, mask)
    changed = kept != plain
    assert np.abs(kept.astype(np.float32) - values).max() <= 2.0**-11
    assert np.all(np.abs(values[changed] - cut) < 2.0**-10)  # only values at the threshold move
    exact_mask, exact = _threshold(values, cut, dtype=np.float32)
    assert exact is values and np.array_equal(exact_mask, mask)


def test_cleanup_keeps_the_largest_component():
    volume, cube = cube_volume()
    hu = volume.array.copy()
    hu[0, 0, 0] = 1200  # a speck far from the cube
    run = segment(volume.with_array(hu), "bright", model=WindowModel(), device="cpu", largest_component=True,
                  skip_empty_slices=False)
    np.testing.assert_array_equal(run.results[0].mask.array.astype(bool), cube)


def test_small_islands_are_dropped_by_volume_and_an_empty_result_is_reported():
    volume, cube = cube_volume()
    hu = volume.array.copy()
    hu[0, 0, 0] = 1200  # a 0.002 mL speck; the cube is about 1.4 mL (voxels of 2 mm³)
    volume = volume.with_array(hu)
    kept = segment(volume, "bright", model=WindowModel(), device="cpu", min_component_ml=0.05, skip_empty_slices=False)
    np.testing.assert_array_equal(kept.results[0].mask.array.astype(bool), cube)
    assert not any("nothing found" in w for w in kept.warnings)
    gone = segment(volume, "bright", model=WindowModel(), device="cpu", min_component_ml=5.0, skip_empty_slices=False)
    assert gone.results[0].voxels == 0
    assert any("'bright': nothing found" in w and "5 mL" in w for w in gone.warnings)
    with pytest.raises(InputError, match="min_component_ml"):
        segment(volume, "bright", model=WindowModel(), device="cpu", min_component_ml=-1.0)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_compact_probabilities_cover_the_same_extent_and_leave_the_masks_alone(name):
    from TextSegmentLib.grid import same_extent

    volume, cube = cube_volume(DIRECTIONS[name], shape=(6, 64, 48))
    source = segment(volume, ["bright", "dark"], model=WindowModel(image_size=32), device="cpu")
    compact = segment(volume, ["bright", "dark"], model=WindowModel(image_size=32), device="cpu",
                      probability_grid="compact")
    for full, small in zip(source.results, compact.results):
        np.testing.assert_array_equal(small.mask.array, full.mask.array)
        assert small.mask.same_geometry(volume)
        prob = small.probability
        assert prob.array.dtype == np.float16 and prob.array.size == volume.array.size // 4  # 64 × 48 → 32 × 24
        assert same_extent(prob.ijk_to_lps(), prob.shape, volume.ijk_to_lps(), volume.shape, tolerance_mm=1e-3)
        back, exact = small.probability_values(), full.probability.array.astype(np.float32)
        assert back.shape == volume.shape
        assert np.corrcoef(back.ravel(), exact.ravel())[0, 1] > 0.95
    np.testing.assert_array_equal(label_map(compact), label_map(source))


def test_a_compact_probability_voxel_is_the_mean_of_the_source_voxels_it_covers():
    volume, _ = cube_volume(shape=(4, 64, 48))  # identity: axial slices are the array as it is
    full = segment(volume, "bright", model=WindowModel(image_size=32), device="cpu", probability_dtype="float32")
    small = segment(volume, "bright", model=WindowModel(image_size=32), device="cpu", probability_grid="compact")
    expected = full.results[0].probability.array.reshape(4, 32, 2, 24, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(small.results[0].probability.array.astype(np.float32), expected, atol=2.0**-10)
    assert np.allclose(small.results[0].probability.spacing, (2.0, 2.0, 2.0))
    with pytest.raises(InputError, match="probability_grid"):
        segment(volume, "bright", model=WindowModel(), device="cpu", probability_grid="coarse")


@pytest.mark.parametrize("axis", ["coronal", "axial"])
def test_compact_probabilities_keep_what_the_network_resolved_across_anisotropic_pixels(axis):
    """Coronal slices of a thick-slice CT: 16 rows of 4 mm and 128 columns of 0.5 mm, 64 mm each way.

    The network's 32² square gives the rows 32 pixels, so the compact grid keeps all 16 and a
    12 mm slab survives it; shrunk by voxel counts (4 rows, 16 mm apart) it vanished. Axially the
    8 rows of 1 mm get 4 of the network's pixels, not 2.
    """
    hu = np.full((16, 8, 128), 40, np.int16)
    hu[6:9, :, 30:90] = 1200  # three slices (12 mm) thick, 30 mm wide
    volume = Volume(hu, spacing=(0.5, 1.0, 4.0))
    source = segment(volume, "bright", model=WindowModel(image_size=32), device="cpu", axis=axis)
    compact = segment(volume, "bright", model=WindowModel(image_size=32), device="cpu", axis=axis,
                      probability_grid="compact")
    assert compact[0].probability.shape == {"coronal": (16, 8, 32), "axial": (16, 4, 32)}[axis]
    mask = source[0].mask.array.astype(bool)
    back = compact[0].probability_values() >= 0.5
    assert 2 * (mask & back).sum() / (mask.sum() + back.sum()) > 0.95
    np.testing.assert_allclose(compact[0].probability_values(), source[0].probability.array.astype(np.float32),
                               atol=0.15)


def test_the_label_map_gives_an_overlap_to_the_more_probable_prompt():
    volume, _ = cube_volume()
    ramp = np.linspace(0, 1200, volume.array.size, dtype=np.float32).reshape(volume.shape)
    run = segment(volume.with_array(ramp), ["dark", "bright"], model=WindowModel(), device="cpu", threshold=0.01)
    dark, bright = (r.mask.array > 0 for r in run.results)
    both = dark & bright
    assert both.any() and (bright & ~dark).any(), "a threshold this low should let the two masks overlap"
    labels = label_map(run)
    p_dark, p_bright = (r.probability.array.astype(np.float32) for r in run.results)
    np.testing.assert_array_equal(labels[both], np.where(p_bright[both] > p_dark[both], 2, 1))
    assert set(np.unique(labels[both])) == {1, 2}
    assert set(np.unique(labels[bright & ~dark])) == {2} and set(np.unique(labels[dark & ~bright])) == {1}


def test_holes_are_filled_in_a_one_slice_volume():
    """Every voxel of a one-slice volume lies on its face, so 3D hole filling never filled anything there."""
    hu = np.full((1, 32, 32), 40, np.int16)
    hu[0, 8:24, 8:24] = 1200
    hu[0, 14:18, 14:18] = 40  # a 4 × 4 hole inside the bright square
    notch = (0, slice(8, 12), 15)
    hu[notch] = 40  # a notch open to the outside: not a hole
    run = segment(Volume(hu, spacing=(0.8, 0.8, 5.0)), "bright", model=WindowModel(), device="cpu", fill_holes=True)
    mask = run.results[0].mask.array
    assert mask[0, 14:18, 14:18].all()
    assert not mask[notch].any() and mask.sum() == 16 * 16 - 4


def test_holes_are_filled_in_a_one_voxel_thick_coronal_or_sagittal_volume():
    from TextSegmentLib.postprocess import clean_mask

    ring = np.ones((5, 5), np.uint8)
    ring[2, 2] = 0
    for shape in [(5, 1, 5), (5, 5, 1)]:
        filled = clean_mask(ring.reshape(shape), largest_component=False, fill_holes=True)
        assert filled.shape == shape and filled.all()
    closed = np.zeros((5, 5, 5), np.uint8)
    closed[1:4, 1:4, 1:4] = 1
    closed[2, 2, 2] = 0
    assert clean_mask(closed, largest_component=False)[2, 2, 2] == 1
    assert clean_mask(np.ones((1, 1, 1), np.uint8)).tolist() == [[[1]]]


def test_a_one_voxel_line_has_no_holes_to_fill():
    """A volume thin along two axes is a line: each gap touches the volume's faces, as it would in
    its 1 × N plane, so nothing is filled (squeezing to 1D filled every gap between two pieces)."""
    from TextSegmentLib.postprocess import clean_mask

    line = np.array([1, 0, 1, 0, 1], np.uint8)
    for shape in [(1, 1, 5), (1, 5, 1), (5, 1, 1)]:
        kept = clean_mask(line.reshape(shape), largest_component=False, fill_holes=True)
        assert kept.shape == shape and kept.ravel().tolist() == [1, 0, 1, 0, 1]
    plane = np.zeros((1, 3, 5), np.uint8)
    plane[0, 1] = line  # the same line inside a one-slice plane: not filled either
    assert clean_mask(plane, largest_component=False).sum() == 3


def test_a_run_written_from_python_records_what_ran_as_the_cli_does(tmp_path):
    """``write_segmentation(run, out_dir=...)`` needed the model's name and weights, and its legend lacked the settings."""
    import json

    from TextSegmentLib.export import write_segmentation

    volume, _ = cube_volume()
    model = WindowModel()
    model.config.name = "window-rule"  # a preset's config names it, as freqmedclip-tiny's does
    run = segment(volume, ["bright"], model=model, device="cpu", threshold=0.3, largest_component=True)
    write_segmentation(run, out_dir=tmp_path)
    legend = json.loads((tmp_path / "segmentation.json").read_text())
    assert legend["model"] == "window-rule" and legend["weights"] == "default"
    assert {"weights_file", "weights_sha256", "weights_data_sha256"} <= set(legend)
    assert legend["settings"]["threshold"] == 0.3 and legend["settings"]["largest_component"] is True
    assert legend["settings"]["windows"] == ["abdomen", "lung", "bone"]


def test_a_write_from_python_that_fails_half_way_leaves_the_folder_as_it_was(tmp_path, monkeypatch):
    """``write_segmentation`` wrote file by file: a failure after the label map left it without its legend, and
    with ``overwrite=True`` the earlier run's label map replaced beside its old legend (the CLI staged; Python did not)."""
    from TextSegmentLib.export import write_segmentation
    from TextSegmentLib.io import writers

    volume, _ = cube_volume()
    run = segment(volume, ["bright"], model=WindowModel(), device="cpu")
    out = tmp_path / "out"
    write_segmentation(run, out_dir=out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writers, "write_float_map", full_disk)  # after the label map, before the legend
    other = segment(volume, ["bright", "dark"], model=WindowModel(), device="cpu")  # another label map
    with pytest.raises(OSError, match="No space left"):
        write_segmentation(other, out_dir=out, overwrite=True)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(writers.STAGING_PREFIX)]
    with pytest.raises(OSError, match="No space left"):
        write_segmentation(run, out_dir=tmp_path / "new" / "folder")
    assert not (tmp_path / "new").exists()  # the folders it made are gone again


def test_a_run_prints_in_a_few_lines():
    """In a notebook ``run`` printed every Volume's voxels (numpy's summary of each array): pages per prompt."""
    volume, _ = cube_volume()
    run = segment(volume, ["bright", "dark"], model=WindowModel(), device="cpu")
    text = repr(run)
    assert "Volume(shape=(10, 32, 32), dtype=uint8, spacing=(1, 1, 2)" in text
    assert len(text) < 1500 and "array(" not in text


def test_file_names_keep_the_letters_of_accented_prompts():
    # "lésion hépatique" was written as l_sion_h_patique
    from TextSegmentLib.export import slug

    assert slug("Lésion hépatique") == "lesion_hepatique"
    assert slug("Schädel-Ödem, ç") == "schadel_odem_c"
    assert slug("肝臓") == "prompt"  # no ASCII letter to keep: the file's number tells prompts apart
