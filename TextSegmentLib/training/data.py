"""Training data: labelled CT cases → a pool of model-ready slices → (slice, prompt, mask) batches.

Slices go through exactly the engine's path (``slice_plan`` → ``window_composite`` →
``fit_to_square``), so the network trains on what it will be shown at inference. Prompts come from
each case's prompt pyramid (L1/L2/L3 and negative controls) and their masks from mask algebra on
the label slice, computed per sample: a pool holds images and label ids only, never one mask per
prompt. Sampling is balanced over levels and also draws slices where a target is absent, so the
model learns to answer "nothing here".

Case sources: phantoms, TotalSegmentator's layout (CT + multilabel map + class map), Medical
Segmentation Decathlon task folders, and a DICOM series with a DICOM SEG.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..preprocess import fit_to_square, slice_plan, window_composite
from ..prompts import Prompt, build_prompt_pyramid, canonical_target_name, find_target_name, ground_truth
from ..prompts.names import words
from ..volume import Volume

log = logging.getLogger(__name__)

AIR_HU = -500.0  # the engine skips such slices; training does too
LEVEL_WEIGHTS = {"L1": 0.3, "L2": 0.2, "L3": 0.3, "negative": 0.2}
DIFFICULTY_PRIOR = 0.5  # a prompt not yet scored counts as half solved
DIFFICULTY_RATE = 0.05  # EMA step: a prompt's difficulty follows its last ~20 scored samples
HELD_OUT_SEED = 2000  # phantoms from here on are the bench's test set (textsegment bench --seed 2000)


@dataclass
class LabelledCase:
    """A CT, its label map on the same grid (a partition) and the names of its labels."""

    name: str
    ct: Volume
    labels: Volume
    label_names: dict[int, str]
    licence: str = ""
    synthetic: bool = False

    def __post_init__(self) -> None:
        if not self.ct.same_geometry(self.labels):
            self.labels = align_labels(self.labels, self.ct)


# --------------------------------------------------------------------------------------- sources


def phantom_cases(seeds: Iterable[int], *, shape: Sequence[int] = (32, 128, 128)) -> list[LabelledCase]:
    """Seeded phantoms (lesions drawn at random), one case per seed."""
    from ..phantom import make_phantom

    cases = []
    for seed in seeds:
        ph = make_phantom(seed=int(seed), shape=tuple(shape))
        cases.append(LabelledCase(f"phantom-{seed}", ph.ct, ph.labels, dict(ph.label_names), licence="generated", synthetic=True))
    return cases


def load_totalsegmentator_case(
    ct: Union[str, Path], seg: Union[str, Path], class_map: Union[str, Path], *, task: str = "total",
    licence: str = "Apache-2.0",
) -> LabelledCase:
    """A CT (file or DICOM folder) + TotalSegmentator multilabel map + its class-map JSON."""
    from ..io import read_label_map, read_volume

    maps = read_json(class_map, "class map")
    if not isinstance(maps, Mapping):
        raise InputError(f"class map {class_map} must hold a JSON object of label value → name, e.g. {{\"1\": \"spleen\"}}")
    if task not in maps and any(isinstance(v, Mapping) for v in maps.values()):  # a file of maps by task, not one map
        raise InputError(f"{class_map} has no class map for task {task!r}; its tasks: {', '.join(maps)}")
    names = label_values(maps.get(task, maps), f"class map {class_map}")
    # canonical names, as the MSD and SEG loaders give: a map's "Urinary Bladder" must be the table's
    # urinary_bladder, or it gets no table prompts and is even drawn as an "absent" negative
    case = LabelledCase(Path(ct).name, read_volume(ct), read_label_map(seg),
                        {k: canonical_target_name(v) for k, v in names.items() if k > 0}, licence=licence)
    check_named(case, seg, f"class map {class_map}")
    return case


def load_msd_task(
    folder: Union[str, Path], *, limit: Optional[int] = None, licence: str = "CC-BY-SA-4.0",
    failed: Optional[list[dict[str, str]]] = None,
) -> list[LabelledCase]:
    """The training cases of a Medical Segmentation Decathlon task folder (``dataset.json`` + images/labels).

    A bad entry (a file missing, unreadable or mislabelled) raises, naming it: training on the rest
    would hide it. Given a ``failed`` list (a benchmark), it is recorded there (case, source, error)
    and the other entries are read, so one bad case of forty does not cost the other scores.
    """
    folder = Path(folder)
    spec_path = folder / "dataset.json"
    if not spec_path.is_file():
        raise InputError(f"{folder} is not an MSD task folder: it has no dataset.json")
    spec = read_json(spec_path, "MSD task description")
    if not isinstance(spec, Mapping):
        raise InputError(f"{spec_path} must hold a JSON object (labels, training, ...)")
    modality = [str(m) for m in spec.get("modality", {"0": "CT"}).values()]
    if [m.strip().upper() for m in modality] != ["CT"]:  # MR or multi-channel (4D) tasks: TextSegment trains on CT
        raise InputError(f"{spec_path}: task {spec.get('name') or folder.name} is not single-channel CT: its modality is "
                         f"{', '.join(modality) or 'empty'} ({len(modality)} channel(s)); use a CT task")
    names = msd_label_names(spec, folder)
    cases = []
    already = len(failed or [])  # another source's failures, not this task's
    for n, entry in enumerate(spec.get("training", [])[:limit], start=1):
        try:
            cases.append(_msd_case(entry, n, folder=folder, spec_path=spec_path, names=names, licence=licence))
        except (InputError, OSError, RuntimeError) as exc:  # RuntimeError: SimpleITK's unreadable file
            if failed is None:
                raise
            image = entry.get("image") if isinstance(entry, Mapping) else None
            failed.append({"case": Path(image).name if isinstance(image, str) else f"{folder.name} entry {n}",
                           "source": str(folder / image) if isinstance(image, str) else str(spec_path),
                           "error": f"{type(exc).__name__}: {exc}"})
    if not cases and len(failed or []) > already:  # every entry bad: the task itself is the problem
        raise InputError(f"{spec_path}: no training entry could be read; the last: {failed[-1]['error']}")
    if not cases:
        raise InputError(f"{spec_path} lists no training cases")
    return cases


def _msd_case(entry: Any, n: int, *, folder: Path, spec_path: Path, names: dict[int, str], licence: str) -> LabelledCase:
    """Training entry ``n`` of an MSD ``dataset.json``, checked and read."""
    from ..io import read_label_map, read_volume

    if not (isinstance(entry, Mapping) and isinstance(entry.get("image"), str) and isinstance(entry.get("label"), str)):
        raise InputError(f"{spec_path}: training entry {n} is {json.dumps(entry)[:80]}, not "
                         f'{{"image": "./imagesTr/NAME.nii.gz", "label": "./labelsTr/NAME.nii.gz"}}')
    image, label = folder / entry["image"], folder / entry["label"]
    for path, listed in ((image, entry["image"]), (label, entry["label"])):
        if not path.exists():
            raise InputError(f"{spec_path}: training entry {n} lists {listed}, which is missing ({path})")
    case = LabelledCase(image.name, read_volume(image), read_label_map(label), names, licence=licence)
    check_named(case, label, f"the labels of {spec_path}")
    return case


GENERIC_LABEL_WORDS = {"tumor", "vessel", "cyst", "nodule", "metastasis", "primary"}


def msd_label_names(spec: Mapping[str, Any], folder: Path) -> dict[int, str]:
    """Canonical names of an MSD task's labels; a generic one ("cancer", "Tumour") gets the task's organ.

    Why: Task03_Liver's "cancer" alone is a "tumor" that the liver does not include, so "liver"
    prompts would get the tumour cut out of their ground truth; "liver cancer" is liver_tumor.
    """
    organ = None
    task = re.sub(r"^Task\d+_", "", folder.resolve().name)
    for text in (str(spec.get("name", "")), task):
        text = re.sub(r"([a-z])([A-Z])", r"\1 \2", text)  # "HepaticVessel" -> "Hepatic Vessel"
        organ = next((w for w in words(text) if w not in GENERIC_LABEL_WORDS and find_target_name(w)), None)
        if organ:
            break
    names = {}
    for k, text in label_values(spec.get("labels", {}), str(folder / "dataset.json")).items():
        if k > 0:
            generic = organ and words(text) and set(words(text)) <= GENERIC_LABEL_WORDS
            names[int(k)] = canonical_target_name(f"{organ} {text}" if generic else text)
    return names


def read_json(path: Union[str, Path], what: str) -> Any:
    """A JSON file's content; a missing or broken file is an error naming it, not a traceback."""
    path = Path(path)
    if path.is_dir() or not path.exists():  # a pipe (bash's <(...)) is neither and reads as a file
        raise InputError(f"{what} {path}: " + ("no such file" if not path.exists() else "is a folder, not a JSON file"))
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{what} {path} is not valid JSON: {error}") from None


