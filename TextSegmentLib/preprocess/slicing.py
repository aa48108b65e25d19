"""Slices in one canonical display orientation, however the volume happens to be stored.

A model only sees pixels, so "left kidney" means patient left only if every volume reaches it
the same way round. ``slice_plan`` picks the array axis closest to the view's normal, then flips
and transposes (no resampling) so that every slice comes out as (LPS = patient Left, Posterior,
Superior):

=========  ==================  ====================  ====================
view       slices ordered      rows go (top→bottom)  columns go (left→right)
=========  ==================  ====================  ====================
axial      inferior→superior   anterior→posterior    patient right→left
coronal    anterior→posterior  superior→inferior     patient right→left
sagittal   right→left          superior→inferior     anterior→posterior
=========  ==================  ====================  ====================

Axial and coronal are in the radiological convention (patient left on the image right); slices
always run along increasing L/P/S. An LPS volume with identity direction is already canonical
axial. ``restore`` is the exact inverse of ``extract``. For oblique volumes the nearest axes are
used and the residual angle is recorded in ``obliquity_deg``.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume import Volume

logger = logging.getLogger(__name__)

# (LPS axis, sign) of the slice, row and column directions of each view; LPS axes: 0=L, 1=P, 2=S.
VIEWS: dict[str, tuple[tuple[int, int], tuple[int, int], tuple[int, int]]] = {
    "axial": ((2, +1), (1, +1), (0, +1)),
    "coronal": ((1, +1), (2, -1), (0, +1)),
    "sagittal": ((0, +1), (2, -1), (1, +1)),
}


@dataclass(frozen=True)
class SlicePlan:
    """How to turn a volume's (z, y, x) array into canonical (N, H, W) slices and back.

    ``axes[d]`` is the array axis that becomes output axis d (slice, row, column), and
    ``flips[d]`` says whether that output axis runs against the array axis.
    """

    view: str
    axes: tuple[int, int, int]
    flips: tuple[bool, bool, bool]
    source_shape: tuple[int, int, int]
    pixel_spacing: tuple[float, float]  # (row, column) in mm
    slice_spacing: float
    obliquity_deg: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        """(N, H, W) of the extracted slices."""
        return tuple(self.source_shape[a] for a in self.axes)  # type: ignore[return-value]

    @property
    def num_slices(self) -> int:
        return self.shape[0]

    def extract(self, array: Any) -> Any:
        """Canonical (N, H, W) slices of a (z, y, x) array on the volume's grid (a contiguous copy).

        Works for numpy arrays and torch tensors alike (HU, probabilities or labels).
        """
        torch = _torch_module_of(array)
        if torch is None:
            return np.ascontiguousarray(self.extract_view(array))
        flipped = self._flipped_axes(array)
        out = array.permute(*self.axes)
        return torch.flip(out, flipped) if flipped else out.contiguous()

    def extract_view(self, array: np.ndarray) -> np.ndarray:
        """``extract`` without the copy: the canonical slices as a (possibly strided) numpy view.

        For readers that take a few slices at a time (the engine): a copy of the whole CT would be
        the largest array of a run after its outputs.
        """
        flipped = self._flipped_axes(array)
        out = np.transpose(array, self.axes)
        return np.flip(out, flipped) if flipped else out

    def _flipped_axes(self, array: Any) -> list[int]:
        """The slice axes to flip, once ``array`` is checked to be on the planned volume's grid."""
        if tuple(array.shape) != self.source_shape:
            raise ValueError(f"array shape {tuple(array.shape)} does not match the planned volume {self.source_shape}")
        return [d for d, flip in enumerate(self.flips) if flip]

    def restore(self, slices: Any) -> Any:
        """Put canonical (N, H, W) slices back into the volume's (z, y, x) layout: ``extract``'s inverse."""
        if tuple(slices.shape) != self.shape:
            raise ValueError(f"slices shape {tuple(slices.shape)} does not match the planned slices {self.shape}")
        flipped = [d for d, flip in enumerate(self.flips) if flip]
        inverse = tuple(int(d) for d in np.argsort(self.axes))
        torch = _torch_module_of(slices)
        if torch is not None:
            out = torch.flip(slices, flipped) if flipped else slices
            return out.permute(*inverse).contiguous()
        out = np.flip(slices, flipped) if flipped else slices
        return np.ascontiguousarray(np.transpose(out, inverse))


def slice_plan(volume: Volume, *, axis: str = "axial") -> SlicePlan:
    """Plan canonical slices of ``volume`` along ``axis`` ("axial", "coronal" or "sagittal")."""
    view = str(axis).strip().lower()
    if view not in VIEWS:
        raise InputError(f"unknown slice axis {axis!r}; choose one of {', '.join(VIEWS)}")
    direction = np.asarray(volume.direction, dtype=np.float64)
    if not np.all(np.isfinite(direction)) or abs(abs(np.linalg.det(direction)) - 1.0) > 1e-3:
        raise InputError(
            f"{volume.source or 'volume'}: its direction matrix is not a rotation (|det| != 1); "
            "check the image header"
        )
    wanted = VIEWS[view]

    # The index axis (0=i, 1=j, 2=k) closest to the view's normal, then the better in-plane pairing.
    normal_lps = wanted[0][0]
    normal_ijk = int(np.argmax(np.abs(direction[normal_lps])))
    rest = [a for a in range(3) if a != normal_ijk]
    row_lps, col_lps = wanted[1][0], wanted[2][0]
    row_ijk, col_ijk = max(
        itertools.permutations(rest),
        key=lambda pair: abs(direction[row_lps, pair[0]]) + abs(direction[col_lps, pair[1]]),
    )

    ijk = (normal_ijk, row_ijk, col_ijk)
    cosines = [direction[lps, a] for (lps, _), a in zip(wanted, ijk)]
    flips = tuple(bool(np.sign(c) != sign) for c, (_, sign) in zip(cosines, wanted))
    obliquity = math.degrees(math.acos(min(1.0, min(abs(c) for c in cosines))))
    if obliquity > 0.5:
        logger.info("%s slices of an oblique volume: nearest axes used, up to %.1f degrees off", view, obliquity)

    spacing = volume.spacing  # in index order (i, j, k)
    return SlicePlan(
        view=view,
        axes=tuple(2 - a for a in ijk),  # array axes are (k, j, i)
        flips=flips,
        source_shape=volume.shape,
        pixel_spacing=(spacing[row_ijk], spacing[col_ijk]),
        slice_spacing=spacing[normal_ijk],
        obliquity_deg=obliquity,
    )


def _torch_module_of(values: Any) -> Any:
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(values, torch.Tensor):
        return torch
    return None
