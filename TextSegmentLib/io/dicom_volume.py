"""Read one chosen DICOM series (a ``dicom_series.SeriesInfo``) into a Volume: its pixels and geometry.

Reading follows the DICOM geometry, the same way ITK/SimpleITK does:

* slices are sorted by their ImagePositionPatient projected on the slice normal (row × column);
* the origin is the first slice's position, the direction columns are row, column and normal;
* the slice spacing is (last − first) / (n − 1). When the gaps differ (missing slices, uneven
  acquisition) the slices are still stacked in order at that mean spacing — **nothing is resampled** —
  and a warning is logged and recorded in ``Volume.metadata`` (``non_uniform_spacing``, the real
  ``slice_positions_mm`` and the largest deviation) so a caller can refuse or resample explicitly;
* scouts ``dicom_series`` split off the stack (``SeriesInfo.localizer_files``) are named in a warning and
  in ``metadata["localizer_files_left_out"]``;
* a one-slice series is a valid (1, H, W) volume whose slice spacing is SpacingBetweenSlices, else
  SliceThickness, else 1 mm;
* pixels are decoded by pydicom (pylibjpeg handles JPEG 2000); a file pydicom has no decoder for is
  handed to SimpleITK/GDCM. Rescale slope/intercept are applied per slice; the result is int16 when
  every value is an integer that fits, float32 otherwise.

Enhanced (multi-frame) CT — Enhanced CT Image Storage and its Legacy Converted variant, one file holding
every slice — is read by the same rules, frame by frame: each frame is a slice whose position,
orientation, pixel spacing and rescale come from its Per-Frame Functional Groups item, else the Shared
one (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
PixelValueTransformationSequence). A frame whose groups hold no rescale (nor Modality LUT) takes the
file's top-level RescaleSlope/Intercept or Modality LUT Sequence; with none anywhere its stored values
are kept, as for a classic slice, and a warning names the file. A Modality LUT is applied per frame like
a rescale. Pixels pydicom has no decoder for are handed to SimpleITK/GDCM, which returns the frames in
file order (their rescale stripped first: GDCM would apply one rescale to every frame); the geometry
still comes from the functional groups. Frames are sorted along the normal like files (never trusted to be
stored in order), uneven gaps are reported, nothing is resampled. ``DicomInfo.files`` and
``sop_instance_uids`` then repeat the one file per slice and ``metadata["frame_numbers"]`` gives each
slice's 1-based frame number (``None`` for a single-frame file), which DICOM SEG needs to reference it.
A multi-frame file *without* functional groups (e.g. a multi-frame Secondary Capture) carries no
per-frame geometry and is refused. A classic single-frame slice carrying a stray functional-groups
sequence is still read as a classic slice when it has its own ImagePositionPatient/ImageOrientationPatient
(an enhanced SOP class always takes the frame path, even with one frame).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from ..errors import InputError
from ..volume import DicomInfo, Volume
from .dicom_series import (
    ORIENTATION_TOLERANCE,
    SeriesInfo,
    functional_group,
    int_or_none,
    is_enhanced,
    sop_class_uid,
    sop_instance_uid,
    tag_text,
    value_multiplicity,
)

log = logging.getLogger(__name__)

POSITION_TOLERANCE_MM = 0.01


def read_series(series: SeriesInfo, *, source: Path | str) -> Volume:
    """Stack one series into a Volume (geometry rules in the module docstring). No CT check here."""
    if not series.is_image:
        raise InputError(f"{source}: series {series.key} is a {series.modality or 'non-image'} object, not an image series")
    if series.localizer_files:
        log.warning(
            "%s: series %s: left out %d localizer (scout) image(s) filed with the %d-image stack: %s",
            source, series.key, len(series.localizer_files), series.n_images, ", ".join(series.localizer_files),
        )
    slices = [s for f in series.files for s in _read_slices(Path(f))]
    _check_stackable(slices, series=series, source=source)
    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda s: (float(np.dot(s.position, normal)), s.instance_number, s.frame or 0))
    z_spacing, metadata = _slice_spacing(slices, normal, source=source)
    if series.localizer_files:
        metadata["localizer_files_left_out"] = list(series.localizer_files)
    if any(s.frame is not None for s in slices):
        metadata["frame_numbers"] = [s.frame for s in slices]  # which frame of files[k] slice k is
    header = slices[0].header
    return Volume(
        array=np.stack([s.pixels for s in slices]),  # int16 unless some slice needed float32
        spacing=(slices[0].pixel_spacing[1], slices[0].pixel_spacing[0], z_spacing),
        origin=tuple(slices[0].position),
        direction=np.column_stack([row, col, normal]),
        modality=tag_text(header, "Modality").upper() or None,
        dicom=DicomInfo(
            study_instance_uid=tag_text(header, "StudyInstanceUID"),
            series_instance_uid=tag_text(header, "SeriesInstanceUID"),
            frame_of_reference_uid=tag_text(header, "FrameOfReferenceUID"),
            sop_instance_uids=tuple(sop_instance_uid(s.header) for s in slices),
            sop_class_uid=sop_class_uid(header),
            patient_id=tag_text(header, "PatientID"),
            patient_name=tag_text(header, "PatientName"),
            series_description=tag_text(header, "SeriesDescription"),
            series_number=int_or_none(header.get("SeriesNumber")),
            files=tuple(str(s.file) for s in slices),
        ),
        source=str(source),
        metadata={"format": "DICOM", "series_key": series.key, **metadata},
    )


def _check_stackable(slices: list["_Slice"], *, series: SeriesInfo, source: Path | str) -> None:
    first = slices[0]
    for s in slices[1:]:
        if s.shape != first.shape or not np.allclose(s.pixel_spacing, first.pixel_spacing, atol=1e-4):
            raise InputError(
                f"{s.label}: matrix {s.shape} / pixel spacing {s.pixel_spacing} differ from {first.shape} / "
                f"{first.pixel_spacing} in {first.label}; the series cannot be stacked"
            )
        if not np.allclose(s.orientation, first.orientation, atol=ORIENTATION_TOLERANCE):
            raise InputError(
                f"{source}: series {series.key} mixes slice orientations (e.g. {first.label} and {s.label}), "
                "as a localizer does; it is not one volume"
            )


def _slice_spacing(slices: list["_Slice"], normal: np.ndarray, *, source: Path | str) -> tuple[float, dict[str, Any]]:
    """Slice spacing by SimpleITK's rule, and what the metadata should record about the real positions."""
    depth = np.array([float(np.dot(s.position, normal)) for s in slices])
    metadata: dict[str, Any] = {"slice_positions_mm": [round(d, 6) for d in depth]}
    if len(slices) == 1:
        return slices[0].single_slice_spacing, {**metadata, "single_slice": True}
    gaps = np.diff(depth)
    if gaps.min() < POSITION_TOLERANCE_MM:
        k = int(np.argmin(gaps))
        uid = sop_instance_uid(slices[k].header)
        if uid and uid == sop_instance_uid(slices[k + 1].header) and slices[k].frame == slices[k + 1].frame:
            raise InputError(
                f"{source}: {slices[k].label} and {slices[k + 1].label} are copies of one image (SOP Instance UID {uid}); "
                "the folder holds the series twice: remove the duplicate copy or point at one copy's folder"
            )
        raise InputError(
            f"{source}: {slices[k].label} and {slices[k + 1].label} lie at the same position; the series holds several "
            "stacks (acquisitions, phases or echoes) and cannot be read as one volume"
        )
    z_spacing = float(depth[-1] - depth[0]) / (len(slices) - 1)
    deviation = float(np.max(np.abs(gaps - z_spacing)))
    uneven = deviation > max(POSITION_TOLERANCE_MM, 0.01 * z_spacing)
    metadata.update(slice_spacing_mm=z_spacing, non_uniform_spacing=bool(uneven), max_spacing_deviation_mm=deviation)
    if uneven:
        log.warning(
            "%s: slice gaps are uneven (%.3g to %.3g mm, mean %.3g mm): slices are stacked at the mean spacing and "
            "NOT resampled, so positions between the first and last slice are approximate",
            source, gaps.min(), gaps.max(), z_spacing,
        )
    offsets = np.array([s.position - slices[0].position for s in slices])
    shear = float(np.max(np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)))
    if shear > 10 * POSITION_TOLERANCE_MM:
        metadata["slice_shear_mm"] = shear
        log.warning("%s: slices drift %.3g mm sideways (gantry tilt?); stacked without correction", source, shear)
    return z_spacing, metadata


