"""A fresh headless Slicer scene per test (slicer-core: Slicer's real MRML classes, no Qt)."""

from __future__ import annotations

import pytest


@pytest.fixture
def context():
    from TextSegmentLib.slicer_bridge import headless_context

    ctx = headless_context()
    yield ctx
    ctx.scene.Clear(True)
