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
            assert item.legend[layer]["stage"] == (3 if layer in joint else 1)