@dataclass
class _Slice:
    file: Path
    header: Any
    pixels: np.ndarray
    position: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    instance_number: int
    single_slice_spacing: float
    frame: Optional[int] = None  # 1-based frame number in an enhanced (multi-frame) file; None for a single-frame file

    @property
    def shape(self) -> tuple[int, ...]:
        return self.pixels.shape

    @property
    def label(self) -> str:
        """How messages name the slice: the file, plus the frame for a multi-frame file."""
        return str(self.file) if self.frame is None else f"{self.file} (frame {self.frame})"


def _read_slices(file: Path) -> list[_Slice]:
    """The slices one file holds: one for a classic image, one per frame for an enhanced multi-frame image."""
    try:
        ds = pydicom.dcmread(file)
    except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt file
        raise InputError(f"{file}: corrupt DICOM file ({exc})") from exc
    if "PixelData" not in ds:
        raise InputError(f"{file}: holds no pixel data (a copy cut short before its image?); copy the file again "
                         "from its source, or move it out of the folder")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{file}: a colour image ({ds.get('PhotometricInterpretation')}); a grey-level CT slice is needed")
    if is_enhanced(ds):
        return _read_frames(file, ds)
    if int_or_none(ds.get("NumberOfFrames")) not in (None, 1):
        raise InputError(
            f"{file}: a multi-frame image without per-frame geometry (no functional groups, SOP class "
            f"{sop_class_uid(ds) or 'unknown'}), so its frames cannot be placed in space; export the series as "
            "single-frame CT or Enhanced CT DICOM, or as NIfTI"
        )
    return [_read_slice(file, ds)]


