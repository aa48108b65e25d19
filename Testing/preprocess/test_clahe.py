"""CLAHE against scikit-image's implementation (the reference), with the parameters mapped.

Mapping: our ``clip_limit`` is relative to the mean bin count (OpenCV style), skimage's is a
fraction of the tile area, so ``clip_sk = clip_limit / nbins``; our ``tiles`` grid is skimage's
``kernel_size = ceil(shape / tiles)``. skimage min-max rescales its output, so ours is rescaled
the same way before comparing. The images are chosen so skimage's integer clip limit equals ours.
"""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage import exposure

from TextSegmentLib.errors import InputError
from TextSegmentLib.preprocess import ContrastConfig, clahe, enhance_contrast, percentile_stretch


def reference_clahe(image, *, clip_limit, tiles, nbins=256):
    kernel = tuple(int(np.ceil(s / t)) for s, t in zip(image.shape, tiles))
    return exposure.equalize_adapthist(image, kernel_size=kernel, clip_limit=clip_limit / nbins, nbins=nbins)


def assert_agrees_with_reference(image, *, clip_limit, tiles, mean_tol):
    ours = clahe(image, clip_limit=clip_limit, tiles=tiles)
    ref = reference_clahe(image, clip_limit=clip_limit, tiles=tiles)
    ours = (ours - ours.min()) / (ours.max() - ours.min())
    assert np.mean(np.abs(ours - ref)) < mean_tol
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.99


@pytest.fixture(scope="module")
def lung_slice(shared_data):
    import SimpleITK as sitk

    hu = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data / "ct/pyradiomics_lung1/lung1_image_zcrop.nrrd")))
    return percentile_stretch(hu[hu.shape[0] // 2].astype(np.float32))


def test_matches_reference_on_a_real_ct_slice(lung_slice):
    assert lung_slice.shape == (512, 512)
    assert_agrees_with_reference(lung_slice, clip_limit=2.0, tiles=(8, 8), mean_tol=0.01)


def test_matches_reference_with_a_higher_clip_limit(lung_slice):
    assert_agrees_with_reference(lung_slice, clip_limit=4.0, tiles=(8, 8), mean_tol=0.01)


@pytest.mark.parametrize(
    "shape, tiles, sigma",
    [((256, 256), (8, 8), 0.0), ((256, 256), (8, 8), 3.0), ((250, 190), (4, 4), 2.0), ((128, 192), (2, 3), 1.0)],
)
def test_matches_reference_on_random_images(shape, tiles, sigma):
    rng = np.random.default_rng(sum(shape))
    image = gaussian_filter(rng.random(shape), sigma) if sigma else rng.random(shape)
    image = (image - image.min()) / (image.max() - image.min())
    assert_agrees_with_reference(image, clip_limit=2.0, tiles=tiles, mean_tol=0.02)


def test_one_tile_without_clipping_is_global_histogram_equalisation():
    image = np.random.default_rng(3).random((40, 50)) ** 3
    bins = np.minimum((image * 256).astype(int), 255)
    cdf = np.cumsum(np.bincount(bins.ravel(), minlength=256)) / bins.size
    np.testing.assert_allclose(clahe(image, clip_limit=0, tiles=(1, 1)), cdf[bins], atol=1e-6)


def test_clipping_limits_the_contrast_gain():
    image = gaussian_filter(np.random.default_rng(4).random((128, 128)), 4)
    image = (image - image.min()) / (image.max() - image.min())
    gentle, strong = clahe(image, clip_limit=1.5), clahe(image, clip_limit=40.0)
    assert np.std(np.diff(gentle, axis=1)) < np.std(np.diff(strong, axis=1))


def test_flipping_the_image_flips_the_result():
    image = np.random.default_rng(5).random((64, 96))
    np.testing.assert_allclose(clahe(image[:, ::-1]), clahe(image)[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(clahe(image[::-1]), clahe(image)[::-1], atol=1e-6)


def test_stack_is_processed_slice_by_slice():
    rng = np.random.default_rng(6)
    stack = rng.random((3, 40, 30))
    out = clahe(stack, tiles=(4, 3))
    assert out.shape == (3, 40, 30) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    np.testing.assert_allclose(out[1], clahe(stack[1], tiles=(4, 3)), atol=1e-6)


def test_more_tiles_than_pixels_still_works():
    out = clahe(np.random.default_rng(7).random((3, 5)), tiles=(8, 8))
    assert out.shape == (3, 5) and np.all(np.isfinite(out))


def test_percentile_stretch_maps_percentiles_to_the_unit_range():
    image = np.arange(1000, dtype=np.float32).reshape(20, 50)
    image[0, 0] = -1e6  # one outlier must not squash the rest
    out = percentile_stretch(image, low=1, high=99)
    lo, hi = np.percentile(image, [1, 99])
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    np.testing.assert_allclose(out[10, 0], (image[10, 0] - lo) / (hi - lo), rtol=1e-5)


def test_percentile_stretch_is_per_slice_and_flat_slices_give_zeros():
    stack = np.stack([np.linspace(0, 1, 100).reshape(10, 10), 1000 + np.linspace(0, 5, 100).reshape(10, 10)])
    stack = np.concatenate([stack, np.full((1, 10, 10), 7.0)])
    out = percentile_stretch(stack)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)
    assert np.all(out[2] == 0)
    joint = percentile_stretch(stack, per_slice=False)
    assert joint[0].max() < 0.01 and joint[1].min() > 0.99


@pytest.mark.parametrize("kwargs", [{"low": 50, "high": 10}, {"low": -1}, {"high": 101}])
def test_percentile_stretch_rejects_bad_percentiles(kwargs):
    with pytest.raises(InputError):
        percentile_stretch(np.zeros((4, 4)), **kwargs)


def test_bad_inputs_raise_input_errors():
    with pytest.raises(InputError):
        clahe(np.zeros(10))
    with pytest.raises(InputError):
        clahe(np.full((4, 4), np.nan))
    with pytest.raises(InputError):
        clahe(np.zeros((4, 4)), tiles=(0, 2))


def test_enhance_contrast_is_stretch_then_clahe(lung_slice):
    hu = lung_slice * 2000 - 1000
    config = ContrastConfig(clip_limit=3.0, tiles=(4, 4))
    expected = clahe(percentile_stretch(hu), clip_limit=3.0, tiles=(4, 4))
    np.testing.assert_array_equal(enhance_contrast(hu, config=config), expected)
    no_clahe = enhance_contrast(hu, config=ContrastConfig(clahe=False))
    np.testing.assert_array_equal(no_clahe, percentile_stretch(hu))
