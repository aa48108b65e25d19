"""Find the DICOM series in a folder, DICOMDIR or file, group them, and choose the CT one to read.

pydicom reads the headers (fast: pixels are skipped) and groups files by SeriesInstanceUID. Heavily
anonymised exports may leave that UID empty; such files are grouped by a key built from what they
still share (study, frame of reference, modality, description, orientation, matrix size, folder).

A scout/localizer filed under the axial series' UID (ImageType LOCALIZER, or another orientation than
the clear majority of the images) is split off into ``SeriesInfo.localizer_files``, as dicom2nifti does;
the series keeps its localizer status only when no such stack remains. An Enhanced (multi-frame) file
counts each of its frames as an image.

Reading the chosen series' pixels is ``dicom_volume``'s job; the header accessors below (tag values,
functional groups, the enhanced test) are public because it reads headers by the same rules.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom import uid as _uid

from ..errors import InputError, NotCTError

log = logging.getLogger(__name__)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
# Objects that may sit beside images in a study but are not images we can stack.
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SEG", "SR", "PR", "KO", "REG", "DOC"})
# Orientations closer than this are one stack: when grouping here and when stacking in dicom_volume.
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


def counted(n: int, noun: str) -> str:
    """'1 image', '3 images': a count as a user reads it (``noun`` singular, its plural ending in s)."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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
        elif sop_class_uid(header) != DICOMDIR_SOP_CLASS:
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
        if not sop_class_uid(header):
            raise InvalidDicomError("no SOP Class UID in the file meta or the dataset")
        return header
    except Exception as exc:  # noqa: BLE001 - a truncated header raises struct.error, BytesLengthException, …
        if strict:
            raise InputError(f"{file}: corrupt DICOM file ({exc})") from exc
        log.warning("%s: skipped, corrupt DICOM file (%s)", file, exc)
        if problems is not None:
            problems.append({"file": str(file), "error": f"corrupt DICOM file ({exc})"})
        return None


# header values (dicom_volume reads them too) --------------------------------------------------
def tag_text(header: Any, keyword: str) -> str:
    """A tag's value as stripped text; "" when absent or empty, as anonymised headers often leave it."""
    value = header.get(keyword, "")
    return "" if value is None else str(value).strip()


def sop_class_uid(header: Any) -> str:
    """The dataset's SOP Class UID, else the file meta's copy (some writers fill only one)."""
    return tag_text(header, "SOPClassUID") or _meta(header, "MediaStorageSOPClassUID")


def sop_instance_uid(header: Any) -> str:
    """Anonymisers may blank the dataset's UID and leave the file meta's copy: fall back to it."""
    return tag_text(header, "SOPInstanceUID") or _meta(header, "MediaStorageSOPInstanceUID")


def _meta(header: Any, keyword: str) -> str:
    return str(getattr(header, "file_meta", {}).get(keyword, "") or "").strip()


def int_or_none(value: Any) -> Optional[int]:
    """An integer tag's value; None when absent, empty or malformed, so a bad optional tag does not stop a read."""
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def value_multiplicity(ds: Any, keyword: str) -> int:
    """How many values an element holds (0 when absent or empty)."""
    element = ds.get(keyword)
    if element is None or element == "":
        return 0
    return len(element) if isinstance(element, (list, tuple, pydicom.multival.MultiValue)) else 1


def is_enhanced(ds: Any) -> bool:
    """An image whose geometry lies in functional groups (Enhanced / Legacy Converted Enhanced CT, …).

    Functional groups alone do not make one: a classic single-frame slice may carry a stray Shared Functional
    Groups Sequence beside its own position and orientation. So: functional groups, and more than one frame,
    an enhanced SOP class (one frame or many), or no complete ImagePositionPatient/ImageOrientationPatient.
    """
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return False
    if (int_or_none(ds.get("NumberOfFrames")) or 1) > 1 or sop_class_uid(ds) in ENHANCED_SOP_CLASSES:
        return True
    return value_multiplicity(ds, "ImagePositionPatient") != 3 or value_multiplicity(ds, "ImageOrientationPatient") != 6


def functional_group(ds: Any, index: int, keyword: str) -> Optional[Any]:
    """The first item of functional group ``keyword`` for frame ``index`` (0-based): per-frame first, else shared."""
    for container, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(container)
        if groups and position < len(groups):
            item = groups[position].get(keyword)
            if item:
                return item[0]
    return None


