"""Deformable attention against a loop-by-loop reference, and its degenerate cases."""

from __future__ import annotations

import math

import pytest
import torch

from TextSegmentLib.models.deformable_attention import (
    MultiScaleDeformableAttention,
    deformable_sample,
    flatten_levels,
    level_reference_points,
    unflatten_levels,
)

SHAPES = [(5, 7), (3, 4), (2, 2)]


def bilinear_read(image: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Textbook bilinear interpolation of ``image`` (C, H, W) at normalised (x, y); zeros outside."""
    channels, height, width = image.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(channels, dtype=image.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < width and 0 <= yi < height:
                out += wx * wy * image[:, yi, xi]
    return out


def naive_deformable_sample(value, shapes, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes[:-1]:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for level, (lh, lw) in enumerate(shapes):
                    image = value[b, starts[level] : starts[level] + lh * lw, h].T.reshape(head_dim, lh, lw)
                    for p in range(points):
                        x, y = locations[b, q, h, level, p].tolist()
                        out[b, q, h] += weights[b, q, h, level, p] * bilinear_read(image, x, y)
    return out.reshape(batch, queries, heads * head_dim)


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("with_autograd", [False, True])  # the two ways of summing the points
def test_sampling_matches_naive_reference_on_random_inputs(generator, with_autograd):
    batch, queries, heads, head_dim, points = 2, 6, 2, 3, 3
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, head_dim, generator=generator, dtype=torch.float64)
    # locations partly outside [0, 1] so the zero padding is exercised too
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator, dtype=torch.float64)
    locations = locations * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator, dtype=torch.float64)

    got = deformable_sample(value.requires_grad_(with_autograd), torch.tensor(SHAPES), locations, weights)
    assert got.requires_grad == with_autograd
    expected = naive_deformable_sample(value.detach(), SHAPES, locations, weights)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-9, atol=1e-9)


def test_module_matches_naive_reference(generator):
    torch.manual_seed(1)
    dim, heads, points = 8, 2, 2
    attention = MultiScaleDeformableAttention(dim, num_heads=heads, num_levels=len(SHAPES), num_points=points).double()
    with torch.no_grad():  # random offsets and weights so the test is not only about the initialisation
        for p in attention.parameters():
            p.normal_(0.0, 0.5, generator=generator)
    tokens = sum(h * w for h, w in SHAPES)
    query = torch.randn(1, 4, dim, generator=generator, dtype=torch.float64)
    value = torch.randn(1, tokens, dim, generator=generator, dtype=torch.float64)
    reference = torch.rand(1, 4, 2, generator=generator, dtype=torch.float64)

    got = attention(query, reference, value, torch.tensor(SHAPES))

    projected = attention.value_proj(value).view(1, tokens, heads, dim // heads)
    offsets = attention.sampling_offsets(query).view(1, 4, heads, len(SHAPES), points, 2)
    weights = attention.attention_weights(query).view(1, 4, heads, -1).softmax(-1).view(1, 4, heads, len(SHAPES), points)
    locations = torch.empty_like(offsets)
    for level, (h, w) in enumerate(SHAPES):
        locations[:, :, :, level, :, 0] = reference[:, :, None, None, 0] + offsets[:, :, :, level, :, 0] / w
        locations[:, :, :, level, :, 1] = reference[:, :, None, None, 1] + offsets[:, :, :, level, :, 1] / h
    expected = attention.output_proj(naive_deformable_sample(projected, SHAPES, locations, weights))
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_zero_offsets_read_the_reference_points(generator):
    dim = 4
    attention = MultiScaleDeformableAttention(dim, num_heads=2, num_levels=len(SHAPES), num_points=3).double()
    with torch.no_grad():
        attention.sampling_offsets.weight.zero_()
        attention.sampling_offsets.bias.zero_()
        for proj in (attention.value_proj, attention.output_proj):
            proj.weight.copy_(torch.eye(dim))
            proj.bias.zero_()
    maps = [torch.randn(1, dim, h, w, generator=generator, dtype=torch.float64) for h, w in SHAPES]
    value, shapes = flatten_levels(maps)
    # one query per pixel of the first level; per level its reference is a pixel centre of that level
    picks = [(2, 3), (1, 2), (0, 1)]
    reference = torch.tensor([[[(x + 0.5) / w, (y + 0.5) / h] for (y, x), (h, w) in zip(picks, SHAPES)]], dtype=torch.float64)
    query = torch.randn(1, 1, dim, generator=generator, dtype=torch.float64)

    got = attention(query, reference[:, None], value, shapes)

    expected = sum(m[0, :, y, x] for m, (y, x) in zip(maps, picks)) / len(SHAPES)  # uniform weights at start
    torch.testing.assert_close(got[0, 0], expected)


def test_pixel_centre_references_reproduce_every_level(generator):
    maps = [torch.randn(2, 6, h, w, generator=generator) for h, w in SHAPES]
    value, shapes = flatten_levels(maps)
    reference = level_reference_points(shapes)  # (N, 2)
    queries = reference.shape[0]
    locations = reference[None, :, None, None, None, :].expand(2, queries, 1, len(SHAPES), 1, 2)
    level_of_query = torch.repeat_interleave(torch.arange(len(SHAPES)), torch.tensor([h * w for h, w in SHAPES]))
    weights = torch.nn.functional.one_hot(level_of_query, len(SHAPES)).float()[None, :, None, :, None].expand(2, -1, 1, -1, 1)

    got = deformable_sample(value[:, :, None, :], shapes, locations, weights)
    torch.testing.assert_close(got, value)


def test_flatten_round_trip(generator):
    maps = [torch.randn(3, 5, h, w, generator=generator) for h, w in SHAPES]
    tokens, shapes = flatten_levels(maps)
    assert tokens.shape == (3, sum(h * w for h, w in SHAPES), 5)
    assert shapes.tolist() == [list(s) for s in SHAPES]
    for original, restored in zip(maps, unflatten_levels(tokens, shapes)):
        torch.testing.assert_close(restored, original)


def test_offsets_learn_and_heads_start_in_different_directions():
    attention = MultiScaleDeformableAttention(16, num_heads=8, num_levels=2, num_points=2)
    first_points = attention.sampling_offsets.bias.view(8, 2, 2, 2)[:, 0, 0]
    assert len({tuple(p.tolist()) for p in first_points}) == 8
    maps = [torch.randn(1, 16, 6, 6), torch.randn(1, 16, 3, 3)]
    value, shapes = flatten_levels(maps)
    query = torch.randn(1, 5, 16)
    attention(query, torch.rand(1, 5, 2), value, shapes).square().sum().backward()
    assert attention.sampling_offsets.weight.grad.abs().sum() > 0
    assert attention.attention_weights.weight.grad.abs().sum() > 0


def test_wrong_number_of_levels_is_refused():
    attention = MultiScaleDeformableAttention(8, num_heads=2, num_levels=3, num_points=1)
    value, shapes = flatten_levels([torch.randn(1, 8, 4, 4)])
    with pytest.raises(ValueError, match="3 value levels"):
        attention(torch.randn(1, 2, 8), torch.rand(1, 2, 2), value, shapes)
