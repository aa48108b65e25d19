"""Device selection: "auto" picks what is there; asking for a missing GPU is a clear error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from TextSegmentLib.devices import describe_devices, select_device
from TextSegmentLib.errors import InputError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """Pretend two GPUs are present; nothing here needs a real one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda i: SimpleNamespace(name=f"Fake GPU {i}", total_memory=(i + 1) * 2**30, major=8, minor=i),
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: ((i + 1) * 2**29, (i + 1) * 2**30))


def test_auto_is_cpu_without_cuda(no_cuda):
    assert select_device("auto") == torch.device("cpu")
    assert select_device(None) == torch.device("cpu")


def test_auto_is_the_gpu_when_there_is_one(two_fake_gpus):
    assert select_device() == torch.device("cuda", 0)
    assert select_device("cuda:1") == torch.device("cuda", 1)
    assert select_device(torch.device("cuda")) == torch.device("cuda", 0)


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "CUDA"])
def test_cuda_without_cuda_is_a_clear_error(no_cuda, spec):
    with pytest.raises(InputError, match="CUDA is not available.*--device cpu"):
        select_device(spec)


def test_a_gpu_index_that_does_not_exist_is_named(two_fake_gpus):
    with pytest.raises(InputError, match=r"has 2 CUDA device\(s\)"):
        select_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu", "tpu:0", "cuda:x"])
def test_unknown_device_names_are_refused(spec):
    with pytest.raises(InputError, match="device"):
        select_device(spec)


def test_cpu_is_always_there():
    assert select_device("cpu") == torch.device("cpu")
    assert select_device(" CPU ") == torch.device("cpu")


def test_describe_lists_cpu_cores_without_cuda(no_cuda):
    devices = describe_devices()
    assert [d["type"] for d in devices if d["type"] != "mps"] == ["cpu"]
    assert devices[0]["cores"] >= devices[0]["usable_cores"] >= 1


def test_describe_reports_gpu_memory(two_fake_gpus):
    gpus = [d for d in describe_devices() if d["type"] == "cuda"]
    assert [g["device"] for g in gpus] == ["cuda:0", "cuda:1"]
    assert gpus[1]["name"] == "Fake GPU 1" and gpus[1]["capability"] == "8.1"
    assert gpus[1]["total_memory"] == 2 * 2**30 and gpus[1]["free_memory"] == 2**30
