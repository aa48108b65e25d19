"""The one progress/cancel protocol shared by the engine, the CLI bar and the Slicer progress bar."""

from __future__ import annotations

import threading
from typing import Callable, Optional, Protocol

from .errors import Cancelled


class ProgressCallback(Protocol):
    def __call__(self, fraction: float, message: str) -> None:  # pragma: no cover - protocol
        """``fraction`` in [0, 1], monotonic within one job; ``message`` is short, human-readable."""


class CancelToken:
    """Thread-safe flag checked by long jobs between units of work (slices, batches, cases)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self.cancelled:  # the property, so a token that also follows another (slicer_jobs) is obeyed
            raise Cancelled("cancelled by the user; no output was written")


def check_cancel(cancel: "CancelToken | Callable[[], bool] | None") -> None:
    """Raise ``Cancelled`` if ``cancel`` (a token or a zero-argument callable) says so."""
    if cancel is None:
        return
    if isinstance(cancel, CancelToken):
        cancel.raise_if_cancelled()
    elif cancel():
        raise Cancelled("cancelled by the user; no output was written")


class MonotonicProgress:
    """Wraps a callback so reported fractions never go backwards and end exactly at 1.0."""

    def __init__(self, callback: Optional[ProgressCallback]) -> None:
        self._callback = callback
        self._last = 0.0

    def __call__(self, fraction: float, message: str = "") -> None:
        fraction = min(1.0, max(self._last, float(fraction)))
        self._last = fraction
        if self._callback is not None:
            self._callback(fraction, message)
