"""DICOM: find the series in a folder, DICOMDIR or file, pick the CT one, and stack it into a Volume.

pydicom reads the headers (fast: pixels are skipped) and groups files by SeriesInstanceUID. Heavily
anonymised exports may leave that UID empty; such files are grouped by a key built from what they
still share (study, frame of reference, modality, description, orientation, matrix size, folder).

Reading a series follows the DICOM geometry, the same way ITK/SimpleITK does:

* slices are sorted by their ImagePositionPatient projected on the slice normal (row × column);
* the origin is the first slice's position, the direction columns are row, column and normal;
* the slice spacing is (last − first) / (n − 1). When the gaps differ (missing slices, uneven
  acquisition) the slices are still stacked in order at that mean spacing — **nothing is resampled** —
  and a warning is logged and recorded in ``Volume.metadata`` (``non_uniform_spacing``, the real
  ``slice_positions_mm`` and the largest deviation) so a caller can refuse or resample explicitly;
* a scout/localizer filed under the axial series' UID (ImageType LOCALIZER, or another orientation than
  the clear majority of the images) is left out with a warning, as dicom2nifti does; the series keeps
  its localizer status only when no such stack remains;
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

import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom import uid as _uid
from pydicom.pixels import apply_modality_lut

from ..errors import InputError, NotCTError
from ..volume import DicomInfo, Volume

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Objects that may sit beside images in a study but are not images we can stack.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "SR", "PR", "KO", "REG", "DOC"})
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-3
# Multi-frame image IODs whose geometry lies only in functional groups, even when they hold a single frame.
ENHANCED_SOP_CLASSES = frozenset({
    _uid.EnhancedCTImageStorage, _uid.LegacyConvertedEnhancedCTImageStorage,
    _uid.EnhancedMRImageStorage, _uid.LegacyConvertedEnhancedMRImageStorage,
    _uid.EnhancedPETImageStorage, _uid.LegacyConvertedEnhancedPETImageStorage,
})


@dataclass(frozen=True)
class SeriesInfo:
    """One series found on disk: what ``textsegment info`` lists and what ``read_series`` reads."""

    key: str  # the SeriesInstanceUID, or "nouid-…" when the files have none
    series_instance_uid: str
    modality: str  # "" when the tag is missing
    description: str
    series_number: Optional[int]
    study_instance_uid: str
    patient_id: str
    patient_name: str
    frame_of_reference_uid: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    rows: Optional[int]
    columns: Optional[int]
    files: tuple[str, ...]  # the images read_series stacks
    is_image: bool
    orientations: int  # distinct slice orientations: 1 for a volume, more for e.g. a 3-plane localizer
    localizer_files: tuple[str, ...] = ()  # scout images filed under this series' UID, left out of ``files``
    frames: int = 0  # slices ``files`` hold: each frame of a multi-frame (enhanced) file counts; 0: one per file

    @property
    def n_files(self) -> int:
        return len(self.files)

    @property
    def n_images(self) -> int:
        """Slices the series stacks: an enhanced file holds many in one file."""
        return self.frames or self.n_files

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    def to_dict(self, *, with_files: bool = False) -> dict[str, Any]:
        """JSON-ready; the file list only when asked (a series may hold thousands)."""
        data = asdict(self)
        files = data.pop("files")
        data.update(image_type=list(self.image_type), n_files=len(files), n_images=self.n_images,
                    localizer_files=list(self.localizer_files))
        if with_files:
            data["files"] = list(files)
        return data


# discovery ------------------------------------------------------------------------------------
def is_dicom_file(path: Path) -> bool:
    """True when the file carries the DICOM Part 10 signature ("DICM" after the 128-byte preamble)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_dicomdir(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    if path.name.upper() == "DICOMDIR":
        return True
    if not is_dicom_file(path):
        return False
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # noqa: BLE001 - an unreadable header is simply "not a DICOMDIR"
        return False
    return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS


def is_dicom_input(path: Path) -> bool:
    """A folder, a DICOMDIR or a DICOM file: anything ``list_series`` can take."""
    path = Path(path)
    return path.is_dir() or is_dicomdir(path) or (path.is_file() and is_dicom_file(path))


def list_series(path: Path | str, *, corrupt_files: Optional[list[dict[str, str]]] = None) -> list[SeriesInfo]:
    """Every series under a folder (searched recursively), in a DICOMDIR, or of a single DICOM file.

    Files that are not DICOM (no "DICM" signature) are skipped quietly; DICOM files whose header
    cannot be parsed are skipped with a warning and, when ``corrupt_files`` is a list, appended to it
    as ``{"file": …, "error": …}`` (so a batch can report them). Raises ``InputError`` when nothing
    usable is found.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    headers, corrupt = [], []
    single_file = path.is_file() and not is_dicomdir(path)
    for file in _candidate_files(path):
        header = _read_header(file, strict=single_file, problems=corrupt_files)
        if header is None:
            corrupt.append(file)
        elif _sop_class(header) != DICOMDIR_SOP_CLASS:
            headers.append((file, header))
    if not headers:
        what = "folder" if path.is_dir() else "DICOMDIR"
        skipped = f" ({len(corrupt)} corrupt DICOM file(s) skipped, e.g. {corrupt[0]})" if corrupt else ""
        raise InputError(
            f"{path}: no readable DICOM files in this {what}{skipped}; point at a folder of DICOM files or an image file"
        )
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for file, header in headers:
        groups.setdefault(_series_key(file, header), []).append((file, header))
    series = [_series_info(key, members) for key, members in groups.items()]
    series.sort(key=lambda s: (s.patient_id, s.study_instance_uid, s.series_number is None, s.series_number or 0, s.key))
    return series


def series_from_files(files: Sequence[Path | str], *, source: Path | str) -> SeriesInfo:
    """The one series a given list of files makes up (e.g. what a DICOM database lists for a loaded volume).

    Unlike ``list_series`` nothing is searched or skipped: every file must exist and be readable
    DICOM of a single series, else ``InputError`` (``source`` names the files' origin in messages).
    """
    if not files:
        raise InputError(f"{source}: no DICOM files given")
    members = []
    for file in dict.fromkeys(Path(f) for f in files):
        if not file.is_file():
            raise InputError(f"{source}: {file}: no such DICOM file")
        members.append((file, _read_header(file, strict=True)))
    groups: dict[str, list[tuple[Path, Any]]] = {}
    for file, header in members:
        groups.setdefault(_series_key(file, header), []).append((file, header))
    if len(groups) > 1:
        raise InputError(f"{source}: the files belong to {len(groups)} different series ({', '.join(sorted(groups))}), not one")
    (key, grouped), = groups.items()
    return _series_info(key, grouped)


def _candidate_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in _walk_files(path) if is_dicom_file(p))
    if is_dicomdir(path):
        return _dicomdir_files(path)
    if not is_dicom_file(path):
        raise InputError(f"{path}: not a DICOM file (no DICM signature) and not a known image format")
    return [path]


def _walk_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, following linked folders (a study assembled from links), each real folder once."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link back up the tree, or two links to one folder
            dirs[:] = []
            continue
        seen.add(real)
        files += [Path(root) / name for name in names if (Path(root) / name).is_file()]
    return files


def _dicomdir_files(path: Path) -> list[Path]:
    from pydicom.fileset import FileSet

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fileset = FileSet(pydicom.dcmread(path))
            files = [Path(instance.path) for instance in fileset]
    except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds for a broken DICOMDIR
        raise InputError(
            f"{path}: cannot parse this DICOMDIR ({exc}); point at the folder that holds the images instead"
        ) from exc
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{path}: the DICOMDIR lists {len(missing)} file(s) that do not exist, e.g. {missing[0]}")
    return sorted(files)


def _read_header(file: Path, *, strict: bool, problems: Optional[list[dict[str, str]]] = None) -> Optional[Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns on every odd element; we judge the result below
            header = pydicom.dcmread(file, stop_before_pixels=True)
        if not _sop_class(header):
            raise InvalidDicomError("no SOP Class UID in the file meta or the dataset")
        return header
    except Exception as exc:  # noqa: BLE001 - a truncated header raises struct.error, BytesLengthException, …
        if strict:
            raise InputError(f"{file}: corrupt DICOM file ({exc})") from exc
        log.warning("%s: skipped, corrupt DICOM file (%s)", file, exc)
        if problems is not None:
            problems.append({"file": str(file), "error": f"corrupt DICOM file ({exc})"})
        return None


def _text(header: Any, keyword: str) -> str:
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


def _sop_class(header: Any) -> str:
    return _text(header, "SOPClassUID") or _meta(header, "MediaStorageSOPClassUID")


def _sop_instance(header: Any) -> str:
    """Anonymisers may blank the dataset's UID and leave the file meta's copy: fall back to it."""
    return _text(header, "SOPInstanceUID") or _meta(header, "MediaStorageSOPInstanceUID")


def _meta(header: Any, keyword: str) -> str:
    return str(getattr(header, "file_meta", {}).get(keyword, "") or "").strip()


def _int_or_none(value: Any) -> Optional[int]:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _series_key(file: Path, header: Any) -> str:
    uid = _text(header, "SeriesInstanceUID")
    if uid:
        return uid
    orientation = _orientation_key(header)
    parts = (
        _text(header, "StudyInstanceUID"),
        _text(header, "FrameOfReferenceUID"),
        _text(header, "Modality"),
        _text(header, "SeriesDescription"),
        _text(header, "SeriesNumber"),
        ",".join(f"{v:.3f}" for v in orientation) if orientation else "",
        _text(header, "Rows"),
        _text(header, "Columns"),
        str(file.parent.resolve()),
    )
    return "nouid-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _series_info(key: str, members: list[tuple[Path, Any]]) -> SeriesInfo:
    members, localizers = _split_localizers(members)
    first = members[0][1]
    modality = _text(first, "Modality").upper()
    is_image = modality not in NON_IMAGE_MODALITIES and "Rows" in first and "Columns" in first
    return SeriesInfo(
        key=key,
        series_instance_uid=_text(first, "SeriesInstanceUID"),
        modality=modality,
        description=_text(first, "SeriesDescription"),
        series_number=_int_or_none(first.get("SeriesNumber")),
        study_instance_uid=_text(first, "StudyInstanceUID"),
        patient_id=_text(first, "PatientID"),
        patient_name=_text(first, "PatientName"),
        frame_of_reference_uid=_text(first, "FrameOfReferenceUID"),
        sop_class_uid=_sop_class(first),
        image_type=_image_type(first),
        rows=_int_or_none(first.get("Rows")),
        columns=_int_or_none(first.get("Columns")),
        files=tuple(str(f) for f, _ in sorted(members, key=lambda m: str(m[0]))),
        is_image=is_image,
        orientations=len(_orientation_groups(members)),
        localizer_files=tuple(str(f) for f, _ in sorted(localizers, key=lambda m: str(m[0]))),
        # only frames read_series will place (an enhanced file's) count: other multi-frame files are refused there
        frames=sum(max(_int_or_none(h.get("NumberOfFrames")) or 1, 1) if _is_enhanced(h) else 1 for _, h in members),
    )


def _image_type(header: Any) -> tuple[str, ...]:
    image_type = header.get("ImageType") or ()
    if isinstance(image_type, str):
        image_type = (image_type,)
    return tuple(str(t).upper() for t in image_type)


def _split_localizers(members: list[tuple[Path, Any]]) -> tuple[list[tuple[Path, Any]], list[tuple[Path, Any]]]:
    """The cross-sectional stack and the scout images a scanner filed under the same SeriesInstanceUID.

    Scouts are the images typed LOCALIZER and, of the rest, those outside the orientation that more than
    half of them share (dicom2nifti's rule). When no such stack remains (a localizer series, or several
    orientations with no majority) nothing is split off, so the series is still judged as a localizer.
    """
    rest = [m for m in members if "LOCALIZER" not in _image_type(m[1])]
    groups = _orientation_groups(rest)
    if len(groups) > 1:
        largest = max(groups, key=len)
        if 2 * len(largest) <= sum(len(g) for g in groups):
            return members, []
        others = {id(m) for g in groups if g is not largest for m in g}
        rest = [m for m in rest if id(m) not in others]
    if not rest:
        return members, []
    kept = {id(m) for m in rest}
    return rest, [m for m in members if id(m) not in kept]


def _orientation_groups(members: list[tuple[Path, Any]]) -> list[list[tuple[Path, Any]]]:
    """Members grouped by slice orientation (within ORIENTATION_TOLERANCE); those without one are left out."""
    groups: list[tuple[np.ndarray, list[tuple[Path, Any]]]] = []
    for member in members:
        orientation = _orientation_key(member[1])
        if orientation is None:
            continue
        for reference, group in groups:
            if np.allclose(orientation, reference, atol=ORIENTATION_TOLERANCE):
                group.append(member)
                break
        else:
            groups.append((np.array(orientation), [member]))
    return [group for _, group in groups]


def _orientation_key(header: Any) -> Optional[tuple[float, ...]]:
    """The slice orientation rounded to 3 decimals; None when absent or not six numbers (read_series says so).

    For an enhanced (multi-frame) file: the shared orientation, else the first frame's (read_series checks every frame).
    """
    if _is_enhanced(header):
        header = functional_group(header, 0, "PlaneOrientationSequence")
        if header is None:
            return None
    if _multiplicity(header, "ImageOrientationPatient") != 6:
        return None
    try:
        return tuple(round(float(v), 3) for v in header.ImageOrientationPatient)
    except (TypeError, ValueError):
        return None


def _is_enhanced(ds: Any) -> bool:
    """An image whose geometry lies in functional groups (Enhanced / Legacy Converted Enhanced CT, …).

    Functional groups alone do not make one: a classic single-frame slice may carry a stray Shared Functional
    Groups Sequence beside its own position and orientation. So: functional groups, and more than one frame,
    an enhanced SOP class (one frame or many), or no complete ImagePositionPatient/ImageOrientationPatient.
    """
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return False
    if (_int_or_none(ds.get("NumberOfFrames")) or 1) > 1 or _sop_class(ds) in ENHANCED_SOP_CLASSES:
        return True
    return _multiplicity(ds, "ImagePositionPatient") != 3 or _multiplicity(ds, "ImageOrientationPatient") != 6


def functional_group(ds: Any, index: int, keyword: str) -> Optional[Any]:
    """The first item of functional group ``keyword`` for frame ``index`` (0-based): per-frame first, else shared."""
    for container, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(container)
        if groups and position < len(groups):
            item = groups[position].get(keyword)
            if item:
                return item[0]
    return None


# choosing -------------------------------------------------------------------------------------
def choose_series(
    series: Sequence[SeriesInfo], *, source: Path | str, series_uid: Optional[str] = None, allow_non_ct: bool = False
) -> SeriesInfo:
    """The series to read: the one asked for, else the CT image series.

    Without ``series_uid``: non-image objects (RTSTRUCT, SEG, …) are ignored; CT series are preferred,
    then image series with no Modality tag (their values are checked for HU later); localizers
    (ImageType LOCALIZER) and series mixing orientations only when nothing else is left; among
    equals, the one with the most images (an enhanced file's frames each count).
    CT series from different patients or studies are not guessed between: an ``InputError`` asks for
    ``series_uid``. A study with no CT raises ``NotCTError`` unless ``allow_non_ct``.
    """
    if series_uid:
        matches = [s for s in series if series_uid in (s.key, s.series_instance_uid)]
        if not matches:
            keys = ", ".join(s.key for s in series)
            raise InputError(f"{source}: no series {series_uid!r} here; available: {keys}")
        return matches[0]
    images = [s for s in series if s.is_image]
    if not images:
        found = ", ".join(f"{s.modality or 'no modality'} ({s.n_images} images)" for s in series)
        raise InputError(f"{source}: no image series to read; the DICOM objects here hold no images: {found}")
    ct_like = [s for s in images if s.modality in ("CT", "")]
    if not ct_like:
        if not allow_non_ct:
            modalities = sorted({s.modality for s in images})
            found = ", ".join(f"{m} ({sum(s.modality == m for s in images)} series)" for m in modalities)
            raise NotCTError(
                f"{source}: not CT: this study holds {found} and no CT series; TextSegment's models are trained on CT. "
                "To read it anyway pass allow_non_ct=True (CLI: --allow-non-ct)."
            )
        ct_like = images

    def tier(s: SeriesInfo) -> tuple[bool, bool, bool]:
        return (not s.is_localizer, s.orientations <= 1, s.modality == "CT")

    ranked = sorted(ct_like, key=lambda s: (tier(s), s.n_images), reverse=True)
    best = ranked[0]
    rivals = [s for s in ranked if tier(s) == tier(best)]
    studies = {(s.patient_id, s.study_instance_uid) for s in rivals}
    if len(studies) > 1:
        listing = "; ".join(
            f"{s.key} ({s.modality or 'no modality'}, {s.n_images} images, {s.description or 'no description'})" for s in rivals
        )
        raise InputError(
            f"{source}: holds {len(rivals)} candidate series from {len(studies)} different patients/studies; "
            f"choose one with series_uid (CLI: --series UID; `textsegment info` lists them) or point at its folder: {listing}"
        )
    if len(rivals) > 1:
        log.warning("%s: %d candidate series; reading %s (%d images, the most)", source, len(rivals), best.key, best.n_images)
    return best


# reading --------------------------------------------------------------------------------------
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
        modality=_text(header, "Modality").upper() or None,
        dicom=DicomInfo(
            study_instance_uid=_text(header, "StudyInstanceUID"),
            series_instance_uid=_text(header, "SeriesInstanceUID"),
            frame_of_reference_uid=_text(header, "FrameOfReferenceUID"),
            sop_instance_uids=tuple(_sop_instance(s.header) for s in slices),
            sop_class_uid=_sop_class(header),
            patient_id=_text(header, "PatientID"),
            patient_name=_text(header, "PatientName"),
            series_description=_text(header, "SeriesDescription"),
            series_number=_int_or_none(header.get("SeriesNumber")),
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
        uid = _sop_instance(slices[k].header)
        if uid and uid == _sop_instance(slices[k + 1].header) and slices[k].frame == slices[k + 1].frame:
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
        raise InputError(f"{file}: holds no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{file}: a colour image ({ds.get('PhotometricInterpretation')}); a grey-level CT slice is needed")
    if _is_enhanced(ds):
        return _read_frames(file, ds)
    if _int_or_none(ds.get("NumberOfFrames")) not in (None, 1):
        raise InputError(
            f"{file}: a multi-frame image without per-frame geometry (no functional groups, SOP class "
            f"{_sop_class(ds) or 'unknown'}), so its frames cannot be placed in space; export the series as "
            "single-frame CT or Enhanced CT DICOM, or as NIfTI"
        )
    return [_read_slice(file, ds)]


def _read_slice(file: Path, ds: Any) -> _Slice:
    if _multiplicity(ds, "ImagePositionPatient") != 3 or _multiplicity(ds, "ImageOrientationPatient") != 6:
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
        instance_number=_int_or_none(ds.get("InstanceNumber")) or 0,
        single_slice_spacing=abs(float(thickness)) or 1.0,
    )


def _pixel_spacing(ds: Any, *, where: Any) -> Optional[tuple[float, float]]:
    """The (row, column) PixelSpacing of ``ds``; None when absent (the caller assumes 1 mm), an error when malformed."""
    n = _multiplicity(ds, "PixelSpacing")
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
    n = _int_or_none(ds.get("NumberOfFrames")) or 1
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
        if (plane is None or orientation is None or _multiplicity(plane, "ImagePositionPatient") != 3
                or _multiplicity(orientation, "ImageOrientationPatient") != 6):
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
    instance_number = _int_or_none(ds.get("InstanceNumber")) or 0
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


def _multiplicity(ds: Any, keyword: str) -> int:
    """How many values an element holds (0 when absent or empty)."""
    element = ds.get(keyword)
    if element is None or element == "":
        return 0
    return len(element) if isinstance(element, (list, tuple, pydicom.multival.MultiValue)) else 1


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
