"""Targets as mask algebra over label names, so a prompt's ground truth is computed, never drawn.

A label map is a partition (each voxel one label), so ``Target(include=("liver",),
exclude=("liver_tumor",))`` is simply "voxels whose label is in the liver group but not in the
tumour group". Group names expand through ``GROUPS``: an organ includes its lesions (the liver
includes its tumour, a kidney its cyst), and TotalSegmentator's lobes and vertebrae roll up.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Union

import numpy as np

from ..errors import InputError

LEVELS = ("L1", "L2", "L3", "negative")

# name -> members; a member may be a glob over label names; "*" (every label) applies only when the
# name itself is a label of the map (the phantom's "body": the whole body outline).
GROUPS: dict[str, tuple[str, ...]] = {
    "body": ("*",),
    "liver": ("liver_tumor",),
    "liver_tumor": ("liver_tumor_necrotic_core", "liver_tumor_enhancing_rim"),
    # every organ includes its lesions, named as ``canonical_target_name`` names "<organ> tumour" (MSD Task07's
    # "cancer" is pancreas_tumor); a lesion's own name never includes its organ
    "pancreas": ("pancreas_tumor",),
    "spleen": ("spleen_tumor",),
    "kidney_left": ("kidney_cyst_left", "kidney_tumor_left"),
    "kidney_right": ("kidney_cyst_right", "kidney_tumor_right"),
    "kidneys": ("kidney_left", "kidney_right", "kidney_cyst", "kidney_tumor"),
    "kidney_cyst": ("kidney_cyst_left", "kidney_cyst_right"),
    "kidney_tumor": ("kidney_tumor_left", "kidney_tumor_right"),
    "adrenal_gland_left": ("adrenal_tumor_left", "adrenal_gland_tumor_left"),
    "adrenal_gland_right": ("adrenal_tumor_right", "adrenal_gland_tumor_right"),
    "adrenal_glands": ("adrenal_gland_left", "adrenal_gland_right", "adrenal_tumor", "adrenal_gland_tumor"),
    "colon": ("colon_tumor",),
    "urinary_bladder": ("urinary_bladder_tumor", "bladder_tumor"),
    "brain": ("brain_tumor",),
    "lung_left": ("lung_upper_lobe_left", "lung_lower_lobe_left"),
    "lung_right": ("lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right"),
    "lungs": ("lung_left", "lung_right", "lung_nodule"),
    "vertebrae": ("vertebrae_*",),
    "ribs": ("rib_left_*", "rib_right_*"),
    "heart": ("heart_*",),
    "bowel": ("duodenum", "small_bowel", "colon"),
}

# Groups people ask for by name ("kidneys", "hepatic lesion"): offered as L1 targets when present.
COMPOSITES = ("kidneys", "lungs", "lung_left", "lung_right", "liver_tumor", "kidney_cyst", "adrenal_glands",
              "vertebrae", "ribs", "heart", "bowel")

# Parts of a lesion: asking for them is already compositional, so the pyramid puts them at L3.
PARTS = ("liver_tumor_necrotic_core", "liver_tumor_enhancing_rim")

LabelNames = Mapping[Union[int, str], str]


@dataclass(frozen=True)
class Target:
    """Ground truth = union(include) minus union(exclude), over (group-expanded) label names."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field_name in ("include", "exclude"):
            value = getattr(self, field_name)
            object.__setattr__(self, field_name, (value,) if isinstance(value, str) else tuple(value))

    def labels(self, available: Iterable[str]) -> set[str]:
        """The label names of a partition that make up this target."""
        available = set(available)
        inc = set().union(*(expand(n, available) for n in self.include)) if self.include else set()
        exc = set().union(*(expand(n, available) for n in self.exclude)) if self.exclude else set()
        return inc - exc

    def label_ids(self, label_names: LabelNames) -> list[int]:
        """The label values (never 0, the background) whose union is this target's mask."""
        names = names_by_id(label_names)
        wanted = self.labels(names.values())
        return [i for i, n in names.items() if n in wanted and i > 0]

    def mask(self, label_map: Any, label_names: LabelNames) -> np.ndarray:
        array = np.asarray(getattr(label_map, "array", label_map))
        lut = np.zeros(max(int(array.max(initial=0)), max(names_by_id(label_names), default=0)) + 1, dtype=bool)
        lut[self.label_ids(label_names)] = True
        return lut[array]

    def to_dict(self) -> dict[str, list[str]]:
        return {"include": list(self.include), "exclude": list(self.exclude)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Target":
        return cls(include=tuple(data.get("include", ())), exclude=tuple(data.get("exclude", ())))

    def __str__(self) -> str:
        text = " ∪ ".join(self.include) or "∅"
        return f"{text} − {' ∪ '.join(self.exclude)}" if self.exclude else text


@dataclass(frozen=True)
class Prompt:
    """One text prompt with its level and the target its ground truth is computed from."""

    text: str
    level: str
    target: Target
    source: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise InputError(f"prompt {self.text!r}: level must be one of {', '.join(LEVELS)}, got {self.level!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "level": self.level, "target": self.target.to_dict(), "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Prompt":
        try:
            return cls(text=str(data["text"]), level=str(data["level"]), target=Target.from_dict(data.get("target", {})),
                       source=str(data.get("source", "")))
        except KeyError as exc:
            raise InputError(f"prompt entry {dict(data)!r} lacks the field {exc}; each needs 'text' and 'level'") from None


def names_by_id(label_names: LabelNames) -> dict[int, str]:
    """``{id: name}`` whether the keys came as ints or (from JSON) as strings."""
    try:
        return {int(k): str(v) for k, v in label_names.items()}
    except (TypeError, ValueError):
        raise InputError("label names must map integer label values to names, e.g. {1: 'liver'}") from None


def expand(name: str, available: Iterable[str]) -> set[str]:
    """The names in ``available`` that the (possibly group) ``name`` stands for."""
    available = set(available)
    found: set[str] = set()
    stack, seen = [name], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current in available:
            found.add(current)
        for member in GROUPS.get(current, ()):
            if member == "*":
                if current in available:
                    found |= available
            elif any(ch in member for ch in "*?["):
                found |= set(fnmatch.filter(available, member))
            else:
                stack.append(member)
    return found


def descendants(name: str, vocabulary: Iterable[str]) -> list[str]:
    """Every name inside a group, breadth first; globs are matched against ``vocabulary``."""
    vocabulary = sorted(set(vocabulary))
    out: list[str] = []
    queue = [name]
    while queue:
        current = queue.pop(0)
        for member in GROUPS.get(current, ()):
            members = fnmatch.filter(vocabulary, member) if any(ch in member for ch in "*?[") else [member]
            for m in members:
                if m != "*" and m not in out and m != name:
                    out.append(m)
                    queue.append(m)
    return out


def ground_truth(prompt_or_target: Union[Prompt, Target, str], label_map: Any, label_names: LabelNames) -> np.ndarray:
    """Boolean mask of a prompt's (or target's) ground truth on a label map (array or ``Volume``).

    A plain text ("left kidney excluding the cyst") is read by ``resolve_target``, as the prompt
    tables are; text it cannot read is an ``InputError``, not a wrong mask.
    """
    if isinstance(prompt_or_target, str):
        from .names import resolve_target

        target = resolve_target(prompt_or_target, label_names=label_names)
        if target is None:
            raise InputError(f"no ground truth for {prompt_or_target!r}: the text names no structure the prompt "
                             "tables know; pass a Target, e.g. Target(('liver',))")
    else:
        target = prompt_or_target.target if isinstance(prompt_or_target, Prompt) else prompt_or_target
    return target.mask(label_map, label_names)
