"""Shared layers: the Haar DWT against two reference implementations, FiLM, conv blocks."""

from __future__ import annotations

import numpy as np
import pytest
import pywt
import torch
from pytorch_wavelets import DWTForward

from TextSegmentLib.errors import InputError
from TextSegmentLib.models.layers import (
    HAAR_BANDS,
    ChannelLayerNorm,
    ConvBlock,
    FiLM,
    band_statistics,
    bilinear_matrix,
    haar_dwt,
    haar_idwt,
    resize_by_matrices,
    resize_to,
)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(2, 3, 10, 14, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_haar_dwt_matches_pywavelets_band_major(images):
    bands = haar_dwt(images)
    assert bands.shape == (2, 12, 5, 7)
    for b in range(2):
        for c in range(3):
            approx, (horizontal, vertical, diagonal) = pywt.dwt2(images[b, c].numpy(), "haar")
            for index, expected in enumerate((approx, horizontal, vertical, diagonal)):
                np.testing.assert_allclose(bands[b, 3 * index + c].numpy(), expected, atol=1e-12)


def test_haar_dwt_matches_pytorch_wavelets(images):
    low, (high,) = DWTForward(J=1, wave="haar", mode="zero").double()(images)
    reference = torch.cat([low, high[:, :, 0], high[:, :, 1], high[:, :, 2]], dim=1)
    # pytorch_wavelets keeps its filter taps in float32 (1/sqrt(2) to ~1e-8)
    torch.testing.assert_close(haar_dwt(images), reference, atol=1e-6, rtol=0)


def test_lh_is_horizontal_detail_and_hl_vertical_detail():
    columns = torch.arange(8.0).repeat(8, 1)  # changes along x only: vertical edges
    image = columns[None, None].expand(1, 3, 8, 8)
    ll, lh, hl, hh = haar_dwt(image).chunk(4, dim=1)
    assert HAAR_BANDS == ("LL", "LH", "HL", "HH")
    assert lh.abs().max() == 0 and hh.abs().max() == 0 and hl.abs().min() > 0
    ll, lh, hl, hh = haar_dwt(image.transpose(-1, -2)).chunk(4, dim=1)  # changes along y only
    assert hl.abs().max() == 0 and hh.abs().max() == 0 and lh.abs().min() > 0


def test_haar_dwt_is_orthonormal_and_inverted_exactly(images):
    bands = haar_dwt(images)
    torch.testing.assert_close((bands**2).sum(), (images**2).sum())
    torch.testing.assert_close(haar_idwt(bands), images, atol=1e-12, rtol=0)


def test_haar_dwt_rejects_odd_sizes():
    with pytest.raises(InputError, match="even"):
        haar_dwt(torch.zeros(1, 3, 9, 8))


def test_band_statistics_pool_all_batches(images):
    mean, std = band_statistics([images[:1], images[1:]])
    bands = haar_dwt(images).transpose(0, 1).reshape(12, -1)
    torch.testing.assert_close(mean, bands.mean(1).float())
    torch.testing.assert_close(std, bands.std(1, unbiased=False).float())
    torch.testing.assert_close(band_statistics(images)[0], mean)


def test_film_is_identity_for_a_zero_condition_and_responds_to_others():
    film = FiLM(4, 3)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(film(x, torch.zeros(2, 3)), x)
    a, b = film(x, torch.tensor([[1.0, 0, 0]] * 2)), film(x, torch.tensor([[0, 1.0, 0]] * 2))
    assert (a - b).abs().max() > 1e-4


def test_conv_block_channel_norm_and_resize_shapes():
    x = torch.randn(2, 6, 9, 9)
    assert ConvBlock(6, 10)(x).shape == (2, 10, 9, 9)
    normed = ChannelLayerNorm(6)(x)
    torch.testing.assert_close(normed.mean(1), torch.zeros(2, 9, 9), atol=1e-5, rtol=0)
    assert resize_to(x, (4, 5)).shape == (2, 6, 4, 5)
    assert resize_to(x, (9, 9)) is x


@pytest.mark.parametrize(
    "shape, size",
    [
        ((2, 3, 16, 16), (64, 64)),  # the decoder's upsampling
        ((1, 3, 2, 2), (64, 64)),  # a coarse stage to a fine one
        ((1, 2, 7, 5), (3, 11)),  # down along one axis, up along the other
        ((2, 4, 32, 32), (17, 9)),  # downsampling, not a divisor
        ((1, 1, 1, 1), (4, 4)),
        ((1, 2, 20, 31), (20, 62)),  # one axis unchanged
        ((1, 2, 40, 40), (80, 80)),
        ((1, 160, 8, 8), (4, 4)),
    ],
)
def test_resize_by_matrices_and_resize_to_equal_pytorch_bilinear(shape, size):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    expected = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(resize_by_matrices(x, size), expected, atol=5e-6, rtol=0)
    torch.testing.assert_close(resize_to(x, size), expected, atol=5e-6, rtol=0)
    channels_last = x.contiguous(memory_format=torch.channels_last)  # the kernel's path
    torch.testing.assert_close(resize_to(channels_last, size), expected, atol=5e-6, rtol=0)


def test_bilinear_matrix_rows_are_two_neighbour_weights_summing_to_one():
    matrix = bilinear_matrix(4, 8)
    torch.testing.assert_close(matrix.sum(dim=1), torch.ones(8))
    assert int((matrix > 0).sum(dim=1).max()) == 2
    # output cell 3 of 8 sits at input coordinate (3 + 0.5) · 4 / 8 − 0.5 = 1.25: 0.75 of cell 1, 0.25 of cell 2
    torch.testing.assert_close(matrix[3], torch.tensor([0.0, 0.75, 0.25, 0.0]))
    torch.testing.assert_close(matrix[0], torch.tensor([1.0, 0.0, 0.0, 0.0]))  # clamped at the first cell


def test_resize_matrices_made_under_inference_mode_still_train():
    """The matrices are cached: one first built under inference mode must still work with autograd."""
    bilinear_matrix.cache_clear()
    with torch.inference_mode():
        resize_to(torch.randn(1, 1, 5, 5), (9, 9))
    x = torch.randn(1, 1, 5, 5, requires_grad=True)
    resize_to(x, (9, 9)).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


@pytest.mark.parametrize("channels_last", [False, True])
def test_resize_to_gradients_equal_pytorch_bilinear(channels_last):
    """Training takes the matrix path for either layout; its gradient must be the kernel's."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    ours, theirs = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    resize_to(ours, (64, 64)).backward(upstream)
    torch.nn.functional.interpolate(theirs, size=(64, 64), mode="bilinear", align_corners=False).backward(upstream)
    torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)  # sums of 64 upstream values
