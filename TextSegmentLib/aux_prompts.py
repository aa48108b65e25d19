"""Auxiliary knowledge prompts for TGC-Net's DATE text branch, without needing an LLM.

The paper enriches each prompt with an LLM-written description. We get the same kind of text from,
in order: the user (a second text field) → an LLM endpoint *only if the user configured one* →
the curated table ``data/clinical_descriptions.json`` → a template for short target names → the
primary prompt itself. Every step can fail and hand over to the next; nothing needs the network.

The LLM hook speaks the OpenAI-compatible chat API with stdlib ``urllib``. It is enabled by
setting ``TEXTSEGMENT_LLM_URL`` (``TEXTSEGMENT_LLM_KEY``, ``TEXTSEGMENT_LLM_MODEL`` and
``TEXTSEGMENT_LLM_TIMEOUT`` are optional); only the prompt text is sent, never an image. Answers
are cached as JSON under ``$TEXTSEGMENT_HOME`` (default ``~/.cache/textsegment``), keyed by model,
endpoint and target, so each target is asked once and results stay reproducible. Offline mode
(``TEXTSEGMENT_OFFLINE`` / ``HF_HUB_OFFLINE``) reads only that cache; redirects are not followed (they
would carry the key elsewhere); answers that are not plain text, or exceed 1 MiB, are refused.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)

DESCRIPTIONS_PATH = Path(__file__).resolve().parent / "data" / "clinical_descriptions.json"
CACHE_FILE_NAME = "aux_prompts_llm_cache.json"
TEMPLATE_MAX_WORDS = 6  # longer prompts already describe their target: they are their own aux text
LLM_MAX_CHARS = 600
LLM_MAX_RESPONSE_BYTES = 1 << 20  # a chat answer of ~120 tokens is a few kB; more is not an answer
LLM_DEFAULT_TIMEOUT_S = 10.0
LLM_MAX_TIMEOUT_S = 3600.0
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})

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
            timeout = LLM_DEFAULT_TIMEOUT_S
        return cls(
            url=url,
            model=env.get("TEXTSEGMENT_LLM_MODEL") or None,
            key=(env.get("TEXTSEGMENT_LLM_KEY") or "").strip() or None,  # a stray newline would land in a header error
            timeout_s=timeout,
        )

    @property
    def chat_url(self) -> str:
        """``url`` with ``/chat/completions`` added to its path (a query such as Azure's ``?api-version=`` stays last)."""
        try:
            parts = urllib.parse.urlsplit(self.url)
        except ValueError:
            parts = None
        if parts is None or not parts.scheme:
            url = self.url.rstrip("/")
            return url if url.endswith("/chat/completions") else url + "/chat/completions"
        path = parts.path.rstrip("/")
        path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        return urllib.parse.urlunsplit(parts._replace(path=path))


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
        """Model, endpoint (without credentials or query) and target: two servers never share answers."""
        return f"{endpoint.model or ''}|{_public_url(endpoint.chat_url)}|{_cache_target(target)}"

    def read(self) -> dict[str, str]:
        try:
            with open(self.path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, RecursionError) as exc:
            log.warning("ignoring unreadable LLM answer cache %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("ignoring LLM answer cache %s: not a JSON object", self.path)
            return {}
        kept = {k: v for k, v in data.items() if isinstance(v, str)}
        if len(kept) != len(data):
            log.warning("ignoring %d non-text entries in LLM answer cache %s", len(data) - len(kept), self.path)
        return kept

    def get(self, key: str) -> Optional[str]:
        return self.read().get(key)

    def put(self, key: str, text: str) -> None:
        with self._lock:
            data = self.read()
            data[key] = text
            scratch: Optional[str] = None
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # a scratch file of our own: another process writing the cache never shares (or moves) it
                handle, scratch = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
                with os.fdopen(handle, "w", encoding="utf-8") as out:
                    out.write(json.dumps(data, indent=1, sort_keys=True))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(scratch, self.path)
                scratch = None
            except OSError as exc:
                log.warning("could not write the LLM answer cache %s: %s", self.path, exc)
            finally:
                if scratch is not None:
                    try:
                        os.unlink(scratch)
                    except OSError:
                        pass


def _cache_target(prompt: str) -> str:
    """``normalise_target`` for the cache key, but keeping non-ASCII letters (identical for ASCII prompts):
    "肝脏" and "脾脏" must not share one answer. Falls back to the whitespace-folded prompt."""
    words = re.sub(r"[\W_]+", " ", prompt.lower()).split()
    words = [_SPELLING.get(w, w) for w in words if w not in _FILLER]
    sides = [w for w in words if w in _SIDES]
    target = " ".join([w for w in words if w not in _SIDES] + sides)
    return target or " ".join(prompt.lower().split())


def _public_url(url: str) -> str:
    """``url`` without user info, query or fragment (where credentials hide), for logs and cache keys."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return "<unparseable URL>"
    return f"{parts.scheme.lower()}://{host}{port}{parts.path}"


def _redact(text: str, endpoint: LLMEndpoint) -> str:
    """``text`` with the API key (also as ``repr`` shows it) and the raw URL replaced."""
    if endpoint.url:
        text = text.replace(endpoint.chat_url, _public_url(endpoint.chat_url))
        text = text.replace(endpoint.url, _public_url(endpoint.url))
    if endpoint.key:
        for form in {endpoint.key, repr(endpoint.key)[1:-1]}:
            if form:
                text = text.replace(form, "***")
    return text


def _clean_answer(text: object) -> Optional[str]:
    """A model's answer as one line of printable text within ``LLM_MAX_CHARS``; ``None`` unless it is text."""
    if not isinstance(text, str):
        return None
    chars = []
    for char in text:
        category = unicodedata.category(char)
        if category == "Cc":
            chars.append(" ")  # newlines, tabs, escape sequences' ESC, NUL
        elif not category.startswith("C"):  # drop bidi overrides, zero-width and lone surrogates
            chars.append(char)
    return " ".join("".join(chars).split())[:LLM_MAX_CHARS] or None


def _timeout(endpoint: LLMEndpoint) -> float:
    value = endpoint.timeout_s
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        log.warning("TEXTSEGMENT_LLM_TIMEOUT must be a positive number of seconds, got %r; using %g",
                    value, LLM_DEFAULT_TIMEOUT_S)
        return LLM_DEFAULT_TIMEOUT_S
    return min(float(value), LLM_MAX_TIMEOUT_S)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would resend the Authorization header to wherever ``Location`` points: refuse it."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib API)
        raise urllib.error.HTTPError(req.full_url, code, f"{msg}; redirects are not followed", headers, fp)


def _read_capped(response, deadline: float) -> bytes:  # noqa: ANN001 (an http.client.HTTPResponse)
    """The body, at most ``LLM_MAX_RESPONSE_BYTES``, read by ``deadline`` (a slow drip is no answer)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError("the answer did not arrive within the timeout")
        chunk = response.read1(65536)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > LLM_MAX_RESPONSE_BYTES:
            raise ValueError(f"the answer is larger than {LLM_MAX_RESPONSE_BYTES} bytes")
        chunks.append(chunk)


_SYSTEM_MESSAGE = (
    "You describe an anatomical structure or lesion for a CT segmentation model in one or two short "
    "sentences: where it lies, its shape, and its typical CT appearance with Hounsfield units. "
    "No advice, no lists, no preamble."
)


def ask_llm(prompt: str, *, endpoint: LLMEndpoint, cache: Optional[LLMAnswerCache] = None) -> Optional[str]:
    """The endpoint's description of ``prompt`` (cached), or ``None`` on any failure (logged)."""
    cache = cache or LLMAnswerCache()
    key = cache.key(endpoint, prompt)
    cached = _clean_answer(cache.get(key))
    if cached:
        return cached
    from .weights import offline_reason

    offline = offline_reason()
    if offline:
        log.warning("offline mode is on (%s); not asking the LLM endpoint %s", offline, _public_url(endpoint.chat_url))
        return None
    try:
        parts = urllib.parse.urlsplit(endpoint.chat_url)
        scheme, host, userinfo = parts.scheme.lower(), (parts.hostname or "").lower(), "@" in parts.netloc
    except ValueError:
        scheme = host = ""
        userinfo = False
    if scheme not in ("http", "https"):
        log.warning("TEXTSEGMENT_LLM_URL must be an http(s) URL, got %r; not asking the LLM", _public_url(endpoint.url))
        return None
    if userinfo:  # urllib would take "user:secret" for a host name and echo it in its error
        log.warning("TEXTSEGMENT_LLM_URL %s holds credentials (user:password@, not shown); put the key in "
                    "TEXTSEGMENT_LLM_KEY instead; not asking the LLM", _public_url(endpoint.url))
        return None
    if endpoint.key and any(ord(c) < 0x21 or ord(c) > 0x7E for c in endpoint.key):
        log.warning("TEXTSEGMENT_LLM_KEY holds spaces, control or non-ASCII characters (not shown); not asking the LLM")
        return None
    if endpoint.key and scheme == "http" and host not in _LOOPBACK_HOSTS and not host.startswith("127."):
        log.warning("TEXTSEGMENT_LLM_URL %s is plain http: the API key (TEXTSEGMENT_LLM_KEY) crosses the "
                    "network unencrypted; use https", _public_url(endpoint.chat_url))
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
    timeout = _timeout(endpoint)
    try:
        with urllib.request.build_opener(_NoRedirect).open(request, timeout=timeout) as response:
            raw = _read_capped(response, time.monotonic() + timeout)
        answer = json.loads(raw)  # bytes: UTF-8 (with or without BOM), UTF-16 or UTF-32, as RFC 8259 allows
        text = _clean_answer(answer["choices"][0]["message"]["content"])
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError, OverflowError,
            RecursionError) as exc:
        hint = "" if endpoint.model else " (set TEXTSEGMENT_LLM_MODEL if the server needs a model name)"
        log.warning("LLM endpoint %s failed for %r: %s%s; using the next source", _public_url(endpoint.chat_url),
                    prompt, _redact(str(exc), endpoint), hint)
        return None
    if not text:
        log.warning("LLM endpoint %s gave no text answer for %r; using the next source",
                    _public_url(endpoint.chat_url), prompt)
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
