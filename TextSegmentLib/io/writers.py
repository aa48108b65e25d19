"""Write volumes, label maps, float maps and JSON legends safely.

Three promises, for every writer here:

* **atomic**: the data go to a hidden temporary file in the target folder, which is renamed onto the
  target only once complete; a failed write leaves no temporary file and the old file untouched;
* **no surprise overwrite**: an existing output raises ``OutputExistsError`` unless ``overwrite=True``;
* **inputs are sacred**: the file a volume was read from (``Volume.source``, its DICOM files) and any
  ``protected`` path can never be written, not even with ``overwrite=True``.

Images keep the geometry of their reference volume (LPS, as SimpleITK stores it in NIfTI and NRRD).
Neither NIfTI-1 nor NRRD nor MetaImage has a half-float type, so float16 maps are stored as float32.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, OutputExistsError
from ..volume import Volume

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")  # single-file formats only: a pair cannot be atomic
PathLike = Union[str, os.PathLike]


def write_volume(
    volume_or_array: Volume | np.ndarray,
    path: PathLike,
    *,
    reference: Optional[Volume] = None,
    overwrite: bool = False,
    compress: bool = True,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write an image on the grid of ``reference`` (needed for a bare array) or of the volume itself."""
    grid, array = _grid_and_array(volume_or_array, reference, path)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    elif array.dtype == np.float16:
        array = array.astype(np.float32)
    inputs = _protected(volume_or_array, reference, protected)
    return _write_image(array, grid, path, overwrite=overwrite, compress=compress, protected=inputs)


