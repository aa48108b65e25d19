"""From typed text to canonical target names and targets.

Names are compared as *sets of normalised words*, so word order, case, punctuation, side
abbreviations and British spellings do not matter: "Left Kidney", "kidney (left)", "left-kidney"
and "L kidney" all become ``kidney_left``; a dotted abbreviation is its letters ("I.V.C." is "IVC").
Left and right always mean the patient's.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable, Optional

from .table import prompt_table
from .targets import GROUPS, LabelNames, Target, descendants, expand, names_by_id

SIDES = ("left", "right")
# an organ's adjective is its noun, so "pancreatic cancer" and "pancreas cancer" are one name (pancreas_tumor,
# which the pancreas includes); "hepatic vein" stays liver_vein, no member of the liver's group. ``colors``
# reads the same table to find the organ a finding lies in.
ORGAN_ADJECTIVES = {
    "oesophageal": "esophagus", "esophageal": "esophagus", "renal": "kidney", "hepatic": "liver",
    "pulmonary": "lung", "gastric": "stomach", "aortic": "aorta", "cardiac": "heart", "splenic": "spleen",
    "vertebral": "vertebrae", "suprarenal": "adrenal", "pancreatic": "pancreas", "colonic": "colon",
    "duodenal": "duodenum", "prostatic": "prostate", "cerebral": "brain",
}
_WORDS = {
    "l": "left", "lt": "left", "sinister": "left", "r": "right", "rt": "right", "dexter": "right",
    "tumour": "tumor", "lesion": "tumor", "mass": "tumor", "neoplasm": "tumor", "cancer": "tumor",
    "carcinoma": "tumor", "centre": "core", "center": "core", "oesophagus": "esophagus",
    "vertebra": "vertebrae", "intestine": "bowel", **ORGAN_ADJECTIVES,
}
_STOPWORDS = {
    "the", "a", "an", "of", "in", "inside", "within", "both", "all", "whole", "entire", "its", "their", "this",
    "that", "one", "s", "patient", "segment", "segmentation", "show", "find", "please", "healthy", "normal",
    "parenchyma", "remaining", "rest",
}
_KEEP_S = ("ss", "us", "is", "as")
_DOTTED = re.compile(r"(?<![0-9a-z])[a-z](?:\.[a-z])+\.?(?![0-9a-z])")  # "i.v.c." is "ivc", as "l." is "l"

_EXCLUDE = re.compile(r"\s*,?\s*\b(?:excluding|without|but not|except for|except|minus|sparing|other than|"
                      r"not including|apart from|and not|not)\b\s*")
_UNION = re.compile(r"\s*(?:,\s*(?:and\s+)?|&|\b(?:and|plus|together with|along with|as well as|including|with)\b)\s*")
_PART_OF = re.compile(r"\s+\b(?:of|in|inside|within)\b\s+")


def words(text: str) -> tuple[str, ...]:
    """Normalised words of a name: lower case, singular, American spelling, sides spelled out."""
    out = []
    text = _DOTTED.sub(lambda m: m.group().replace(".", ""), text.lower())
    for w in re.split(r"[^0-9a-z]+", text):
        if not w:
            continue
        if w.endswith("ies") and len(w) > 4:
            w = w[:-3] + "y"
        elif w.endswith("s") and len(w) > 3 and not w.endswith(_KEEP_S):
            w = w[:-1]
        w = _WORDS.get(w, w)
        if w not in _STOPWORDS:
            out.append(w)
    return tuple(out)


def canonical_target_name(text: str, *, known: Optional[Iterable[str]] = None) -> str:
    """The canonical snake_case name of a typed target name.

    Known names come from the curated table, the phantom, TotalSegmentator's classes and
    ``known`` (e.g. a label map's own names). Unknown text comes back normalised (lower-case
    snake_case, side last), so a dictionary lookup keyed by canonical names simply misses.
    """
    found = find_target_name(text, known=known)
    if found:
        return found
    w = words(text)
    return "_".join([x for x in w if x not in SIDES] + [x for x in w if x in SIDES])


def find_target_name(text: str, *, known: Optional[Iterable[str]] = None) -> Optional[str]:
    """The canonical name ``text`` stands for, or None when it is not a known target name."""
    key = _name_key(text)
    if known:
        extra = {_name_key(n): n for n in known}  # keyed as the text is: "caudate_lobe" is found by "caudate lobe"
        if key in extra:
            return extra[key]
    return _vocabulary().get(key)


def _name_key(text: str) -> frozenset:
    """A name's words as a set; a lobe is a lung's unless named otherwise ("left lower lobe")."""
    w = set(words(text))
    if "lobe" in w:
        w.add("lung")
    return frozenset(w)


def display_name(name: str) -> str:
    """How a canonical name reads in a prompt: the table's first name, else words with the side first."""
    entry = prompt_table().entries.get(name)
    if entry:
        return entry.names[0]
    parts = name.split("_")
    if parts[0] == "vertebrae" and len(parts) == 2:  # vertebrae_L1 -> "L1 vertebra"
        return f"{parts[1]} vertebra"
    return " ".join([p for p in parts if p in SIDES] + [p for p in parts if p not in SIDES])


