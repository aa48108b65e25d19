"""Read a CT volume from a file (NIfTI, NRRD, MetaImage) or from DICOM, refusing what is not CT.

Geometry comes exactly as SimpleITK gives it (LPS), so a volume read here lines up with ITK,
Slicer and every DICOM tool. Every problem with the input raises one ``InputError`` naming the path.

Is it CT? DICOM says so in its Modality tag. Image files carry no modality, so CT is assumed when
the values look like Hounsfield units: the minimum is at or below −500 (air, or the scanner's padding
value such as −1024/−3024) and the maximum at most 32767. MR, PET, label maps and normalised images
fail that test. DICOM series without a Modality tag get the same test, with a logged warning. A crop
with no air in it fails too: pass ``allow_non_ct=True`` to read such data anyway.

NaN or infinite voxels are an error. SimpleITK 2.x (ITK ≤ 5.4) turns them into 0 when it reads a
NIfTI file, so float NIfTI files are also scanned for them in their raw bytes.

A file holding less voxel data than its header announces is "truncated or corrupt" (``integrity``):
ITK 5.4 would zero-fill what is missing without a word.
"""

from __future__ import annotations

import gzip
import logging
import zlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, NotCTError
from ..volume import Volume
from . import dicom_series, dicom_volume
from .integrity import check_complete, nifti_header

log = logging.getLogger(__name__)

FILE_FORMATS = {
    ".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD", ".mha": "MetaImage", ".mhd": "MetaImage",
}
HU_AIR_AT_MOST = -500.0
HU_MAX = 32767.0
NOT_CT_HINT = "To read it anyway pass allow_non_ct=True (CLI: --allow-non-ct)."
_ITK_SHORT_READ = ("fread got only", "_nrrdGzRead", "_nrrdEncodingGzip_read")  # ITK's words for a short NRRD


def read_volume(
    path: Path | str, *, allow_non_ct: bool = False, series_uid: Optional[str] = None,
    listing: Optional[Sequence[dicom_series.SeriesInfo]] = None,
) -> Volume:
    """A CT volume from an image file, a DICOM folder, a DICOMDIR or a single DICOM file.

    ``series_uid`` picks one DICOM series (a SeriesInstanceUID or a key from ``list_series``); without
    it the CT series is chosen (see ``dicom_series.choose_series``). A single DICOM file is read alone, as
    one slice; point at its folder for the whole series. Non-CT input raises ``NotCTError`` unless
    ``allow_non_ct``. ``listing``: ``list_series(path)`` when the caller has made it already, so a
    large study's headers are not read a second time.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if dicom_series.is_dicom_input(path):
        found = dicom_series.list_series(path) if listing is None else listing
        series = dicom_series.choose_series(found, source=path, series_uid=series_uid, allow_non_ct=allow_non_ct)
        volume = dicom_volume.read_series(series, source=path)
        _check_values(volume, path)
        if path.is_file() and volume.shape[0] == 1:
            _warn_lone_slice(path)
    else:
        if series_uid:
            raise InputError(f"{path}: series_uid (CLI: --series) applies to DICOM input only, and this is an "
                             "image file; leave it out")
        volume = read_image_file(path)
    return _apply_ct_policy(volume, path=path, allow_non_ct=allow_non_ct)


def read_label_map(path: Path | str) -> Volume:
    """An integer label map (e.g. a reference segmentation) from an image file; no CT check."""
    path = Path(path)
    volume = read_image_file(path)
    array = volume.array
    if not np.issubdtype(array.dtype, np.integer):
        if not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: not a label map: it holds non-integer values ({array.dtype})")
        array = array.astype(np.int32)
    if array.size and array.min() < 0:
        raise InputError(f"{path}: not a label map: it holds negative values (min {array.min()})")
    metadata = {**volume.metadata, "kind": "label map"}
    return volume.with_array(array, metadata=metadata)


def read_image_file(path: Path | str) -> Volume:
    """Any finite 3D single-channel image SimpleITK reads, with its geometry untouched and no CT check."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path}: is a folder, not an image file")
    check_complete(path, format_name=_format_name(path))
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if any(marker in str(exc) for marker in _ITK_SHORT_READ):
            raise InputError(f"{path}: truncated or corrupt: {_itk_reason(exc)}") from exc
        misnamed = _content_format(path)
        if misnamed is not None:
            fmt, suffix = misnamed
            raise InputError(f"{path}: holds {fmt} data, but its name does not end in {suffix}, so it cannot be "
                             f"read; rename it (e.g. {without_image_suffix(path.name)}{suffix})") from exc
        raise InputError(f"{path}: cannot read this image ({_itk_reason(exc)}); use NIfTI, NRRD, MHA or DICOM") from exc
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(f"{path}: {components} values per voxel (colour/vector image); a grey-level CT is needed")
    if image.GetDimension() == 2:
        width, height = image.GetSize()
        raise InputError(
            f"{path}: a 2D image ({width}×{height}); TextSegment needs a 3D volume (a CT series or a 3D NIfTI/NRRD)"
        )
    if image.GetDimension() != 3:
        raise InputError(f"{path}: a {image.GetDimension()}D image; TextSegment needs a 3D volume")
    if _format_name(path) == "NIfTI" and image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        try:
            bad = _nifti_non_finite(path)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:  # damage the size check cannot see
            raise InputError(f"{path}: truncated or corrupt: {f'{exc}'.rstrip('.')}; copy or export the file again") from None
        if bad:
            raise InputError(f"{path}: {bad} voxel(s) are NaN or infinite; fix or mask them before segmenting")
    volume = Volume(
        array=sitk.GetArrayFromImage(image),
        spacing=image.GetSpacing(),
        origin=image.GetOrigin(),
        direction=np.array(image.GetDirection()).reshape(3, 3),
        source=str(path),
        metadata={"format": _format_name(path)},
    )
    _check_values(volume, path)
    return volume