def _read_slice(file: Path, ds: Any) -> _Slice:
    if value_multiplicity(ds, "ImagePositionPatient") != 3 or value_multiplicity(ds, "ImageOrientationPatient") != 6:
        raise InputError(  # absent, or present but empty/short (type 2 in some IODs, or blanked by an anonymiser)
            f"{file}: no complete ImagePositionPatient/ImageOrientationPatient, so its place in space is unknown "
            "(a projection image such as CR/DX is not a cross-sectional volume)"
        )
    spacing = _pixel_spacing(ds, where=file)
    if spacing is None:
        log.warning("%s: no PixelSpacing; assuming 1 mm", file)
        spacing = (1.0, 1.0)
    thickness = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
    pixels = _compact(_decode(file, ds))
    del ds.PixelData  # keep only the header: a long series would otherwise hold every slice twice
    return _Slice(
        file=file,
        header=ds,
        pixels=pixels,
        position=_floats(ds, "ImagePositionPatient", file=file),
        orientation=_floats(ds, "ImageOrientationPatient", file=file),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        instance_number=int_or_none(ds.get("InstanceNumber")) or 0,
        single_slice_spacing=abs(float(thickness)) or 1.0,
    )


def _pixel_spacing(ds: Any, *, where: Any) -> Optional[tuple[float, float]]:
    """The (row, column) PixelSpacing of ``ds``; None when absent (the caller assumes 1 mm), an error when malformed."""
    n = value_multiplicity(ds, "PixelSpacing")
    if n == 0:
        return None
    if n != 2:
        raise InputError(
            f"{where}: PixelSpacing holds {n} value(s) ({ds.get('PixelSpacing')}), not the two it must "
            "(row and column spacing), so the pixel size is unknown"
        )
    row, column = _floats(ds, "PixelSpacing", file=where)
    return float(row), float(column)


def _read_frames(file: Path, ds: Any) -> list[_Slice]:
    """Each frame of an enhanced multi-frame image as a slice, its geometry and rescale from the functional groups."""
    n = int_or_none(ds.get("NumberOfFrames")) or 1
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n:
        raise InputError(
            f"{file}: NumberOfFrames is {n} but the Per-Frame Functional Groups Sequence holds {len(per_frame)} item(s)"
        )
    geometry = []
    for index in range(n):
        where = f"{file} (frame {index + 1})"
        plane = functional_group(ds, index, "PlanePositionSequence")
        orientation = functional_group(ds, index, "PlaneOrientationSequence")
        if (plane is None or orientation is None or value_multiplicity(plane, "ImagePositionPatient") != 3
                or value_multiplicity(orientation, "ImageOrientationPatient") != 6):
            raise InputError(
                f"{where}: no complete ImagePositionPatient/ImageOrientationPatient in the Plane Position/Orientation "
                "functional groups (per-frame or shared), so its place in space is unknown"
            )
        measures = functional_group(ds, index, "PixelMeasuresSequence")
        spacing = _pixel_spacing(measures, where=where) if measures is not None else None
        if spacing is None:
            if index == 0:
                log.warning("%s: no PixelSpacing in the Pixel Measures functional group; assuming 1 mm", file)
            spacing = (1.0, 1.0)
        thickness = (measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") if measures is not None else None) or 1.0
        transform = functional_group(ds, index, "PixelValueTransformationSequence")
        modality = next((m for m in (transform, ds) if m is not None and _has_modality_transform(m)), None)
        geometry.append((plane, orientation, spacing, thickness, modality, where))
    if any(g[4] is None for g in geometry):
        log.warning(
            "%s: no RescaleSlope/RescaleIntercept or Modality LUT in the functional groups or the file for %d of %d "
            "frame(s); their stored values are taken as they are", file, sum(g[4] is None for g in geometry), n,
        )
    stored = _decode_frames(file, ds, n)
    del ds.PixelData  # the slices share this header; keep no second copy of the pixels
    instance_number = int_or_none(ds.get("InstanceNumber")) or 0
    slices = []
    for index, (plane, orientation, spacing, thickness, modality, where) in enumerate(geometry):
        slices.append(_Slice(
            file=file,
            header=ds,
            pixels=_compact(_frame_values(stored[index], modality)),
            position=_floats(plane, "ImagePositionPatient", file=where),
            orientation=_floats(orientation, "ImageOrientationPatient", file=where),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            instance_number=instance_number,
            single_slice_spacing=abs(float(thickness)) or 1.0,
            frame=index + 1,
        ))
    return slices


def _has_modality_transform(ds: Any) -> bool:
    return bool(ds.get("ModalityLUTSequence")) or "RescaleSlope" in ds or "RescaleIntercept" in ds


def _frame_values(stored: np.ndarray, modality: Optional[Any]) -> np.ndarray:
    """Modality values (HU for CT) of one frame: its Modality LUT, else rescale; the stored values when ``modality`` is None."""
    if modality is not None and modality.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(stored, modality), dtype=np.float64)
    slope = float(modality.get("RescaleSlope", 1) or 1) if modality is not None else 1.0
    intercept = float(modality.get("RescaleIntercept", 0) or 0) if modality is not None else 0.0
    return stored.astype(np.float64) * slope + intercept


