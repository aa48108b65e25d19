"""A tiny slice pool shared by the training tests (two small phantoms at 128 px)."""

from __future__ import annotations

import pytest

@pytest.fixture(scope="session")
def tiny_pool():
    from TextSegmentLib.training import build_pool, phantom_cases

    return build_pool(phantom_cases([3, 4], shape=(6, 64, 64)), size=128, pyramid_seeds=(0,))
