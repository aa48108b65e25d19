"""Small layers shared by the model families: Haar DWT, FiLM and conv blocks.

Kept free of timm/open_clip imports so that any family can use them without paying for either.
"""

from __future__ import annotations

import functools
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

HAAR_BANDS = ("LL", "LH", "HL", "HH")
"""Band order of ``haar_dwt``. ``LH`` is the *horizontal* detail (low-pass along x, high-pass along y:
it answers to horizontal edges) and ``HL`` the *vertical* detail, as PyWavelets (cH, cV) and
pytorch_wavelets name them. The FreqMedCLIP paper's text calls LH "vertical"; only the names
differ, the four bands are the same."""


def haar_dwt(images: torch.Tensor) -> torch.Tensor:
    """One-level orthonormal 2D Haar DWT, band-major: ``(B, C, H, W) -> (B, 4C, H/2, W/2)``.

    Channels come out as ``[LL x C, LH x C, HL x C, HH x C]`` so a pretrained RGB stem tiled four
    times by timm lines up band by band. Equal to ``pywt.dwt2(x, 'haar')``; sizes must be even
    (we pad whole images, never half a Haar pair).
    """
    if images.ndim != 4:
        raise InputError(f"haar_dwt needs a (B, C, H, W) tensor, got shape {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % 2 or width % 2:
        raise InputError(f"haar_dwt needs even sizes, got {height}x{width}; pad or resize the image first")
    top_left = images[..., 0::2, 0::2]
    top_right = images[..., 0::2, 1::2]
    bottom_left = images[..., 1::2, 0::2]
    bottom_right = images[..., 1::2, 1::2]
    low_x_top, high_x_top = top_left + top_right, top_left - top_right
    low_x_bottom, high_x_bottom = bottom_left + bottom_right, bottom_left - bottom_right
    ll = (low_x_top + low_x_bottom) * 0.5
    lh = (low_x_top - low_x_bottom) * 0.5  # horizontal detail (pywt cH)
    hl = (high_x_top + high_x_bottom) * 0.5  # vertical detail (pywt cV)
    hh = (high_x_top - high_x_bottom) * 0.5  # diagonal detail (pywt cD)
    return torch.cat([ll, lh, hl, hh], dim=1)


def haar_idwt(bands: torch.Tensor) -> torch.Tensor:
    """Inverse of ``haar_dwt``: ``(B, 4C, h, w) -> (B, C, 2h, 2w)`` (exact: the transform is orthonormal)."""
    if bands.ndim != 4 or bands.shape[1] % 4:
        raise InputError(f"haar_idwt needs (B, 4C, h, w) band-major input, got shape {tuple(bands.shape)}")
    ll, lh, hl, hh = bands.chunk(4, dim=1)
    batch, channels, height, width = ll.shape
    out = bands.new_empty(batch, channels, 2 * height, 2 * width)
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) * 0.5
    out[..., 0::2, 1::2] = (ll + lh - hl - hh) * 0.5
    out[..., 1::2, 0::2] = (ll - lh + hl - hh) * 0.5
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) * 0.5
    return out


class HaarDWT(nn.Module):
    """``haar_dwt`` as a module, so it shows up in ``print(model)`` where the spectral input is made."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return haar_dwt(images)


@torch.no_grad()
def band_statistics(batches: Iterable[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of ``haar_dwt`` over images (one tensor or an iterable of batches).

    Training fits these once and stores them with the weights, so the DWT input is standardised
    the same way at inference.
    """
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    total = total_sq = None
    count = 0
    for images in batches:
        bands = haar_dwt(images.double())
        per_channel = bands.transpose(0, 1).reshape(bands.shape[1], -1)
        total = per_channel.sum(1) if total is None else total + per_channel.sum(1)
        total_sq = (per_channel**2).sum(1) if total_sq is None else total_sq + (per_channel**2).sum(1)
        count += per_channel.shape[1]
    if not count:
        raise InputError("band_statistics needs at least one image")
    mean = total / count
    std = (total_sq / count - mean**2).clamp_min(0).sqrt().clamp_min(1e-6)
    return mean.float(), std.float()


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (per pixel), as ViT tokens expect."""

    def __init__(self, channels: int, *, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FiLM(nn.Module):
    """Feature-wise linear modulation ``x * (1 + gamma(c)) + beta(c)`` by a condition vector.

    Initialised small but not zero: random-weight models already respond to the prompt, so
    tests can check that the text matters and training starts with a usable gradient.
    """

    def __init__(self, channels: int, condition_dim: int, *, init_std: float = 0.02):
        super().__init__()
        self.to_scale_shift = nn.Linear(condition_dim, 2 * channels)
        nn.init.normal_(self.to_scale_shift.weight, std=init_std)
        nn.init.zeros_(self.to_scale_shift.bias)

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.to_scale_shift(condition).chunk(2, dim=-1)
        shape = (x.shape[0], -1) + (1,) * (x.ndim - 2)
        return x * (1 + gamma.reshape(shape)) + beta.reshape(shape)


class ConvNormAct(nn.Sequential):
    """Conv → GroupNorm → GELU: GroupNorm because segmentation batches are small."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 3, groups: int = 8):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
            nn.GroupNorm(_group_count(out_channels, groups), out_channels),
            nn.GELU(),
        )


