"""The curated prompt table (``data/prompt_descriptions.json``): names, aliases, L2 phrasings, L3 compositions.

Kept as data so adding a target or a phrasing is editing JSON, not code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

from .targets import Target


@dataclass(frozen=True)
class Description:
    text: str
    aspect: str  # location | shape | appearance
    source: str


@dataclass(frozen=True)
class Entry:
    """One canonical target: L1 names (the first is the display name), lookup-only aliases, L2 phrasings."""

    name: str
    names: tuple[str, ...]
    aliases: tuple[str, ...]
    descriptions: tuple[Description, ...]


@dataclass(frozen=True)
class Composition:
    """An L3 template: offered when every name in ``requires`` has voxels in the map."""

    text: str
    target: Target
    requires: tuple[str, ...]
    source: str


@dataclass(frozen=True)
class PromptTable:
    entries: dict[str, Entry]
    compositions: tuple[Composition, ...]
    totalsegmentator_names: tuple[str, ...]


@lru_cache(maxsize=1)
def prompt_table() -> PromptTable:
    raw: dict[str, Any] = json.loads(
        resources.files("TextSegmentLib").joinpath("data/prompt_descriptions.json").read_text(encoding="utf-8")
    )
    entries = {
        name: Entry(
            name=name,
            names=tuple(e["names"]),
            aliases=tuple(e.get("aliases", ())),
            descriptions=tuple(Description(d["text"], d["aspect"], d["source"]) for d in e.get("descriptions", ())),
        )
        for name, e in raw["targets"].items()
    }
    compositions = tuple(
        Composition(
            text=c["text"],
            target=Target(include=tuple(c["include"]), exclude=tuple(c.get("exclude", ()))),
            requires=tuple(c.get("requires") or (*c["include"], *c.get("exclude", ()))),
            source=c.get("source", "ours"),
        )
        for c in raw["compositions"]
    )
    return PromptTable(entries=entries, compositions=compositions,
                       totalsegmentator_names=tuple(raw.get("totalsegmentator_total", ())))
