"""What the module's Setup section shows before torch is installed: GPUs and missing requirements.

Nothing here imports torch (Slicer start-up; torch may be missing), pip or the network.
"""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

TORCH_REQUIREMENT = "torch>=2.4,<2.15"  # torch and torchvision come from Slicer's PyTorch extension, not pip
TORCHVISION_REQUIREMENT = "torchvision>=0.19,<0.30"


# devices (no torch import: the widget shows this before torch is installed) -----------------------
def probe_gpus(*, run: Callable[..., Any] = subprocess.run) -> list[dict[str, Any]]:
    """NVIDIA GPUs as ``nvidia-smi`` reports them (name, total and free MiB); [] when there is none.

    A GPU whose memory nvidia-smi does not report ("[N/A]": unified-memory parts such as a DGX Spark's
    GB10) is kept with ``None`` for it: it is still the GPU the models run on."""
    command = ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]
    try:
        done = run(command, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    if getattr(done, "returncode", 1) != 0:
        return []
    gpus = []
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            index = int(fields[0])
        except ValueError:
            continue
        gpus.append({"index": index, "name": fields[1], "total_mib": _mib(fields[2]), "free_mib": _mib(fields[3])})
    return gpus


def _mib(field: str) -> Optional[int]:
    try:
        return int(field)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def describe_gpus(gpus: Sequence[Mapping[str, Any]]) -> str:
    """One line for the device selector: what 'auto' and 'cuda' will use."""
    if not gpus:
        return "No NVIDIA GPU found: models run on the CPU (slower)."

    def memory(g: Mapping[str, Any]) -> str:
        if g.get("free_mib") is None or g.get("total_mib") is None:
            return "memory not reported"
        return f"{g['free_mib'] / 1024:.1f} of {g['total_mib'] / 1024:.1f} GiB free"

    return "; ".join(f"cuda:{g['index']} {g['name']}: {memory(g)}" for g in gpus)


# dependencies ----------------------------------------------------------------------------------
def read_requirements(path: Union[str, Path]) -> list[str]:
    """The requirement lines of a requirements.txt (comments, blanks and pip options dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in Path(path).read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("-")]


def missing_requirements(requirements: Iterable[str]) -> list[str]:
    """Requirements not installed, or installed at a version outside their pins (no pip, no network)."""
    from packaging.requirements import Requirement

    missing = []
    for text in requirements:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue  # not for this Python or platform: pip skips it too
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            missing.append(f"{text} (installed: {installed})")
    return missing
