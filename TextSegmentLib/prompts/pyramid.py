"""SemantiBench-style prompt pyramids for a label map, without an LLM.

L1 atomic names, L2 descriptive phrasings (location, shape, CT appearance) from the curated
table, L3 exclusionary/compositional prompts whose ground truth is mask algebra, and negative
controls: structures absent from the map (empty ground truth) and nonsense text. Only targets
with voxels are asked for, so every L1–L3 ground truth is non-empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .names import display_name
from .table import prompt_table
from .targets import COMPOSITES, PARTS, LabelNames, Prompt, Target, expand, names_by_id

OUT_OF_VIEW = ("brain", "thyroid_gland", "prostate", "urinary_bladder", "femur_left", "femur_right", "sacrum")

NONSENSE = (
    "purple elephant",
    "the quarterly tax report",
    "a bicycle wheel",
    "zxqv blorft",
    "the smell of rain",
    "a cup of coffee",
)


def build_prompt_pyramid(
    label_map: Any,
    label_names: LabelNames,
    *,
    seed: int = 0,
    max_l2_per_target: int = 3,
    absent: int = 3,
    nonsense: int = 1,
    min_voxels: int = 1,
) -> list[Prompt]:
    """Prompts for every target present in ``label_map`` (array or ``Volume``), plus controls.

    ``seed`` picks which L2 phrasings, absent structures and nonsense prompts appear, so a
    training loop sees varied phrasings while a benchmark stays reproducible. Labels with fewer
    than ``min_voxels`` voxels (a sliver at the edge of the view) are neither asked for nor
    used as negatives.
    """
    for name, count in (("absent", absent), ("nonsense", nonsense)):
        if count < 0:  # order[:-1] would silently drop the last negatives instead
            raise InputError(f"{name} must be a count of negative prompts (0 or more), got {count}")
    rng = np.random.default_rng(seed)
    table = prompt_table()
    names = names_by_id(label_names)
    array = np.asarray(getattr(label_map, "array", label_map))
    counts = np.bincount(array.ravel().astype(np.int64), minlength=max(names, default=0) + 1)
    count = {n: int(counts[i]) if 0 < i < len(counts) else 0 for i, n in names.items()}
    present = {n for n, c in count.items() if c >= max(min_voxels, 1)}
    sliver = {n for n, c in count.items() if 0 < c < min_voxels}

    def has_voxels(target: Target) -> bool:
        return bool(target.labels(present))

    prompts: list[Prompt] = []
    for name in _present_targets(names, present):
        level = "L3" if name in PARTS else "L1"
        entry = table.entries.get(name)
        target = Target((name,))
        for i, text in enumerate(entry.names if entry else (display_name(name),)):
            prompts.append(Prompt(text, level, target, "canonical name" if i == 0 else "common name"))
        descriptions = entry.descriptions if entry else ()
        if descriptions and max_l2_per_target > 0:
            chosen = sorted(rng.choice(len(descriptions), size=min(max_l2_per_target, len(descriptions)), replace=False))
            prompts += [Prompt(descriptions[i].text, "L3" if name in PARTS else "L2", target, descriptions[i].source)
                        for i in chosen]

    for comp in table.compositions:
        if all(expand(r, present) for r in comp.requires) and has_voxels(comp.target):
            prompts.append(Prompt(comp.text, "L3", comp.target, comp.source))

    # Negatives must be absent from the *image*, not merely unlabelled (a phantom's lung has lobes):
    # labels the map declares but leaves empty first, then structures never in an abdominal view.
    declared = set(names.values()) - {"background"}
    empty = sorted(n for n in {*declared, *COMPOSITES} if expand(n, declared) and not expand(n, present | sliver))
    outside = sorted(n for n in OUT_OF_VIEW if not expand(n, declared))
    order = [*rng.permutation(empty), *rng.permutation(outside)]
    for name in map(str, order[:absent]):
        prompts.append(Prompt(display_name(name), "negative", Target((name,)), "absent structure"))
    for i in rng.choice(len(NONSENSE), size=min(nonsense, len(NONSENSE)), replace=False):
        prompts.append(Prompt(NONSENSE[i], "negative", Target(), "nonsense"))
    return prompts


_LESION_WORDS = frozenset({"tumor", "cyst", "nodule", "lesion", "metastasis", "cancer"})


def _present_targets(names: dict[int, str], present: set[str]) -> list[str]:
    """Present labels in label order, then composite groups that have voxels but are not labels.

    An organ group is offered only when some of its organ is labelled, not just a lesion in it: a
    SEG holding a kidney tumour alone would otherwise ask for "kidneys" with the tumour as truth.
    """
    labels = [n for _, n in sorted(names.items()) if n in present]
    groups = [
        g for g in COMPOSITES
        if g not in present and (members := expand(g, present))
        and (_is_lesion(g) or not all(_is_lesion(m) for m in members))
    ]
    return labels + groups


def _is_lesion(name: str) -> bool:
    return not _LESION_WORDS.isdisjoint(name.split("_"))