def label_values(names: Any, where: str) -> dict[int, str]:
    """``{"1": "spleen", ...}`` (label value → name) as ``{1: "spleen"}``.

    Anything else is named: the inverted ``{"spleen": 1}`` that nnU-Net v2 writes, a list, a
    non-text name.
    """
    if not isinstance(names, Mapping):
        raise InputError(f"{where}: the labels must be a JSON object of label value → name, e.g. {{\"1\": \"spleen\"}}")
    values = {}
    for key, name in names.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            inverted = " (name → value, inverted)" if isinstance(name, int) else ""
            raise InputError(f"{where}: label key {key!r}{inverted} is not a label value; write value → name, "
                             f'e.g. {{"1": "spleen"}}') from None
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: label {key!r} has no name (got {name!r}); write value → name, "
                             f'e.g. {{"1": "spleen"}}')
        values[value] = name
    return values


def check_named(case: LabelledCase, label_file: Any, names_from: str) -> None:
    """Refuse label values of the map (``label_file``) that ``names_from`` gives no name.

    Why: an unnamed label is trained and scored as background, so a prompt for what it holds (or for
    a group including it) gets a mask without it; a class map of another TotalSegmentator version
    shows up this way.
    """
    counts = np.bincount(np.asarray(case.labels.array).ravel().astype(np.int64))
    unnamed = [int(v) for v in np.flatnonzero(counts) if v > 0 and int(v) not in case.label_names]
    if unnamed:
        listed = ", ".join(map(str, unnamed[:10])) + (f" and {len(unnamed) - 10} more" if len(unnamed) > 10 else "")
        raise InputError(f"{label_file}: label value(s) {listed} ({int(counts[unnamed].sum())} voxels) "
                         f"have no name in {names_from}; name them there, or check that it belongs to this label map")


