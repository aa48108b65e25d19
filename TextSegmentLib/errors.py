"""One exception family whose messages a user can act on.

The CLI turns any ``TextSegmentError`` into one line on stderr and a non-zero exit code; the
Slicer module shows it in a message box. Everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class TextSegmentError(Exception):
    """Base class: the message names the problem and, where possible, what to do about it."""

    exit_code = 2


class InputError(TextSegmentError):
    """A path, image, DICOM series, prompt or option the user gave cannot be used."""


class NotCTError(InputError):
    """The data is not CT (e.g. an MR-only study); pass ``allow_non_ct=True`` to go on anyway."""


class OutputExistsError(InputError):
    """An output file exists already; we never overwrite unless explicitly asked to."""


class WeightsError(TextSegmentError):
    """Weights are missing, tampered with, or do not match the model."""


class ModelError(TextSegmentError):
    """A model name or configuration is unknown or inconsistent."""


class Cancelled(TextSegmentError):
    """The user cancelled a running job; nothing partial was written."""

    exit_code = 130