# grouping -------------------------------------------------------------------------------------
def _series_key(file: Path, header: Any) -> str:
    uid = tag_text(header, "SeriesInstanceUID")
    if uid:
        return uid
    orientation = _orientation_key(header)
    parts = (
        tag_text(header, "StudyInstanceUID"),
        tag_text(header, "FrameOfReferenceUID"),
        tag_text(header, "Modality"),
        tag_text(header, "SeriesDescription"),
        tag_text(header, "SeriesNumber"),
        ",".join(f"{v:.3f}" for v in orientation) if orientation else "",
        tag_text(header, "Rows"),
        tag_text(header, "Columns"),
        str(file.parent.resolve()),
    )
    return "nouid-" + hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


def _series_info(key: str, members: list[tuple[Path, Any]]) -> SeriesInfo:
    members, localizers = _split_localizers(members)
    first = members[0][1]
    modality = tag_text(first, "Modality").upper()
    is_image = modality not in NON_IMAGE_MODALITIES and "Rows" in first and "Columns" in first
    return SeriesInfo(
        key=key,
        series_instance_uid=tag_text(first, "SeriesInstanceUID"),
        modality=modality,
        description=tag_text(first, "SeriesDescription"),
        series_number=int_or_none(first.get("SeriesNumber")),
        study_instance_uid=tag_text(first, "StudyInstanceUID"),
        patient_id=tag_text(first, "PatientID"),
        patient_name=tag_text(first, "PatientName"),
        frame_of_reference_uid=tag_text(first, "FrameOfReferenceUID"),
        sop_class_uid=sop_class_uid(first),
        image_type=_image_type(first),
        rows=int_or_none(first.get("Rows")),
        columns=int_or_none(first.get("Columns")),
        files=tuple(str(f) for f, _ in sorted(members, key=lambda m: str(m[0]))),
        is_image=is_image,
        orientations=len(_orientation_groups(members)),
        localizer_files=tuple(str(f) for f, _ in sorted(localizers, key=lambda m: str(m[0]))),
        # only frames read_series will place (an enhanced file's) count: other multi-frame files are refused there
        frames=sum(max(int_or_none(h.get("NumberOfFrames")) or 1, 1) if is_enhanced(h) else 1 for _, h in members),
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
    if is_enhanced(header):
        header = functional_group(header, 0, "PlaneOrientationSequence")
        if header is None:
            return None
    if value_multiplicity(header, "ImageOrientationPatient") != 6:
        return None
    try:
        return tuple(round(float(v), 3) for v in header.ImageOrientationPatient)
    except (TypeError, ValueError):
        return None


# choosing -------------------------------------------------------------------------------------
def cut_short(series: Any) -> bool:
    """An image's SOP class but no Rows/Columns: a header cut short (interrupted copy) that pydicom read without error."""
    return (not series.is_image and series.modality not in NON_IMAGE_MODALITIES
            and "Image Storage" in _uid.UID(series.sop_class_uid or "").name)


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
        cut = [f for s in series if cut_short(s) for f in s.files]
        if cut:  # "no image series ... no modality" told nothing of a copy cut short
            shown = ", ".join(cut[:3]) + (", ..." if len(cut) > 3 else "")
            raise InputError(f"{source}: no image series to read; the DICOM objects here hold no images: "
                             f"{counted(len(cut), 'file')} of an image type without an image size (Rows/Columns): "
                             f"cut short? If so, copy again from the source ({shown})")
        found = ", ".join(f"{s.modality or 'no modality'} ({counted(s.n_files, 'file')})" for s in series)
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
            f"{s.key} ({s.modality or 'no modality'}, {counted(s.n_images, 'image')}, "
            f"{s.description or 'no description'})" for s in rivals
        )
        raise InputError(
            f"{source}: holds {len(rivals)} candidate series from {len(studies)} different patients/studies; "
            f"choose one with series_uid (CLI: --series UID; `textsegment info` lists them) or point at its folder: {listing}"
        )
    if len(rivals) > 1:
        log.warning("%s: %d candidate series; reading %s (%s, the most)", source, len(rivals), best.key,
                    counted(best.n_images, "image"))
    return best
