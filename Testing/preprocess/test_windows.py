import numpy as np
import pytest
import torch

from TextSegmentLib.errors import InputError
from TextSegmentLib.preprocess import WINDOW_PRESETS, Window, apply_window, get_window, window_composite


def test_presets_hold_the_documented_values():
    expected = {
        "abdomen": (40, 400),
        "liver": (60, 150),
        "lung": (-600, 1500),
        "bone": (400, 1800),
        "mediastinum": (50, 350),
        "soft_tissue": (50, 400),
    }
    assert {name: (w.center, w.width) for name, w in WINDOW_PRESETS.items()} == expected


def test_window_maps_its_edges_to_0_and_1_and_clips_outside():
    hu = np.array([-1000, -160, 40, 240, 3000], dtype=np.int16)
    out = apply_window(hu, preset="abdomen")
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_center_and_width_match_the_equivalent_preset():
    hu = np.linspace(-1500, 1500, 101)
    np.testing.assert_array_equal(apply_window(hu, center=-600, width=1500), apply_window(hu, preset="lung"))


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"center": 40}, {"preset": "abdomen", "width": 400}, {"preset": "brain_stem"}, {"center": 0, "width": 0}],
)
def test_bad_window_requests_raise_input_errors(kwargs):
    with pytest.raises(InputError):
        apply_window(np.zeros(3), **kwargs)


def test_get_window_accepts_names_pairs_and_windows():
    assert get_window("Soft Tissue") == WINDOW_PRESETS["soft_tissue"]
    assert get_window((10, 20)) == Window(center=10.0, width=20.0)
    assert get_window(Window(1.0, 2.0)).high == 2.0


def test_composite_is_channel_first_per_slice_in_unit_range():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1200, 2000, size=(4, 16, 24)).astype(np.int16)
    out = window_composite(hu)
    assert out.shape == (4, 3, 16, 24) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    np.testing.assert_array_equal(out[:, 0], apply_window(hu, preset="abdomen"))
    np.testing.assert_array_equal(out[:, 1], apply_window(hu, preset="lung"))
    np.testing.assert_array_equal(out[:, 2], apply_window(hu, preset="bone"))


def test_composite_of_one_slice_and_custom_windows():
    hu = np.full((5, 6), 100.0)
    out = window_composite(hu, windows=("liver", (100, 50)))
    assert out.shape == (2, 5, 6)
    np.testing.assert_allclose(out[0], (100 - (60 - 75)) / 150)
    np.testing.assert_allclose(out[1], 0.5)


def test_a_single_preset_name_is_one_window_not_its_letters():
    hu = np.array([[-1200.0, -600.0], [0.0, 500.0]])
    out = window_composite(hu, windows="lung")
    assert out.shape == (1, 2, 2)
    np.testing.assert_array_equal(out[0], apply_window(hu, preset="lung"))
    assert window_composite(hu, windows=Window(0.0, 100.0)).shape == (1, 2, 2)


def test_composite_on_tensors_matches_numpy():
    hu = np.random.default_rng(1).normal(0, 500, size=(2, 8, 8))
    from_tensor = window_composite(torch.from_numpy(hu))
    assert isinstance(from_tensor, torch.Tensor) and from_tensor.dtype == torch.float32
    np.testing.assert_allclose(from_tensor.numpy(), window_composite(hu), atol=1e-6)
    for c, preset in enumerate(("abdomen", "lung", "bone")):  # windowed in place: the very same values
        assert torch.equal(from_tensor[:, c], apply_window(torch.from_numpy(hu), preset=preset))


def test_integer_hu_is_windowed_without_a_float_copy_and_gives_the_float_values():
    hu = np.random.default_rng(2).integers(-1024, 3000, size=(3, 16, 16)).astype(np.int16)
    expected = window_composite(hu.astype(np.float32))
    got = window_composite(hu)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)  # bit for bit: the cast happens on the way into the output
    from_tensor = window_composite(torch.from_numpy(hu))
    assert from_tensor.dtype == torch.float32
    np.testing.assert_array_equal(from_tensor.numpy(), expected)


def test_composite_writes_into_a_given_buffer_slice_after_slice():
    hu = np.random.default_rng(3).integers(-1024, 3000, size=(4, 16, 16)).astype(np.int16)
    whole = window_composite(hu)
    buffer = np.full((1, 3, 16, 16), np.nan, np.float32)
    for k in range(4):
        assert window_composite(hu[k : k + 1], out=buffer) is buffer
        np.testing.assert_array_equal(buffer[0], whole[k])
    for bad in (np.empty((1, 3, 16, 16), np.float64), np.empty((1, 2, 16, 16), np.float32)):
        with pytest.raises(InputError, match="out must be float32"):
            window_composite(hu[:1], out=bad)