def resolve_target(text: str, *, label_names: Optional[LabelNames] = None) -> Optional[Target]:
    """The target a free-text prompt asks for, or None when it cannot be understood.

    Understands names and aliases, unions ("liver and spleen"), exclusions ("left kidney but not
    the cyst", "lungs excluding the left lower lobe"), parts ("necrotic core of the hepatic
    lesion", "upper lobes of both lungs") and every phrasing in the curated table.
    """
    known = tuple(names_by_id(label_names).values()) if label_names else ()
    clean = " ".join(text.lower().split()).strip(" .")
    exact = _phrasebook().get(clean) or _phrasebook().get(" ".join(words(clean)))
    if exact:
        return exact
    whole = find_target_name(clean, known=known)
    if whole:
        return Target((whole,))
    pieces = _EXCLUDE.split(clean, maxsplit=1)
    if len(pieces) == 2 and pieces[0] and pieces[1]:
        include = _union(pieces[0], context=(), known=known)
        exclude = _union(pieces[1], context=include, known=known) if include else None
        if include and exclude:
            return Target(include, exclude)
    else:
        include = _union(clean, context=(), known=known)
        if include:
            return Target(include)
    return None


# --- helpers ----------------------------------------------------------------------------------


def _union(text: str, *, context: tuple[str, ...], known: tuple[str, ...]) -> Optional[tuple[str, ...]]:
    """Names joined by and/plus/commas; each resolved within ``context`` first (for exclusions)."""
    whole = _piece(text, context=context, known=known)
    if whole:
        return whole
    pieces = [p.strip() for p in _UNION.split(text) if p.strip()]
    found = [_piece(p, context=context, known=known) for p in pieces]
    resolved = tuple(n for f in found if f for n in f)
    for i, f in enumerate(found):  # "liver and the tumor": the tumour *of the liver*
        if not f:
            found[i] = _piece(pieces[i], context=resolved, known=known) if resolved else None
    if not all(found):
        return None
    return _simplest([n for f in found for n in f], known)


