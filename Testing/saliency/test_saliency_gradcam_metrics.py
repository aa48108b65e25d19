"""The Grad-CAM baseline and the saliency metrics, each against a hand computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from planted_model import PlantedModel

from TextSegmentLib.models.base import ModelOutput, TextFeatures, TextSegmentationModel
from TextSegmentLib.saliency.gradcam import grad_cam
from TextSegmentLib.saliency.metrics import energy_inside, pointing_game, prompt_swap_correlation, thresholded_overlap


class LinearHeadModel(TextSegmentationModel):
    """logits = nearest-upsampled Σ_c w_c A_c: Grad-CAM's answer is known in closed form."""

    tap_names = ("features",)

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"image_size": 8})()
        self.head = torch.nn.Parameter(torch.tensor([2.0, -1.0, 0.5]))

    def encode_text(self, prompts, aux_prompts=None):
        return TextFeatures(pooled=torch.ones(len(prompts), 1))

    def forward(self, images, text, *, taps=None):
        features = F.avg_pool2d(images, 2)  # (N, 3, 4, 4)
        logits = F.interpolate(
            torch.einsum("c,nchw->nhw", self.head, features)[:, None], scale_factor=2, mode="nearest"
        )
        return ModelOutput(logits=logits, taps={"features": features} if taps else {})


def test_grad_cam_matches_the_closed_form():
    model = LinearHeadModel()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    target = torch.zeros(2, 8, 8)
    target[0, :4, :4] = 1.0  # 16 pixels
    target[1, 2:3, 5:8] = 1.0  # 3 pixels
    maps = grad_cam(model, images, model.encode_text(["x", "x"]), layers=["features"], target=target)
    features = F.avg_pool2d(images, 2)
    # ∂y/∂A_c(i, j) = w_c · (target pixels in cell (i, j)); its mean over the 4×4 cells is w_c · |target| / 16
    scale = target.sum(dim=(1, 2)) / 16
    expected = torch.relu(scale[:, None, None] * torch.einsum("c,nchw->nhw", model.head.detach(), features))
    assert torch.allclose(maps["features"], expected, atol=1e-6)
    assert not maps["features"].requires_grad


def test_grad_cam_called_inside_inference_mode_still_explains_every_tap():
    """A caller's inference_mode block (the engine's, the sink's) must not turn every map into "no gradient"."""
    model = LinearHeadModel()
    target = torch.zeros(2, 8, 8)
    target[:, 2:6, 1:5] = 1.0
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = grad_cam(model, images, model.encode_text(["x", "x"]), layers=["features"], target=target)["features"]
    with torch.inference_mode():
        made_there = images.clone()  # an inference tensor, as the engine's inputs are
        maps = grad_cam(model, made_there, model.encode_text(["x", "x"]), layers=["features"], target=target.clone())
    assert maps["features"] is not None and torch.allclose(maps["features"], expected, atol=1e-6)


def test_grad_cam_defaults_to_the_predicted_mask_and_reports_taps_off_the_logit_path():
    model = PlantedModel()  # its taps are side outputs: the logits never see them
    images = torch.zeros(1, 3, 32, 32)
    images[:, 2, 8:16, 8:16] = 1.0
    maps = grad_cam(model, images, model.encode_text(["bright"]), layers=["deep", "joint"])
    assert maps == {"deep": None, "joint": None}


def test_energy_inside_by_hand():
    saliency = np.array([[0.0, 1.0], [3.0, 0.0]])
    assert energy_inside(saliency, np.array([[True, True], [False, False]])) == pytest.approx(0.25)
    assert np.isnan(energy_inside(np.zeros((2, 2)), np.ones((2, 2), bool)))


def test_pointing_game_by_hand():
    saliency = np.array([[0.1, 0.9], [0.2, 0.3]])
    assert pointing_game(saliency, np.array([[False, True], [False, False]])) == 1.0
    assert pointing_game(saliency, np.array([[True, False], [True, True]])) == 0.0
    assert np.isnan(pointing_game(np.ones((2, 2)), np.ones((2, 2), bool)))


def test_thresholded_overlap_by_hand():
    saliency = np.array([[0.9, 0.6], [0.4, 0.1]])  # hot: the top row
    mask = np.array([[True, False], [True, False]])
    dice, iou = thresholded_overlap(saliency, mask, threshold=0.5)
    assert dice == pytest.approx(2 * 1 / (2 + 2)) and iou == pytest.approx(1 / 3)
    assert all(np.isnan(v) for v in thresholded_overlap(np.zeros((2, 2)), np.zeros((2, 2), bool)))


def test_prompt_swap_correlation_by_hand():
    a = np.array([1.0, 2.0, 3.0])
    assert prompt_swap_correlation(a, 2 * a + 1) == pytest.approx(1.0)
    assert prompt_swap_correlation(a, -a) == pytest.approx(-1.0)
    assert prompt_swap_correlation(np.array([1.0, 0.0, -1.0]), np.array([1.0, -2.0, 1.0])) == pytest.approx(0.0)
    assert np.isnan(prompt_swap_correlation(a, np.ones(3)))


def test_prompt_swap_correlation_of_a_constant_map_is_nan_whatever_the_round_off():
    """0.1 is not exact in binary: the centred values of a constant map are round-off (~1e-17), and their
    "correlation" with anything is a number near 0, which would read as a prompt-specific map."""
    other = np.random.default_rng(0).random((64, 64))
    for value in (0.1, 0.3, 1 / 3):
        constant = np.full((64, 64), value)
        assert np.isnan(prompt_swap_correlation(constant, other))
        assert np.isnan(prompt_swap_correlation(other, constant))
    assert prompt_swap_correlation(other, other + 1e-12 * np.arange(other.size).reshape(other.shape)) == pytest.approx(1.0)
    assert np.isnan(prompt_swap_correlation(np.zeros((0, 0)), np.zeros((0, 0))))  # nothing to correlate