def _decode_frames(file: Path, ds: Any, n: int) -> np.ndarray:
    """The stored values of every frame, (n, rows, cols); the rescale is the caller's (it may differ per frame).

    pydicom first; compressed pixels it has no decoder for go to SimpleITK/GDCM, as for a classic slice.
    """
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # noqa: BLE001 - missing plugin, corrupt or truncated stream, …
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        stored = _sitk_stored_frames(file) if syntax is not None and syntax.is_compressed else None
        if stored is None:
            raise InputError(
                f"{file}: cannot decode the pixel data of this multi-frame image ({exc}); convert it to classic "
                "single-frame CT DICOM (e.g. dcmtk's dcmdjpeg, or highdicom) or to NIfTI"
            ) from exc
    stored = stored.reshape((n, *stored.shape[-2:])) if stored.ndim == 2 else stored
    if stored.ndim != 3 or stored.shape[0] != n:
        raise InputError(f"{file}: the pixel data hold {stored.shape} values, not {n} frames of one grey level")
    return stored


def _sitk_stored_frames(file: Path) -> Optional[np.ndarray]:
    """Every frame's stored values by SimpleITK/GDCM (file order), None when it cannot decode them either.

    GDCM applies one rescale, the first it finds, to all frames; a copy without any rescale yields the stored values.
    """
    import SimpleITK as sitk

    try:
        ds = pydicom.dcmread(file)
        for group in [*(ds.get("SharedFunctionalGroupsSequence") or []), *(ds.get("PerFrameFunctionalGroupsSequence") or [])]:
            if "PixelValueTransformationSequence" in group:
                del group.PixelValueTransformationSequence
        for keyword in ("RescaleSlope", "RescaleIntercept", "RescaleType"):
            if keyword in ds:
                delattr(ds, keyword)
        with tempfile.TemporaryDirectory() as folder:
            ds.save_as(Path(folder) / "frames.dcm")
            return sitk.GetArrayFromImage(sitk.ReadImage(str(Path(folder) / "frames.dcm")))
    except Exception:  # noqa: BLE001
        return None


def _floats(ds: Any, keyword: str, *, file: Path) -> np.ndarray:
    """A numeric tag's values; pydicom reads a malformed decimal string leniently, so check here."""
    try:
        values = np.array([float(v) for v in ds.get(keyword)])
    except (TypeError, ValueError) as exc:
        raise InputError(f"{file}: {keyword} is not numeric ({exc})") from exc
    if not np.all(np.isfinite(values)):
        raise InputError(f"{file}: {keyword} holds a non-finite value ({', '.join(map(str, values))})")
    return values

def _decode(file: Path, ds: Any) -> np.ndarray:
    """Modality values (HU for CT) of one slice: pydicom first, SimpleITK/GDCM for codecs pydicom lacks."""
    try:
        return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)
    except Exception as pydicom_error:  # noqa: BLE001 - missing plugin, corrupt stream, …
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and not syntax.is_compressed:
            # uncompressed data pydicom cannot read is corrupt (e.g. truncated): GDCM would return garbage
            raise InputError(f"{file}: corrupt pixel data ({pydicom_error})") from pydicom_error
        import SimpleITK as sitk

        try:
            return sitk.GetArrayFromImage(sitk.ReadImage(str(file)))[0].astype(np.float64)
        except Exception:  # noqa: BLE001
            raise InputError(f"{file}: cannot decode the pixel data ({pydicom_error})") from pydicom_error


def _compact(values: np.ndarray) -> np.ndarray:
    """int16 when every value is an integer that fits (CT in HU always does), float32 otherwise."""
    info = np.iinfo(np.int16)
    if values.size and values.min() >= info.min and values.max() <= info.max and np.array_equal(values, np.round(values)):
        return values.astype(np.int16)
    return values.astype(np.float32)
