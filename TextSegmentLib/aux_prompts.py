"""Auxiliary knowledge prompts for TGC-Net's DATE text branch, without needing an LLM.

The paper enriches each prompt with an LLM-written description. We get the same kind of text from,
in order: the user (a second text field) → an LLM endpoint *only if the user configured one* →
the curated table ``data/clinical_descriptions.json`` → a template for short target names → the
primary prompt itself. Every step can fail and hand over to the next; nothing needs the network.

The LLM hook speaks the OpenAI-compatible chat API with stdlib ``urllib``. It is enabled by
setting ``TEXTSEGMENT_LLM_URL`` (``TEXTSEGMENT_LLM_KEY``, ``TEXTSEGMENT_LLM_MODEL`` and
``TEXTSEGMENT_LLM_TIMEOUT`` are optional); only the prompt text is sent, never an image. Answers
are cached as JSON under ``$TEXTSEGMENT_HOME`` (default ``~/.cache/textsegment``), so each target
is asked once and results stay reproducible.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)

DESCRIPTIONS_PATH = Path(__file__).resolve().parent / "data" / "clinical_descriptions.json"
CACHE_FILE_NAME = "aux_prompts_llm_cache.json"
TEMPLATE_MAX_WORDS = 6  # longer prompts already describe their target: they are their own aux text
LLM_MAX_CHARS = 600

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


@dataclass(frozen=True)
class LLMEndpoint:
    """An OpenAI-compatible chat endpoint the user configured; ``key`` is never logged."""

    url: str
    model: Optional[str] = None
    key: Optional[str] = field(default=None, repr=False)
    timeout_s: float = 10.0

    @classmethod
    def from_environment(cls, environ: Optional[Mapping[str, str]] = None) -> Optional["LLMEndpoint"]:
        """The endpoint named by ``TEXTSEGMENT_LLM_*``, or ``None`` (the default: no LLM)."""
        env = os.environ if environ is None else environ
        url = env.get("TEXTSEGMENT_LLM_URL", "").strip()
        if not url:
            return None
        try:
            timeout = float(env.get("TEXTSEGMENT_LLM_TIMEOUT", "10"))
        except ValueError:
            timeout = 10.0
        return cls(
            url=url,
            model=env.get("TEXTSEGMENT_LLM_MODEL") or None,
            key=env.get("TEXTSEGMENT_LLM_KEY") or None,
            timeout_s=timeout,
        )

    @property
    def chat_url(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"


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


def textsegment_home() -> Path:
    return Path(os.environ.get("TEXTSEGMENT_HOME") or Path.home() / ".cache" / "textsegment")


class LLMAnswerCache:
    """Answers of the LLM hook, one JSON file, keyed by model and normalised target."""

    _lock = threading.Lock()

    def __init__(self, path: Optional[Path] = None) -> None:
        self.path = Path(path) if path is not None else textsegment_home() / CACHE_FILE_NAME

    @staticmethod
    def key(endpoint: LLMEndpoint, target: str) -> str:
        return f"{endpoint.model or ''}|{normalise_target(target)}"

    def read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable LLM answer cache %s: %s", self.path, exc)
            return {}

    def get(self, key: str) -> Optional[str]:
        return self.read().get(key)

    def put(self, key: str, text: str) -> None:
        with self._lock:
            data = self.read()
            data[key] = text
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                scratch = self.path.with_suffix(".tmp")
                scratch.write_text(json.dumps(data, indent=1, sort_keys=True), encoding="utf-8")
                os.replace(scratch, self.path)
            except OSError as exc:
                log.warning("could not write the LLM answer cache %s: %s", self.path, exc)


_SYSTEM_MESSAGE = (
    "You describe an anatomical structure or lesion for a CT segmentation model in one or two short "
    "sentences: where it lies, its shape, and its typical CT appearance with Hounsfield units. "
    "No advice, no lists, no preamble."
)


def ask_llm(prompt: str, *, endpoint: LLMEndpoint, cache: Optional[LLMAnswerCache] = None) -> Optional[str]:
    """The endpoint's description of ``prompt`` (cached), or ``None`` on any failure (logged)."""
    cache = cache or LLMAnswerCache()
    key = cache.key(endpoint, prompt)
    cached = cache.get(key)
    if cached:
        return cached
    if not endpoint.chat_url.startswith(("http://", "https://")):
        log.warning("TEXTSEGMENT_LLM_URL must be an http(s) URL, got %r; not asking the LLM", endpoint.url)
        return None
    body: dict[str, object] = {
        "messages": [
            {"role": "system", "content": _SYSTEM_MESSAGE},
            {"role": "user", "content": f"Describe: {prompt.strip()}"},
        ],
        "temperature": 0,
        "max_tokens": 120,
    }
    if endpoint.model:
        body["model"] = endpoint.model
    headers = {"Content-Type": "application/json"}
    if endpoint.key:
        headers["Authorization"] = f"Bearer {endpoint.key}"
    request = urllib.request.Request(endpoint.chat_url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=endpoint.timeout_s) as response:
            answer = json.loads(response.read().decode("utf-8"))
        text = answer["choices"][0]["message"]["content"]
        text = " ".join(str(text).split())[:LLM_MAX_CHARS]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        hint = "" if endpoint.model else " (set TEXTSEGMENT_LLM_MODEL if the server needs a model name)"
        log.warning("LLM endpoint %s failed for %r: %s%s; using the next source", endpoint.chat_url, prompt, exc, hint)
        return None
    if not text:
        log.warning("LLM endpoint %s gave an empty answer for %r; using the next source", endpoint.chat_url, prompt)
        return None
    cache.put(key, text)
    return text


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
