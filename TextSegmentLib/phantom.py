"""Synthetic abdominal CT phantoms: our training and test bed when no other data exists.

Anatomy is drawn from a seed in **physical** LPS millimetres centred on the body (x toward the
patient's left, y posterior, z superior) and voxelised through the grid's own ijk→LPS map, so a
flipped or oblique grid shows the same patient and "left" is always the patient's left.

Image model: per-tissue HU (portal-venous phase by default, see ``TISSUES``) plus smooth physical
texture → Gaussian blur (partial volume at edges; the label map stays crisp) → correlated Gaussian
noise → int16. The label map is a partition: lesions are carved out of their organ, so composite
prompts are mask algebra on labels (see ``TextSegmentLib.prompts``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np

from .errors import InputError, OutputExistsError
from .volume import Volume

log = logging.getLogger(__name__)

FIELD_OF_VIEW_MM = (400.0, 400.0, 240.0)  # x, y, z extent a grid is fitted to when no spacing is given

LABELS: dict[int, str] = {
    1: "body",  # skin, intervertebral discs and other unnamed soft tissue
    2: "fat",  # subcutaneous, visceral, mediastinal and renal-sinus fat
    3: "muscle",
    4: "ribs",
    5: "vertebrae",
    6: "spinal_cord",
    7: "lung_left",
    8: "lung_right",
    9: "heart",
    10: "esophagus",
    11: "liver",
    12: "gallbladder",
    13: "spleen",
    14: "stomach",
    15: "pancreas",
    16: "kidney_left",
    17: "kidney_right",
    18: "aorta",
    19: "inferior_vena_cava",
    20: "small_bowel",
    21: "colon",
    22: "liver_tumor_necrotic_core",
    23: "liver_tumor_enhancing_rim",
    24: "kidney_cyst_left",
    25: "kidney_cyst_right",
    26: "lung_nodule",
}
LABEL_IDS = {name: value for value, name in LABELS.items()}
LESIONS = ("liver_tumor", "kidney_cyst", "lung_nodule")
LESION_PARTS = {
    "liver_tumor": ("liver_tumor_necrotic_core", "liver_tumor_enhancing_rim"),
    "kidney_cyst": ("kidney_cyst_left", "kidney_cyst_right"),
    "lung_nodule": ("lung_nodule",),
}
PHASES = ("portal_venous", "non_contrast")


@dataclass(frozen=True)
class Tissue:
    """Base HU in each phase and the amplitude (HU) of the smooth texture added on top."""

    portal_venous: float
    non_contrast: float
    texture: float = 6.0


# Portal-venous phase (~70 s after injection): liver and spleen enhance, vessels bright, renal
# cortex brighter than medulla. Structures with internal detail (kidney, vertebrae, stomach,
# colon, small bowel, heart, lesions) get it in ``_render``; these are their base values.
TISSUES: dict[str, Tissue] = {
    "body": Tissue(40, 40, 6),
    "fat": Tissue(-100, -100, 8),
    "muscle": Tissue(55, 50, 6),
    "ribs": Tissue(500, 500, 40),
    "vertebrae": Tissue(220, 220, 25),
    "spinal_cord": Tissue(35, 30, 3),
    "lung_left": Tissue(-860, -860, 15),
    "lung_right": Tissue(-860, -860, 15),
    "heart": Tissue(160, 45, 6),
    "esophagus": Tissue(45, 40, 5),
    "liver": Tissue(105, 60, 6),
    "gallbladder": Tissue(10, 10, 3),
    "spleen": Tissue(115, 50, 5),
    "stomach": Tissue(20, 20, 5),
    "pancreas": Tissue(100, 45, 8),
    "kidney_left": Tissue(165, 35, 5),
    "kidney_right": Tissue(165, 35, 5),
    "aorta": Tissue(170, 45, 4),
    "inferior_vena_cava": Tissue(140, 40, 4),
    "small_bowel": Tissue(30, 25, 8),
    "colon": Tissue(20, 20, 20),
    "liver_tumor_necrotic_core": Tissue(20, 20, 4),
    "liver_tumor_enhancing_rim": Tissue(145, 50, 5),
    "kidney_cyst_left": Tissue(8, 8, 2),
    "kidney_cyst_right": Tissue(8, 8, 2),
    "lung_nodule": Tissue(35, 35, 4),
}

# Median HU expected inside each label of a portal-venous phantom at the default grid (48×160×160,
# 2.5×2.5×5 mm, noise 12 HU): the documented contract the tests hold the generator to. Small or
# mixed structures are wide because partial volume and gas pull their medians.
EXPECTED_MEDIAN_HU: dict[str, tuple[float, float]] = {
    "body": (-400, 70),
    "fat": (-125, -75),
    "muscle": (30, 75),
    "ribs": (150, 700),
    "vertebrae": (220, 700),
    "spinal_cord": (10, 70),
    "lung_left": (-900, -780),
    "lung_right": (-900, -780),
    "heart": (110, 190),
    "esophagus": (-60, 80),
    "liver": (90, 125),
    "gallbladder": (-10, 40),
    "spleen": (95, 135),
    "stomach": (-1000, 60),
    "pancreas": (60, 125),
    "kidney_left": (130, 210),
    "kidney_right": (130, 210),
    "aorta": (130, 200),
    "inferior_vena_cava": (100, 170),
    "small_bowel": (-100, 60),
    "colon": (-1000, 40),
    "liver_tumor_necrotic_core": (0, 70),
    "liver_tumor_enhancing_rim": (100, 170),
    "kidney_cyst_left": (-10, 80),
    "kidney_cyst_right": (-10, 80),
    "lung_nodule": (-500, 60),
}


@dataclass(frozen=True)
class PhantomConfig:
    """Everything ``make_phantom`` was asked for: rebuilds the identical phantom."""

    seed: int = 0
    shape: tuple[int, int, int] = (48, 160, 160)
    spacing: tuple[float, float, float] = (2.5, 2.5, 5.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    lesions: Union[str, tuple[str, ...]] = "random"
    noise_hu: float = 12.0
    phase: str = "portal_venous"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["lesions"] = self.lesions if isinstance(self.lesions, str) else list(self.lesions)
        return json.loads(json.dumps(d))


@dataclass(frozen=True)
class Phantom:
    """A CT volume, its label map (a partition) and how they were made."""

    ct: Volume
    labels: Volume
    label_names: dict[int, str]
    config: PhantomConfig
    anatomy: dict[str, Any] = field(default_factory=dict)  # drawn sizes/positions, LPS mm

    @property
    def name(self) -> str:
        """``phantom-<seed>``, as ``training.phantom_cases`` names it: a phantom is a SemantiBench case as it is."""
        return f"phantom-{self.config.seed}"

    @property
    def lesions(self) -> tuple[str, ...]:
        """Lesions with at least one voxel on this grid."""
        counts = self.voxel_counts()
        return tuple(les for les in LESIONS if any(counts.get(p, 0) for p in LESION_PARTS[les]))

    def voxel_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels.array.ravel(), minlength=max(self.label_names) + 1)
        return {name: int(counts[value]) for value, name in self.label_names.items()}


def make_phantom(
    *,
    seed: int = 0,
    shape: Sequence[int] = (48, 160, 160),
    spacing: Optional[Sequence[float]] = None,
    direction: Optional[np.ndarray] = None,
    origin: Optional[Sequence[float]] = None,
    lesions: Union[str, Iterable[str]] = "random",
    noise_hu: float = 12.0,
    phase: str = "portal_venous",
) -> Phantom:
    """A seeded CT phantom with its label map.

    ``shape`` is (z, y, x); ``spacing`` (x, y, z) mm defaults to fitting ``FIELD_OF_VIEW_MM`` into
    the grid, so a tiny grid still shows the whole trunk; ``direction`` (columns = LPS axes of i,
    j, k) and ``origin`` default to identity and a grid centred on the body. ``lesions`` is
    ``"random"`` (each of ``LESIONS`` with probability 0.6), ``"all"``, ``"none"`` or a set of
    names (``"kidney_cyst_left"``/``"_right"`` force the side). Anatomy and lesions come from
    independent streams of ``seed``: toggling lesions leaves the organs untouched.
    """
    config = _config(seed, shape, spacing, direction, origin, lesions, noise_hu, phase)
    streams = np.random.SeedSequence(config.seed).spawn(4)
    anat_rng, lesion_rng, field_rng, noise_rng = (np.random.default_rng(s) for s in streams)
    anatomy = _draw_anatomy(anat_rng)
    anatomy["lesions"] = _draw_lesions(lesion_rng, anatomy, config.lesions)
    waves = _draw_waves(field_rng)

    grid = _Grid(config.shape, _affine(config))
    labels, hu = _render(grid, anatomy, waves, config.phase)
    hu = _acquire(hu, noise_rng, config.noise_hu)

    geometry = dict(spacing=config.spacing, origin=config.origin, direction=np.asarray(config.direction))
    source = f"phantom(seed={config.seed})"
    ct = Volume(hu, modality="CT", source=source, metadata={"phantom": config.to_dict()}, **geometry)
    label_volume = Volume(labels, modality="SEG", source=source, metadata={"label_names": dict(LABELS)}, **geometry)
    log.debug("phantom seed %d on %s grid: lesions %s", config.seed, config.shape,
              [k for k, v in anatomy["lesions"].items() if v["present"]])
    return Phantom(ct=ct, labels=label_volume, label_names=dict(LABELS), config=config, anatomy=anatomy)


def oblique_direction(degrees: float, *, axis: str = "x") -> np.ndarray:
    """Direction matrix of a grid rotated by ``degrees`` about a patient axis (x: a gantry-like tilt)."""
    if axis not in ("x", "y", "z"):
        raise InputError(f"oblique axis must be x, y or z, got {axis!r}")
    return _rotation(**{axis: degrees})


def save_phantom(
    phantom: Phantom,
    folder: Union[str, Path],
    *,
    overwrite: bool = False,
    prompts: Optional[Sequence[Any]] = None,
) -> dict[str, Path]:
    """Write ``ct.nii.gz``, ``labels.nii.gz``, ``labels.json`` and ``prompts.json`` into ``folder``.

    Nothing is written when any of them exists already, unless ``overwrite``. ``prompts`` defaults
    to the phantom's prompt pyramid; each entry is saved with the voxel count of its ground truth.
    """
    from .io.writers import write_json, write_label_map, write_volume
    from .prompts import build_prompt_pyramid, ground_truth

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder}: exists and is not a folder; choose another output folder")
    paths = {name: folder / name for name in ("ct.nii.gz", "labels.nii.gz", "labels.json", "prompts.json")}
    clashes = [str(p) for p in paths.values() if p.exists()]
    if clashes and not overwrite:  # check all first: never leave a half-replaced set
        verb = "exists" if len(clashes) == 1 else "exist"
        raise OutputExistsError(f"{', '.join(clashes)} already {verb}; nothing was written (pass overwrite=True, CLI: --overwrite, to replace)")

    label_map = phantom.labels.array
    if prompts is None:
        prompts = build_prompt_pyramid(label_map, phantom.label_names, seed=phantom.config.seed)
    prompt_rows = [
        {**p.to_dict(), "voxels": int(ground_truth(p, label_map, phantom.label_names).sum())} for p in prompts
    ]
    label_doc = {
        "labels": {str(k): v for k, v in phantom.label_names.items()},
        "voxels": phantom.voxel_counts(),
        "lesions": list(phantom.lesions),
        "config": phantom.config.to_dict(),
        "anatomy": phantom.anatomy,
    }
    write_volume(phantom.ct, paths["ct.nii.gz"], overwrite=overwrite)
    write_label_map(phantom.labels, paths["labels.nii.gz"], overwrite=overwrite)
    write_json(label_doc, paths["labels.json"], overwrite=overwrite)
    write_json(prompt_rows, paths["prompts.json"], overwrite=overwrite)
    return paths


# --- configuration --------------------------------------------------------------------------


def _config(seed, shape, spacing, direction, origin, lesions, noise_hu, phase) -> PhantomConfig:
    if int(seed) < 0:
        raise InputError(f"phantom seed must be a non-negative integer, got {seed}")
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"phantom shape must be three positive sizes (z, y, x), got {shape}")
    if spacing is None:
        spacing = (FIELD_OF_VIEW_MM[0] / shape[2], FIELD_OF_VIEW_MM[1] / shape[1], FIELD_OF_VIEW_MM[2] / shape[0])
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"phantom spacing must be three positive millimetre values (x, y, z), got {spacing}")
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    if d.shape != (3, 3) or not np.allclose(d.T @ d, np.eye(3), atol=1e-5):
        raise InputError("phantom direction must be an orthonormal 3×3 matrix (columns = LPS axes of i, j, k)")
    if origin is None:  # centre the grid on the body, whatever the direction
        half = np.array(spacing) * (np.array(shape[::-1]) - 1) / 2.0
        origin = -(d @ half)
    origin = tuple(float(o) for o in origin)
    if len(origin) != 3:
        raise InputError(f"phantom origin must be three LPS millimetre values, got {origin}")
    if phase not in PHASES:
        raise InputError(f"unknown contrast phase {phase!r}; choose one of {', '.join(PHASES)}")
    if not np.isfinite(noise_hu) or noise_hu < 0:
        raise InputError(f"noise_hu (CLI: --noise) must be a non-negative number of HU, got {noise_hu:g}")
    return PhantomConfig(
        seed=int(seed),
        shape=shape,  # type: ignore[arg-type]
        spacing=spacing,  # type: ignore[arg-type]
        origin=origin,  # type: ignore[arg-type]
        direction=tuple(tuple(float(v) for v in row) for row in d),
        lesions=_lesion_mode(lesions),
        noise_hu=float(noise_hu),
        phase=phase,
    )


def _lesion_mode(lesions: Union[str, Iterable[str]]) -> Union[str, tuple[str, ...]]:
    if isinstance(lesions, str):
        if lesions in ("random", "all", "none"):
            return lesions
        lesions = [lesions]
    names = tuple(sorted(set(lesions)))
    allowed = set(LESIONS) | {"kidney_cyst_left", "kidney_cyst_right"}
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise InputError(
            f"unknown lesion(s) {', '.join(unknown)}; use 'random', 'all', 'none' or names from {', '.join(sorted(allowed))}"
        )
    if {"kidney_cyst_left", "kidney_cyst_right"} <= set(names):  # one cyst is drawn: asking both would drop one
        raise InputError("a phantom has one kidney cyst: ask for kidney_cyst_left or kidney_cyst_right, not both "
                         "(or kidney_cyst for a random side)")
    return names


def _affine(config: PhantomConfig) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = np.asarray(config.direction) @ np.diag(config.spacing)
    m[:3, 3] = config.origin
    return m


# --- random anatomy (grid-independent, LPS mm) -------------------------------------------------


def _rotation(x: float = 0.0, y: float = 0.0, z: float = 0.0) -> np.ndarray:
    """Rotation (degrees about the patient axes, applied x, then y, then z); columns = rotated axes."""
    ax, ay, az = np.radians([x, y, z])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _draw_anatomy(rng: np.random.Generator) -> dict[str, Any]:
    """Sizes and positions of every structure; the order of draws is part of the seed contract."""

    def g(mean: float, sd: float, lo: float = -np.inf, hi: float = np.inf) -> float:
        return round(float(np.clip(mean + sd * rng.standard_normal(), lo, hi)), 3)

    def p(*xyz: float) -> list[float]:
        return [round(float(v), 3) for v in xyz]

    a = {}
    a["body"] = dict(a=g(150, 10, 125, 175), b=g(108, 6, 95, 120), yc=g(2, 3), p=2.4, skin=2.0,
                     fat=g(20, 6, 6, 38), muscle=g(11, 1.5, 8, 15))
    a["diaphragm"] = dict(right=p(g(-70, 6), g(5, 6), g(52, 7)), left=p(g(72, 6), g(5, 6), g(43, 7)), k=g(170, 15, 130, 210))
    a["mediastinum"] = dict(center=p(g(8, 3), -15), radii=p(g(38, 3, 30, 46), 80))
    a["heart"] = dict(center=p(g(22, 5), g(-38, 5), g(132, 8)), radii=p(g(68, 5), g(52, 4), g(58, 5)), rot_z=g(-25, 8))
    a["ribs"] = dict(period=g(34, 2, 28, 40), phase=g(0, 10), slope=g(110, 10, 80, 140), width=g(9, 1, 7, 11))
    spine_y = g(45, 3, 38, 52)
    a["vertebrae"] = dict(y=spine_y, radii=p(g(22, 1.5, 18, 26), g(17, 1.2, 14, 20)), period=g(33, 1.5, 29, 37),
                          phase=g(0, 10), disc=g(7, 0.8, 5, 9))
    a["spinal_cord"] = dict(y=round(spine_y + 28, 3), radius=g(8.5, 0.8, 7, 10))
    a["liver"] = dict(right=dict(center=p(g(-65, 6), g(0, 6), g(5, 7)), radii=p(g(75, 6), g(85, 6), g(80, 6)), rot_z=g(0, 6)),
                      left=dict(center=p(g(12, 7), g(-52, 5), g(22, 6)), radii=p(g(52, 7), g(32, 4), g(42, 5)), rot_z=g(20, 8)))
    a["gallbladder"] = dict(center=p(g(-45, 5), g(-52, 5), g(-35, 6)), radii=p(g(16, 2), g(18, 2), g(30, 4)), rot_x=g(25, 8))
    a["spleen"] = dict(center=p(g(96, 4), g(32, 5), g(14, 6)), radii=p(g(24, 3), g(52, 5), g(42, 5)), rot_z=g(35, 8))
    a["stomach"] = dict(fundus=dict(center=p(g(55, 5), g(-12, 5), g(20, 5)), radii=p(g(34, 4), g(34, 4), g(36, 4))),
                        antrum=dict(center=p(g(22, 5), g(-52, 4), g(-8, 5)), radii=p(g(48, 5), g(24, 3), g(28, 4)), rot_z=g(30, 8)),
                        gas_level=g(-48, 10, -75, -20))
    a["esophagus"] = dict(points=[p(g(0, 2), spine_y - 40, 140), p(g(3, 2), spine_y - 42, 70), p(g(35, 4), -5, 25)],
                          radius=g(8, 1, 6, 10))
    a["pancreas"] = dict(points=[p(g(-30, 4), g(-15, 4), g(-28, 5)), p(g(5, 4), g(-25, 4), g(-18, 5)), p(g(72, 5), g(20, 5), g(-8, 5))],
                         radii=[g(15, 2, 11, 19), g(11, 1.5, 8, 14), g(9, 1.5, 6, 12)])
    a["kidney_left"] = dict(center=p(g(72, 4), g(40, 3), g(-28, 7)), radii=p(g(26, 2), g(28, 2), g(52, 4)),
                            rot_z=g(-30, 6), rot_y=g(-12, 4))
    a["kidney_right"] = dict(center=p(g(-72, 4), g(40, 3), g(-42, 7)), radii=p(g(26, 2), g(28, 2), g(52, 4)),
                             rot_z=g(30, 6), rot_y=g(12, 4))
    a["aorta"] = dict(points=[p(g(15, 3), spine_y - 35, -125), p(g(18, 3), spine_y - 25, 140)], radius=g(12, 1.2, 9, 15))
    a["inferior_vena_cava"] = dict(points=[p(g(-22, 3), spine_y - 32, -125), p(g(-25, 3), spine_y - 45, 60)],
                                   radius=g(14, 1.5, 10, 18), flatten=g(0.72, 0.08, 0.55, 0.9))
    a["colon"] = dict(points=[p(g(-95, 5), -10, -130), p(g(-90, 5), g(-30, 5), g(-45, 6)), p(0, g(-72, 5), g(-50, 8)),
                              p(g(92, 5), g(-30, 5), g(-22, 6)), p(g(98, 4), -5, -130)], radius=g(21, 2.5, 15, 27))
    a["small_bowel"] = dict(top=g(-15, 6), posterior=g(20, 5))
    a["psoas"] = dict(top=g(-15, 8), x=g(32, 3), growth=g(0.16, 0.03, 0.08, 0.24))
    a["paraspinal"] = dict(x=g(30, 2.5), radii=p(g(24, 2), g(22, 2)))
    return a


def _draw_lesions(rng: np.random.Generator, anatomy: dict, mode: Union[str, tuple[str, ...]]) -> dict[str, Any]:
    """Lesion geometry (always drawn, so the seed's stream does not depend on ``mode``) and presence."""
    u = lambda lo, hi: round(float(rng.uniform(lo, hi)), 3)  # noqa: E731
    chance = rng.uniform(size=len(LESIONS))
    lobe = anatomy["liver"]["right"]
    c, r = np.array(lobe["center"]), np.array(lobe["radii"])
    tumor = dict(center=[round(float(v), 3) for v in c + r * [u(-0.45, 0.15), u(-0.4, 0.15), u(-0.2, 0.25)]],
                 radius=u(12, 30), core=u(0.45, 0.7))
    side = "left" if rng.uniform() < 0.5 else "right"
    cyst = dict(side=side, offset=[u(0.1, 0.35), u(-0.25, 0.2), u(-0.55, 0.55)], radius=u(8, 15))
    nodule_side = 1.0 if rng.uniform() < 0.5 else -1.0
    nodule = dict(center=[round(nodule_side * u(65, 95), 3), u(20, 50), u(75, 110)], radius=u(5, 11))

    if mode == "random":
        present = {name: bool(chance[i] < 0.6) for i, name in enumerate(LESIONS)}
    elif mode in ("all", "none"):
        present = {name: mode == "all" for name in LESIONS}
    else:
        present = {name: name in mode for name in LESIONS}
        for forced in ("left", "right"):
            if f"kidney_cyst_{forced}" in mode:
                present["kidney_cyst"], cyst["side"] = True, forced
    return {
        "liver_tumor": {**tumor, "present": present["liver_tumor"]},
        "kidney_cyst": {**cyst, "present": present["kidney_cyst"]},
        "lung_nodule": {**nodule, "present": present["lung_nodule"]},
    }


def _draw_waves(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random plane waves (wave vectors in rad/mm, phases) for smooth physical fields of unit variance."""
    spec = {"shape": (10, 50, 150), "texture": (16, 5, 20), "bowel": (10, 22, 40), "vessel_a": (8, 12, 30),
            "vessel_b": (8, 12, 30), "content": (10, 8, 20)}
    waves = {}
    for name, (n, shortest, longest) in spec.items():
        dirs = rng.standard_normal((n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        wavelength = rng.uniform(shortest, longest, size=n)
        waves[name] = (dirs * (2 * np.pi / wavelength)[:, None], rng.uniform(0, 2 * np.pi, size=n))
    return waves


# --- voxelisation ---------------------------------------------------------------------------


class _Grid:
    """Evaluates physical-space shapes on a voxel grid; every linear function of the LPS point is
    built from three broadcast 1-D ramps, so nothing is computed point by point."""

    def __init__(self, shape: tuple[int, int, int], affine: np.ndarray) -> None:
        self.shape = shape
        self.matrix, self.offset = affine[:3, :3], affine[:3, 3]
        nz, ny, nx = shape
        self.ramps = (np.arange(nx, dtype=np.float64), np.arange(ny, dtype=np.float64), np.arange(nz, dtype=np.float64))
        self.x, self.y, self.z = (self.linear(axis) for axis in np.eye(3))

    def linear(self, w: Sequence[float], c: float = 0.0) -> np.ndarray:
        """``w · p + c`` at every voxel centre ``p`` (LPS mm)."""
        a = np.asarray(w, dtype=np.float64) @ self.matrix
        b = float(np.dot(w, self.offset) + c)
        i, j, k = self.ramps
        plane = ((a[2] * k + b)[:, None] + (a[1] * j)[None, :]).astype(np.float32)
        return plane[:, :, None] + (a[0] * i).astype(np.float32)[None, None, :]

    def ellipsoid(self, center: Sequence[float], radii: Sequence[float], rotation: np.ndarray = np.eye(3)) -> np.ndarray:
        """Squared normalised radius: < 1 inside."""
        out = np.zeros(self.shape, np.float32)
        for axis, r in zip(np.asarray(rotation).T, radii):
            out += np.square(self.linear(axis / r, -float(np.dot(axis, center)) / r))
        return out

    def tube(self, points: Sequence[Sequence[float]], radii: Union[float, Sequence[float]], *, flatten: float = 1.0) -> np.ndarray:
        """Squared normalised distance to a polyline with rounded ends; ``radii`` is one number or
        one per point; ``flatten`` scales the front-back radius (a flattened vein)."""
        pts = np.asarray(points, dtype=np.float64)
        rad = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(pts),))
        out = np.full(self.shape, np.inf, np.float32)
        for a, b, ra, rb in zip(pts[:-1], pts[1:], rad[:-1], rad[1:]):
            length = float(np.linalg.norm(b - a))
            d = (b - a) / length
            e1 = np.cross([0.0, 1.0, 0.0], d)
            e1 = e1 / np.linalg.norm(e1) if np.linalg.norm(e1) > 1e-6 else np.array([1.0, 0.0, 0.0])
            e2 = np.cross(d, e1)
            t = self.linear(d / length, -float(d @ a) / length)
            tc = np.clip(t, 0.0, 1.0)
            r = ra + (rb - ra) * tc
            nd = (np.square(self.linear(e1, -float(e1 @ a))) + np.square(self.linear(e2, -float(e2 @ a)) / flatten)
                  + np.square((t - tc) * length)) / np.square(r)
            np.minimum(out, nd, out=out)
        return out

    def waves(self, spec: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Σ cos(k·p + φ) with unit variance; separable, so it is two small matrix products."""
        kvec, phase = spec
        a = kvec @ self.matrix  # per-wave coefficients of i, j, k
        b = kvec @ self.offset + phase
        i, j, k = self.ramps
        ez = np.exp(1j * (np.outer(a[:, 2], k) + b[:, None]))
        ey = np.exp(1j * np.outer(a[:, 1], j))
        ex = np.exp(1j * np.outer(a[:, 0], i))
        zy = (ez[:, :, None] * ey[:, None, :]).reshape(len(kvec), -1)
        real = zy.real.T.astype(np.float32) @ ex.real.astype(np.float32) - zy.imag.T.astype(np.float32) @ ex.imag.astype(np.float32)
        return (real * np.float32(np.sqrt(2.0 / len(kvec)))).reshape(self.shape)


def _render(grid: _Grid, anat: dict, waves: dict, phase: str) -> tuple[np.ndarray, np.ndarray]:
    """Paint structures in anatomical order (later ones win) into a label map and a base HU image."""
    X, Y, Z = grid.x, grid.y, grid.z
    F = {name: grid.waves(spec) for name, spec in waves.items()}
    labels = np.zeros(grid.shape, np.uint8)
    hu = np.full(grid.shape, -1000.0, np.float32)
    base = {name: getattr(t, phase) for name, t in TISSUES.items()}
    contrast = phase == "portal_venous"

    def paint(mask: np.ndarray, name: str, value: Union[float, np.ndarray, None] = None) -> None:
        labels[mask] = LABEL_IDS[name]
        value = base[name] if value is None else value
        hu[mask] = value if np.isscalar(value) else value[mask]

    def irregular(nd: np.ndarray, amount: float) -> np.ndarray:
        return nd < np.square(1.0 + amount * F["shape"])

    # trunk: skin, subcutaneous fat, muscle wall, cavity
    b = anat["body"]
    u, v = X / b["a"], (Y - b["yc"]) / b["b"]
    au, av = np.abs(u), np.abs(v)
    s = (au ** b["p"] + av ** b["p"]) ** (1.0 / b["p"]) * (1.0 + 0.015 * F["shape"])
    depth = (1.0 - s) * (b["a"] * au + b["b"] * av) / (au + av + 1e-6)
    fat_t = b["fat"] * (1.0 + 0.4 * np.clip(-v, 0, 1) - 0.5 * np.clip(v, 0, 1))
    wall_in = b["skin"] + fat_t
    cavity_in = wall_in + b["muscle"] * (1.0 + 0.6 * np.clip(v, 0, 1))
    inside = depth > 0
    paint(inside, "body")
    paint(depth > b["skin"], "fat")
    paint(depth > wall_in, "muscle")
    cavity = depth > cavity_in

    dr, dl, k = np.array(anat["diaphragm"]["right"]), np.array(anat["diaphragm"]["left"]), anat["diaphragm"]["k"]
    dome = np.maximum(dr[2] - ((X - dr[0]) ** 2 + (Y - dr[1]) ** 2) / k, dl[2] - ((X - dl[0]) ** 2 + (Y - dl[1]) ** 2) / k)
    thorax = cavity & (Z > dome)
    abdomen = cavity & (Z <= dome - 5.0)
    paint(cavity, "muscle")  # the diaphragm sheet: what thorax and abdomen leave between them
    paint(abdomen, "fat", -90.0)

    # ribs: bands in the muscle wall, descending from the spine to the front
    r = anat["ribs"]
    behind = np.arctan2(v, au) / np.pi + 0.5  # 0 at the front, 1 at the back, by angle
    level = (Z + r["slope"] * (1.0 - behind) + r["phase"]) % r["period"]
    in_wall = (depth > wall_in + 1.0) & (depth < wall_in + b["muscle"] + 2.0)
    rib = in_wall & (np.abs(level - r["period"] / 2) < r["width"] / 2) & (Z > dome - 70) & ((v > -0.6) | (au > 0.35))
    paint(rib, "ribs")

    # thorax: mediastinal fat, lungs with vessels, heart, oesophagus
    m = anat["mediastinum"]
    mediastinum = ((X - m["center"][0]) / m["radii"][0]) ** 2 + ((Y - m["center"][1]) / m["radii"][1]) ** 2 < 1
    paint(thorax, "fat", -95.0)
    lung = thorax & ~mediastinum
    vessels = (np.abs(F["vessel_a"]) < 0.12) & (np.abs(F["vessel_b"]) < 0.12)
    lung_hu = np.where(vessels, 30.0 if not contrast else 120.0, base["lung_left"]).astype(np.float32)
    paint(lung & (X < m["center"][0]), "lung_right", lung_hu)
    paint(lung & (X >= m["center"][0]), "lung_left", lung_hu)
    h = anat["heart"]
    heart_nd = grid.ellipsoid(h["center"], h["radii"], _rotation(z=h["rot_z"]))
    paint(thorax & (heart_nd < 1), "heart", np.where(heart_nd > 0.6, base["heart"] - (50 if contrast else 5), base["heart"]))

    # abdomen, back to front in painting priority
    sb = anat["small_bowel"]
    loops = abdomen & (Z < sb["top"]) & (Y < sb["posterior"]) & (np.abs(F["bowel"]) < 0.5)
    bowel_hu = np.where(np.abs(F["bowel"]) < 0.22, np.where(F["content"] > 1.7, -950.0, base["small_bowel"] - 10), base["small_bowel"] + 15)
    paint(loops, "small_bowel", bowel_hu)
    colon_nd = grid.tube(anat["colon"]["points"], anat["colon"]["radius"])
    colon_hu = np.where(colon_nd > 0.6, 40.0, np.where(F["content"] > 0.0, -950.0, -80.0 + 60.0 * F["texture"]))
    paint(abdomen & irregular(colon_nd, 0.1), "colon", colon_hu)
    st = anat["stomach"]
    st_nd = np.minimum(grid.ellipsoid(st["fundus"]["center"], st["fundus"]["radii"]),
                       grid.ellipsoid(st["antrum"]["center"], st["antrum"]["radii"], _rotation(z=st["antrum"]["rot_z"])))
    stomach_hu = np.where(st_nd > 0.72, 55.0 if contrast else 40.0, np.where(Y < st["gas_level"], -1000.0, base["stomach"]))
    paint(abdomen & irregular(st_nd, 0.08), "stomach", stomach_hu)

    lv = anat["liver"]
    liver_nd = np.minimum(grid.ellipsoid(lv["right"]["center"], lv["right"]["radii"], _rotation(z=lv["right"]["rot_z"])),
                          grid.ellipsoid(lv["left"]["center"], lv["left"]["radii"], _rotation(z=lv["left"]["rot_z"])))
    portal = (np.abs(F["vessel_a"]) < 0.1) & (np.abs(F["vessel_b"]) < 0.1) & (liver_nd < 0.6)
    paint(abdomen & irregular(liver_nd, 0.08), "liver", np.where(portal & contrast, 165.0, base["liver"]))
    gb = anat["gallbladder"]
    paint(abdomen & (grid.ellipsoid(gb["center"], gb["radii"], _rotation(x=gb["rot_x"])) < 1), "gallbladder")
    sp = anat["spleen"]
    paint(abdomen & irregular(grid.ellipsoid(sp["center"], sp["radii"], _rotation(z=sp["rot_z"])), 0.08), "spleen")
    pa = anat["pancreas"]
    paint(abdomen & irregular(grid.tube(pa["points"], pa["radii"]), 0.15), "pancreas")

    ps = anat["psoas"]
    vert = anat["vertebrae"]
    psoas_r = np.clip(6.0 + ps["growth"] * (ps["top"] - Z), 0, 28)
    for sign in (-1.0, 1.0):
        cx = sign * (ps["x"] + 0.4 * psoas_r)
        paint(cavity & (Z < ps["top"]) & ((X - cx) ** 2 + (Y - vert["y"] + 2) ** 2 < psoas_r**2), "muscle")

    for name, sign in (("kidney_left", 1.0), ("kidney_right", -1.0)):
        kd = anat[name]
        rot = _rotation(y=kd["rot_y"], z=kd["rot_z"])
        k_nd = grid.ellipsoid(kd["center"], kd["radii"], rot)
        cortex = np.clip((np.sqrt(k_nd) - 0.55) / 0.35, 0, 1)
        kidney_hu = base[name] + (45.0 * cortex - 20.0 if contrast else 0.0)
        paint(abdomen & irregular(k_nd, 0.05), name, kidney_hu)
        hilum = np.array(kd["center"]) + rot @ (np.array(kd["radii"]) * [-sign * 0.55, -0.2, 0.0])
        sinus = grid.ellipsoid(hilum, np.array(kd["radii"]) * [0.42, 0.4, 0.45], rot) < 1
        paint(sinus & (labels == LABEL_IDS[name]), "fat", -60.0)

    ivc = anat["inferior_vena_cava"]
    paint(cavity & (grid.tube(ivc["points"], ivc["radius"], flatten=ivc["flatten"]) < 1), "inferior_vena_cava")
    paint(inside & (grid.tube(anat["aorta"]["points"], anat["aorta"]["radius"]) < 1), "aorta")
    paint(cavity & (Z > dome - 25) & (grid.tube(anat["esophagus"]["points"], anat["esophagus"]["radius"]) < 1), "esophagus")

    # spine: paraspinal muscles, vertebral bodies with discs and cortex, posterior elements, cord
    pr = anat["paraspinal"]
    canal_y = anat["spinal_cord"]["y"]
    for sign in (-1.0, 1.0):
        paint(inside & (((X - sign * pr["x"]) / pr["radii"][0]) ** 2 + ((Y - canal_y - 18) / pr["radii"][1]) ** 2 < 1), "muscle")
    vb = ((X / vert["radii"][0]) ** 2 + ((Y - vert["y"]) / vert["radii"][1]) ** 2)
    disc = ((Z + vert["phase"]) % vert["period"]) < vert["disc"]
    paint((vb < 1) & ~disc, "vertebrae", np.where(vb > 0.8, 650.0, base["vertebrae"]))
    paint((vb < 1) & disc, "body", 85.0)
    canal = X**2 + (Y - canal_y) ** 2
    cord_r = anat["spinal_cord"]["radius"]
    arch = (canal < (cord_r + 7) ** 2) & (Y > vert["y"] + vert["radii"][1] - 3)
    spinous = (np.abs(X) < 4) & (Y > canal_y) & (Y < canal_y + 36)
    transverse = (np.abs(Y - canal_y + 6 - 0.3 * np.abs(X)) < 4) & (np.abs(X) < 40) & ~disc
    paint(inside & (arch | spinous | transverse) & (vb >= 1), "vertebrae", 450.0)
    paint(canal < cord_r**2, "spinal_cord")

    _paint_lesions(grid, anat, labels, paint, irregular)
    texture = np.array([0.0] + [TISSUES[LABELS[i]].texture for i in sorted(LABELS)], np.float32)
    hu += texture[labels] * F["texture"]
    return labels, hu


def _paint_lesions(grid: _Grid, anat: dict, labels: np.ndarray, paint, irregular) -> None:
    """Lesions carve out of their organ's current voxels, so they always lie inside it."""
    les = anat["lesions"]
    t = les["liver_tumor"]
    if t["present"]:
        nd = grid.ellipsoid(t["center"], [t["radius"]] * 3)
        in_liver = labels == LABEL_IDS["liver"]
        tumor = in_liver & irregular(nd, 0.15)
        paint(tumor, "liver_tumor_enhancing_rim")
        paint(tumor & irregular(nd / t["core"] ** 2, 0.15), "liver_tumor_necrotic_core")
    c = les["kidney_cyst"]
    if c["present"]:
        kd = anat[f"kidney_{c['side']}"]
        rot = _rotation(y=kd["rot_y"], z=kd["rot_z"])
        sign = 1.0 if c["side"] == "left" else -1.0
        offset = np.array(c["offset"]) * [sign, 1.0, 1.0] * np.array(kd["radii"])
        center = np.array(kd["center"]) + rot @ offset
        cyst = grid.ellipsoid(center, [c["radius"]] * 3) < 1
        paint(cyst & (labels == LABEL_IDS[f"kidney_{c['side']}"]), f"kidney_cyst_{c['side']}")
    n = les["lung_nodule"]
    if n["present"]:
        lung = np.isin(labels, [LABEL_IDS["lung_left"], LABEL_IDS["lung_right"]])
        paint(lung & irregular(grid.ellipsoid(n["center"], [n["radius"]] * 3), 0.2), "lung_nodule")


def _acquire(hu: np.ndarray, rng: np.random.Generator, noise_hu: float) -> np.ndarray:
    """Scanner effects: partial-volume blur of the HU image, correlated noise, int16 quantisation."""
    hu = gaussian_blur(hu, (0.5, 0.5, 0.5))
    if noise_hu > 0:
        noise = gaussian_blur(rng.standard_normal(hu.shape, dtype=np.float32), (0.0, 0.7, 0.7))
        spread = float(noise.std())
        if spread > 1e-6:  # a one-voxel field has no spread to scale: dividing by ~0 would clip the voxel
            hu += noise * np.float32(noise_hu / spread)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def gaussian_blur(array: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Separable Gaussian blur (sigma in voxels per axis, mirrored edges, kernel to 3 sigma).

    A handful of shifted sums for the small kernels a phantom needs: no SciPy in the engine.
    """
    out = np.asarray(array, dtype=np.float32)
    for axis, sigma in enumerate(sigmas):
        if sigma <= 0:
            continue
        radius = max(1, int(3.0 * sigma + 0.5))
        taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        taps /= taps.sum()
        pad = [(0, 0)] * out.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(out, pad, mode="symmetric")
        n = out.shape[axis]
        blurred = np.zeros_like(out)
        for offset, weight in enumerate(taps):
            window = [slice(None)] * out.ndim
            window[axis] = slice(offset, offset + n)
            blurred += np.float32(weight) * padded[tuple(window)]
        out = blurred
    return out
