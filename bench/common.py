"""Small helpers shared by the benchmarks: timing, resident memory, machine notes, tables, doc blocks.

Peak memory uses Linux's per-process high-water mark (``VmHWM``), which writing ``5`` to
``/proc/self/clear_refs`` resets: a benchmark can then read the peak of one phase only, after the
model was built. Where that is not possible (not Linux), the whole-process peak from
``getrusage`` is reported instead and ``peak_reset`` says so.
"""

from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

MB = 1024 * 1024


def timed(fn: Callable[[], Any], *, sync: Callable[[], None] | None = None) -> tuple[float, Any]:
    """Seconds ``fn()`` took and what it returned; ``sync`` (e.g. CUDA synchronise) runs before each clock read."""
    if sync:
        sync()
    start = time.perf_counter()
    result = fn()
    if sync:
        sync()
    return time.perf_counter() - start, result


def median(values: Iterable[float]) -> float:
    return float(statistics.median(list(values)))


def _proc_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_mb() -> float:
    """Resident memory now."""
    kb = _proc_status_kb("VmRSS")
    if kb is not None:
        return kb / 1024
    import psutil  # not Linux: psutil knows the current RSS

    return psutil.Process().memory_info().rss / MB


def trim_heap() -> None:
    """Collect garbage and hand glibc's free heap back to the OS, so RSS counts memory in use.

    Without it, memory freed after building a model stays resident, is reused later, and a phase's
    peak minus the baseline would understate what the phase needs.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the baseline then includes free heap


def reset_peak_rss() -> bool:
    """Start a new high-water mark; False where the OS cannot (then ``peak_rss_mb`` is the process peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory since the last ``reset_peak_rss`` (or since the process started)."""
    kb = _proc_status_kb("VmHWM")
    return kb / 1024 if kb is not None else process_peak_rss_mb()


def process_peak_rss_mb() -> float:
    """Peak resident memory over the whole life of the process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024


def machine_info() -> dict[str, Any]:
    """What a reader needs to judge the numbers: CPU, cores, load, library versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match.group(1).strip() if match else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        info["monai"] = None
    return info


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """``columns`` are (header, key) pairs; floats get 3 significant digits, None shows as '–'."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, bool):
            return "yes" if value else "no"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(key)) for _, key in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
    return path


def replace_doc_block(path: str | os.PathLike, name: str, text: str) -> None:
    """Replace what lies between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` in ``path``."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    path = Path(path)
    doc = path.read_text()
    if start not in doc or end not in doc:
        raise SystemExit(f"{path}: no {start} … {end} block to replace")
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    path.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", doc))
