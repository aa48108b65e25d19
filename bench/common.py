"""Small helpers shared by the benchmarks: timing, resident memory, machine notes, tables, doc blocks.

Peak memory uses Linux's per-process high-water mark (``VmHWM``), which writing ``5`` to
``/proc/self/clear_refs`` resets: a benchmark can then read the peak of one phase only, after the
model was built. Where that is not possible (not Linux), the whole-process peak from
``getrusage`` is reported instead and ``peak_reset`` says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import shlex
import shutil
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


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number ≥ 1 (a count of slices, repeats, runs, threads)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse ``type``: a whole number ≥ 0 (a count that may be left out, such as phantoms)."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value} is less than {low}")
    return value


def check_outputs(
    parser: argparse.ArgumentParser, *, json_path: str | os.PathLike | None = None,
    doc: str | os.PathLike | None = None, block: str | None = None,
) -> None:
    """Refuse, before any measuring, a ``--json`` that cannot be written and a ``--doc`` without its block.

    A benchmark runs for minutes; finding out at the end that its results have nowhere to go loses them.
    """
    if json_path is not None:
        path = Path(json_path)
        if path.is_dir():
            parser.error(f"--json {path}: is a folder; give a file name")
        folder = next((p for p in path.parents if p.exists()), Path("."))
        if not folder.is_dir():
            parser.error(f"--json {path}: {folder} is a file, not a folder")
    if doc is not None:
        path = Path(doc)
        if not path.is_file():
            parser.error(f"--doc {path}: no such file (the Markdown file whose bench:{block} block gets the tables)")
        missing = _missing_block(path.read_text(encoding="utf-8"), block)
        if missing:
            parser.error(f"--doc {path}: {missing}")


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How the run was started, quoted so that it can be pasted into a shell as it is."""
    return shlex.join([script, *(sys.argv[1:] if argv is None else argv)])


def run_info(script: str, argv: Sequence[str] | None) -> dict[str, Any]:
    """What every benchmark's JSON records about its run: when, the command line, the machine."""
    return {"created": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command_line(script, argv), "machine": machine_info()}


@contextlib.contextmanager
def user_errors():
    """A ``TextSegmentError`` (unknown model, missing weights or data) as one line and exit status 2, not a traceback."""
    from TextSegmentLib.errors import TextSegmentError

    try:
        yield
    except TextSegmentError as exc:
        raise SystemExit(f"error: {exc}") from None


def _write_whole(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file beside it: an interrupted write leaves the old file as it was.

    A link is followed (the file it points at is rewritten, the link stays) and the file keeps its permissions.
    """
    from TextSegmentLib.io.writers import replace_whole

    path = Path(os.path.realpath(path))

    def write(temporary: Path) -> None:
        with open(temporary, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        if path.exists():
            shutil.copymode(path, temporary)

    replace_whole(path, write)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_whole(path, json.dumps(data, indent=2, default=float) + "\n")
    return path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def _missing_block(doc: str, name: str) -> str:
    """What is wrong with ``doc``'s block ``name`` ("" when it has one, start before end): checked before a run
    (``check_outputs``) and again when its tables are written."""
    start, end = _markers(name)
    if start not in doc or end not in doc or doc.index(start) > doc.index(end):
        return f"no {start} … {end} block to replace"
    return ""


def replace_doc_block(path: str | os.PathLike, name: str, text: str) -> None:
    """Replace what lies between ``<!-- bench:NAME:start -->`` and ``<!-- bench:NAME:end -->`` in ``path``.

    The rest of the file is kept byte for byte (its line endings included).
    """
    start, end = _markers(name)
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        doc = f.read()
    missing = _missing_block(doc, name)
    if missing:
        raise SystemExit(f"{path}: {missing}")
    newline = "\r\n" if "\r\n" in doc else "\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    block = f"{start}\n{text}\n{end}".replace("\r\n", "\n").replace("\n", newline)
    _write_whole(path, pattern.sub(lambda _: block, doc))