def _piece(text: str, *, context: tuple[str, ...], known: tuple[str, ...]) -> Optional[tuple[str, ...]]:
    w = set(words(text))
    if not w:
        return None
    if context and w <= set(SIDES):  # "right kidney, not the left one"
        side = next(iter(w)) if len(w) == 1 else None
        base = [x for x in words(context[0]) if x not in SIDES]
        name = find_target_name(" ".join(base + [side]), known=known) if side else None
        return (name,) if name else None
    if context:  # "left kidney but not the cyst": the cyst *of the left kidney*
        vocab = _all_names(known)
        exact = find_target_name(text, known=known)  # "body excluding the lungs": the lungs, not every name with "lung"
        if exact and any(exact == c or exact in descendants(c, vocab) for c in context):
            return (exact,)
        inner = [d for c in context for d in descendants(c, vocab) if w <= set(words(d))]
        if inner:
            return _simplest(inner, known)
    name = find_target_name(text, known=known)
    if name:
        return (name,)
    part = _PART_OF.split(text, maxsplit=1)
    if len(part) == 2:  # "necrotic core of the hepatic lesion": best word overlap inside the whole
        wholes = _union(part[1], context=(), known=known)
        if wholes:
            want = set(words(part[0])) - set(SIDES)
            scored = [(len(want & set(words(d))), d) for c in wholes for d in descendants(c, _all_names(known))]
            best = max((s for s, _ in scored), default=0)
            if best:
                return _simplest([d for s, d in scored if s == best], known)
            name = find_target_name(part[0], known=known)  # "the nodule in the left lung"
            if name and _near(name, wholes, known):  # not "the cyst in the liver" -> kidney cyst
                return (name,)
    return None


def _near(name: str, wholes: tuple[str, ...], known: tuple[str, ...]) -> bool:
    """``name`` lies in one of ``wholes`` or in a group holding one (a lung's nodule is in "lungs").

    Groups of every label ("body") are no evidence: everything lies in the body. A map's own label
    that the table does not know ("caudate_lobe") has no groups to check, so it is taken as named.
    """
    if name in known and name not in _vocabulary().values():
        return True
    vocab = _all_names(known)
    groups = [g for g, members in GROUPS.items() if "*" not in members]
    for whole in wholes:
        scopes = [whole, *(g for g in groups if whole in descendants(g, vocab))]
        if any(name == s or name in descendants(s, vocab) for s in scopes):
            return True
    return False


def _simplest(names: list[str], known: tuple[str, ...]) -> tuple[str, ...]:
    """Drop names already covered by another one (``liver_tumor`` covers its core and rim)."""
    vocab = _all_names(known)
    unique = list(dict.fromkeys(names))
    cover = {n: expand(n, vocab) | {n} for n in unique}
    return tuple(n for n in unique if not any(m != n and cover[n] < cover[m] for m in unique))


def _all_names(known: tuple[str, ...]) -> set[str]:
    return set(_vocabulary().values()) | set(known)


@lru_cache(maxsize=1)
def _vocabulary() -> dict[frozenset, str]:
    """Word set -> canonical name, from the table's names and aliases, groups and TotalSegmentator."""
    table = prompt_table()
    vocab: dict[frozenset, str] = {}

    def add(phrase: str, name: str) -> None:
        w = set(words(phrase))
        if "lobe" in w:
            w.add("lung")
        if w:
            vocab.setdefault(frozenset(w), name)

    for name, entry in table.entries.items():
        for phrase in (name, *entry.names, *entry.aliases):
            add(phrase, name)
    for name in (*GROUPS, *table.totalsegmentator_names):
        add(name, name)
    return vocab


def vocabulary_conflicts() -> list[tuple[str, str, str]]:
    """(phrase, first name, other name) for table phrases claimed by two targets: should be empty."""
    table = prompt_table()
    seen: dict[frozenset, str] = {}
    conflicts = []
    for name, entry in table.entries.items():
        for phrase in (name, *entry.names, *entry.aliases):
            key = frozenset(words(phrase))
            if seen.setdefault(key, name) != name:
                conflicts.append((phrase, seen[key], name))
    return conflicts


@lru_cache(maxsize=1)
def _phrasebook() -> dict[str, Target]:
    """Exact table phrasings (L2 descriptions, L3 compositions) -> their targets."""
    table = prompt_table()
    book: dict[str, Target] = {}
    for name, entry in table.entries.items():
        for d in entry.descriptions:
            book.setdefault(d.text.lower().strip(" ."), Target((name,)))
            book.setdefault(" ".join(words(d.text)), Target((name,)))
    for c in table.compositions:
        book.setdefault(c.text.lower().strip(" ."), c.target)
        book.setdefault(" ".join(words(c.text)), c.target)
    return book