def looks_like_hu(array: np.ndarray) -> bool:
    """True when the values could be Hounsfield units (rule in the module docstring)."""
    if array.size == 0:
        return False
    return float(np.min(array)) <= HU_AIR_AT_MOST and float(np.max(array)) <= HU_MAX


def _apply_ct_policy(volume: Volume, *, path: Path, allow_non_ct: bool) -> Volume:
    modality = (volume.modality or "").upper()
    if modality == "CT":
        return volume
    if modality:
        if allow_non_ct:
            log.info("%s: reading %s data as asked; the models are trained on CT", path, modality)
            return volume
        raise NotCTError(f"{path}: not CT: the series is {modality}; TextSegment's models are trained on CT. {NOT_CT_HINT}")
    lo, hi = float(np.min(volume.array)), float(np.max(volume.array))
    if looks_like_hu(volume.array):
        if volume.dicom is not None:
            log.warning("%s: no Modality tag; treated as CT because the values (%g to %g) look like HU", path, lo, hi)
        missing = "no Modality tag" if volume.dicom is not None else "image files record no modality"
        reason = f"{missing}; values look like HU"
        return volume.with_array(volume.array, modality="CT", metadata={**volume.metadata, "modality_assumed": reason})
    if allow_non_ct:
        log.info("%s: values %g to %g do not look like HU; reading as asked", path, lo, hi)
        return volume
    raise NotCTError(
        f"{path}: not CT: values {lo:g} to {hi:g} do not look like Hounsfield units (CT has air near -1000 HU). "
        f"If this is CT, convert it to HU first. {NOT_CT_HINT}"
    )


def _warn_lone_slice(path: Path) -> None:
    """One file of a series, dragged in alone, gives a one-slice "volume" that segments without a word:
    say when its folder holds more DICOM files (by their signature only, so a large folder costs little)."""
    if dicom_series.is_dicomdir(path):
        return
    others = sum(1 for p in path.parent.iterdir() if p != path and p.is_file() and dicom_series.is_dicom_file(p))
    if others:
        log.warning("%s: one DICOM file read alone, as a single slice; its folder holds %d more DICOM file(s): "
                    "point at the folder (%s) to segment the whole series", path, others, path.parent)


def _check_values(volume: Volume, path: Path) -> None:
    array = volume.array
    if array.size == 0:
        raise InputError(f"{path}: the image is empty (shape {array.shape})")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise InputError(f"{path}: {bad} voxel(s) are NaN or infinite; fix or mask them before segmenting")


def _nifti_non_finite(path: Path) -> int:
    """Count NaN/inf voxels in a float NIfTI from its raw bytes.

    ITK up to 5.4 (SimpleITK 2.x) silently reads them as 0, which would hide broken data.
    """
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    header = nifti_header(data)
    if header is None:
        return 0
    dtype = {16: "f4", 64: "f8"}.get(header.datatype)
    count, offset = int(np.prod(header.dims[1 : int(header.dims[0]) + 1])), int(header.offset)
    if dtype is None or offset + count * int(dtype[1]) > len(data):
        return 0
    voxels = np.frombuffer(data, f"{header.endian}{dtype}", count, offset)
    return int(np.count_nonzero(~np.isfinite(voxels)))


def _content_format(path: Path) -> Optional[tuple[str, str]]:
    """(format, suffix) when the bytes are a single-file NIfTI or a NRRD that ITK refused for its name: a
    ``.nii.gz`` saved as ``.nii`` or with no extension is NIfTI, and "use NIfTI" would only puzzle its owner."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(544)
        packed = head[:2] == b"\x1f\x8b"
        if packed:
            with gzip.open(path, "rb") as handle:
                head = handle.read(544)
        header = nifti_header(head)
    except (OSError, EOFError, zlib.error):
        return None
    if header is not None and header.magic in (b"n+1\0", b"n+2\0"):  # header and data in one file
        return ("gzip-compressed NIfTI", ".nii.gz") if packed else ("NIfTI", ".nii")
    if head.startswith(b"NRRD000"):
        return "NRRD", ".nrrd"
    return None


def without_image_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (*FILE_FORMATS, ".gz"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _format_name(path: Path) -> str:
    name = path.name.lower()
    for suffix, fmt in FILE_FORMATS.items():
        if name.endswith(suffix):
            return fmt
    return path.suffix.lstrip(".").upper() or "image"


def _itk_reason(exc: Exception) -> str:
    text = str(exc)
    marker = "ERROR:"
    reason = text.split(marker, 1)[1] if marker in text else text.strip().splitlines()[-1]
    return " ".join(reason.split())
