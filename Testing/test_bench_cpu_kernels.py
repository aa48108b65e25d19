"""bench/cpu_kernels.py: its textbook forms are what the models' stand-ins replace, and it finds every call."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from TextSegmentLib.engine import segment
from TextSegmentLib.models import deformable_attention, layers, tgcnet
from TextSegmentLib.models.deformable_attention import MultiScaleDeformableAttention, flatten_levels
from TextSegmentLib.phantom import make_phantom
from TextSegmentLib.weights import load_model
from bench_scripts import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("cpu_kernels")


@pytest.fixture(scope="module")
def tgcnet_tiny():
    return load_model("tgcnet-tiny", weights="tgcnet-tiny-v9", device="cpu")


@pytest.fixture(scope="module")
def small_case():
    return SimpleNamespace(volume=make_phantom(seed=4, shape=(3, 96, 96)).ct)


def test_textbook_forms_equal_the_models_stand_ins(bench):
    generator = torch.Generator().manual_seed(0)
    for shape, size in [((2, 8, 16, 16), (64, 64)), ((2, 8, 8, 8), (32, 32)), ((1, 4, 40, 40), (80, 80))]:
        x = torch.randn(*shape, generator=generator)
        torch.testing.assert_close(layers.resize_to(x, size), bench.textbook_resize(x, size), atol=5e-6, rtol=0)
    pixels, text = torch.randn(2, 64, 16, 16, generator=generator), torch.randn(2, 64, generator=generator)
    torch.testing.assert_close(
        tgcnet.grouped_cosine(pixels, text, 8), bench.textbook_grouped_cosine(pixels, text, 8), atol=1e-6, rtol=0
    )
    shapes = torch.tensor([[8, 8], [4, 4]])
    value = torch.randn(2, 80, 4, 8, generator=generator)  # 64 + 16 cells, 4 heads of 8
    locations = torch.rand(2, 5, 4, 2, 3, 2, generator=generator)
    weights = torch.rand(2, 5, 4, 2, 3, generator=generator)
    torch.testing.assert_close(
        deformable_attention.deformable_sample(value, shapes, locations, weights),
        bench.textbook_deformable_sample(value, shapes, locations, weights),
        atol=1e-6,
        rtol=0,
    )
    reference, offsets = torch.rand(2, 5, 2, 2, generator=generator), torch.randn(2, 5, 4, 2, 3, 2, generator=generator)
    torch.testing.assert_close(
        deformable_attention.sampling_locations(reference, offsets, shapes),
        bench.textbook_sampling_locations(reference, offsets, shapes),
        atol=0,
        rtol=0,
    )


def test_textbook_everywhere_swaps_every_stand_in_and_puts_them_back(bench):
    ours = (layers.resize_to, tgcnet.resize_to, tgcnet.grouped_cosine, deformable_attention.sampling_locations)
    with bench.textbook_everywhere():
        assert tgcnet.resize_to is bench.textbook_resize
        assert tgcnet.grouped_cosine is bench.textbook_grouped_cosine
        assert deformable_attention.deformable_sample is bench.textbook_deformable_sample
        assert deformable_attention.sampling_locations is bench.textbook_sampling_locations
        torch.manual_seed(0)
        module = MultiScaleDeformableAttention(16, num_heads=2, num_levels=1, num_points=2)
        value, shapes = flatten_levels([torch.randn(1, 16, 4, 4)])
        query, reference = torch.randn(1, 3, 16), torch.rand(1, 3, 2)
        with torch.no_grad():
            through_textbook = module(query, reference, value, shapes)
    assert (layers.resize_to, tgcnet.resize_to, tgcnet.grouped_cosine, deformable_attention.sampling_locations) == ours
    with torch.no_grad():
        torch.testing.assert_close(module(query, reference, value, shapes), through_textbook, atol=1e-6, rtol=0)


def test_the_textbook_forms_give_the_same_masks(bench, tgcnet_tiny, small_case):
    ours = segment(small_case.volume, ["liver", "spleen"], model=tgcnet_tiny, device="cpu")
    with bench.textbook_everywhere():
        textbook = segment(small_case.volume, ["liver", "spleen"], model=tgcnet_tiny, device="cpu")
    for a, b in zip(ours.results, textbook.results):
        assert int(a.mask.array.sum()) > 0
        np.testing.assert_array_equal(a.mask.array, b.mask.array)


def test_recorded_calls_find_every_kernel_of_tgcnet(bench, tgcnet_tiny, small_case):
    calls = bench.recorded_calls(tgcnet_tiny, small_case)
    kernels = {kernel for kernel, *_ in calls}
    assert kernels == {"bilinear resize", "grouped cosine", "deformable sampling", "sampling locations"}
    for kernel, ours, textbook, args in calls:
        assert ours is not textbook and all(not callable(a) for a in args)
