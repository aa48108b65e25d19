"""DICOM SEG output: one Segmentation object per source series, one segment per prompt (highdicom).

Frames follow the engine's array: slice ``k`` of every mask is written against the file
``source.dicom.files[k]`` that slice ``k`` was read from (the DICOM reader keeps them in array
order). Before writing, each file's orientation, matrix size and position are checked against the
volume's geometry, so a volume whose voxels no longer follow its files is refused, never
misplaced.

Heavily anonymised series may have empty SOP Instance/Class UIDs, Study/Series Instance UIDs or
Frame of Reference UID in their datasets. highdicom needs them, so they are filled on *in-memory
copies* of the headers (the user's files are never touched): instance and class UIDs from the file
meta header (MediaStorageSOPInstanceUID / MediaStorageSOPClassUID) or the volume's ``DicomInfo``;
study, series and frame-of-reference UIDs from ``DicomInfo`` or, if empty there too, generated
*stably* (a hash of the series' instance UIDs), so writing twice gives a SEG in the same study.

An enhanced (multi-frame) CT source — one file, every slice a frame, read by ``io.dicom_volume`` with
``metadata["frame_numbers"]`` — is handed to highdicom as that one dataset, with the masks put back
into the file's frame order, so each SEG frame references the source image *and its frame number*.
Each frame's position/orientation (functional groups) is checked against the volume like a file's.
A volume that uses only some frames of the file, or stacks several multi-frame files, is refused.
"""

from __future__ import annotations

import logging
import uuid
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from .colors import Code, lookup
from .errors import InputError
from .volume import Volume

log = logging.getLogger(__name__)

ALGORITHM_NAME = "TextSegment"
POSITION_TOLERANCE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-3
LO_MAX = 64  # DICOM "long string": labels and descriptions are cut to this length


