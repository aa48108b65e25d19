"""The optional LLM source of TGC-Net's auxiliary descriptions: an OpenAI-compatible chat endpoint.

Enabled only by setting ``TEXTSEGMENT_LLM_URL`` (``TEXTSEGMENT_LLM_KEY``, ``TEXTSEGMENT_LLM_MODEL``
and ``TEXTSEGMENT_LLM_TIMEOUT`` are optional); spoken with stdlib ``urllib``; only the prompt text
is sent, never an image. Answers are cached as JSON under ``$TEXTSEGMENT_HOME``, keyed by model,
endpoint and target, so each target is asked once and results stay reproducible. Offline mode
(``TEXTSEGMENT_OFFLINE`` / ``HF_HUB_OFFLINE``) reads only that cache; redirects are not followed
(they would carry the key elsewhere); answers that are not plain text, or exceed 1 MiB, are refused.
``aux_prompts`` decides when to ask.
"""

from __future__ import annotations

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
from typing import Mapping, Optional

log = logging.getLogger(__name__)

CACHE_FILE_NAME = "aux_prompts_llm_cache.json"
LLM_MAX_CHARS = 600
LLM_MAX_RESPONSE_BYTES = 1 << 20  # a chat answer of ~120 tokens is a few kB; more is not an answer
LLM_DEFAULT_TIMEOUT_S = 10.0
LLM_MAX_TIMEOUT_S = 3600.0
_LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


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


class LLMAnswerCache:
    """Answers of the LLM hook, one JSON file, keyed by model, endpoint and normalised target."""

    _lock = threading.Lock()

    def __init__(self, path: Optional[Path] = None) -> None:
        if path is None:
            from .weights_manifest import textsegment_home  # the weights' cache folder: one home for everything cached

            path = textsegment_home() / CACHE_FILE_NAME
        self.path = Path(path)

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
    from .aux_prompts import _FILLER, _SIDES, _SPELLING  # the curated lookup's word tables

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
    from .weights_manifest import offline_reason

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
