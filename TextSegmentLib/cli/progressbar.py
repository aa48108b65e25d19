"""A terminal progress bar speaking the library's ``callback(fraction, message)`` protocol."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def progress_bar(*, disable: bool = False) -> Iterator:
    """Yields a progress callback drawing a tqdm bar in per-cent on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=100, unit="%", file=sys.stderr, disable=disable, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

    def update(fraction: float, message: str = "") -> None:
        bar.update(round(fraction * 100, 1) - bar.n)
        if message:
            bar.set_postfix_str(message, refresh=False)

    try:
        yield update
    finally:
        bar.close()
