"""A terminal progress bar speaking the library's ``callback(fraction, message)`` protocol."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def progress_bar(*, disable: bool = False) -> Iterator:
    """Yields a progress callback drawing a tqdm bar in per-cent on stderr.

    The bar appears with the first progress report: a command refused on its options or inputs printed
    an empty bar ("0%| 00:00<?") above its error line.
    """
    from tqdm import tqdm

    bars: list = []

    def update(fraction: float, message: str = "") -> None:
        if not bars:
            bars.append(tqdm(total=100, unit="%", file=sys.stderr, disable=disable,
                             bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}"))
            started = False
        else:
            started = True
        bar = bars[0]
        if message:  # before the update draws the line, or it shows the previous step's message
            bar.set_postfix_str(message, refresh=False)
        percent = round(fraction * 100, 1)
        if not started or percent < bar.n:
            # a resumed run starts at 90 %, a reproduce phase starts again at 0: time the rest from here,
            # or the first jump reads as speed and the time left is wrong for hours
            bar.reset()
            bar.n = bar.last_print_n = bar.initial = percent
            bar.refresh()
            return
        bar.update(percent - bar.n)

    try:
        yield update
    finally:
        for bar in bars:
            bar.close()
