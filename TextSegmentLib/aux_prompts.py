"""Auxiliary knowledge prompts for TGC-Net's DATE text branch, without needing an LLM.

The paper enriches each prompt with an LLM-written description. We get the same kind of text from,
in order: the user (a second text field) → an LLM endpoint *only if the user configured one*
(``aux_llm``) → the curated table ``data/clinical_descriptions.json`` → a template for short target
names → the primary prompt itself. Every step can fail and hand over to the next; nothing needs the
network.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .aux_llm import LLMAnswerCache, LLMEndpoint, ask_llm

DESCRIPTIONS_PATH = Path(__file__).resolve().parent / "data" / "clinical_descriptions.json"
TEMPLATE_MAX_WORDS = 6  # longer prompts already describe their target: they are their own aux text

_SIDES = ("left", "right")
_FILLER = frozenset(
    "a an the of in on this that image slice ct scan segment segmentation mask please show find outline delineate".split()
)
_SPELLING = {
    "tumour": "tumor",
    "tumours": "tumors",
    "oesophagus": "esophagus",
    "oesophageal": "esophageal",
    "haemorrhage": "hemorrhage",
    "haematoma": "hematoma",
    "oedema": "edema",
    "vertebra": "vertebrae",
    "caecum": "cecum",
}
_LESION_WORDS = frozenset(
    "tumor tumors lesion lesions nodule nodules mass masses cyst cysts metastasis metastases cancer carcinoma "
    "lymphoma abscess hemorrhage hematoma fracture stone stones opacity infection effusion thrombus".split()
)


# words after which a prompt names what to leave out (as ``prompts`` splits them): not the target
_EXCLUSION = re.compile(r"\b(?:excluding|without|but not|except|minus|sparing|other than|not including|apart from|not)\b")


@dataclass(frozen=True)
class ClinicalDescription:
    """One curated entry; ``source`` says where the wording came from (licence trail)."""

    key: str
    text: str
    source: str
    category: str = ""
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class AuxPrompt:
    """The auxiliary text chosen for a prompt and which step supplied it."""

    text: str
    source: str  # "user" | "llm" | "curated" | "template" | "primary"
    detail: str = ""  # e.g. the curated key and its provenance, or the LLM model


def normalise_target(text: str) -> str:
    """Lower case, words only, American spelling, filler words dropped, side words moved last.

    So "Segment the LEFT kidney", "kidney_left" and "left kidney" all become "kidney left",
    the form of the curated keys. Deliberately gentler than ``prompts.canonical_target_name``,
    which folds synonyms ("lesion", "mass", "cancer" → tumor; "renal" → kidney) to find a label:
    the description table keeps those clinical distinctions apart.
    """
    words = re.sub(r"[^a-z0-9]+", " ", text.lower().replace("_", " ")).split()
    words = [_SPELLING.get(w, w) for w in words if w not in _FILLER]
    sides = [w for w in words if w in _SIDES]
    return " ".join([w for w in words if w not in _SIDES] + sides)


@functools.lru_cache(maxsize=4)
def load_clinical_descriptions(path: Optional[str] = None) -> dict[str, ClinicalDescription]:
    """The curated table, keyed by normalised name (read once)."""
    with open(path or DESCRIPTIONS_PATH, encoding="utf-8") as handle:
        raw = json.load(handle)["descriptions"]
    return {
        normalise_target(key): ClinicalDescription(
            key=normalise_target(key),
            text=entry["text"],
            source=entry["source"],
            category=entry.get("category", ""),
            aliases=tuple(entry.get("aliases", ())),
        )
        for key, entry in raw.items()
    }


@functools.lru_cache(maxsize=4)
def _phrase_index(path: Optional[str] = None) -> dict[str, ClinicalDescription]:
    index: dict[str, ClinicalDescription] = {}
    for entry in load_clinical_descriptions(path).values():
        for phrase in (entry.key, *map(normalise_target, entry.aliases)):
            index.setdefault(phrase, entry)
    return index


def find_description(
    prompt: str, *, path: Optional[str] = None, kept_only: bool = True
) -> Optional[ClinicalDescription]:
    """The curated entry for a prompt: an exact (normalised) name or alias, else the longest one
    contained in the prompt as whole words ("segment the liver tumour here" → "liver tumor").

    ``kept_only`` looks only before an exclusion word, so "lungs excluding the nodule" is described
    as the lungs, not the nodule. ``False`` searches the whole prompt, as the shipped tgcnet-tiny
    weights were trained (``TGCNetConfig.aux_kept_only``, ``docs/design.md``).
    """
    target = normalise_target(prompt)
    if not target:
        return None
    index = _phrase_index(path)
    if target in index:
        return index[target]
    searched = _EXCLUSION.split(prompt.lower(), maxsplit=1)[0] if kept_only else prompt
    padded = f" {normalise_target(searched)} "
    found = [phrase for phrase in index if f" {phrase} " in padded]
    if not found:
        return None
    return index[max(found, key=lambda phrase: (len(phrase.split()), len(phrase)))]


def template_description(prompt: str) -> Optional[str]:
    """A generic description for a short target name; ``None`` for long free text."""
    target = normalise_target(prompt)
    words = target.split()
    if not words or len(words) > TEMPLATE_MAX_WORDS:
        return None
    sides = [w for w in words if w in _SIDES]
    name = " ".join(w for w in words if w not in _SIDES)
    where = f" on the {sides[0]} side of the body" if sides else ""
    if _LESION_WORDS.intersection(words):
        return (
            f"{name.capitalize()}: a focal abnormality{where} on CT, a region whose density or enhancement "
            "differs from the surrounding tissue, usually rounded, with a sharp or irregular margin."
        )
    return (
        f"{name.capitalize()}: an anatomical structure{where} on CT, a connected region of fairly uniform "
        "density with a smooth boundary against the neighbouring tissues."
    )


def resolve_aux_prompt(
    prompt: str,
    *,
    user_text: Optional[str] = None,
    use_llm: bool = True,
    llm: Optional[LLMEndpoint] = None,
    cache: Optional[LLMAnswerCache] = None,
    kept_only: bool = True,
) -> AuxPrompt:
    """Pick the auxiliary text for ``prompt``: user → LLM (if configured) → curated → template → prompt.

    ``llm=None`` reads the endpoint from the environment; ``use_llm=False`` never asks one.
    ``kept_only`` as in ``find_description``.
    """
    if user_text and user_text.strip():
        return AuxPrompt(user_text.strip(), "user")
    endpoint = (llm or LLMEndpoint.from_environment()) if use_llm else None
    if endpoint is not None:
        answer = ask_llm(prompt, endpoint=endpoint, cache=cache)
        if answer:
            return AuxPrompt(answer, "llm", endpoint.model or "")
    entry = find_description(prompt, kept_only=kept_only)
    if entry is not None:
        return AuxPrompt(entry.text, "curated", f"{entry.key} ({entry.source})")
    template = template_description(prompt)
    if template is not None:
        return AuxPrompt(template, "template")
    return AuxPrompt(prompt.strip(), "primary")


def resolve_aux_prompts(
    prompts: Sequence[str],
    user_texts: Optional[Sequence[Optional[str]]] = None,
    **options: object,
) -> list[AuxPrompt]:
    """``resolve_aux_prompt`` for each prompt; ``user_texts`` pairs with ``prompts`` (``None`` = look it up)."""
    if user_texts is not None and len(user_texts) != len(prompts):
        from .errors import InputError

        raise InputError(f"got {len(user_texts)} auxiliary texts for {len(prompts)} prompts; give one per prompt or none")
    user_texts = user_texts if user_texts is not None else [None] * len(prompts)
    return [resolve_aux_prompt(p, user_text=u, **options) for p, u in zip(prompts, user_texts)]  # type: ignore[arg-type]
