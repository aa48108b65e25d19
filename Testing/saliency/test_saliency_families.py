"""The sink works unchanged on both real model families (random weights: plumbing, not quality)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from planted_model import sphere_phantom

from TextSegmentLib.models.registry import create_model
from TextSegmentLib.saliency import COMBINED, explain


@pytest.fixture(scope="module", params=["freqmedclip-tiny", "tgcnet-tiny"])
def family_model(request):
    """Each family built once for this file: building dominates these tests' time."""
    torch.manual_seed(0)
    return create_model(request.param).eval()


def test_default_layers_are_the_models_saliency_subset(family_model):
    model = family_model
    volume, _, _ = sphere_phantom(shape=(1, 40, 48))
    result = explain(volume, ["liver"], model=model, device="cpu").features
    assert set(model.saliency_layers) < set(model.tap_names)
    assert result.prompts[0].layers == [*model.saliency_layers, COMBINED]


def test_every_tap_of_both_families_gives_a_map_on_the_input_grid(family_model):
    model = family_model
    volume, _, _ = sphere_phantom(shape=(2, 40, 48))
    result = explain(volume, ["liver", "spleen"], model=model, device="cpu", stage=3, layers=model.tap_names).features
    joint = set(model.joint_tap_names)
    assert joint and joint <= set(model.tap_names)
    for item in result.prompts:
        assert item.layers == [*model.tap_names, COMBINED]
        for layer in model.tap_names:
            assert item.maps[layer].same_geometry(volume) and item.maps[layer].array.dtype == np.uint8
            assert item.legend[layer]["stage"] == 3
            assert (layer in joint) == item.legend[layer]["space"].startswith("joint")
            assert (layer in joint) == ("note" not in item.legend[layer])


@pytest.mark.parametrize("stage", [2, 3])
def test_a_batch_where_no_row_has_a_target_gives_zero_maps(family_model, stage):
    """E.g. a slice whose predicted mask is empty: the joint-space layers must cope with zero rows."""
    from TextSegmentLib.saliency import SaliencyConfig, explain_batch

    model = family_model
    size = model.image_size
    with torch.inference_mode():
        output = model(torch.rand(2, 3, size, size), model.encode_text(["liver"]), taps=model.joint_tap_names)
        maps, has_target, _ = explain_batch(output, layers=model.joint_tap_names, target=torch.zeros(2, size, size),
                                            config=SaliencyConfig(stage=stage), model=model)
    assert not has_target.any()
    for name in model.joint_tap_names:
        assert maps[name].shape[0] == 2 and not maps[name].any()


