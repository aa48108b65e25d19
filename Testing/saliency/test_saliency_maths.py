"""Each saliency stage against a hand computation on tensors small enough to do on paper."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from TextSegmentLib.saliency.maths import (
    HISTOGRAM_MIN,
    Stage3Weights,
    box_of,
    box_surrounds,
    box_weights,
    cosine_map,
    gaussian_prior,
    percentile,
    percentiles,
    region_mean,
    ring_weights,
    robust_rescale,
    stage1_map,
    stage2_map,
    stage3_map,
)


def grid(*vectors):
    """(1, C, 1, W) features: one row of positions holding ``vectors``."""
    return torch.tensor(vectors, dtype=torch.float32).T[None, :, None, :]


def test_cosine_map_by_hand():
    features = grid([3.0, 4.0], [0.0, 2.0], [-1.0, 0.0])
    out = cosine_map(features, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(out, torch.tensor([[[0.6, 0.0, -1.0]]]))


def test_cosine_map_of_zero_vector_is_zero_not_nan():
    out = cosine_map(grid([0.0, 0.0], [1.0, 0.0]), torch.tensor([[1.0, 0.0]]))
    assert torch.equal(out, torch.tensor([[[0.0, 1.0]]]))


def test_cosine_map_with_several_references_matches_one_at_a_time():
    features = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    references = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    stacked = cosine_map(features, references)
    assert stacked.shape == (2, 4, 4, 5)
    for k in range(4):
        assert torch.allclose(stacked[:, k], cosine_map(features, references[:, k]), atol=1e-6)


def test_region_mean_of_several_regions_in_one_pass():
    features = grid([2.0, 0.0], [0.0, 4.0])
    weights = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])  # (1, 2 regions, 1, 2)
    assert torch.allclose(region_mean(features, weights), torch.tensor([[[2.0, 0.0], [1.0, 2.0]]]))


def test_region_mean_is_the_weighted_average():
    features = grid([2.0, 0.0], [0.0, 4.0], [6.0, 6.0])
    weights = torch.tensor([[[1.0, 0.5, 0.0]]])
    # (1·[2,0] + 0.5·[0,4]) / 1.5 = [4/3, 4/3]
    assert torch.allclose(region_mean(features, weights), torch.tensor([[4 / 3, 4 / 3]]))
    assert torch.equal(region_mean(features, torch.zeros(1, 1, 3)), torch.zeros(1, 2))


@pytest.mark.parametrize("q, expected", [(0, 1.0), (25, 1.75), (50, 2.5), (100, 4.0)])
def test_percentile_by_hand(q, expected):
    assert float(percentile(torch.tensor([4.0, 1.0, 3.0, 2.0]), q)) == pytest.approx(expected)


def test_percentile_matches_numpy_on_random_values():
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0))
    for q in (1.0, 37.5, 99.0):
        assert float(percentile(values, q)) == pytest.approx(np.percentile(values.numpy(), q), abs=1e-6)


@pytest.mark.parametrize("n", [1, 2, 3, 10, 1000])
def test_percentiles_at_once_match_numpy_with_ties(n):
    """Several percentiles in one call, on both sides of the median, with repeated values."""
    values = torch.randint(0, 7, (n,), generator=torch.Generator().manual_seed(n)).float()
    qs = (0.0, 1.0, 49.9, 50.0, 50.1, 99.0, 100.0)
    assert percentiles(values, qs) == pytest.approx(list(np.percentile(values.numpy(), qs)), abs=1e-6)


@pytest.mark.parametrize("spread", [0.3, 1e4])
def test_percentiles_of_many_float16_values_match_numpy_exactly(spread):
    """The bit-pattern histogram path: negatives, zeros of both signs, ties and both tails, exactly."""
    n = HISTOGRAM_MIN + 1001
    values = (torch.randn(n, generator=torch.Generator().manual_seed(3)) * spread).half()
    values[:500] = 0.0
    values[500:600] = -0.0
    values[600:700] = values[700]  # ties
    qs = (0.0, 1.0, 37.5, 50.0, 99.0, 100.0)
    expected = np.percentile(values.float().numpy().astype(np.float64), qs)
    assert percentiles(values, qs) == pytest.approx(list(expected), rel=1e-12, abs=1e-12)
    assert percentiles(values, qs) == pytest.approx(percentiles(values.float(), qs), rel=1e-12, abs=1e-12)


def test_robust_rescale_maps_percentiles_to_unit_range():
    maps = torch.arange(11.0).reshape(1, 1, 11)  # percentiles 10 and 90 are 1 and 9
    out = robust_rescale(maps, low=10, high=90)
    expected = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 8], dtype=torch.float32) / 8
    assert torch.allclose(out, expected.reshape(1, 1, 11))
    assert torch.allclose(robust_rescale(maps, bounds=(0.0, 5.0))[0, 0, :3], torch.tensor([0.0, 0.2, 0.4]))
    assert torch.equal(robust_rescale(torch.ones(1, 2, 2)), torch.zeros(1, 2, 2))


def test_box_of_gives_fractions_and_presence():
    target = torch.zeros(2, 4, 8, dtype=torch.bool)
    target[0, 1:3, 2:6] = True
    boxes, present = box_of(target)
    assert present.tolist() == [True, False]
    assert torch.allclose(boxes[0], torch.tensor([0.25, 0.25, 0.75, 0.75]))


def test_box_and_ring_weights_on_a_4x4_grid():
    box = torch.tensor([[0.25, 0.25, 0.75, 0.75]])  # cell centres 0.125, 0.375, 0.625, 0.875
    inner = box_weights(box, (4, 4))
    assert inner[0].tolist() == [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    ring = ring_weights(box, (4, 4), margin=0.5)  # grown by 0.25 per side: the whole grid
    assert ring[0].sum() == 12 and ring[0, 1:3, 1:3].sum() == 0


def test_gaussian_prior_by_hand():
    box = torch.tensor([[0.0, 0.0, 0.5, 0.5]])  # centre (0.25, 0.25), σ = 0.5 per axis
    prior = gaussian_prior(box, (2, 2), floor=0.2)
    # cell centres are 0.25 and 0.75: offsets 0 or 0.5 = 1σ per axis
    assert float(prior[0, 0, 0]) == pytest.approx(1.0)
    assert float(prior[0, 0, 1]) == pytest.approx(0.2 + 0.8 * math.exp(-0.5))
    assert float(prior[0, 1, 1]) == pytest.approx(0.2 + 0.8 * math.exp(-1.0))


@pytest.mark.parametrize("floor", [0.0, 0.25])
def test_box_surrounds_match_the_ring_and_prior_grid_by_grid(floor):
    """All grids at once (square, oblong, coarser than the box) equal the one-grid functions."""
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(40, 2, 2, generator=generator)
    low, high = corners.min(dim=1).values, corners.max(dim=1).values
    boxes = torch.cat([low, high], dim=1)
    boxes[:3] = 0.0  # rows without a target
    boxes[3, 2] = boxes[3, 0]  # a box one line thin
    shapes = [(2, 2), (8, 8), (3, 5), (16, 4), (64, 64)]
    surrounds = box_surrounds(boxes, shapes + [(8, 8)], margin=0.5, sigma_scale=1.5, floor=floor)
    assert list(surrounds) == shapes
    for shape in shapes:
        ring, prior = surrounds[shape]
        assert torch.equal(ring, ring_weights(boxes, shape, margin=0.5))
        assert torch.allclose(prior, gaussian_prior(boxes, shape, sigma_scale=1.5, floor=floor), atol=1e-6)
    assert box_surrounds(boxes, []) == {}


def test_stage1_is_similarity_to_the_prototype():
    features = grid([1.0, 0.0], [1.0, 0.0], [0.0, 1.0])
    prototype = region_mean(features, torch.tensor([[[1.0, 1.0, 0.0]]]))  # = [1, 0]
    assert torch.allclose(stage1_map(features, prototype=prototype), torch.tensor([[[1.0, 1.0, 0.0]]]))


def test_stage2_blends_prototype_and_prompt():
    features = grid([1.0, 0.0], [0.0, 1.0])
    prototype, prompt = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    out = stage2_map(features, prototype=prototype, prompt=prompt, alpha=0.75)
    norm = math.hypot(0.75, 0.25)  # reference ∝ (0.75, 0.25) after unit-normalising both parts
    assert torch.allclose(out, torch.tensor([[[0.75 / norm, 0.25 / norm]]]))


def test_stage3_four_components_by_hand():
    e1, e2, e3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    features = grid(e1, e2, e3)
    weights = Stage3Weights(prototype=1.0, prompt=1.0, global_image=0.5, context=0.5)
    prior = torch.tensor([[[1.0, 0.5, 0.25]]])
    out = stage3_map(
        features,
        prototype=torch.tensor([e1]),
        prompt=torch.tensor([e2]),
        global_image=torch.tensor([e3]),
        context=torch.tensor([e3]),
        prior=prior,
        weights=weights,
    )
    # scores: e1 → +1, e2 → +1, e3 → −0.5 − 0.5 = −1; total weight 3; unit = (score/3 + 1)/2
    unit = torch.tensor([(1 / 3 + 1) / 2, (1 / 3 + 1) / 2, (-1 / 3 + 1) / 2])
    assert torch.allclose(out, (unit * prior[0, 0])[None, None])


def test_stage3_without_a_prompt_keeps_its_three_image_components_by_hand():
    e1, e2, e3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    features = grid(e1, e2, e3)
    prior = torch.tensor([[[1.0, 0.5, 0.25]]])
    out = stage3_map(
        features,
        prototype=torch.tensor([e1]),
        prompt=None,
        global_image=torch.tensor([e3]),
        context=torch.tensor([e2]),
        prior=prior,
        weights=Stage3Weights(prototype=1.0, prompt=1.0, global_image=0.5, context=0.5),
    )
    # scores: e1 → +1, e2 → −0.5 (context), e3 → −0.5 (global); total weight 2 without the prompt's
    unit = torch.tensor([(1 / 2 + 1) / 2, (-0.5 / 2 + 1) / 2, (-0.5 / 2 + 1) / 2])
    assert torch.allclose(out, (unit * prior[0, 0])[None, None])


def test_stage3_equals_the_weighted_sum_of_its_four_cosines_row_by_row_and_per_image():
    """One combined reference per row is the same score as four cosines weighed one by one."""
    gen = torch.Generator().manual_seed(3)
    features = torch.randn(2, 6, 4, 5, generator=gen)
    refs = [torch.randn(2, 3, 6, generator=gen) for _ in range(4)]  # (B, P, C): 3 prompts per image
    prior = torch.rand(2, 3, 4, 5, generator=gen)
    weights = Stage3Weights(prototype=1.0, prompt=0.7, global_image=0.5, context=0.3)
    signs = (weights.prototype, weights.prompt, -weights.global_image, -weights.context)
    score = sum(s * cosine_map(features, r) for s, r in zip(signs, refs))
    expected = (score / weights.total + 1.0) / 2.0 * prior
    names = ("prototype", "prompt", "global_image", "context")
    per_image = stage3_map(features, prior=prior, weights=weights, **dict(zip(names, refs)))
    torch.testing.assert_close(per_image, expected)
    for p in range(3):  # row by row: each prompt's rows alone give that prompt's maps
        rows = stage3_map(features, prior=prior[:, p], weights=weights, **{n: r[:, p] for n, r in zip(names, refs)})
        torch.testing.assert_close(rows, expected[:, p])


@pytest.mark.parametrize("per_image", [False, True])
def test_stage3_on_a_padded_slice_ignores_what_the_padding_holds(per_image):
    """The model square pads a non-square slice; stage 3's global image mean and context ring are the
    slice's own, so the maps on the image are the same whatever features the padding carries."""
    from types import SimpleNamespace

    from TextSegmentLib.saliency import SaliencyConfig
    from TextSegmentLib.saliency.layer_maps import explain_batch

    gen = torch.Generator().manual_seed(5)
    image = torch.randn(1, 6, 8, 4, generator=gen)  # 8 rows × 4 columns of image, 4 columns of padding after
    inside = torch.zeros(8, 8)
    inside[:, :4] = 1.0
    target = torch.zeros(1, 8, 8)
    target[0, 2:4, 1:3] = 1.0
    config = SaliencyConfig(stage=3)
    maps = []
    for padding in (torch.zeros(1, 6, 8, 4), 5.0 * torch.randn(1, 6, 8, 4, generator=gen)):
        output = SimpleNamespace(taps={"layer": torch.cat([image, padding], dim=-1)}, text_embedding=None)
        raw, has_target, _ = explain_batch(output, layers=["layer"], target=target, config=config,
                                           images=1 if per_image else None, inside=inside)
        assert bool(has_target.all())
        maps.append(raw["layer"][..., :4])
    torch.testing.assert_close(maps[0], maps[1])
