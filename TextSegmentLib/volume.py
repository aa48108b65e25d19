"""The one volume type every layer of TextSegment passes around.

Conventions (the same as ITK/SimpleITK and DICOM, so nothing is flipped silently):

* ``array`` is indexed ``[k, j, i]`` = ``(z, y, x)``: slice, row, column. CT values are HU.
* ``spacing`` and ``origin`` are given in index order ``(i, j, k)`` = ``(x, y, z)``, in mm.
* ``direction`` is a 3×3 matrix whose **columns** are the LPS unit vectors of the i, j, k axes.
* The physical point of voxel ``(i, j, k)`` is ``origin + direction @ (spacing * (i, j, k))`` in
  **LPS** (patient Left, Posterior, Superior positive) — the DICOM/ITK frame. Slicer works in RAS;
  ``ijk_to_ras()`` gives that matrix (the first two rows negated), and the MRML bridge uses it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class DicomInfo:
    """Identifiers a DICOM-derived volume keeps so outputs (e.g. DICOM SEG) can reference it."""

    study_instance_uid: str = ""
    series_instance_uid: str = ""
    frame_of_reference_uid: str = ""
    sop_instance_uids: tuple[str, ...] = ()  # one per slice, in array (k) order
    sop_class_uid: str = ""
    patient_id: str = ""
    patient_name: str = ""
    series_description: str = ""
    series_number: Optional[int] = None
    files: tuple[str, ...] = ()  # one per slice, in array (k) order


@dataclass(frozen=True)
class Volume:
    """A 3D image with its physical geometry; see the module docstring for the conventions."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    modality: Optional[str] = None
    dicom: Optional[DicomInfo] = None
    source: Optional[str] = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        array = np.asarray(self.array)
        if array.ndim != 3:
            raise InputError(
                f"{self.source or 'volume'}: expected a 3D image, got {array.ndim}D with shape {array.shape}"
            )
        object.__setattr__(self, "array", array)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        object.__setattr__(self, "direction", direction)
        if len(self.spacing) != 3 or any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise InputError(f"{self.source or 'volume'}: spacing must be three positive numbers, got {self.spacing}")

    def __repr__(self) -> str:
        """One line: the dataclass repr printed every voxel row numpy shows, so a run in a notebook filled pages."""
        spacing = ", ".join(f"{s:g}" for s in self.spacing)
        return (f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing=({spacing}), "
                f"orientation={orientation_code(self.direction)}, modality={self.modality!r}, source={self.source!r})")

    # geometry -----------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Size in index order (i, j, k), as ITK reports it."""
        z, y, x = self.array.shape
        return (x, y, z)

    def ijk_to_lps(self) -> np.ndarray:
        """4×4 homogeneous matrix mapping (i, j, k, 1) to LPS millimetres."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_ras(self) -> np.ndarray:
        """4×4 homogeneous matrix mapping (i, j, k, 1) to RAS millimetres (Slicer's frame)."""
        return LPS_TO_RAS @ self.ijk_to_lps()

    def physical_points(self, ijk: np.ndarray) -> np.ndarray:
        """LPS coordinates of an (N, 3) array of (i, j, k) indices."""
        ijk = np.asarray(ijk, dtype=np.float64).reshape(-1, 3)
        m = self.ijk_to_lps()
        return ijk @ m[:3, :3].T + m[:3, 3]

    def same_geometry(self, other: "Volume", *, atol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )

    # derived volumes ----------------------------------------------------------------------
    def with_array(self, array: np.ndarray, **changes: Any) -> "Volume":
        """A volume on the same grid (geometry and DICOM identity kept) holding ``array``."""
        if tuple(np.shape(array)) != self.shape:
            raise ValueError(f"array shape {np.shape(array)} does not match the volume grid {self.shape}")
        return dataclasses.replace(self, array=np.asarray(array), **changes)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary used by ``textsegment info`` and the logs."""
        a = self.array
        info: dict[str, Any] = {
            "source": self.source,
            "modality": self.modality,
            "shape_zyx": list(self.shape),
            "spacing_xyz_mm": [round(s, 6) for s in self.spacing],
            "origin_lps_mm": [round(o, 6) for o in self.origin],
            "direction": [[round(float(v), 6) for v in row] for row in self.direction],
            "orientation": orientation_code(self.direction),
            "dtype": str(a.dtype),
            "value_range": [float(np.min(a)), float(np.max(a))] if a.size else None,
        }
        if self.dicom is not None:
            info["dicom"] = {
                "study_instance_uid": self.dicom.study_instance_uid,
                "series_instance_uid": self.dicom.series_instance_uid,
                "series_description": self.dicom.series_description,
                "series_number": self.dicom.series_number,
                "patient_id": self.dicom.patient_id,
                "files": len(set(self.dicom.files)),  # an enhanced file holds every slice: count it once
            }
        if self.metadata:
            info["metadata"] = {k: v for k, v in self.metadata.items() if _jsonable(v)}
        return info


def orientation_code(direction: np.ndarray) -> str:
    """Three-letter LPS code of where the i, j, k axes point, e.g. ``'LPS'`` for the identity."""
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    code = ""
    for col in np.asarray(direction).T:
        axis = int(np.argmax(np.abs(col)))
        code += letters[axis][0 if col[axis] > 0 else 1]
    return code


def direction_from_axes(axes: Sequence[Sequence[float]]) -> np.ndarray:
    """Direction matrix from the i, j, k axis vectors (LPS), orthonormalised."""
    m = np.asarray(axes, dtype=np.float64).T
    q, r = np.linalg.qr(m)
    return q * np.sign(np.diag(r))


GRID_TOLERANCE_VOXELS = 0.1


def reorient_to(volume: Volume, reference: Volume, *, tolerance: float = GRID_TOLERANCE_VOXELS) -> Volume:
    """``volume``'s values on ``reference``'s grid, when both grids hold the very same voxel centres.

    The grids may differ in axis order and direction (a y-flipped or slice-reversed storage of the
    same image): voxels are then transposed and flipped, never interpolated, so each one keeps its
    value exactly (nearest neighbour on an identical grid, without its rounding at the edges).
    Grids whose voxel centres differ by more than ``tolerance`` voxels anywhere (resampled, cropped,
    moved) raise ``InputError``: those voxels are not the reference's.
    """
    if volume.same_geometry(reference):
        return reference.with_array(volume.array)
    # volume (i, j, k) -> reference (i, j, k); affine, so the corners bound the error everywhere
    to_reference = np.linalg.inv(reference.ijk_to_lps()) @ volume.ijk_to_lps()
    rotation, offset = to_reference[:3, :3], to_reference[:3, 3]
    signed = np.round(rotation)
    size, ref_size = np.array(volume.size_ijk), np.array(reference.size_ijk)
    permutation = np.argmax(np.abs(signed), axis=1)  # reference axis a comes from volume axis permutation[a]
    is_permutation = (np.abs(signed).sum(axis=0) == 1).all() and (np.abs(signed).sum(axis=1) == 1).all()
    corners = np.array([[i, j, k] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)], dtype=float)
    mapped = corners @ rotation.T + offset
    on_grid = np.abs(mapped - np.round(mapped)).max() <= tolerance
    if not (is_permutation and on_grid and (size[permutation] == ref_size).all()
            and np.allclose(np.round(mapped).min(axis=0), 0) and np.allclose(np.round(mapped).max(axis=0), ref_size - 1)):
        raise InputError(
            f"{volume.source or 'the volume'} does not lie on the voxel grid of {reference.source or 'the reference'} "
            f"(shape {volume.shape} vs {reference.shape}, or its voxels moved, resampled or cropped); "
            "its voxels cannot be matched one to one"
        )
    values = np.asarray(volume.array).transpose(2, 1, 0)  # (i, j, k)
    values = values.transpose(permutation)
    flips = tuple(a for a in range(3) if signed[a, permutation[a]] < 0)
    if flips:
        values = np.flip(values, axis=flips)
    return reference.with_array(np.ascontiguousarray(values.transpose(2, 1, 0)))


def _jsonable(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool, type(None), list, dict))