def write_label_map(
    labels: Volume | np.ndarray,
    path: PathLike,
    *,
    reference: Optional[Volume] = None,
    overwrite: bool = False,
    compress: bool = True,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write integer labels as uint8 (values up to 255) or uint16 (up to 65535)."""
    grid, array = _grid_and_array(labels, reference, path)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise InputError(f"{path}: label values must be whole numbers; got non-integer values")
    elif array.dtype.kind not in "biu":
        raise InputError(f"{path}: label values must be integers; got {array.dtype}")
    lo, hi = (int(array.min()), int(array.max())) if array.size else (0, 0)
    if lo < 0 or hi > 65535:
        raise InputError(f"{path}: label values must lie in 0..65535; got {lo}..{hi}")
    array = array.astype(np.uint8 if hi <= 255 else np.uint16)
    inputs = _protected(labels, reference, protected)
    return _write_image(array, grid, path, overwrite=overwrite, compress=compress, protected=inputs)


def write_float_map(
    values: Volume | np.ndarray,
    path: PathLike,
    *,
    reference: Optional[Volume] = None,
    overwrite: bool = False,
    compress: bool = True,
    protected: Iterable[PathLike] = (),
) -> Path:
    """Write a probability/saliency map as float32 (float16 input is widened: no format stores half floats)."""
    grid, array = _grid_and_array(values, reference, path)
    if array.dtype.kind not in "biuf":
        raise InputError(f"{path}: a float map needs numbers; got {array.dtype}")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{path}: the map holds NaN or infinite values; nothing was written")
    inputs = _protected(values, reference, protected)
    return _write_image(array, grid, path, overwrite=overwrite, compress=compress, protected=inputs)


def write_json(data: Any, path: PathLike, *, overwrite: bool = False, protected: Iterable[PathLike] = ()) -> Path:
    """Write ``data`` as indented UTF-8 JSON (numpy numbers and paths become plain JSON)."""
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default) + "\n"

    def write(tmp: Path) -> None:
        with open(tmp, "x", encoding="utf-8") as handle:
            handle.write(text)

    return atomic_write(path, write, overwrite=overwrite, protected=protected)


# internals ------------------------------------------------------------------------------------
def _grid_and_array(data: Volume | np.ndarray, reference: Optional[Volume], path: PathLike) -> tuple[Volume, np.ndarray]:
    if isinstance(data, Volume):
        grid, array = data, data.array
    else:
        if reference is None:
            raise ValueError(f"{path}: writing a bare array needs reference= (a Volume giving the geometry)")
        grid, array = reference, np.asarray(data)
    if reference is not None and array.shape != reference.shape:
        raise ValueError(f"{path}: data of shape {array.shape} does not match the reference grid {reference.shape}")
    return grid, array


def _protected(data: Any, reference: Optional[Volume], extra: Iterable[PathLike]) -> set[PathLike]:
    paths: set[PathLike] = set(extra)
    for volume in (data, reference):
        if isinstance(volume, Volume):
            if volume.source:
                paths.add(volume.source)
            if volume.dicom is not None:
                paths.update(volume.dicom.files)
    return paths


def _write_image(
    array: np.ndarray, grid: Volume, path: PathLike, *, overwrite: bool, compress: bool, protected: set[PathLike]
) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(tuple(float(v) for v in grid.direction.ravel()))

    def write(tmp: Path) -> None:
        sitk.WriteImage(image, str(tmp), compress)

    return atomic_write(path, write, overwrite=overwrite, protected=protected, suffixes=IMAGE_SUFFIXES)


def atomic_write(
    path: PathLike,
    write: Callable[[Path], None],
    *,
    overwrite: bool = False,
    protected: Iterable[PathLike] = (),
    suffixes: tuple[str, ...] = (),
) -> Path:
    """Run ``write(tmp)`` on a hidden file beside ``path``, then move it onto ``path`` (the module's promises).

    For writers outside this module (e.g. Slicer storage nodes); ``tmp`` ends with the target's suffix
    so format-by-extension writers pick the right format.
    """
    path = Path(path)
    _refuse_inputs(path, protected)
    if suffixes and not path.name.lower().endswith(suffixes):
        raise InputError(f"{path}: unsupported output type; use one of {', '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name for the output")
    if path.exists() and not overwrite:
        raise exists_error(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # e.g. a file where a folder of the path should be
        raise InputError(f"{path}: cannot create its folder {path.parent} ({exc.strerror or exc}); nothing was written") from None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.partial{_suffix(path)}")
    try:
        write(tmp)
        _publish(tmp, path, overwrite=overwrite)
    except (RuntimeError, OSError) as exc:
        raise InputError(f"{path}: cannot write ({exc}); nothing was changed") from exc
    finally:
        tmp.unlink(missing_ok=True)
    log.info("wrote %s", path)
    return path


@contextmanager
def staged_folder(out_dir: PathLike, *, overwrite: bool = False, protected: Iterable[PathLike] = ()) -> Iterator[Path]:
    """Yield a hidden folder inside ``out_dir`` to write a whole set of outputs into; they are moved into
    ``out_dir`` only when the block ends normally.

    Each file is atomic on its own, but a set is not: Ctrl-C between two files used to leave a label map
    without its legend, and the next run refused the folder. Now an error or Ctrl-C leaves ``out_dir`` as it
    was (an earlier run's files included) and removes a folder this created; Ctrl-C while the finished files
    are moved in (milliseconds) waits until they all are.
    """
    out_dir = Path(out_dir)
    created = out_dir
    while not created.parent.exists() and created.parent != created:
        created = created.parent  # the topmost folder this makes, removed again if nothing is published
    created = created if not created.exists() else None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = out_dir / f".textsegment-partial-{secrets.token_hex(4)}"
        staging.mkdir()
    except OSError as exc:
        raise InputError(f"{out_dir}: cannot write there ({exc.strerror or exc}); nothing was written") from None
    published = False
    try:
        yield staging
        if _publish_folder(staging, out_dir, overwrite=overwrite, protected=protected):
            log.warning("%s: Ctrl-C came as the finished files were moved in; they are all in place", out_dir)
        published = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created is not None and not published:
            shutil.rmtree(created, ignore_errors=True)  # made by this call and holding nothing of anyone's


def _publish_folder(staging: Path, out_dir: Path, *, overwrite: bool, protected: Iterable[PathLike]) -> bool:
    """Move every file of ``staging`` to the same place under ``out_dir``: all checked first, legends last.

    Returns whether Ctrl-C came while the files were moved (held back until they all were)."""
    files = sorted((p for p in staging.rglob("*") if p.is_file()), key=lambda p: (p.suffix == ".json", str(p)))
    moves = [(file, out_dir / file.relative_to(staging)) for file in files]
    for _, target in moves:
        _refuse_inputs(target, protected)
        if target.is_dir():
            raise InputError(f"{target}: is a folder; move it away or choose another output folder")
        if target.exists() and not overwrite:
            raise exists_error(target)

    def move() -> None:
        for file, target in moves:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)

    return _without_interruption(move)


def _without_interruption(action: Callable[[], None]) -> bool:
    """Run ``action`` with Ctrl-C held back until it is done (main thread only; elsewhere it just runs);
    returns whether Ctrl-C was pressed meanwhile."""
    if threading.current_thread() is not threading.main_thread():
        action()
        return False
    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        action()
    finally:
        signal.signal(signal.SIGINT, previous)
    return bool(held)


def _publish(tmp: Path, path: Path, *, overwrite: bool) -> None:
    """Rename the finished temporary file onto ``path``; without overwrite, never clobber (race-free)."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path appeared meanwhile
    except FileExistsError:
        raise exists_error(path) from None
    except OSError:  # a file system without hard links
        if path.exists():
            raise exists_error(path) from None
        os.replace(tmp, path)


def exists_error(path: Path) -> OutputExistsError:
    """The one message for an output that is there already (writers, montages, a batch's series folders)."""
    return OutputExistsError(f"{path}: exists already; pass overwrite=True (CLI: --overwrite) to replace it")


def _refuse_inputs(path: Path, protected: Iterable[PathLike]) -> None:
    target = path.resolve()
    for item in protected:
        candidate = Path(item)
        same = candidate.resolve() == target or (candidate.exists() and path.exists() and os.path.samefile(candidate, path))
        if same:
            raise OutputExistsError(
                f"{path}: is an input of this run; TextSegment never overwrites its inputs, choose another output path"
            )


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
