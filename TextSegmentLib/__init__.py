"""TextSegment engine: text-prompted CT segmentation that explains itself.

Importing this package loads numpy only; torch, SimpleITK, pydicom and the models are imported
by the modules that need them, so Slicer can import it at start-up without cost.
"""

from .errors import (
    Cancelled,
    InputError,
    ModelError,
    NotCTError,
    OutputExistsError,
    TextSegmentError,
    WeightsError,
)
from .progress import CancelToken
from .volume import DicomInfo, Volume

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "CancelToken",
    "DicomInfo",
    "InputError",
    "ModelError",
    "NotCTError",
    "OutputExistsError",
    "TextSegmentError",
    "Volume",
    "WeightsError",
    "__version__",
]