@pytest.mark.parametrize("one_projection", [True, False])
@pytest.mark.parametrize("stage", [2, 3])
def test_image_taps_are_projected_once_per_image_with_the_same_maps(family_model, stage, one_projection, monkeypatch):
    """Rows prompt-major (P·B): a tap the prompt cannot change needs one projection per image, not per row.

    The families map every ViT tap through one projection, so the stacked taps are projected in one
    call; a model without that promise gets one call per tap. The maps are the same either way.
    """
    from TextSegmentLib.saliency import SaliencyConfig, explain_batch

    model = family_model
    assert model.joint_projection_shared
    monkeypatch.setattr(model, "joint_projection_shared", one_projection, raising=False)
    size, images, prompts = model.image_size, 2, 3
    batch = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(5))
    rows = torch.arange(prompts).repeat_interleave(images)
    layers = [name for name in model.joint_tap_names if name in model.image_tap_names]
    assert layers, "both families have ViT taps computed from the image alone"
    target = torch.zeros(prompts * images, size, size)
    target[:, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    target[2, :2] = 1.0  # one row's target differs, so rows are not all alike
    with torch.inference_mode():
        output = model(batch[torch.arange(images).repeat(prompts)], model.encode_text(["liver", "spleen", "aorta"]).index(rows),
                       taps=layers)
        config = SaliencyConfig(stage=stage)
        plain, _, _ = explain_batch(output, layers=layers, target=target, config=config, model=model)
        seen = []
        project = model.project_to_joint
        monkeypatch.setattr(model, "project_to_joint", lambda name, f: seen.append(f.shape[0]) or project(name, f))
        shared, _, _ = explain_batch(output, layers=layers, target=target, config=config, model=model, images=images)
    assert seen == ([images * len(layers)] if one_projection else [images] * len(layers))
    for name in layers:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_image", [False, True])
def test_stage_3_equals_its_formula_row_by_row_when_some_rows_have_no_target(family_model, per_image):
    """The batched sink (rings and priors of every grid at once, rows gathered) against the maths, one row at a time."""
    import torch.nn.functional as F

    from TextSegmentLib.saliency.maths import box_of, gaussian_prior, region_mean, ring_weights, stage3_map
    from TextSegmentLib.saliency import SaliencyConfig, explain_batch

    model = family_model
    size, images, prompts = model.image_size, 2, 2
    batch = torch.rand(images, 3, size, size, generator=torch.Generator().manual_seed(7))
    target = torch.zeros(prompts * images, size, size)
    target[0, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    target[2, size // 2 :, : size // 4] = 1.0  # rows 1 and 3 have no target
    config = SaliencyConfig(stage=3)
    layers = [name for name in model.tap_names if name not in model.joint_tap_names]  # no prompt term
    with torch.inference_mode():
        rows = torch.arange(prompts).repeat_interleave(images)
        output = model(batch[torch.arange(images).repeat(prompts)], model.encode_text(["liver", "spleen"]).index(rows),
                       taps=layers)
        maps, has_target, _ = explain_batch(output, layers=layers, target=target, config=config, model=model,
                                            images=images if per_image else None)
        assert has_target.tolist() == [True, False, True, False]
        checked = 0
        for name in layers:
            features = output.taps[name].float()
            h, w = features.shape[-2:]
            if max(h, w) > config.max_map_size:  # pooled before it is kept: not this formula's business
                continue
            for row in range(prompts * images):
                if not has_target[row]:
                    assert not maps[name][row].any()
                    continue
                f = features[row : row + 1]
                inside = F.adaptive_avg_pool2d(target[row : row + 1, None], (h, w))[:, 0]
                box, _ = box_of(target[row : row + 1])
                ring = ring_weights(box, (h, w), margin=config.ring_margin)
                whole = region_mean(f, torch.ones_like(inside))
                expected = stage3_map(
                    f,
                    prototype=region_mean(f, inside),
                    prompt=None,
                    global_image=whole,
                    context=region_mean(f, ring) if ring.any() else whole,
                    prior=gaussian_prior(box, (h, w), sigma_scale=config.sigma_scale, floor=config.prior_floor),
                    weights=config.weights,
                )
                torch.testing.assert_close(maps[name][row], expected[0], rtol=1e-4, atol=1e-5)
                checked += 1
    assert checked >= 4


def test_a_tap_that_is_another_taps_tensor_is_mapped_once(family_model, monkeypatch):
    """"fused" is the last decoder stage itself: its map is that stage's, computed once."""
    from TextSegmentLib.saliency import SaliencyConfig, layer_maps

    model = family_model
    size = model.image_size
    target = torch.zeros(2, size, size)
    target[:, size // 4 : size // 2, size // 3 : size // 2] = 1.0
    with torch.inference_mode():
        output = model(torch.rand(2, 3, size, size), model.encode_text(["liver"]), taps=model.tap_names)
        last = [name for name in model.tap_names if name != "fused" and output.taps[name] is output.taps["fused"]]
        assert len(last) == 1
        calls = []
        layer_map = layer_maps._layer_map
        monkeypatch.setattr(layer_maps, "_layer_map", lambda features, **kw: calls.append(1) or layer_map(features, **kw))
        maps, _, info = layer_maps.explain_batch(output, layers=[last[0], "fused"], target=target,
                                                 config=SaliencyConfig(stage=3), model=model)
    assert len(calls) == 1
    assert torch.equal(maps["fused"], maps[last[0]]) and maps["fused"].any()
    assert info["fused"] == info[last[0]]
