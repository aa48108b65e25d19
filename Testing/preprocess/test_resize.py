import numpy as np
import pytest
import torch

from TextSegmentLib.errors import InputError
from TextSegmentLib.preprocess import fit_to_square, inverse_fit, plan_fit


def smooth_image(shape, spacing=(1.0, 1.0)):
    rows = (np.arange(shape[0]) + 0.5) * spacing[0]
    cols = (np.arange(shape[1]) + 0.5) * spacing[1]
    r, c = np.meshgrid(rows / rows[-1], cols / cols[-1], indexing="ij")
    return (np.sin(2.0 * r) * np.cos(1.5 * c) + 0.5 * r).astype(np.float32)


def test_shapes_and_centred_padding():
    images = np.ones((3, 20, 40), dtype=np.float32)
    out, fit = fit_to_square(images, size=80, pad_value=-1.0)
    assert out.shape == (3, 80, 80) and isinstance(out, np.ndarray)
    assert fit.resized_shape == (40, 80) and fit.padding == (20, 20, 0, 0)
    assert np.all(out[:, :20] == -1) and np.all(out[:, 60:] == -1) and np.all(out[:, 20:60] == 1)
    assert fit.output_spacing == pytest.approx(0.5)


def test_channels_are_kept():
    images = torch.rand(2, 3, 30, 50)
    out, fit = fit_to_square(images, size=64)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3, 64, 64)
    assert inverse_fit(out, fit).shape == (2, 3, 30, 50)


def test_a_physical_circle_stays_a_circle_with_anisotropic_pixels():
    spacing = (2.0, 0.5)  # rows 2 mm apart, columns 0.5 mm: 32 x 128 pixels cover 64 x 64 mm
    rows = (np.arange(32) + 0.5) * spacing[0] - 32
    cols = (np.arange(128) + 0.5) * spacing[1] - 32
    disc = (rows[:, None] ** 2 + cols[None, :] ** 2 <= 20.0**2).astype(np.float32)
    out, fit = fit_to_square(disc[None], size=64, pixel_spacing=spacing)
    assert fit.resized_shape == (64, 64) and fit.output_spacing == pytest.approx(1.0)
    mask = out[0] > 0.5
    height = np.ptp(np.nonzero(mask.any(axis=1))[0]) + 1
    width = np.ptp(np.nonzero(mask.any(axis=0))[0]) + 1
    assert abs(height - width) <= 1 and abs(height - 40) <= 2
    assert mask.sum() == pytest.approx(np.pi * 20**2, rel=0.05)


def test_smooth_image_round_trip_is_close_when_enlarging_and_when_shrinking():
    for shape, size in [((60, 90), 224), ((512, 384), 352)]:
        image = smooth_image(shape)[None]
        out, fit = fit_to_square(image, size=size)
        back = inverse_fit(out, fit)
        assert back.shape == image.shape
        assert np.abs(back - image)[:, 2:-2, 2:-2].max() < 0.02


def test_labels_survive_a_nearest_round_trip():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 3, 7, 200], size=(2, 37, 53)).astype(np.uint8)
    out, fit = fit_to_square(labels, size=160, pixel_spacing=(0.9, 0.7), mode="nearest")
    assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 3, 7, 200}
    back = inverse_fit(out, fit, mode="nearest")
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, labels)  # enlarging, then shrinking back, is exact


def test_nearest_keeps_the_label_set_when_shrinking():
    labels = np.zeros((1, 400, 300), dtype=np.int64)
    labels[0, 100:200, 50:150] = 2
    labels[0, 250:380, 160:290] = 5
    out, fit = fit_to_square(labels, size=96, mode="nearest")
    assert set(np.unique(out)) == {0, 2, 5}
    back = inverse_fit(out, fit, mode="nearest")
    assert set(np.unique(back)) == {0, 2, 5}
    assert np.mean(back == labels) > 0.98


def test_probabilities_map_back_linearly_onto_the_source_grid():
    probs = torch.zeros(1, 128, 128)
    probs[0, 32:96, 32:96] = 1.0
    fit = plan_fit((64, 32), size=128, pixel_spacing=(1.0, 2.0))
    assert fit.resized_shape == (128, 128)
    back = inverse_fit(probs, fit)
    assert back.shape == (1, 64, 32) and back.dtype == torch.float32
    assert back[0, 32, 16] == pytest.approx(1.0) and back[0, 2, 2] == pytest.approx(0.0)


def test_bad_inputs_raise():
    with pytest.raises(InputError):
        fit_to_square(np.zeros((4, 4)), size=8)
    with pytest.raises(InputError):
        fit_to_square(np.zeros((1, 4, 4)), size=8, pixel_spacing=(0.0, 1.0))
    with pytest.raises(InputError):
        fit_to_square(np.zeros((1, 4, 4)), size=8, mode="cubic")
    with pytest.raises(ValueError):
        inverse_fit(np.zeros((1, 9, 9)), plan_fit((4, 4), size=8))


def test_real_labels_go_to_the_model_grid_and_back_unchanged(shared_data):
    import SimpleITK as sitk

    from TextSegmentLib.preprocess import slice_plan, window_composite
    from TextSegmentLib.volume import Volume

    image = sitk.ReadImage(str(shared_data / "ct/totalseg_example_ct_sm/example_seg.nii.gz"))
    seg = Volume(
        sitk.GetArrayFromImage(image),
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )
    plan = slice_plan(seg)
    slices = torch.from_numpy(plan.extract(seg.array))
    model_input, fit = fit_to_square(window_composite(slices.float()), size=352, pixel_spacing=plan.pixel_spacing)
    assert model_input.shape == (plan.num_slices, 3, 352, 352)
    on_model_grid, fit_labels = fit_to_square(slices, size=352, pixel_spacing=plan.pixel_spacing, mode="nearest")
    assert fit_labels == fit
    back = plan.restore(inverse_fit(on_model_grid, fit, mode="nearest"))
    assert torch.equal(back, torch.from_numpy(seg.array))