def load_dicom_seg_case(series: Union[str, Path], seg_file: Union[str, Path], *, licence: str = "") -> LabelledCase:
    """A DICOM CT series and a DICOM SEG on it; frames are placed by their position on the CT grid.

    From a folder of several series, the one the SEG references (ReferencedSeriesSequence) is read: another
    on the same grid would take the labels silently.
    """
    import pydicom

    from ..io import dicom_series, read_volume

    if not Path(seg_file).is_file():
        problem = "no such file" if not Path(seg_file).exists() else "is a folder; give the DICOM SEG file"
        raise InputError(f"{seg_file}: {problem}")
    try:
        ds = pydicom.dcmread(str(seg_file))
    except pydicom.errors.InvalidDicomError:
        raise InputError(f"{seg_file} is not a DICOM file; give a DICOM SEG") from None
    if getattr(ds, "Modality", "") != "SEG":
        raise InputError(f"{seg_file} is not a DICOM SEG (modality {getattr(ds, 'Modality', '?')!r})")
    referenced = [str(r.SeriesInstanceUID) for r in ds.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in r]
    if referenced and dicom_series.is_dicom_input(Path(series)):
        listing = dicom_series.list_series(series)  # once: read_volume would read every header of the study again
        held = {s.series_instance_uid: s.key for s in listing}
        series_uid = next((uid for uid in referenced if uid in held), None)
        ct = read_volume(series, series_uid=series_uid, listing=listing) if series_uid else _uidless_series(ds, series, listing)
        if ct is None:
            holds = ", ".join(s.series_instance_uid or f"{s.key} (no SeriesInstanceUID)" for s in listing)
            raise InputError(f"{seg_file} segments series {', '.join(referenced)}, which {series} does not hold; "
                             f"it holds: {holds or 'no series'}")
    else:
        ct = read_volume(series)
    names = {int(s.SegmentNumber): canonical_target_name(str(s.SegmentLabel)) for s in ds.SegmentSequence}
    frames = ds.pixel_array.reshape(-1, int(ds.Rows), int(ds.Columns))
    if str(getattr(ds, "SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        # fractions in 0..MaximumFractionalValue: a voxel is in the segment when at least half of it is
        frames = frames.astype(np.float64) >= float(getattr(ds, "MaximumFractionalValue", 255)) / 2
    else:
        frames = frames > 0
    inverse = np.linalg.inv(ct.ijk_to_lps()[:3, :3])
    origin = np.asarray(ct.origin)
    placed = []
    size: dict[int, int] = {}
    shared = ds.SharedFunctionalGroupsSequence[0] if "SharedFunctionalGroupsSequence" in ds else {}

    def value(n: int, frame_groups: Any, sequence: str, keyword: str) -> Any:  # per frame, else shared (highdicom: one segment)
        for where in (frame_groups, shared):
            items = where.get(sequence)
            if items and keyword in items[0]:
                return items[0].get(keyword)
        raise InputError(f"{seg_file}: frame {n} has no {keyword} ({sequence}) in its per-frame or shared functional groups")

    for n, (frame, groups) in enumerate(zip(frames, ds.PerFrameFunctionalGroupsSequence), start=1):
        number = int(value(n, groups, "SegmentIdentificationSequence", "ReferencedSegmentNumber"))
        position = np.asarray(value(n, groups, "PlanePositionSequence", "ImagePositionPatient"), dtype=float)
        i, j, k = np.round(inverse @ (position - origin)).astype(int)
        if (i, j) != (0, 0) or not 0 <= k < ct.shape[0] or frame.shape != ct.shape[1:]:
            raise InputError(f"{seg_file}: a frame does not lie on a slice of the CT grid; resample the SEG first")
        placed.append((number, k, frame))
        size[number] = size.get(number, 0) + int(frame.sum())
    labels = np.zeros(ct.shape, dtype=np.min_scalar_type(max(size, default=0)))  # segment numbers go up to 65535
    # overlapping segments (a partition is needed): the smaller segment wins, so a lesion inside its
    # organ survives whatever the segment order (the organ's name includes its lesions)
    for number, k, frame in sorted(placed, key=lambda p: -size[p[0]]):
        labels[k][frame] = number
    return LabelledCase(Path(series).name, ct, ct.with_array(labels, modality="SEG"), names, licence=licence)


def _uidless_series(ds: Any, series: Union[str, Path], listing: Sequence[Any]) -> Optional[Volume]:
    """The series without a SeriesInstanceUID whose images the SEG references (ReferencedInstanceSequence), if any.

    Why: a SEG made on an anonymised series (``textsegment batch`` writes one) references a UID
    generated for it, which no file of the series holds; its instance UIDs still match.
    """
    from ..io import read_volume

    instances = {str(i.ReferencedSOPInstanceUID) for r in ds.get("ReferencedSeriesSequence", [])
                 for i in r.get("ReferencedInstanceSequence", []) if "ReferencedSOPInstanceUID" in i}
    for info in listing:
        if instances and info.is_image and not info.series_instance_uid:
            ct = read_volume(series, series_uid=info.key, listing=listing)
            if instances & set(ct.dicom.sop_instance_uids):
                return ct
    return None


def load_source(spec: str, *, failed: Optional[list[dict[str, str]]] = None) -> list[LabelledCase]:
    """Cases from one source spec, the form the CLI and recipes use:

    ``phantoms:0-47`` (seeds, ``a-b`` inclusive or ``a,b,c``; ``@32x128x128`` sets the grid),
    ``totalseg:CT,SEG,CLASSMAP``, ``msd:FOLDER``, ``dicomseg:SERIES,SEG``. ``failed`` collects the
    bad entries of an MSD task instead of raising (see ``load_msd_task``).
    """
    kind, _, rest = spec.partition(":")
    if kind == "phantoms":
        seeds_text, _, grid = rest.partition("@")
        return phantom_cases(parse_seeds(seeds_text), shape=parse_grid(grid))
    parts = rest.split(",")
    if kind == "totalseg" and len(parts) == 3:
        return [load_totalsegmentator_case(*parts)]
    if kind == "msd" and rest:
        return load_msd_task(rest, failed=failed)
    if kind == "dicomseg" and len(parts) == 2:
        return [load_dicom_seg_case(*parts)]
    raise InputError(f"unknown data source {spec!r}; use phantoms:0-47, totalseg:CT,SEG,CLASSMAP, msd:FOLDER or dicomseg:SERIES,SEG")


def parse_seeds(text: str) -> list[int]:
    """``"0-3"`` → [0, 1, 2, 3]; ``"1,5,9"`` → [1, 5, 9].

    A part that is no seed, or a backwards range, is an error naming it: skipped, it would train on
    other data than the recipe says.
    """
    seeds: list[int] = []
    for part in filter(None, text.split(",")):
        a, sep, b = part.partition("-")
        try:
            first, last = int(a), int(b) if sep else int(a)
        except ValueError:
            raise InputError(f"bad phantom seeds {part!r} in {text!r}; write e.g. 0-47 or 1,5,9") from None
        if last < first:
            raise InputError(f"backwards seed range {part!r} in {text!r}; write {last}-{first}")
        seeds += range(first, last + 1)
    if not seeds:
        raise InputError(f"no phantom seeds in {text!r}; write e.g. 0-47")
    return seeds


def parse_grid(text: str) -> tuple[int, ...]:
    """``"32x128x128"`` → (32, 128, 128), the phantom grid after ``@``; empty: that default."""
    if not text:
        return (32, 128, 128)
    try:
        shape = tuple(int(v) for v in text.split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise InputError(f"bad phantom grid {text!r}; write three positive sizes, e.g. @32x128x128")
    return shape


def source_keys(spec: str) -> dict[Any, str]:
    """What a source spec draws on, without loading it: phantom (seed, grid) pairs or resolved paths, each with a name.

    A TotalSegmentator class map is left out: many cases share one.
    """
    kind, _, rest = spec.partition(":")
    if kind == "phantoms":
        seeds_text, _, grid = rest.partition("@")
        shape = parse_grid(grid)
        return {(seed, shape): f"phantom seed {seed} at {'x'.join(map(str, shape))}" for seed in parse_seeds(seeds_text)}
    paths = {"totalseg": rest.split(",")[:2], "msd": [rest], "dicomseg": rest.split(",")}.get(kind, [])
    return {Path(p).resolve(): str(p) for p in paths if p}


def check_sources(sources: Sequence[str], val_sources: Sequence[str]) -> None:
    """Refuse training and validation sources that share a case; warn on the held-out bench seeds.

    Why: validating on a trained case flatters the curves and the choice of the best weights, and
    phantoms from ``HELD_OUT_SEED`` on are what ``textsegment bench`` scores models on by default.
    """
    trained = {k: v for s in sources for k, v in source_keys(s).items()}
    validated = {k: v for s in val_sources for k, v in source_keys(s).items()}

    pairs = [(a, a) for a in trained if a in validated]  # the same phantom or file
    paths = [b for b in validated if isinstance(b, Path)]
    pairs += [(a, b) for a in trained if isinstance(a, Path)  # a file inside a folder (msd:FOLDER)
              for b in paths if a in b.parents or b in a.parents]
    shared = [trained[a] if trained[a] == validated[b] else f"{trained[a]} / {validated[b]}" for a, b in pairs]
    if shared:
        more = f" and {len(shared) - 5} more" if len(shared) > 5 else ""
        raise InputError(f"training and validation sources overlap: {', '.join(shared[:5])}{more}; "
                         f"validate on other cases (the recipes train on phantoms 0-79 and validate on 1000-1003)")
    for name, keys in (("training", trained), ("validation", validated)):
        held_out = sorted(k[0] for k in keys if isinstance(k, tuple) and k[0] >= HELD_OUT_SEED)
        if held_out:
            log.warning("%s uses phantom seeds %s, the held-out seeds (%d on) that textsegment bench tests on "
                        "(--seed %d): its scores of this model would flatter it", name,
                        held_out[0] if len(held_out) == 1 else f"{held_out[0]}-{held_out[-1]}", HELD_OUT_SEED,
                        HELD_OUT_SEED)


def align_labels(labels: Volume, ct: Volume) -> Volume:
    """The label map resampled (nearest neighbour) onto the CT grid, e.g. a y-flipped storage.

    It must cover the whole CT, give or take one of its voxels at the edge: CT outside it would be
    trained and scored as unlabelled background (a cropped, transposed or coarser-extent map).
    """
    import SimpleITK as sitk

    def image(volume: Volume, array: np.ndarray) -> "sitk.Image":
        img = sitk.GetImageFromArray(array)
        img.SetSpacing(volume.spacing)
        img.SetOrigin(volume.origin)
        img.SetDirection(tuple(float(v) for v in np.asarray(volume.direction).ravel()))
        return img

    def grid(volume: Volume) -> str:
        return f"{'x'.join(map(str, volume.shape))} voxels of {'x'.join(f'{v:g}' for v in volume.spacing[::-1])} mm"

    def resample(img: "sitk.Image") -> np.ndarray:  # nearest neighbour, the edge value carried past the edge
        return sitk.GetArrayFromImage(sitk.Resample(img, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                    img.GetPixelID(), True))

    reference = image(ct, np.zeros(ct.shape, dtype=np.uint8))
    array = resample(image(labels, np.asarray(labels.array))).astype(labels.array.dtype)
    if np.any(labels.array) and not array.any():
        raise InputError(f"{labels.source or 'the label map'}: its labelled voxels lie outside the CT "
                         f"{ct.source or ''} in physical space; is it the label map of another image?")
    extent = sitk.ConstantPad(image(labels, np.ones(labels.shape, dtype=np.uint8)), [1, 1, 1], [1, 1, 1], 1)
    covered = sitk.GetArrayFromImage(sitk.Resample(extent, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
    if not covered.all():
        raise InputError(f"{labels.source or 'the label map'}: covers only {100 * covered.mean():.0f}% of the CT "
                         f"{ct.source or ''} (z x y x x: its grid {grid(labels)}, the CT's {grid(ct)}); the rest would "
                         "count as unlabelled. Give the label map of the whole CT, or crop the CT to it")
    return ct.with_array(array, modality="SEG")


# --------------------------------------------------------------------------------------- pool


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S) in [0, 1]
    masks: torch.Tensor  # (B, 1, S, S) float {0, 1}
    prompts: list[str]
    levels: list[str]


@dataclass
class SlicePool:
    """Model-ready slices of many cases, their label ids, and each case's prompts."""

    images: torch.Tensor  # (N, 3, S, S) float16
    labels: torch.Tensor  # (N, S, S) int16
    case_of: np.ndarray  # (N,) case index of each slice
    prompts: list[list[Prompt]]  # per case
    label_names: list[dict[int, str]]  # per case
    case_weight: np.ndarray  # (cases,) relative sampling weight
    present: list[list[np.ndarray]] = field(default_factory=list)  # per case, per prompt: slice ids with a non-empty mask
    difficulty: dict[str, float] = field(default_factory=dict)  # prompt text -> running 1 - soft Dice (see record)

    @property
    def size(self) -> int:
        return int(self.images.shape[-1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def mask(self, index: int, prompt: Prompt) -> np.ndarray:
        return ground_truth(prompt, self.labels[index].numpy(), self.label_names[int(self.case_of[index])])

    def sample(
        self, rng: np.random.Generator, batch_size: int, *, level_weights: Mapping[str, float] = LEVEL_WEIGHTS,
        present_fraction: float = 0.8, hard_mining: float = 0.0,
    ) -> list[tuple[int, Prompt]]:
        """(slice, prompt) pairs: a level by weight, a case having it, a prompt, then a slice.

        With probability ``present_fraction`` the slice shows the target; otherwise any slice of the
        case (often one without it, whose mask is empty). ``hard_mining`` (0–1) is the share of the
        prompt choice that follows each prompt's running difficulty (``record``) instead of being
        uniform; 0 draws exactly the pairs it drew before the option existed.
        """
        levels, chances = self.level_chances(level_weights)
        picks = []
        for level in rng.choice(levels, size=batch_size, p=chances):
            cases = [c for c, ps in enumerate(self.prompts) if any(p.level == level for p in ps)]
            w = self.case_weight[cases]
            case = int(rng.choice(cases, p=w / w.sum()))
            options = [i for i, p in enumerate(self.prompts[case]) if p.level == level]
            if hard_mining > 0:
                k = int(rng.choice(options, p=self.prompt_weights([self.prompts[case][i] for i in options], hard_mining)))
            else:
                k = int(rng.choice(options))
            shown = self.present[case][k]
            if level != "negative" and len(shown) and rng.random() < present_fraction:
                index = int(rng.choice(shown))
            else:
                index = int(rng.choice(np.flatnonzero(self.case_of == case)))
            picks.append((index, self.prompts[case][k]))
        return picks

    def level_chances(self, level_weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
        """The levels ``sample`` draws from and their probabilities.

        A level drawn must be in a case of positive weight: with ``real_fraction`` 0 or 1 one kind of
        case weighs nothing, and a level only it has is left out like one no case has. No weight left
        is an error here rather than NaN probabilities in numpy.
        """
        check_level_weights(level_weights)
        drawable = {p.level for ps, w in zip(self.prompts, self.case_weight) if w > 0 for p in ps}
        levels = [lv for lv in level_weights if lv in drawable]
        weights = np.array([level_weights[lv] for lv in levels], dtype=float)
        if not weights.sum() > 0:
            raise InputError(f"level weights {dict(level_weights)} give no level of these cases a positive weight; "
                             f"they have {sorted(drawable)} (in cases that real_fraction does not weigh zero)")
        return levels, weights / weights.sum()

    def prompt_weights(self, prompts: Sequence[Prompt], hard_mining: float) -> np.ndarray:
        """Choice probabilities: ``(1 - h) · uniform + h · difficulty / sum(difficulty)``.

        Why a mixture: pure difficulty sampling would all but stop showing the solved structures,
        and a model fine-tuned that way forgets them.
        """
        d = np.array([self.difficulty.get(p.text, DIFFICULTY_PRIOR) for p in prompts], dtype=float)
        uniform = np.full(len(d), 1.0 / len(d))
        hard = d / d.sum() if d.sum() > 0 else uniform
        p = (1 - hard_mining) * uniform + hard_mining * hard
        return p / p.sum()

    def record(self, picks: Sequence[tuple[int, Prompt]], losses: Sequence[float]) -> None:
        """Fold each scored sample's ``1 - soft Dice`` into its prompt's running difficulty.

        NaN (an empty mask: nothing to score) leaves the prompt as it was.
        """
        for (_, prompt), loss in zip(picks, losses):
            loss = float(loss)
            if math.isfinite(loss):
                old = self.difficulty.get(prompt.text, DIFFICULTY_PRIOR)
                self.difficulty[prompt.text] = old + DIFFICULTY_RATE * (loss - old)

    def batch(self, picks: Sequence[tuple[int, Prompt]]) -> Batch:
        indices = torch.tensor([i for i, _ in picks])
        masks = np.stack([self.mask(i, p) for i, p in picks])
        return Batch(
            images=self.images[indices].float(),
            masks=torch.from_numpy(masks).float()[:, None],
            prompts=[p.text for _, p in picks],
            levels=[p.level for _, p in picks],
        )


def build_pool(
    cases: Sequence[LabelledCase], *, size: int, pyramid_seeds: Sequence[int] = (0, 1, 2), real_fraction: Optional[float] = None
) -> SlicePool:
    """Axial slices of every case at model size, plus each case's merged prompt pyramids.

    ``real_fraction`` (when there are both kinds) is the share of samples drawn from real cases;
    otherwise every case weighs the same.
    """
    check_real_fraction(real_fraction)
    images, labels, case_of, prompts, names = [], [], [], [], []
    for c, case in enumerate(cases):
        plan = slice_plan(case.ct, axis="axial")
        hu = plan.extract(case.ct.array)
        lab = plan.extract(np.asarray(case.labels.array).astype(np.int16))
        keep = hu.reshape(len(hu), -1).max(axis=1) > AIR_HU
        hu, lab = hu[keep], lab[keep]
        fitted, _ = fit_to_square(torch.from_numpy(window_composite(hu)), size=size, pixel_spacing=plan.pixel_spacing)
        fitted_labels, _ = fit_to_square(torch.from_numpy(lab), size=size, pixel_spacing=plan.pixel_spacing, mode="nearest")
        images.append(fitted.half())
        labels.append(fitted_labels.to(torch.int16))
        case_of.append(np.full(len(hu), c))
        merged: dict[tuple[str, str], Prompt] = {}
        for seed in pyramid_seeds:
            for p in build_prompt_pyramid(case.labels, case.label_names, seed=int(seed), max_l2_per_target=99,
                                          absent=4, nonsense=2, min_voxels=20):
                merged.setdefault((p.text, p.level), p)
        prompts.append(list(merged.values()))
        names.append(dict(case.label_names))
    weight = np.ones(len(cases))
    real = np.array([not c.synthetic for c in cases])
    if real_fraction is not None and real.any() and (~real).any():
        weight[real] = real_fraction / real.sum()
        weight[~real] = (1 - real_fraction) / (~real).sum()
    pool = SlicePool(torch.cat(images), torch.cat(labels), np.concatenate(case_of), prompts, names, weight)
    offsets = np.cumsum([0] + [len(c) for c in case_of])
    for c, case_prompts in enumerate(pool.prompts):
        names = pool.label_names[c]
        shown = labels_per_slice(pool.labels[offsets[c] : offsets[c + 1]].numpy(), max(map(int, names), default=0))
        pool.present.append([offsets[c] + np.flatnonzero(shown[:, p.target.label_ids(names)].any(axis=1))
                             for p in case_prompts])
    log.info("slice pool: %d slices from %d cases, %d prompts", len(pool), len(cases), sum(map(len, prompts)))
    return pool


def check_level_weights(level_weights: Mapping[str, float]) -> None:
    """Level weights are finite, non-negative, of the known levels, and not all zero: else nothing can be sampled."""
    unknown = sorted(set(level_weights) - set(LEVEL_WEIGHTS))
    if unknown:
        raise InputError(f"unknown level(s) {unknown} in level_weights; the levels are {', '.join(LEVEL_WEIGHTS)}")
    bad = {lv: w for lv, w in level_weights.items() if not (math.isfinite(w) and w >= 0)}
    if bad:
        raise InputError(f"level weights must be finite and non-negative, got {bad}")
    if not sum(level_weights.values()) > 0:
        raise InputError(f"level weights {dict(level_weights)} are all zero: nothing to sample; give a level a positive weight")


def check_real_fraction(real_fraction: Optional[float]) -> None:
    """``real_fraction`` is a share in [0, 1] (or None: every case weighs the same)."""
    if real_fraction is not None and not 0.0 <= real_fraction <= 1.0:
        raise InputError(f"real_fraction must lie in [0, 1], got {real_fraction}")


def labels_per_slice(labels: np.ndarray, max_label: int = 0) -> np.ndarray:
    """(S, max id + 1) booleans: which label values each slice of an (S, H, W) label map shows.

    Labels are a partition, so every target is a union of label values and a slice shows it when
    it shows any of them. One bincount per case replaces a full mask per prompt: 13,000 masks,
    one per prompt of every case, took 64 s at the start of each tgcnet-tiny phase.
    """
    count = max(int(labels.max(initial=0)), int(max_label)) + 1
    per_slice = labels.reshape(len(labels), -1).astype(np.int64) + (np.arange(len(labels)) * count)[:, None]
    return np.bincount(per_slice.ravel(), minlength=len(labels) * count).reshape(len(labels), count) > 0


# --------------------------------------------------------------------------------------- augmentation

_SIDE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_prompt(text: str) -> str:
    """Swap 'left' and 'right' (keeping case): the prompt that matches a left–right mirrored image."""

    def swap(match: re.Match) -> str:
        word = match.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():  # "LEFT KIDNEY": a report's headings are often in capitals
            return other.upper()
        return other.capitalize() if word[0].isupper() else other

    return _SIDE.sub(swap, text)


def augment(batch: Batch, rng: np.random.Generator, *, flip_prob: float = 0.0, scale: float = 0.1,
            rotate_deg: float = 8.0, shift: float = 0.06, intensity: float = 0.05) -> Batch:
    """Anatomy-respecting augmentation: small affine moves, mild contrast jitter, optional mirror.

    A mirror (``flip_prob``) swaps 'left'/'right' in the prompt so the pair stays true; it is off by
    default because a mirrored trunk shows the liver on the wrong side (situs inversus).
    """
    n = batch.images.shape[0]
    angle = np.deg2rad(rng.uniform(-rotate_deg, rotate_deg, n))
    zoom = 1.0 + rng.uniform(-scale, scale, n)
    mirror = rng.random(n) < flip_prob
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0] = np.cos(angle) / zoom * np.where(mirror, -1, 1)
    theta[:, 0, 1] = -np.sin(angle) / zoom
    theta[:, 1, 0] = np.sin(angle) / zoom * np.where(mirror, -1, 1)
    theta[:, 1, 1] = np.cos(angle) / zoom
    theta[:, :, 2] = rng.uniform(-shift, shift, (n, 2)) * 2
    grid = F.affine_grid(torch.tensor(theta, dtype=torch.float32), list(batch.images.shape), align_corners=False)
    images = F.grid_sample(batch.images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(batch.masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    gain = torch.tensor(1.0 + rng.uniform(-intensity, intensity, (n, 1, 1, 1)) * 2, dtype=torch.float32)
    offset = torch.tensor(rng.uniform(-intensity, intensity, (n, 1, 1, 1)), dtype=torch.float32)
    images = (images * gain + offset).clamp_(0, 1)
    prompts = [mirror_prompt(p) if m else p for p, m in zip(batch.prompts, mirror)]
    return Batch(images, masks, prompts, list(batch.levels))
