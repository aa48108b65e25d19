"""One training run at a time in a run folder.

Why: a command started twice (two terminals, ``nohup`` run again, ``reproduce`` resumed while it
still runs) put two runs into one ``--out``; both wrote the same ``last.pt`` and best weights, and
the folder held neither run. The lock file names the process that writes there. A lock left by a
process that no longer runs on this machine (killed outright) is taken over with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from ..errors import InputError

log = logging.getLogger(__name__)

LOCK_NAME = ".train.lock"


@contextlib.contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir``'s lock while the block runs; refuse when another live run holds it.

    A folder this call had to create is removed again when the block leaves nothing in it, so a
    run refused before it wrote anything leaves no trace.
    """
    out_dir = Path(out_dir)
    made = [folder for folder in (out_dir, *out_dir.parents) if not folder.exists()]  # innermost first
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    try:
        _take(lock, out_dir)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        for folder in made:
            if any(folder.iterdir()):
                break
            folder.rmdir()


def _take(lock: Path, out_dir: Path) -> None:
    me = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _read(lock)
            host, _, pid = holder.partition(" ")
            if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                log.warning("%s: taking over the lock of process %s, which no longer runs", out_dir, pid)
                lock.unlink(missing_ok=True)
                continue
            raise InputError(f"{out_dir}: another training run (process {pid or '?'} on {host or '?'}) is writing "
                             f"there; wait for it or stop it, or choose another --out. If no such run is left "
                             f"(it ran on another machine), delete {lock}") from None
        with os.fdopen(fd, "w") as handle:
            handle.write(me)
        return


def _read(lock: Path) -> str:
    try:
        return lock.read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True