def write_dicom_seg(
    results: Sequence[Any],
    *,
    source: Volume,
    path: Union[str, Path],
    overwrite: bool = False,
    series_description: str = "TextSegment",
    series_number: Optional[int] = None,
    model_name: str = "TextSegment",
    parameters: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write the masks of ``results`` (engine ``SegmentationResult`` s on ``source``'s grid) as DICOM SEG.

    ``source`` must come from a DICOM series (``source.dicom.files`` in array order). Atomic; refuses
    to overwrite an existing file unless ``overwrite=True``, and never writes over a source file.
    """
    from .io.writers import atomic_write

    seg = build_dicom_seg(results, source=source, series_description=series_description,
                          series_number=series_number, model_name=model_name, parameters=parameters)
    path = Path(path)

    def write(tmp: Path) -> None:
        seg.save_as(tmp, enforce_file_format=True)

    return atomic_write(path, write, overwrite=overwrite, protected=source.dicom.files)


def run_parameters(run: Any) -> dict[str, Any]:
    """What made a run's masks, for a SEG's AlgorithmParameters: the weights (id and data checksum) and threshold."""
    record = getattr(run, "weights_record", None) or {}
    return {"weights": record.get("weights"), "weights_data_sha256": record.get("weights_data_sha256"),
            "threshold": (getattr(run, "settings", None) or {}).get("threshold")}


def build_dicom_seg(
    results: Sequence[Any],
    *,
    source: Volume,
    series_description: str = "TextSegment",
    series_number: Optional[int] = None,
    model_name: str = "TextSegment",
    parameters: Optional[Mapping[str, Any]] = None,
) -> Any:
    """The highdicom ``Segmentation`` dataset ``write_dicom_seg`` writes (in memory, for callers that send it).

    ``parameters`` (e.g. the weights and threshold that made the masks) join ``model`` in each segment's
    AlgorithmParameters, so a SEG that travels without its legend (to a PACS) still says what made it;
    None values are left out.
    """
    import highdicom as hd

    from . import __version__

    results = list(results)
    if not results:
        raise InputError("no segmentation results to write as DICOM SEG")
    if source.dicom is None or not source.dicom.files:
        raise InputError(f"{source.source or 'volume'}: was not read from a DICOM series; DICOM SEG needs the source images")
    for result in results:
        if not result.mask.same_geometry(source):
            raise InputError(f"the mask for {result.prompt!r} does not lie on the source series' voxel grid")
    images = _source_datasets(source)

    masks = np.stack([np.asarray(r.mask.array) > 0 for r in results], axis=-1)  # (k, rows, cols, segments)
    frame_numbers = _frame_numbers(source)
    if frame_numbers is not None:  # one multi-frame source: highdicom wants the masks in its frame order
        masks = masks[np.argsort(frame_numbers)]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=_concept(Code("123110", "DCM", "Artificial Intelligence")),
        version=__version__,
        parameters={"model": model_name, **{k: str(v) for k, v in (parameters or {}).items() if v is not None}},
    )
    descriptions = [_description(n + 1, r.prompt, algorithm) for n, r in enumerate(results)]
    if series_number is None:
        series_number = 1000 + (source.dicom.series_number or 0)
    with warnings.catch_warnings():
        # highdicom doubts single-component patient names; they are copied from the source as they are
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        return hd.seg.Segmentation(
            source_images=images,
            pixel_array=masks,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=int(series_number),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=ALGORITHM_NAME,
            manufacturer_model_name=_lo(model_name),
            software_versions=__version__,
            device_serial_number="n/a",
            content_label="TEXTSEGMENT",
            content_description=_lo(series_description),
            series_description=_lo(series_description),
            omit_empty_frames=bool(masks.any()),  # an all-empty SEG still needs its frames
        )


# source images ---------------------------------------------------------------------------------
def _source_datasets(source: Volume) -> list[Any]:
    """The source headers in array order, with missing UIDs filled in (copies; files untouched)."""
    import pydicom

    info = source.dicom
    files = list(info.files)
    if len(files) != source.shape[0]:
        raise InputError(f"{source.source or 'volume'}: {source.shape[0]} slices but {len(files)} source files; cannot map frames to images")
    frame_numbers = _frame_numbers(source)
    if frame_numbers is not None:
        files = files[:1]  # one multi-frame file, read once: it is the one source image
    datasets = []
    for k, file in enumerate(files):
        try:
            ds = pydicom.dcmread(file, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise InputError(f"{file}: cannot read the source image ({exc})") from exc
        meta = getattr(ds, "file_meta", None) or {}
        ds.SOPInstanceUID = (_text(ds, "SOPInstanceUID") or _text(meta, "MediaStorageSOPInstanceUID")
                             or (info.sop_instance_uids[k] if len(info.sop_instance_uids) == len(files) else ""))
        ds.SOPClassUID = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID") or info.sop_class_uid
        if not ds.SOPInstanceUID or not ds.SOPClassUID:
            raise InputError(f"{file}: has no SOP Instance/Class UID (not even in its file meta header); a SEG cannot reference it")
        if "SpecificCharacterSet" in ds and not ds.SpecificCharacterSet:
            del ds.SpecificCharacterSet  # present but empty: the default repertoire, which highdicom rejects as ''
        if frame_numbers is None:
            _check_slice(ds, source, k, file)
        else:
            _check_frames(ds, source, frame_numbers, file)
        datasets.append(ds)

    instance_uids = sorted(str(ds.SOPInstanceUID) for ds in datasets)
    for keyword, known in (
        ("StudyInstanceUID", info.study_instance_uid),
        ("SeriesInstanceUID", info.series_instance_uid),
        ("FrameOfReferenceUID", info.frame_of_reference_uid),
    ):
        values = {_text(ds, keyword) for ds in datasets} - {""}
        if len(values) > 1:
            raise InputError(f"{source.source or 'volume'}: the source files disagree on {keyword} ({sorted(values)}); not one series")
        if values:
            value = values.pop()
        elif known:
            value = known
        else:  # warned only here: a UID the files or the reader gave needs no warning
            value = _stable_uid(keyword, instance_uids)
            log.warning("source series has no %s; using the stable generated %s", keyword, value)
        for ds in datasets:
            setattr(ds, keyword, value)
    for ds in datasets:
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID",
                        "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime"):
            if keyword not in ds:
                setattr(ds, keyword, "")  # type 2 in the SEG: present, may be empty
    return datasets


def _frame_numbers(source: Volume) -> Optional[list[int]]:
    """Slice k's 1-based frame number in the one multi-frame source file; None for a single-frame series.

    Refuses what a SEG cannot reference frame by frame: several multi-frame files, a mix with
    single-frame files, or a volume that does not hold every frame of its file exactly once.
    """
    frames = source.metadata.get("frame_numbers")
    if not frames or all(f is None for f in frames):
        return None
    name = source.source or "volume"
    files = set(source.dicom.files)
    if len(files) != 1 or any(f is None for f in frames) or len(frames) != source.shape[0]:
        raise InputError(
            f"{name}: the volume stacks frames of {len(files)} multi-frame/single-frame files; DICOM SEG output "
            "supports one enhanced (multi-frame) CT file or a series of single-frame files"
        )
    if sorted(frames) != list(range(1, len(frames) + 1)):
        raise InputError(
            f"{name}: the volume holds frames {sorted(frames)[:8]}… of {next(iter(files))}, not each of its frames "
            "once; a DICOM SEG on it could not reference the source frame by frame"
        )
    return [int(f) for f in frames]


def _check_frames(ds: Any, source: Volume, frame_numbers: Sequence[int], file: str) -> None:
    """Refuse a volume whose slice ``k`` is not frame ``frame_numbers[k]`` of the multi-frame ``file``."""
    from .io.dicom_series import functional_group

    n = int(ds.get("NumberOfFrames") or 1)
    if n != len(frame_numbers):
        raise InputError(f"{file}: holds {n} frames but the volume {len(frame_numbers)} slices; not every frame was read")
    for k, frame in enumerate(frame_numbers):
        plane = functional_group(ds, frame - 1, "PlanePositionSequence")
        orientation = functional_group(ds, frame - 1, "PlaneOrientationSequence")
        _check_plane(ds, source, k, f"{file} (frame {frame})",
                     orientation.get("ImageOrientationPatient") if orientation is not None else None,
                     plane.get("ImagePositionPatient") if plane is not None else None)


def _check_slice(ds: Any, source: Volume, k: int, file: str) -> None:
    """Refuse a volume whose slice ``k`` is not, pixel for pixel, the image in ``file``."""
    _check_plane(ds, source, k, file, ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient"))


def _check_plane(ds: Any, source: Volume, k: int, file: str, orientation: Any, position: Any) -> None:
    """Refuse a volume whose slice ``k`` is not the image (or frame) ``file`` with this orientation and position."""
    rows, cols = source.shape[1], source.shape[2]
    if int(ds.get("Rows", 0)) != rows or int(ds.get("Columns", 0)) != cols:
        raise InputError(f"{file}: is {ds.get('Rows')}×{ds.get('Columns')} pixels but the volume's slices are {rows}×{cols}")
    orientation = np.asarray(orientation or [], dtype=np.float64)
    position = np.asarray(position or [], dtype=np.float64)
    if orientation.size != 6 or position.size != 3:
        raise InputError(f"{file}: has no image position/orientation; DICOM SEG frames could not be placed")
    if not np.allclose(orientation, np.concatenate([source.direction[:, 0], source.direction[:, 1]]), atol=ORIENTATION_TOLERANCE):
        raise InputError(f"{file}: its row/column directions differ from the volume's; the volume was reoriented after reading")
    expected = source.physical_points([[0, 0, k]])[0]
    normal = source.direction[:, 2]
    offset = position - expected
    in_plane = offset - np.dot(offset, normal) * normal
    uneven = bool(source.metadata.get("non_uniform_spacing"))  # stacked at the mean spacing: depth may differ
    # gantry tilt: the reader stacks sheared slices without correction and records the largest sideways drift;
    # each SEG frame is placed at its own source image's position, so that drift is no misplacement
    shear = float(source.metadata.get("slice_shear_mm") or 0.0)
    if np.linalg.norm(in_plane) > shear + POSITION_TOLERANCE_MM or (not uneven and abs(np.dot(offset, normal)) > max(POSITION_TOLERANCE_MM, 0.01 * source.spacing[2])):
        raise InputError(f"{file}: lies at {position.round(3).tolist()} but slice {k} of the volume is at {expected.round(3).tolist()}")


def _stable_uid(keyword: str, instance_uids: Sequence[str]) -> str:
    """A UUID-derived UID (2.25.<int>) from a hash of the series' instance UIDs: same series, same UID."""
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '|'.join(['TextSegment', keyword, *instance_uids])).int}"


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword, "") if hasattr(ds, "get") else ""
    return "" if value is None else str(value).strip()


# segments --------------------------------------------------------------------------------------
def _concept(code: Code) -> Any:
    import highdicom as hd

    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _description(number: int, prompt: str, algorithm: Any) -> Any:
    import highdicom as hd

    style = lookup(prompt)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(prompt),
        segmented_property_category=_concept(style.category),
        segmented_property_type=_concept(style.type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_id=_lo(prompt),
        tracking_uid=hd.UID(),
        anatomic_regions=[_concept(style.region)] if style.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*style.rgb),
    )
    if style.modifier is not None:
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [_concept(style.modifier)]
    if style.region is not None and style.region_modifier is not None:
        description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [_concept(style.region_modifier)]
    if len(prompt) > LO_MAX:
        log.warning("prompt %r is longer than DICOM allows for a segment label; cut to %d characters", prompt, LO_MAX)
    return description


def _lo(text: str) -> str:
    return " ".join(str(text).split())[:LO_MAX].rstrip()
