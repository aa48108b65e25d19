"""Enhanced CT test files made from a classic series, shared by the DICOM, DICOM SEG and batch tests."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional

import pydicom

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.2"


def enhanced_ct(
    series: Path,
    out: Path,
    *,
    order: Optional[list[int]] = None,
    sop_class: str = ENHANCED_CT,
    edit: Optional[Callable[[list], None]] = None,
    description: Optional[str] = None,
    transfer_syntax: str = pydicom.uid.ExplicitVRLittleEndian,
) -> Path:
    """The classic series as one multi-frame file (highdicom's legacy conversion), its frames stored in ``order``.

    ``edit`` changes the classic datasets first; ``sop_class`` is written over the legacy class, since
    a reader must handle Enhanced CT and its Legacy Converted variant alike.
    """
    import highdicom as hd

    datasets = [pydicom.dcmread(f) for f in sorted(Path(series).iterdir())]
    if edit is not None:
        edit(datasets)
    if order is not None:
        datasets = [datasets[i] for i in order]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        image = hd.legacy.LegacyConvertedEnhancedCTImage(
            datasets, series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(), instance_number=1,
            include_dimension_index=False,  # keep the frames in the order given, not sorted by position
            transfer_syntax_uid=transfer_syntax,
        )
    image.SOPClassUID = image.file_meta.MediaStorageSOPClassUID = sop_class
    if description is not None:
        image.SeriesDescription = description
    image.save_as(out, enforce_file_format=True)
    return out
