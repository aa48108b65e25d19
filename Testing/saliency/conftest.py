"""Fixtures for the saliency tests: the planted model and a phantom it can see (see planted_model.py)."""

from __future__ import annotations

import pytest
from planted_model import PlantedModel, sphere_phantom


@pytest.fixture
def model() -> PlantedModel:
    return PlantedModel()


@pytest.fixture
def phantom():
    return sphere_phantom()