class ConvBlock(nn.Sequential):
    """Two 3x3 ``ConvNormAct`` layers: the decoder's unit of work."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(ConvNormAct(in_channels, out_channels), ConvNormAct(out_channels, out_channels))


MATMUL_RESIZE_MAX_SIDE = 32  # on CPU, inputs up to 32 × 32 are resized by two matrix products ...
MATMUL_RESIZE_MIN_OUTPUT = 16  # ... to outputs of at least 16 × 16 (below, the kernel is faster)


def resize_to(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Bilinear resize to ``size`` (a no-op when it already matches), as ``F.interpolate`` computes it.

    On CPU, PyTorch's bilinear kernel on (N, C, h, w) tensors costs ~5 ns per output value
    whatever the input, so upsampling a decoder's 16 × 16 map to 64 × 64 took 2.7 ms for 4 × 32
    channels: 6 % of freqmedclip-tiny's forward pass. Bilinear resizing is separable, so for small
    inputs two products with (out × in) interpolation matrices do the same in 0.6 ms. From 64 × 64
    inputs on the dense matrices cost more than the kernel, and for outputs under 16 × 16 the
    products' fixed cost does; there the kernel stays in use. So it does for channels-last
    layouts (tgcnet's token maps) at inference, which the kernel handles ~15× faster than
    (N, C, h, w); but its backward pass is slow for both layouts, so in training the products
    win for channels-last inputs too (``bench/cpu_kernels.py``).
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if resize_takes_matrices(x, size):
        return resize_by_matrices(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def resize_takes_matrices(x: torch.Tensor, size: tuple[int, int]) -> bool:
    """Whether ``resize_to`` resizes ``x`` to ``size`` by matrix products rather than PyTorch's kernel."""
    products_pay = max(x.shape[-2:]) <= MATMUL_RESIZE_MAX_SIDE and min(size) >= MATMUL_RESIZE_MIN_OUTPUT
    layout_pays = x.is_contiguous() or (x.requires_grad and torch.is_grad_enabled())
    return x.device.type == "cpu" and x.is_floating_point() and products_pay and layout_pays


def resize_by_matrices(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) as rows · x · columnsᵀ with ``bilinear_matrix`` weights."""
    rows = bilinear_matrix(x.shape[-2], size[0], dtype=x.dtype)
    columns = bilinear_matrix(x.shape[-1], size[1], dtype=x.dtype)
    return torch.matmul(rows, torch.matmul(x, columns.T))


@functools.lru_cache(maxsize=128)
def bilinear_matrix(n_in: int, n_out: int, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n_out, n_in) weights of 1-D linear interpolation with ``align_corners=False``, as PyTorch computes them.

    PyTorch's source coordinate is ``max(0, (i + 0.5) · n_in / n_out − 0.5)`` in float32; the
    right neighbour is clamped to the last input. Cached: the decoder asks for the same few sizes.
    """
    with torch.inference_mode(False):  # a cached inference tensor could not be saved for a later backward pass
        return _bilinear_matrix(n_in, n_out).to(dtype)


def _bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    source = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0.0)
    left = source.floor().long().clamp_max(n_in - 1)
    right = (left + 1).clamp_max(n_in - 1)
    fraction = source - left.float()
    matrix = torch.zeros(n_out, n_in, dtype=torch.float32)
    cells = torch.arange(n_out)
    matrix.index_put_((cells, left), 1.0 - fraction, accumulate=True)
    matrix.index_put_((cells, right), fraction, accumulate=True)
    return matrix


def _group_count(channels: int, preferred: int) -> int:
    groups = min(preferred, channels)
    while channels % groups:
        groups -= 1
    return groups
