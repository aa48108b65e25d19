"""Where models run: one place that turns "auto", "cpu" or "cuda:1" into a ``torch.device``.

Asking for a GPU that is not there is an error, never a silent fall-back to the CPU: a user who
typed ``--device cuda`` wants to know that their CUDA setup is broken.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Union

import torch

from .errors import InputError

DeviceSpec = Union[str, torch.device, None]


def select_device(spec: DeviceSpec = "auto") -> torch.device:
    """``"auto"`` (or None) is CUDA when available, else the CPU; MPS is used only when named."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        return _checked_cuda(device, spec)
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise InputError("device 'mps' was asked for but Apple MPS is not available here; use --device cpu or auto")
        return device
    raise InputError(f"unsupported device {spec!r}; use auto, cpu, cuda, cuda:N or mps")


def _checked_cuda(device: torch.device, spec: Any) -> torch.device:
    if not torch.cuda.is_available():
        build = f"PyTorch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}"
        raise InputError(
            f"device {spec!r} was asked for but CUDA is not available ({build}; no GPU or no driver?); "
            "use --device cpu, or auto to take a GPU only when there is one"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise InputError(f"device {spec!r} does not exist: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def describe_devices() -> list[dict[str, Any]]:
    """The CPU and each CUDA GPU as plain dicts (for the Slicer UI and ``textsegment info``).

    Memory is in bytes; ``free_memory`` is what the driver reports now, so it can be shown before
    a user picks a batch size.
    """
    devices: list[dict[str, Any]] = [_describe_cpu()]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            devices.append(_describe_cuda(index))
    if hasattr(torch.backends, "mps") and torch.backends.mps.is_available():
        devices.append({"type": "mps", "name": "Apple MPS", "device": "mps"})
    return devices


def _describe_cpu() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {
        "type": "cpu",
        "device": "cpu",
        "name": platform.processor() or platform.machine() or "CPU",
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
    }


def _describe_cuda(index: int) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(index)
    try:
        free, total = torch.cuda.mem_get_info(index)
    except RuntimeError:  # a GPU busy in exclusive mode cannot be queried; report what we know
        free, total = None, props.total_memory
    return {
        "type": "cuda",
        "device": f"cuda:{index}",
        "index": index,
        "name": props.name,
        "total_memory": int(total),
        "free_memory": None if free is None else int(free),
        "capability": f"{props.major}.{props.minor}",
    }
